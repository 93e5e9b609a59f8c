"""The streaming KV cache: its layout, its capacity buckets, and the traced writes into it.

Layout (`Cache`): one K and one V buffer [layers, B, mem_cap + raw_cap, kv_heads, head_dim],
memory rows first, raw rows after. Queries attend to the whole buffer through `Block`'s key/value
prefix with a mask (`Layout.read_view`: memory rows of visible segments, raw rows already written),
so the layer code is the training code (`Decoder.run_layers`) and the streaming logits equal the
training forward. New tokens' K/V are scattered into the raw rows (`append_raw`); rows a batch
element does not own are dropped (`mode='drop'`), which is what lets prompts of different lengths
share one batch. A compressed segment's c memory rows go to its slot (`Layout.store_memory`).

Positions are those of training (`masks.raw_positions`, `masks.memory_positions`: memory rotated
once at fixed positions). With `ccf.memory_window = W` the memory is a ring of W segments (segment s
in slot s mod W), so the cache stays bounded at any length.

Capacities grow in buckets (memory: powers of two of segments, capped at W; raw rows of 'full':
powers of two, at least l; `Layout.grow`), so the engine compiles once per bucket, never per token,
and short contexts do not pay for a maximum-size cache. All of this depends only on the cache's
shape rules (`Layout`), not on the model's weights, which is why it lives apart from the engine.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ccf_jax.ccf import masks
from ccf_jax.model import spans


class Cache(NamedTuple):
  k: jax.Array  # [layers, B, mem_cap + raw_cap, kv_heads, head_dim]: memory rows, then raw rows.
  v: jax.Array
  mem_segment: jax.Array  # int32[B, mem_cap]: segment summarised by each memory row (-1: empty).
  mem_valid: jax.Array  # bool[B, mem_cap]: a real row at this ratio.
  raw_len: jax.Array  # int32[B]: raw rows written (tokens of the current segment, or all for full).
  segment: jax.Array  # int32[B]: segments compressed so far (= index of the current segment).
  tail: jax.Array  # int32[B, l]: tokens of the current segment (what is compressed when it fills).
  span: jax.Array  # int32[B]: tokens per memory slot (the compression ratio).


@dataclasses.dataclass
class State:
  """A batch's cache plus the host's copy of each element's length (tokens read so far)."""
  cache: Cache
  lengths: np.ndarray


def pow2_at_least(n: int) -> int:
  return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _put(buf, bi, rows, new):
  """buf[:, bi, rows] = new; rows out of range are dropped (what batch elements do not own)."""
  return buf.at[:, bi, rows].set(new.astype(buf.dtype), mode='drop')


def append_raw(cache: Cache, k, v, tokens, num_new) -> Cache:
  """Writes the K/V [layers, B, Lq, K, D] of tokens [B, Lq] (the first num_new[b] of row b) after
  each row's raw rows, and the tokens into its tail."""
  b, lq = tokens.shape
  mem_cap, cap = cache.mem_segment.shape[1], cache.k.shape[2]
  i = jnp.arange(lq, dtype=jnp.int32)
  fresh = i[None] < num_new[:, None]
  at = cache.raw_len[:, None] + i[None]
  bi = jnp.broadcast_to(jnp.arange(b)[:, None], (b, lq))
  rows = jnp.where(fresh, mem_cap + at, cap)  # Out of range: dropped.
  tail = cache.tail.at[bi, jnp.where(fresh, at, cache.tail.shape[1])].set(tokens, mode='drop')
  return cache._replace(k=_put(cache.k, bi, rows, k), v=_put(cache.v, bi, rows, v), tail=tail,
                        raw_len=cache.raw_len + num_new)


@dataclasses.dataclass(frozen=True)
class Layout:
  """The shape rules of one engine's cache: mode ('ccf' | 'local' | 'full'), segment length l,
  c memory rows per segment, memory window W (0: unbounded), ratio and the K/V row shape;
  `sliding_window` (mode 'full' only: `model.sliding_window`) limits the keys each query sees.
  The rows below the window stay allocated (the buffer is not a ring), so a windowed model's cache
  grows with the context like any full one."""
  mode: str
  l: int
  c: int
  window: int
  span: int
  num_layers: int
  num_kv_heads: int
  head_dim: int
  dtype: Any
  sliding_window: int = 0

  # ------------------------------------------------------------------------------ capacities
  def mem_rows(self, segments: int) -> int:
    """Memory capacity (rows) for `segments` compressed segments: a power of two of segments,
    at most the window's W."""
    if self.mode != 'ccf' or segments <= 0:
      return 0
    cap = pow2_at_least(segments)
    return (min(cap, self.window) if self.window else cap) * self.c

  def raw_rows(self, tokens: int) -> int:
    """Raw capacity: one segment (ccf/local); a power of two >= l of tokens (full; 0 if none)."""
    if self.mode != 'full':
      return self.l
    return 0 if tokens <= 0 else max(self.l, pow2_at_least(tokens))

  def new(self, batch: int, mem_rows: int, raw_rows: int, segment=None) -> Cache:
    shape = (self.num_layers, batch, mem_rows + raw_rows, self.num_kv_heads, self.head_dim)
    seg = np.zeros(batch, np.int32) if segment is None else np.asarray(segment, np.int32)
    return Cache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype),
                 jnp.full((batch, mem_rows), -1, jnp.int32), jnp.zeros((batch, mem_rows), bool),
                 jnp.zeros((batch,), jnp.int32), jnp.asarray(seg),
                 jnp.zeros((batch, self.l if self.mode != 'full' else 0), jnp.int32),
                 jnp.full((batch,), self.span, jnp.int32))

  def grow(self, state: State, segments: int, tokens: int) -> State | None:
    """The state re-laid out at the buckets holding `segments` memory segments and `tokens` raw
    tokens, or None when the current capacity suffices (growing is rare: once per bucket)."""
    c = state.cache
    old_mem, cap = c.mem_segment.shape[1], c.k.shape[2]
    mem, raw = old_mem, cap - old_mem
    kept = min(segments, self.window) if self.window else segments  # Segments in the ring.
    if self.mode == 'ccf' and kept * self.c > mem:
      mem = self.mem_rows(segments)
    if self.mode == 'full' and tokens > raw:
      raw = self.raw_rows(tokens)
    if (mem, raw) == (old_mem, cap - old_mem):
      return None

    def pad(a, fill=0):
      z = lambda n: jnp.full(a.shape[:2] + (n,) + a.shape[3:], fill, a.dtype)
      return jnp.concatenate([a[:, :, :old_mem], z(mem - old_mem), a[:, :, old_mem:],
                              z(raw - cap + old_mem)], axis=2)

    mpad = lambda a, fill: jnp.concatenate(
        [a, jnp.full((a.shape[0], mem - old_mem), fill, a.dtype)], axis=1)
    return State(c._replace(k=pad(c.k), v=pad(c.v), mem_segment=mpad(c.mem_segment, -1),
                            mem_valid=mpad(c.mem_valid, False)), state.lengths)

  def nbytes(self, state: State) -> dict:
    """Allocated bytes of the K/V buffers and the bytes of rows in use (summed over the batch)."""
    c = state.cache
    row = self.num_layers * 2 * self.num_kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize
    if self.mode == 'full':
      mem_rows, raw = np.zeros_like(state.lengths), state.lengths
    else:
      segs = state.lengths // self.l
      mem_rows = (np.minimum(segs, self.window) if self.window else segs) * self.c
      mem_rows = mem_rows if self.mode == 'ccf' else 0 * segs
      raw = state.lengths % self.l
    return {'allocated_bytes': int(c.k.nbytes + c.v.nbytes),
            'used_bytes': int((mem_rows + raw).sum() * row), 'memory_rows': int(np.sum(mem_rows)),
            'raw_rows': int(np.sum(raw)), 'bytes_per_row': int(row)}

  def synthetic(self, batch: int, context: int, capacity: int | None = None,
                seed: int = 0) -> State:
    """A state as if `context` tokens had been read, with random K/V (`Engine.synthetic_state`)."""
    segs = 0 if self.mode == 'full' else context // self.l
    raw = capacity or self.raw_rows(context + 1)
    cache = self.new(batch, self.mem_rows(segs), raw, np.full(batch, segs))
    kk, kv = jax.random.split(jax.random.key(seed))
    cache = cache._replace(k=jax.random.normal(kk, cache.k.shape, self.dtype),
                           v=jax.random.normal(kv, cache.v.shape, self.dtype),
                           raw_len=jnp.full((batch,), context - segs * self.l, jnp.int32))
    if self.mode == 'ccf' and segs:
      kept = np.arange(max(0, segs - self.window) if self.window else 0, segs)
      slot = kept % self.window if self.window else kept
      seg = np.full(cache.mem_segment.shape[1], -1, np.int32)
      for s, at in zip(kept, slot):
        seg[at * self.c:(at + 1) * self.c] = s
      valid = (seg >= 0) & (np.arange(seg.size) % self.c < self.l // self.span)
      cache = cache._replace(mem_segment=jnp.asarray(np.broadcast_to(seg, (batch, seg.size))),
                             mem_valid=jnp.asarray(np.broadcast_to(valid, (batch, seg.size))))
    return State(cache, np.full(batch, context, np.int64))

  # ------------------------------------------------------------------------------ traced pieces
  def read_view(self, ccf, cache: Cache, lq: int):
    """(positions int32[B, lq], mask Spans over cap + lq keys) of lq new tokens after each row's raw
    rows: they see the memory rows of visible segments, the raw rows written, and each other
    causally."""
    b = cache.raw_len.shape[0]
    mem_cap, cap = cache.mem_segment.shape[1], cache.k.shape[2]
    if self.mode == 'ccf':
      base = masks.raw_positions(ccf, cache.span, cache.segment[:, None])[:, 0, 0]
      lo, hi = masks.visible_range(ccf, cache.segment[:, None])
      mem_vis = cache.mem_valid & (cache.mem_segment >= lo) & (cache.mem_segment < hi)
    else:
      base, mem_vis = jnp.zeros((b,), jnp.int32), cache.mem_valid
    positions = base[:, None] + cache.raw_len[:, None] + jnp.arange(lq, dtype=jnp.int32)[None]
    raw_vis = jnp.arange(cap - mem_cap)[None] < cache.raw_len[:, None]
    mask = spans.prefix_causal(jnp.concatenate([mem_vis, raw_vis], axis=1), lq)
    if self.sliding_window:  # 'full': raw row j holds position j. One key range per query: the
      # unwritten raw rows between the written ones and the new tokens are masked by key_ok.
      first = positions - self.sliding_window + 1  # The oldest position each query sees.
      lo = jnp.where(first < cache.raw_len[:, None], mem_cap + jnp.maximum(first, 0),
                     cap + first - cache.raw_len[:, None])
      mask = spans.Spans(lo[..., None], mask.hi, mask.key_ok)
    return positions, mask

  def store_memory(self, cache: Cache, mem, segments, commit, advance: bool = False) -> Cache:
    """Writes the c rows of each committed segment [B, k] into its slot (s mod W with a memory
    window); `advance` also drops the raw tail of those rows and moves them to the next segment."""
    b, k = segments.shape
    mem_cap = cache.mem_segment.shape[1]
    slot = segments % self.window if self.window else segments
    rows = slot[:, :, None] * self.c + jnp.arange(self.c)
    rows = jnp.where(commit[:, :, None], rows, cache.k.shape[2]).reshape(b, k * self.c)
    bi = jnp.broadcast_to(jnp.arange(b)[:, None], rows.shape)
    at = jnp.minimum(rows, mem_cap)  # mem_cap: out of range of the row metadata, dropped too.
    cache = cache._replace(k=_put(cache.k, bi, rows, mem.k), v=_put(cache.v, bi, rows, mem.v),
                           mem_segment=cache.mem_segment.at[bi, at].set(mem.segment, mode='drop'),
                           mem_valid=cache.mem_valid.at[bi, at].set(mem.valid, mode='drop'))
    return self.reset_full_tail(cache) if advance else cache

  def reset_full_tail(self, cache: Cache) -> Cache:
    """Moves rows whose raw tail holds l tokens to the next segment, with an empty tail."""
    full = cache.raw_len == self.l
    return cache._replace(raw_len=jnp.where(full, 0, cache.raw_len),
                          segment=cache.segment + full.astype(jnp.int32))
