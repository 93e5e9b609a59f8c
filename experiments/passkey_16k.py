"""Passkey retrieval at 16,384 tokens through 8x memory (issue 24): passkey_4k.py continued.

The export of experiments/passkey_4k.py (a CCF model that already finds keys at any depth of
4,096-token windows) trains on to windows of T=128 segments = 16,384 tokens, growing from 32
segments; the rest is passkey_4k.py's recipe. The reservoir keeps the step's memory at the 4k
run's level although the window is four times longer.
    launch/recipes/passkey_long.sh                                      # runs/passkey_4k first
    launch/recipes/passkey_long.sh --config=experiments/passkey_16k.py
"""

from experiments import passkey_4k


def get_config():
  c = passkey_4k.get_config()
  c.name = 'passkey_16k'
  c.init.params_only = 'runs/passkey_4k/export'  # The 4k model (a CCF export, taken whole).
  c.ccf.num_segments = 128  # T=128 segments of 128 tokens: 16,384 tokens.
  c.model.max_position = 16384  # Full attention over the same window (a baseline) fits too.
  c.data.batch_size = 2  # Windows of 16,384 tokens per step.
  c.data.passkey_min_segments = 32  # Curriculum: from the 4k window ...
  c.data.passkey_curriculum_steps = 150  # ... to T.
  c.train.steps = 1600  # About 80 minutes here (1.1-4.7 s a step).
  c.train.lr = 5e-4  # Continued training.
  c.train.warmup_steps = 20
  c.train.eval_every = 100
  c.checkpoint.every = 100
  return c
