"""Training-efficient CCF: incremental segment decoding under `lax.scan` and sparse encoder
gradients (`ccf.grad_mode`), all inside one jitted train step.

This is the JAX form of the paper's incremental TBPTT (CCF_METHOD.md sec. 5-6; WORKSPACE.md, "CCF
training: incremental TBPTT in JAX"). All indices are 0-based; "loss t" is the loss computed from
the decoding of segment t, "memory s" the latents z_s the encoder produced from segment s.

1. Memory first. The encoder runs batched over a window's segments (they never see each other) and
   its latents are projected once into per-layer memory K/V: a fixed-shape buffer of T*c rows per
   layer, each row tagged with its segment (`Memory`), masked by segment index in the decoder.
2. Decoder second, streamed. Given the buffer, decoder segments are independent, so they are
   decoded by a `lax.scan` over chunks of k = `ccf.decoder_segment_chunk` segments (k=1 serial, k=T
   one parallel step). A chunk's segment axis is the batch axis of the foundation layers and stays
   sharded like 'segment' (`model.segments_as_batch`). The buffer enters the scan as a closed-over
   constant, never as carry: a scan saves its carry at every step for the backward pass (O(T^2) for
   a carried buffer), while a constant is stored once and its cotangent is summed across steps. That
   sum over all later losses is what the PyTorch code accumulates on detached copies of z_s; the
   encoder backward then runs once per segment. `ccf.decoder_remat` checkpoints each chunk step (so
   the decoder keeps one chunk's activations whatever T) or, with a single chunk, its layers.
   `model.attention_impl='blocked'` attends to [buffer rows; tokens] in blocks (blocked_attention),
   so that one chunk's backward keeps one block of scores, not [l, T*c + l] per head and layer,
   and skips the blocks of segments the chunk may not see yet.
3. Gradient modes decide which (loss t, memory s) pairs carry gradient into the encoder. The forward
   value never changes, only the backward. The gate sits between the encoder and the projection:
   the projection (the transfer LoRA and, in pretrain mode, the decoder's own k/v weights) belongs
   to the decoder and learns from every memory row, as in the released code, where only the
   detached z_s -> encoder link is cut.
   * full: no gate.
   * reservoir, final: one gate per segment. The S segments of the final reservoir run through
     the live encoder, with residuals; the other T - S (gathered: a static count) through the
     encoder on stop-gradient parameters, which keeps no residuals (in `lax.map` chunks of
     `ccf.encoder_map_batch` segments so its transient activations stay bounded). Both are
     scattered into one latent buffer. Every segment is encoded once, as in `full`, and the
     encoder's backward cost and memory scale with S, not T.
   * truncated, reservoir streaming: one gate per pair. Every row is projected twice: from sg(z)
     with live weights (the value, and the projection's gradient from every loss) and from z with
     stop-gradient weights, as a zero-valued difference that carries only the z path. Query segment
     t adds the latter weighted by gate[t, s] to its own view of the rows. Under static shapes the
     encoder backward still runs for every segment (zero cotangents where gated off).
   `ccf.compensate` (reservoir only) weights the sampled gradients by their inverse inclusion
   probability, `reservoir.compensation_final` = max(1, T/S) per segment or
   `reservoir.compensation_streaming`[t] = max(1, t/S) per pair (the paper's max(1, (t-1)/S) with
   1-based t), so that their expectation over keys is the full gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccf_jax.model import arch as arch_lib
from ccf_jax.model import decoder as model_lib
from ccf_jax.ccf import reservoir
from ccf_jax.ccf import masks
from ccf_jax.ccf.model import CCFModel, Memory, decode_segments, module_config

sg = jax.lax.stop_gradient


def _bind(cfg, params) -> CCFModel:
  return model_lib.bind(module_config(cfg), params, CCFModel)


def encoder_policy(ccf_cfg) -> str | None:
  """ccf.encoder_remat as run_layers' argument: 'model' means model.remat_policy (None)."""
  return None if ccf_cfg.encoder_remat == 'model' else ccf_cfg.encoder_remat


def draw_reservoirs(key, ccf_cfg, num_valid: jax.Array):
  """(reservoir int32[B, S], membership bool[B, T, T]): Algorithm R per window, window b from
  fold_in(key, b); padded segments are never offered."""
  t, size = ccf_cfg.num_segments, ccf_cfg.reservoir_size
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_valid.shape[0]))
  return jax.vmap(lambda k, n: reservoir.algorithm_r(k, t, size, n))(keys, num_valid)


# ------------------------------------------------------------------------------------------------
# The memory buffer and its gradient gates.


class GatedMemory:
  """The decoder's view of the buffer: `memory` (value, and every gradient path but the gated one)
  plus, for per-pair gates, `delta` (zero-valued K/V whose gradient reaches only the latents) and
  `gate` float32[B, T, T] (weight of the pair: loss t, memory s)."""

  def __init__(self, memory: Memory, delta: Memory | None = None, gate: jax.Array | None = None):
    self.memory, self.delta, self.gate = memory, delta, gate

  def rows(self, start: jax.Array, size: int) -> GatedMemory:
    """The rows [start, start + size) of the buffer (a traced start, a static size). Rows keep
    their segment tags, so masks and per-pair gates index them exactly as before."""
    cut = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, start, size, axis)
    memory = self.memory._replace(k=cut(self.memory.k, 2), v=cut(self.memory.v, 2),
                                  segment=cut(self.memory.segment, 1),
                                  valid=cut(self.memory.valid, 1))
    delta = None if self.delta is None else self.delta._replace(k=cut(self.delta.k, 2),
                                                                v=cut(self.delta.v, 2))
    return GatedMemory(memory, delta, self.gate)

  def for_queries(self, segments: jax.Array) -> Memory:
    """The Memory seen by query segments int32[B, k]: shared rows, or (per-pair gates) rows per
    query segment [layers, B, k, R, K, D] = memory + gate[t, segment of row] * delta."""
    if self.delta is None:
      return self.memory
    rows = jax.vmap(lambda g, s: g[s])(self.gate, segments)  # [B, k, T]
    w = jax.vmap(lambda g, r: g[:, r])(rows, self.memory.segment)[None, :, :, :, None, None]
    view = lambda a, d: a[:, :, None] + w.astype(a.dtype) * d[:, :, None]
    return self.memory._replace(k=view(self.memory.k, self.delta.k),
                                v=view(self.memory.v, self.delta.v))


def latents_without_residuals(ccf_cfg, frozen: CCFModel, tokens, span) -> jax.Array:
  """Latents [layers, B, n, c, d] of the n segments tokens int32[B, n, l] from stop-gradient
  parameters: autodiff keeps no residuals. With `encoder_map_batch` m < n, a `lax.map` over n // m
  chunks of m segments (then one call on the n % m left over) keeps only one chunk's activations
  alive at a time."""
  b, n, l = tokens.shape
  m = min(ccf_cfg.encoder_map_batch or n, n)
  whole = n // m * m
  parts = []
  if whole:
    z = jax.lax.map(lambda tok: frozen.latents(tok, span),
                    tokens[:, :whole].reshape(b, whole // m, m, l).swapaxes(0, 1))
    z = jnp.moveaxis(z, 0, 2)  # [layers, B, n // m, m, c, d]
    parts.append(z.reshape(z.shape[0], b, whole, *z.shape[4:]))
  if n > whole:
    parts.append(frozen.latents(tokens[:, whole:], span))
  return sg(parts[0] if len(parts) == 1 else jnp.concatenate(parts, 2))


def unpicked(picked: jax.Array, num_segments: int) -> jax.Array:
  """int32[B, T - S]: per window, the first T - S segments (ascending) that are not in the
  reservoir picked int32[B, S] (-1: empty slot). A slot is empty only when fewer than S segments
  are valid, and then every valid segment is picked, so the segments this leaves out are padding."""
  t, size = num_segments, picked.shape[1]
  def one(p):  # A stable sort puts the non-members first, in ascending order.
    return jnp.argsort(reservoir.final_mask(p, t), stable=True)[:t - size].astype(jnp.int32)
  return jax.vmap(one)(picked)


def final_reservoir_latents(ccf_cfg, live: CCFModel, frozen: CCFModel, tokens, span, picked,
                            weight, policy) -> jax.Array:
  """Latents [layers, B, T, c, d] under reservoir_semantics='final': the S picked segments
  (int32[B, S], -1: empty) through the live encoder with residuals, their gradient scaled by
  weight[b] and their value unchanged; the other T - S through the stop-gradient encoder. Each
  segment is encoded once, so the forward encoder cost is that of `full`; only the S picked keep
  residuals. Segments left unset (padding, when slots are empty) stay zero: they make no memory."""
  b, t, _ = tokens.shape
  gather = lambda idx: jnp.take_along_axis(tokens, jnp.maximum(idx, 0)[..., None], 1)
  z_live = live.latents(gather(picked), span, policy)  # [layers, B, S, c, d]
  w = weight.astype(z_live.dtype)[None, :, None, None, None]
  z_live = sg(z_live) + w * (z_live - sg(z_live))
  z = jnp.zeros(z_live.shape[:2] + (t,) + z_live.shape[3:], z_live.dtype)
  put = lambda zb, ib, vb: zb.at[:, ib].set(vb, mode='drop')
  if t > picked.shape[1]:
    rest = unpicked(picked, t)
    z = jax.vmap(put, in_axes=(1, 0, 1), out_axes=1)(
        z, rest, latents_without_residuals(ccf_cfg, frozen, gather(rest), span))
  index = jnp.where(picked >= 0, picked, t)  # Out of range: dropped.
  return jax.vmap(put, in_axes=(1, 0, 1), out_axes=1)(z, index, z_live)


def gated_memory(cfg, params, tokens, valid, span, key) -> GatedMemory:
  """The projected memory of windows tokens int32[B, T, l] (`valid` bool[B, T]) with the encoder
  gradient of `ccf.grad_mode` (module docstring); `key` draws the reservoirs."""
  x = cfg.ccf
  b, t, _ = tokens.shape
  live = _bind(cfg, params)
  policy = encoder_policy(x)
  if x.grad_mode == 'full':
    return GatedMemory(live.latents_to_memory(live.latents(tokens, span, policy), span, valid))
  frozen = _bind(cfg, jax.tree.map(sg, params))
  num_valid = valid.sum(-1).astype(jnp.int32)
  size = x.reservoir_size
  if x.grad_mode == 'reservoir':
    picked, membership = draw_reservoirs(key, x, num_valid)
    if x.reservoir_semantics == 'final':
      weight = (reservoir.compensation_final(num_valid, size) if x.compensate
                else jnp.ones((b,), jnp.float32))
      z = final_reservoir_latents(x, live, frozen, tokens, span, picked, weight, policy)
      return GatedMemory(live.latents_to_memory(z, span, valid))
    gate = jax.vmap(reservoir.streaming_mask)(membership).astype(jnp.float32)
    if x.compensate:
      gate = gate * reservoir.compensation_streaming(t, size)[None, :, None]
  else:
    gate = jnp.broadcast_to(reservoir.truncated_mask(t, size), (b, t, t)).astype(jnp.float32)
  z = live.latents(tokens, span, policy)
  z_path = frozen.latents_to_memory(z, span, valid)
  delta = z_path._replace(k=z_path.k - sg(z_path.k), v=z_path.v - sg(z_path.v))
  return GatedMemory(live.latents_to_memory(sg(z), span, valid), delta, gate)


# ------------------------------------------------------------------------------------------------
# The decoder, streamed over chunks of segments.


def decode_window(cfg, decoder, tokens, scored, span, memory: GatedMemory):
  """(loss_sum, target_count, correct) of decoding windows tokens int32[B, T, l] given the memory,
  chunk by chunk (`lax.scan`, or a Python loop with `ccf.unrolled`); `scored` float32[B, T*l]."""
  x = cfg.ccf
  b, t, l = tokens.shape
  k = x.decoder_segment_chunk or t
  n = t // k
  flat = tokens.reshape(b, t * l)
  # Shifted over the whole window before chunking: a segment's last position predicts the next
  # segment's first token, which may lie in the next chunk.
  targets = arch_lib.next_token(flat)
  weights = arch_lib.next_token(scored.astype(jnp.float32))
  chunked = lambda a: a.reshape(b, n, k, l).swapaxes(0, 1)  # [n, B, k, l]
  xs = (chunked(tokens), chunked(targets), chunked(weights), jnp.arange(n, dtype=jnp.int32) * k)
  remat = x.decoder_remat != 'none'
  layer_policy = x.decoder_remat if remat and n == 1 else None  # None: model.remat_policy.
  # With memory_window W, a chunk's queries (segments first..first+k-1) see only the memory of
  # segments first-W..first+k-2: slice those W+k segments' rows (a static width) out of the T*c
  # buffer instead of attending to all of it under a mask. Same result, (W+k)/T of the attention
  # and of the per-query memory copies (the 7B configs: 25 of 128 segments at k=1).
  rows_per_segment = memory.memory.k.shape[2] // t
  window = x.memory_window + k if x.memory_window and x.memory_window + k < t else 0

  def chunk_sums(inp):
    tok, tgt, w, first = inp
    segments = jnp.broadcast_to(first + jnp.arange(k, dtype=jnp.int32), (b, k))
    lo, hi = masks.visible_range(x, segments)
    mem = memory
    if window:
      start = jnp.clip(first - x.memory_window, 0, t - window)
      mem = memory.rows(start * rows_per_segment, window * rows_per_segment)
    logits = decode_segments(decoder, x, tok, span, lo, hi, mem.for_queries(segments),
                             remat_policy=layer_policy)
    return arch_lib.shifted_ce_sums(logits, tgt, w)

  if remat and n > 1:
    # A chunk with no target (padding, a passkey window's filler) is not decoded, forward or
    # backward. The cond sits inside the checkpoint, whose residuals are the chunk's inputs: outside
    # it (or without remat) the cond would return the memory buffer as a residual of every chunk,
    # stacked by the scan: memory quadratic in T (WORKSPACE.md, Long context).
    scored_chunk_sums = chunk_sums
    chunk_sums = jax.checkpoint(
        lambda inp: jax.lax.cond(inp[2].sum() > 0, scored_chunk_sums,
                                 lambda _: (jnp.zeros((), jnp.float32),) * 3, inp),
        policy=model_lib.REMAT_POLICIES[x.decoder_remat],
        prevent_cse=x.unrolled)  # A scan body needs no CSE barrier.
  add = lambda acc, new: tuple(a + v for a, v in zip(acc, new))
  sums = (jnp.zeros((), jnp.float32),) * 3
  if x.unrolled:
    for i in range(n):
      sums = add(sums, chunk_sums(jax.tree.map(lambda a: a[i], xs)))
    return sums
  sums, _ = jax.lax.scan(lambda acc, inp: (add(acc, chunk_sums(inp)), None), sums, xs)
  return sums


def lm_sums(cfg, params, tokens, valid, scored, span, key):
  """The compressive LM term of the 'ccf' objective: ((loss_sum, target_count, correct), memory).

  tokens int32[B, T, l], valid bool[B, T], scored float32[B, T*l] (masks.scored_mask), span int32[B]
  and `key` for the reservoirs. `memory` is the buffer with every gradient path (grad_mode 'full')
  for the auto-encoding term to reuse, else None: gated rows must not carry its gradient.
  """
  memory = gated_memory(cfg, params, tokens, valid, span, key)
  sums = decode_window(cfg, _bind(cfg, params).decoder, tokens, scored, span, memory)
  return sums, memory.memory if cfg.ccf.grad_mode == 'full' else None
