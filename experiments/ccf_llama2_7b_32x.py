"""ccf_llama2_7b_8x.py at 32x: c=32 memory tokens per 1,024-token segment.

Llama-2's 4,096 positions now hold 96 segments of memory (96 * 32 rows) plus one raw segment, so
`memory_window=96` (the paper's cap at 32x: 99,328 tokens); everything else is the 8x config.
"""

from experiments import ccf_llama2_7b_8x


def get_config():
  c = ccf_llama2_7b_8x.get_config()
  c.name = 'ccf_llama2_7b_32x'
  c.ccf.num_memory = 32  # 32x.
  c.ccf.memory_window = 96  # (4096 - 1024) / 32.
  return c
