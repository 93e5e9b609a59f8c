"""Passkey retrieval training for a tiny CCF model (issue 4's second learning-signal bar).

tiny_ccf.py's model (d=128, 4 layers, vocab 2048, distinct memory tokens), started like it from
the export of a trained tiny.py (`init.params_only`), on synthetic passkey windows
(`data.task='passkey'`, ccf_jax/tasks/passkey.py): a 5-digit key stated inside segment 0 of filler,
asked for at the end of the last segment, only the answer digits scored. The key can reach the
answer only through memory, so segment_local on the same windows stays at chance (10% per digit).
Shorter segments than tiny_ccf (l=64, c=8: still 8x) make a T=8 window 512 tokens; a curriculum
grows windows from 2 to 8 segments over the first 600 steps. Auto-encoding targets the key
(`data.passkey_ae_key`): segment 0 is reconstructed from its own memory with the key's
first-statement digits as the only targets, a dense signal that teaches the encoder to store what
the answer needs.
    ./launch/local.sh --config=experiments/tiny.py    # the base: runs/local/tiny/export
    python -m ccf_jax.bench passkey --config=experiments/tiny_ccf_passkey.py
Measured figures (accuracy with memory on/off, segment_local, from scratch): WORKSPACE.md.
"""

from experiments import tiny_ccf


def get_config():
  c = tiny_ccf.get_config()
  c.name = 'tiny_ccf_passkey'
  c.data.task = 'passkey'
  c.data.batch_size = 8  # 8 windows x 512 tokens: about 0.6 s a step on 2 cores.
  c.data.passkey_min_segments = 2
  c.data.passkey_curriculum_steps = 600
  c.ccf.segment_len = 64
  c.ccf.num_memory = 8  # 8x.
  c.ccf.num_segments = 8
  c.ccf.ae_mode = 'extra'  # Auto-encode segment 0 ...
  c.ccf.ae_weight = 1.0  # ... its 5 key digits weighing as much as the 5 answer digits ...
  c.data.passkey_ae_key = True  # ... and nothing else of it (the filler is predictable).
  c.train.steps = 2000  # About 0.6 s a step on 2 cores: 20 minutes ...
  c.train.time_budget_s = 1380.0  # ... capped so that the 7-minute base and this fit 30 minutes.
  c.train.lr = 1e-3  # Fine-tuning, as tiny_ccf.py.
  c.train.warmup_steps = 50
  c.train.eval_batches = 8
  c.checkpoint.every = 200
  return c
