"""Passkey retrieval at 512 tokens, keys at any depth: the first stage of the long-context recipe.

passkey_4k.py's task and model (tiny_ccf.py's: d=128, 4 layers, l=128, c=16: 8x), from the same
base (the export of a trained tiny.py), on windows of T=4 segments = 512 tokens. Retrieval is
learnt here, where a step costs an eighth of a 4,096-token step: encoding is most of a step and
every window is encoded whole (the padded segments of a curriculum cost as much as real ones), so
a curriculum inside the 4k run pays 4k prices for short windows. passkey_4k.py starts from this
stage's export. Measured figures (trainer's teacher-forced per-digit accuracy against steps):
README "Long context".
    ./launch/recipes/passkey_long.sh --config=experiments/passkey_512.py
"""

from experiments import passkey_4k


def get_config():
  c = passkey_4k.get_config()
  c.name = 'passkey_512'
  c.init.params_only = 'runs/local/tiny/export'  # The pretrained base LM (launch/_base.sh).
  c.ccf.num_segments = 4  # T=4 segments of 128 tokens: 512 tokens.
  c.data.batch_size = 8  # Windows of 512 tokens per step.
  c.data.passkey_min_segments = 0  # No curriculum: every window is T segments.
  c.data.passkey_curriculum_steps = 0
  c.train.steps = 3000  # About 0.7 s a step on 2 idle cores ...
  c.train.time_budget_s = 2400.0  # ... capped at 40 minutes.
  c.train.eval_every = 250
  c.checkpoint.every = 250
  return c
