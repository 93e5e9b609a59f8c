"""Tiny plain decoder on the built-in Shakespeare corpus: the CPU default of ./launch/local.sh."""

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
  c.data.seq_len = 256
  c.data.batch_size = 8
  c.train.steps = 800  # About what fits the time budget on 2 cores (cosine reaches its end).
  c.train.time_budget_s = 360.0  # About 6 minutes on a 2-core CPU.
  c.train.lr = 3e-3
  c.train.warmup_steps = 100
  c.checkpoint.every = 500
  return c
