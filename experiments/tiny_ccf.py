"""Tiny CCF model at 8x compression on the built-in corpus: the CPU default for the CCF model.

The model fields are tiny.py's (so a tiny.py export can serve as the base of tiny_ccf_adapter.py):
d=128, 4 layers, vocab 2048, about 1.3M parameters. Windows of T=8 segments of l=128 tokens
(1,024 tokens), c=16 memory tokens per segment (ratio 8), encoder and decoder sharing weights and
trained from scratch, distinct memory tokens (the prototype notes in issue 4: one repeated vector
left the memory weaker), and the auto-encoding loss on one segment per window as an extra signal.
"""

from experiments import tiny


def get_config():
  c = tiny.get_config()
  c.name = 'tiny_ccf'
  c.model.arch = 'ccf'
  c.data.mode = 'windows'
  c.data.batch_size = 2  # Windows per step: more, smaller steps learn faster in a CPU budget
  # (2,048 tokens a step, like tiny.py; ./launch/local.sh --devices=8 raises it to 8).
  c.ccf.segment_len = 128
  c.ccf.num_segments = 8
  c.ccf.num_memory = 16  # 8x.
  c.ccf.mode = 'pretrain'
  c.ccf.shared_weights = True
  c.ccf.lora_rank = 8
  c.ccf.lora_alpha = 32.0
  c.ccf.distinct_memory_tokens = True
  c.ccf.memory_init_token = 3  # eos of the tokenizers ccf_jax trains (pad 0, unk 1, bos 2, eos 3).
  c.ccf.ae_mode = 'extra'
  c.ccf.ae_weight = 0.25
  c.train.steps = 540  # About 0.65 s per step of 2 windows (2,048 tokens) on a 2-core CPU ...
  c.train.time_budget_s = 360.0  # ... so about 6 minutes; the schedule decays within the budget.
  c.train.lr = 3e-3
  c.train.warmup_steps = 20
  c.checkpoint.every = 100
  return c
