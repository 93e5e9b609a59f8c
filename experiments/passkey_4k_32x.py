"""passkey_4k.py at 32x: c=4 memory rows per 128-token segment (issue 24's 32x row), started from
passkey_512_32x.py's export (the 8x stage's memory tokens do not fit a 32x model)."""

from experiments import passkey_4k


def get_config():
  c = passkey_4k.get_config()
  c.name = 'passkey_4k_32x'
  c.init.params_only = 'runs/passkey_512_32x/export'  # The 32x first stage (launch/_base.sh).
  c.ccf.num_memory = 4  # 32x.
  return c
