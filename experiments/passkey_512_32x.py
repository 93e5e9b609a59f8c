"""passkey_512.py at 32x: c=4 memory rows per 128-token segment, the first stage of
passkey_4k_32x.py (a stage's export carries its memory tokens, so each ratio has its own)."""

from experiments import passkey_512


def get_config():
  c = passkey_512.get_config()
  c.name = 'passkey_512_32x'
  c.ccf.num_memory = 4  # 32x.
  return c
