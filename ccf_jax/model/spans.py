"""Attention masks as compact descriptors: key ranges per query and flags per key.

Every mask the models use is a union of a few key-index ranges per query, intersected with a
per-key flag (model/attention.py's docstring lists them). `Spans` costs O(Lq * R + Lk) where a
boolean mask costs O(Lq * Lk), so a blocked kernel can compute each block's mask, and which blocks
no query may see, without a [B, Lq, Lk] array ever existing. Apart from attention.py so that the
kernels (blocked_attention.py, splash.py) and the dispatcher share it without an import circle.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.tree_util.register_dataclass, data_fields=('lo', 'hi', 'key_ok'),
                   meta_fields=('causal', 'window'))
@dataclasses.dataclass(frozen=True)
class Spans:
  """Query i of batch row b may see key j iff some r has lo[b, i, r] <= j < hi[b, i, r], and
  key_ok[b, j] (when given). Leading axes of size 1 broadcast over the batch. `causal` marks the
  square causal mask (hi = i + 1, no key flags), with `window` > 0 a sliding window of that many
  keys (lo = max(0, i - window + 1), else lo = 0): kernels with a native causal or local-window
  mode use them; lo/hi hold the same mask for every other kernel.
  """
  lo: jax.Array
  hi: jax.Array
  key_ok: jax.Array | None = None
  causal: bool = False
  window: int = 0

  @property
  def num_queries(self) -> int:
    return self.lo.shape[1]

  def dense(self, num_keys: int) -> jax.Array:
    """bool[B|1, Lq, num_keys]: the same mask as a boolean array (reference and dense paths)."""
    j = jnp.arange(num_keys)
    return block_mask(self.lo, self.hi, None if self.key_ok is None else self.key_ok, j)

  def keys(self, start: int, stop: int) -> Spans:
    """The mask restricted to keys [start, stop), renumbered from 0 (the gated memory read
    attends to the prefix rows and the rest separately)."""
    clip = lambda a: jnp.clip(a - start, 0, stop - start)
    key_ok = None if self.key_ok is None else self.key_ok[:, start:stop]
    return Spans(clip(self.lo), clip(self.hi), key_ok)


def block_mask(lo, hi, key_ok, j) -> jax.Array:
  """bool[B|1, Lq, n] for key indices j int32[n] (a block's keys); key_ok[B|1, n] or None."""
  inside = (lo[..., None] <= j) & (j < hi[..., None])  # [B, Lq, R, n]
  m = inside.any(axis=2)
  return m if key_ok is None else m & key_ok[:, None, :]


def causal(length: int, window: int = 0) -> Spans:
  """The plain decoder's mask over `length` tokens; `window` > 0: query i sees only the `window`
  keys i - window + 1 .. i (Mistral's `sliding_window`, as transformers masks it)."""
  i = jnp.arange(length, dtype=jnp.int32)[None, :, None]
  lo = jnp.maximum(i - window + 1, 0) if window > 0 else jnp.zeros_like(i)
  return Spans(lo, i + 1, None, causal=True, window=max(int(window), 0))


def prefix_causal(prefix_ok: jax.Array, num_queries: int) -> Spans:
  """Keys [P prefix rows ; num_queries tokens]: prefix row p visible iff prefix_ok[b, p]
  (bool[B|1, P]), then causal over the tokens. The CCF decoder and the inference cache."""
  b, p = prefix_ok.shape
  i = jnp.arange(num_queries, dtype=jnp.int32)[None, :, None]
  key_ok = jnp.concatenate([prefix_ok, jnp.ones((b, num_queries), bool)], axis=1)
  return Spans(jnp.zeros_like(i), p + i + 1, key_ok)


def key_range(mask, start: int, stop: int, num_keys: int):
  """Either mask form restricted to keys [start, stop) of num_keys, renumbered from 0."""
  if isinstance(mask, Spans):
    return mask.keys(start, stop)
  m = jnp.asarray(mask)
  return jnp.broadcast_to(m, m.shape[:-1] + (num_keys,))[..., start:stop]


def as_dense(mask, num_keys: int) -> jax.Array:
  """A boolean [B|1, Lq, Lk] mask from either form."""
  return mask.dense(num_keys) if isinstance(mask, Spans) else jnp.asarray(mask)
