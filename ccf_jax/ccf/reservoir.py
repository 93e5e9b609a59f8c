"""Vitter's Algorithm R over the segment stream, and the gradient masks built on it (METHOD section 6).

CCF back-propagates the encoder sparsely: only some segments' compressed memories pass gradient back
to the encoder that produced them. Which ones is decided here, as pure jittable functions of a PRNG
key (so one compiled train step serves every step's key). All indices are 0-based: segment t is the
t-th segment of the document, the loss of segment t is the loss on its tokens, and the memory of
segment s is what the encoder produced from it (read by the losses of segments t > s).

Gradient modes (config `grad_mode`) and the helpers they use:

- `full`: the memory of s receives gradient from every later loss t > s. Exact BPTT; the reference.
- `truncated`: the memory of s receives gradient only from losses s+1..s+S (`truncated_mask`); with
  S >= T-1 this is `full`.
- `reservoir`, `reservoir_semantics=final`: `algorithm_r` runs over the valid segments; the S
  segments left in the final reservoir (`final_mask`) receive gradient from every later loss, all
  other memories are stop-gradient. Since a segment ends in the final reservoir with probability
  min(1, S/T), `compensate=True` scales the surviving gradient by `compensation_final` =
  max(1, T/S) so that its expectation is the full gradient.
- `reservoir`, `reservoir_semantics=streaming` (UIO-LLMs, the paper's incremental TBPTT): the loss of
  segment t sees the reservoir as it stands after segments 0..t-1 were offered, i.e. row t-1 of
  `membership` (`streaming_mask`): gradient from loss t reaches the memory of s only if
  membership[t-1, s]. This matches the PyTorch code, where an evicted segment's encoder graph is
  back-propagated with the gradient accumulated so far and then freed, so later losses cannot reach
  it. s is in row t-1 with probability min(1, S/t), so `compensate=True` scales the pair (t, s) by
  `compensation_streaming`[t] = max(1, t/S). The paper writes this factor max(1, (t-1)/S) with
  1-based t; it is the same number. The released training script omits the factor.

The random draw is part of the contract (tests re-derive it): at step t >= S the sampler draws
`j = jax.random.randint(jax.random.fold_in(key, t), (), 0, t + 1)` (int32). Draws depend only on
(key, t), so a document's reservoir does not depend on how much padding follows it (num_segments).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _draw(key: jax.Array, t: jax.Array) -> jax.Array:
  """The step-t draw j ~ Uniform{0..t}; a pure function of (key, t)."""
  return jax.random.randint(jax.random.fold_in(key, t), (), 0, t + 1, dtype=jnp.int32)


def algorithm_r(key: jax.Array, num_segments: int, size: int,
                num_valid: jax.Array | int | None = None) -> tuple[jax.Array, jax.Array]:
  """Vitter's Algorithm R with a reservoir of `size` slots over segments 0..num_segments-1.

  Segment t < size enters slot t surely. For t >= size, draw j uniformly in 0..t (see the module
  docstring for the exact draw); if j < size, segment t replaces slot j (the evicted segment never
  returns), else segment t is not kept. Segments t >= num_valid (padding) are never offered: the
  reservoir stays as it was, so rows t >= num_valid of `membership` repeat row num_valid-1 (all
  False if num_valid == 0).

  Args:
    key: PRNG key (typed or raw uint32[2]); may be traced.
    num_segments: static T.
    size: static S >= 1.
    num_valid: number of real segments, an int scalar that may be traced (None: all T). Changing it,
      or the key, never recompiles.

  Returns:
    reservoir: int32[size], the final reservoir's segment indices by slot; a slot never filled
      (fewer than `size` valid segments) holds -1.
    membership: bool[num_segments, num_segments]; membership[t, s] is True iff segment s is in the
      reservoir after segment t was offered. Each row has min(t+1, num_valid, size) True entries,
      all at s <= t.
  """
  if size < 1:
    raise ValueError(f'reservoir size must be >= 1, got {size}')
  if num_valid is None:
    num_valid = num_segments
  num_valid = jnp.asarray(num_valid, jnp.int32)
  segments = jnp.arange(num_segments, dtype=jnp.int32)
  slots = jnp.arange(size, dtype=jnp.int32)

  def step(res, t):
    j = _draw(key, t)
    slot = jnp.where(t < size, t, j)  # t < size: the next empty slot, surely.
    take = (t < num_valid) & (slot < size)
    res = jnp.where(take & (slots == slot), t, res)
    row = jnp.any(res[:, None] == segments[None, :], axis=0)  # -1 matches nothing.
    return res, row

  init = jnp.full((size,), -1, jnp.int32)
  reservoir, membership = jax.lax.scan(step, init, segments)
  return reservoir, membership


def final_mask(reservoir: jax.Array, num_segments: int) -> jax.Array:
  """bool[num_segments]: True for the segments in `reservoir` (empty slots, -1, match nothing).

  Under `final` semantics these memories keep their gradient from every later loss; the rest are
  stop-gradient.
  """
  return jnp.any(reservoir[:, None] == jnp.arange(num_segments, dtype=reservoir.dtype), axis=0)


def streaming_mask(membership: jax.Array) -> jax.Array:
  """bool[T, T]: mask[t, s] = membership[t-1, s] (row 0 all False): may loss t reach memory s?

  Under `streaming` semantics the loss of segment t sees the reservoir after segments 0..t-1 were
  offered. Only s < t can be set, so the mask is causal.
  """
  return jnp.concatenate([jnp.zeros_like(membership[:1]), membership[:-1]], axis=0)


def compensation_final(num_valid: jax.Array | int, size: int) -> jax.Array:
  """float32 scalar max(1, num_valid/size): inverse inclusion probability under `final` semantics.

  A valid segment is in the final reservoir with probability min(1, S/T) (T = num_valid), so
  scaling its gradient by this factor makes the expected gradient equal the full one.
  """
  return jnp.maximum(1.0, jnp.asarray(num_valid, jnp.float32) / size)


def compensation_streaming(num_segments: int, size: int) -> jax.Array:
  """float32[num_segments]: entry t is max(1, t/S), the factor for gradient from loss t.

  Under `streaming` semantics memory s < t reaches loss t iff s is in row t-1 of the membership,
  which happens with probability min(1, S/t) (t segments 0..t-1 offered to S slots), so scaling the
  pair (t, s) by max(1, t/S) makes it unbiased. The paper (1-based t) writes max(1, (t-1)/S). Entry
  0 multiplies nothing (loss 0 has no memory).
  """
  t = np.arange(num_segments, dtype=np.float64)
  return jnp.asarray(np.maximum(1.0, t / size), jnp.float32)


def truncated_mask(num_segments: int, size: int) -> jax.Array:
  """bool[T, T]: mask[t, s] True iff s+1 <= t <= s+S: loss t may send gradient to memory s.

  `truncated` mode: each memory gets gradient from the S losses right after it (a sliding window,
  like truncated BPTT); with S >= T-1 it is the full causal mask (s < t).
  """
  t = np.arange(num_segments)[:, None]
  s = np.arange(num_segments)[None, :]
  return jnp.asarray((s + 1 <= t) & (t <= s + size))
