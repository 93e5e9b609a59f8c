"""Shared helpers of the CCF tests: one tiny config builder and a fast-compiling jit.

Compile time dominates at these sizes, so the tests jit with XLA's cheapest backend settings.
"""

import functools

import jax

from experiments import tiny_ccf

B, L_SEG, C = 2, 8, 2  # Windows per batch, segment length l, memory tokens c.
FAST = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
jit = functools.partial(jax.jit, compiler_options=FAST)


def set_fields(c, section: str, **fields):
  """Sets `c.<section>.<name> = value` for every keyword; returns `c` (the tests' shape builder)."""
  for k, v in fields.items():
    c[section][k] = v
  return c


def override(c, **over):
  """Sets `c.<section>.<name> = value` for every `section__name=value`; returns `c`."""
  for k, v in over.items():
    sect, key = k.split('__')
    c[sect][key] = v
  return c


def tiny_ccf_from_scratch():
  """experiments/tiny_ccf.py without its start: tiny_ccf fine-tunes the tiny.py export, while the
  tests shrink the model and train it from scratch."""
  c = tiny_ccf.get_config()
  c.init.params_only = ''
  return c


def small_cfg(num_segments: int, **ccf):
  """tiny_ccf shrunk to d=32, 2 layers, l=8, c=2, T=num_segments; `ccf` overrides ccf.* fields."""
  c = tiny_ccf_from_scratch()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers = 61, 32, 2
  m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 4, 2, 8, 48
  c.ccf.segment_len, c.ccf.num_segments, c.ccf.num_memory = L_SEG, num_segments, C
  c.ccf.lora_rank, c.ccf.lora_alpha = 4, 8.0
  c.ccf.distinct_memory_tokens = False
  c.ccf.memory_init_token = -1
  c.ccf.ae_mode = 'off'
  c.data.batch_size = B
  for k, v in ccf.items():
    c.ccf[k] = v
  return c
