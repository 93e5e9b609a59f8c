"""The full_attention baseline of tiny_ccf.py: tiny_segment_local.py's base, decoder, data and
steps, with raw attention over the whole 1,024-token window (T=8 segments of 128).

It sees every earlier token uncompressed, so it bounds from above what CCF's memory can recover at
this context, at quadratic cost (see `python -m ccf_jax.bench efficiency`). Its trained positional
range is the window; evaluation reports n/a beyond it. Used by ./launch/local_suite.sh.
"""

from experiments import tiny_segment_local


def get_config():
  c = tiny_segment_local.get_config()
  c.name = 'tiny_full_attention'
  c.model.arch = 'full_attention'
  return c
