"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) in one rule.

It is a pure function of traced values, so the engine compiles it once into its decode step and a
change of temperature, top_k or top_p between calls never recompiles; it also runs on its own
(`jax.vmap`-able) where a test checks the distribution it draws from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_tokens(logits, key, temperature, top_k, top_p):
  """int32[B] from logits [B, V]: greedy when temperature <= 0, else a sample at that temperature
  from the top_k tokens (0 = all) whose cumulative probability first reaches top_p (nucleus).
  All three are traced values: changing them never recompiles."""
  v = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  x = logits / jnp.maximum(temperature, 1e-6)
  srt = -jnp.sort(-x, axis=-1)
  rank = jnp.arange(v)[None]
  in_k = rank < jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  srt = jnp.where(in_k, srt, -jnp.inf)
  p = jax.nn.softmax(srt, axis=-1)
  keep = in_k & ((jnp.cumsum(p, axis=-1) - p) < top_p)  # The token crossing top_p is kept.
  threshold = jnp.take_along_axis(srt, jnp.sum(keep, -1, keepdims=True) - 1, axis=-1)
  sampled = jax.random.categorical(key, jnp.where(x >= threshold, x, -jnp.inf), axis=-1)
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits, -1)).astype(jnp.int32)
