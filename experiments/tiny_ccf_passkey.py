"""Passkey retrieval training for a tiny CCF model (issue 4's second learning-signal bar).

tiny_ccf.py's model (d=128, 4 layers, vocab 2048, distinct memory tokens) on synthetic passkey
windows (`data.task='passkey'`, ccf_jax/tasks/passkey.py): a 5-digit key stated inside segment 0
of filler, asked for at the end of the last segment, only the answer digits scored. The key can
reach the answer only through memory, so segment_local on the same windows stays at chance (10% per
digit). Shorter segments than tiny_ccf (l=64, c=8: still 8x) make a T=8 window 512 tokens, so
more steps fit the 30-minute CPU budget; a curriculum grows windows from 2 to 8 segments over the
first 600 steps. Auto-encoding targets the key (`data.passkey_ae_key`): segment 0 is reconstructed
from its own memory with the key's first-statement digits as the only targets, a dense signal that
teaches the encoder to store what the answer needs. `python -m ccf_jax.bench passkey
--config=experiments/tiny_ccf_passkey.py` trains it and segment_local and prints per-digit accuracy
at T=8. Measured (stop 13, 1,500 steps, about 31 minutes of 2 cores): 0.2375 per digit with memory,
0.100 with memory off (chance), no exact match; without the key's auto-encoding (stop 11) 0.191.
Stop 16: with 2,600 steps its training loss was still at chance (2.30) at step 860, where the
same model started from a pretrained tiny.py had reached 0.17 (tiny_ccf_passkey_finetune.py: 1.000
per digit at T=8 within 30 minutes, base included).
"""

from experiments import tiny_ccf


def get_config():
  c = tiny_ccf.get_config()
  c.name = 'tiny_ccf_passkey'
  c.data.task = 'passkey'
  c.data.batch_size = 8  # 8 windows x 512 tokens: about 1.24 s a step on 2 cores.
  c.data.passkey_min_segments = 2
  c.data.passkey_curriculum_steps = 600
  c.ccf.segment_len = 64
  c.ccf.num_memory = 8  # 8x.
  c.ccf.num_segments = 8
  c.ccf.ae_mode = 'extra'  # Auto-encode segment 0 ...
  c.ccf.ae_weight = 1.0  # ... its 5 key digits weighing as much as the 5 answer digits ...
  c.data.passkey_ae_key = True  # ... and nothing else of it (the filler is predictable).
  c.train.steps = 1500  # About 31 minutes at 1.24 s a step ...
  c.train.time_budget_s = 1800.0  # ... and the 30-minute CPU budget stops it regardless.
  c.train.lr = 2e-3
  c.train.warmup_steps = 50
  c.train.eval_batches = 8
  c.checkpoint.every = 200
  return c
