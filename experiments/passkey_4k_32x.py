"""passkey_4k.py at 32x: c=4 memory rows per 128-token segment (issue 24's 32x row)."""

from experiments import passkey_4k


def get_config():
  c = passkey_4k.get_config()
  c.name = 'passkey_4k_32x'
  c.ccf.num_memory = 4  # 32x.
  return c
