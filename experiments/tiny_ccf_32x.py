"""tiny_ccf.py at 32x compression: c=4 memory tokens per 128-token segment, all else equal."""

from experiments import tiny_ccf


def get_config():
  c = tiny_ccf.get_config()
  c.name = 'tiny_ccf_32x'
  c.ccf.num_memory = 4  # 32x.
  return c
