"""The segment_local baseline of tiny_ccf.py: the same base, decoder, data and steps, each segment
alone.

Every segment of a window is decoded with no memory and no view of earlier segments (the CCF
decoder with memory off), so the gap between this model and tiny_ccf.py is what the compressed
memory buys at equal training. Used by ./launch/local_suite.sh.
"""

from experiments import tiny_ccf


def get_config():
  c = tiny_ccf.get_config()
  c.name = 'tiny_segment_local'
  c.model.arch = 'segment_local'
  c.ccf.ae_mode = 'off'  # No memory to reconstruct from.
  return c
