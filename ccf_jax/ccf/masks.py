"""Where every CCF token sits and what it may see: masks, rotary positions, scored targets.

All the geometry of the method lives here as small pure functions of integer arrays, so the model
code (`model.py`) only wires them into the foundation's `run_layers`, and the tests can check each
rule against a hand-written loop.

Compression ratio per window. Every function takes `span`, int32[B]: the tokens covered per memory
slot (the ratio r = l / c_r) of each window. A fixed-ratio model has span = l / c everywhere. A
model trained on several ratios (`ccf.ratios`) keeps c = l / min(ratios) memory slots and, for a
window of ratio r, uses only the first l / r of them (the rest are masked out of the decoder): one
compiled program serves every ratio, at the cost of computing the unused slots in the encoder.

Encoder (one segment of l tokens followed by c memory tokens):
  * tokens are causal among themselves and never see memory tokens;
  * memory token j sees tokens 0 .. (j+1)*span - 1 and itself ('nested' mask), or the whole segment
    and itself ('plain' ablation);
  * positions: tokens 0 .. l-1, memory token j at (j+1)*span (right after the last token it covers).

Decoder positions. Rotary attention scores depend only on position *differences*, so the memory
keys can be rotated once, at fixed positions, and shared by every later segment:
  * 'sequential' (the released code): memory row j of segment s at s*c_r + j, the raw tokens of a
    segment that sees memory up to segment hi at hi*c_r + i. For a segment that sees segments
    lo..hi-1 this gives exactly the released code's [0, 1, ..., V*c_r - 1 ; V*c_r + i] (V = hi-lo)
    shifted by lo*c_r, which changes no score.
  * 'segment': memory row j of segment s at s*l + (j+1)*span - 1 (the last token it summarises),
    raw tokens of segment t at t*l + i: memory sits where its text was.
A segment that sees no memory (the first one, or memory 'off') gets hi = 0, i.e. positions
0..l-1: exactly the base decoder.

Position range. What a model must support is the largest distance between a query and a key, which
`config_lib.max_relative_position` computes; `memory_window` bounds it for any document length.
(Random global position offsets would not: under rotary they leave every score unchanged.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccf_jax.model import spans as spans_lib


def default_ratio(ccf_cfg) -> int:
  """The ratio used when none is sampled or given: l / c (the finest one the model has)."""
  return ccf_cfg.segment_len // ccf_cfg.num_memory


def spans(ccf_cfg, batch_size: int, rng=None, ratio=None) -> jax.Array:
  """int32[B] tokens per memory slot: `ratio` if given, else sampled from `ccf.ratios` with `rng`
  (one ratio per window), else the default ratio."""
  if ratio is not None:
    return jnp.broadcast_to(jnp.asarray(ratio, jnp.int32), (batch_size,))
  choices = tuple(ccf_cfg.ratios)
  if rng is None or len(choices) <= 1:
    return jnp.full((batch_size,), default_ratio(ccf_cfg), jnp.int32)
  idx = jax.random.randint(rng, (batch_size,), 0, len(choices))
  return jnp.asarray(choices, jnp.int32)[idx]


def memory_valid(span: jax.Array, segment_len: int, num_memory: int) -> jax.Array:
  """bool[B, c]: memory slot j is used at this window's ratio (j < l / span)."""
  return jnp.arange(num_memory)[None] < (segment_len // span)[:, None]


def encoder_layout(span: jax.Array, segment_len: int, num_memory: int, plain: bool = False):
  """(positions int32[B, l+c], mask bool[B, l+c, l+c]) of the encoder over [segment ; memory]."""
  l, c, b = segment_len, num_memory, span.shape[0]
  i = jnp.arange(l)
  cover = jnp.minimum((jnp.arange(c)[None] + 1) * span[:, None], l)  # [B, c] tokens seen by slot j.
  positions = jnp.concatenate([jnp.broadcast_to(i, (b, l)), cover], axis=1)
  tok_tok = jnp.broadcast_to(i[:, None] >= i[None, :], (b, l, l))
  tok_mem = jnp.zeros((b, l, c), bool)
  if plain:
    mem_tok = jnp.ones((b, c, l), bool)
  else:
    mem_tok = i[None, None, :] < cover[:, :, None]
  mem_mem = jnp.broadcast_to(jnp.eye(c, dtype=bool), (b, c, c))
  mask = jnp.concatenate([jnp.concatenate([tok_tok, tok_mem], 2),
                          jnp.concatenate([mem_tok, mem_mem], 2)], 1)
  return positions.astype(jnp.int32), mask


def encoder_spans(span: jax.Array, segment_len: int, num_memory: int,
                  plain: bool = False) -> spans_lib.Spans:
  """`encoder_layout`'s mask as key ranges (model/attention.py): token i sees [0, i + 1); memory
  slot j sees [0, cover_j) (or the whole segment, 'plain') and [l + j, l + j + 1), itself."""
  l, c, b = segment_len, num_memory, span.shape[0]
  i = jnp.arange(l, dtype=jnp.int32)
  j = jnp.arange(c, dtype=jnp.int32)
  cover = jnp.minimum((j[None] + 1) * span[:, None], l).astype(jnp.int32)  # [B, c]
  if plain:
    cover = jnp.full((b, c), l, jnp.int32)
  tok_lo = jnp.zeros((b, l, 2), jnp.int32)  # The second range is empty for tokens.
  tok_hi = jnp.broadcast_to(jnp.stack([i + 1, jnp.zeros_like(i)], -1)[None], (b, l, 2))
  self_lo = jnp.broadcast_to(l + j, (b, c))
  mem_lo = jnp.stack([jnp.zeros((b, c), jnp.int32), self_lo], -1)
  mem_hi = jnp.stack([cover, self_lo + 1], -1)
  return spans_lib.Spans(jnp.concatenate([tok_lo, mem_lo], 1), jnp.concatenate([tok_hi, mem_hi], 1))


def memory_positions(ccf_cfg, span: jax.Array, segments: jax.Array) -> jax.Array:
  """int32[B, n, c] decoder positions of the memory rows of segments[b, k] (see module doc)."""
  l, c = ccf_cfg.segment_len, ccf_cfg.num_memory
  s = segments[:, :, None]
  j = jnp.arange(c)[None, None]
  if ccf_cfg.memory_positions == 'sequential':
    pos = s * (l // span)[:, None, None] + j
  else:
    pos = s * l + (j + 1) * span[:, None, None] - 1
  return pos.astype(jnp.int32)


def raw_positions(ccf_cfg, span: jax.Array, hi: jax.Array) -> jax.Array:
  """int32[B, n, l] decoder positions of the raw tokens of segments that see memory up to `hi`."""
  l = ccf_cfg.segment_len
  per_segment = (l // span)[:, None] if ccf_cfg.memory_positions == 'sequential' else l
  return (hi * per_segment)[..., None].astype(jnp.int32) + jnp.arange(l, dtype=jnp.int32)


def visible_range(ccf_cfg, segments: jax.Array, memory: bool = True):
  """(lo, hi) per query segment: it sees the memory of segments lo <= s < hi (memory_window aware).

  Memory off gives lo = hi = 0: nothing visible and base positions.
  """
  if not memory:
    zero = jnp.zeros_like(segments)
    return zero, zero
  window = ccf_cfg.memory_window
  lo = jnp.maximum(segments - window, 0) if window else jnp.zeros_like(segments)
  return lo, segments


def decoder_mask(mem_segment, mem_valid, lo, hi, segment_len: int) -> jax.Array:
  """bool[B, n, l, R + l]: memory row r (of segment mem_segment[b, r]) visible iff valid and
  lo <= segment < hi; then causal over the segment's own l tokens."""
  b, n = lo.shape
  r = mem_segment.shape[1]
  seg = mem_segment[:, None, :]
  vis = mem_valid[:, None, :] & (seg >= lo[..., None]) & (seg < hi[..., None])  # [B, n, R]
  vis = jnp.broadcast_to(vis[:, :, None, :], (b, n, segment_len, r))
  i = jnp.arange(segment_len)
  causal = jnp.broadcast_to(i[:, None] >= i[None, :], (b, n, segment_len, segment_len))
  return jnp.concatenate([vis, causal], axis=-1)


def decoder_spans(mem_segment, mem_valid, lo, hi, segment_len: int) -> spans_lib.Spans:
  """`decoder_mask` reshaped to [B * n, l, R + l], as key ranges and per-key flags: every query of
  a segment sees the same memory rows, then its own tokens causally."""
  seg = mem_segment[:, None, :]
  vis = mem_valid[:, None, :] & (seg >= lo[..., None]) & (seg < hi[..., None])  # [B, n, R]
  return spans_lib.prefix_causal(vis.reshape(-1, vis.shape[-1]), segment_len)


def scored_mask(ccf_cfg, loss_mask, num_valid_segments) -> jax.Array:
  """float32[B, T*l]: the data's loss mask, zero on padded segments and, unless
  `score_first_token`, on each segment's first token (never predicted from memory alone)."""
  b, w = loss_mask.shape
  l = ccf_cfg.segment_len
  segment = jnp.arange(w) // l
  keep = segment[None] < num_valid_segments[:, None]
  if not ccf_cfg.score_first_token:
    keep = keep & (jnp.arange(w) % l != 0)[None]
  return loss_mask.astype(jnp.float32) * keep
