"""The CCF model: a segment encoder with memory tokens and a decoder reading per-layer memory K/V.

Parameters (a pure dict, like every model here):
    decoder   the base decoder (ccf_jax.model.Decoder): embedding, blocks, final norm, LM head;
    encoder   {'layers'}: only in pretrain mode with `shared_weights=False` (it reads the
              decoder's embedding and never uses a final norm or LM head, so it has none);
    adapter   what CCF adds to a base LM: `memory` vectors ([1 or c, d]), the auto-encoding
              `repeat` vector ([d]), and stacked LoRA pairs `enc_q`, `enc_v` (encoder queries and
              values) and `mem_k`, `mem_v` (the "transfer head": keys and values of memory rows).
In adapter mode only `adapter` trains; the base is shared by encoder and decoder and frozen.
Adapter parameters are float32 whatever `param_dtype` is: they are what the optimizer updates.

The forward pass is split where the paper's training algorithm splits it (CCF_METHOD.md sec. 5):
  1. `CCFModel.compress`: encode segments (batched over all of them: they never see each other),
     keep each layer's normed attention input at the memory positions (the latents z), and project
     them once into rotated memory keys/values with the decoder's k/v weights plus the transfer
     LoRA. The result, a `Memory`, is what the inference cache keeps too.
  2. `decode_segments`: decode any set of segments given a `Memory`; each query segment sees the
     memory rows of segments lo <= s < hi and its own tokens causally. Decoder segments are
     independent given the memory, so the training path (`incremental.py`) streams chunks of
     them through `lax.scan` with the memory as a constant. `compress` is `latents` (encoder)
     then `latents_to_memory` (projection): training gates the encoder's gradient between them.
Raw tokens use the base projections only, so a segment that sees no memory is the base decoder.

Sharding: encoder and decoder run on [B * n, ...] arrays (batch and segments merged), and
`segments_as_batch` lets the logical 'batch' axis also take the mesh axes of 'segment' meanwhile,
so the foundation layers keep the segment axis sharded without knowing about it.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ccf_jax.model import spans
from ccf_jax.model import decoder as model_lib
from ccf_jax.core import sharding
from ccf_jax.ccf import masks
from ccf_jax.model.layers import DTYPES, dense


class Memory(NamedTuple):
  """Projected memory of some segments: what the decoder (and the inference cache) consumes."""
  k: jax.Array  # [layers, B, R, kv_heads, head_dim], rotary applied.
  v: jax.Array  # [layers, B, R, kv_heads, head_dim].
  segment: jax.Array  # int32[B, R]: the segment each row summarises.
  valid: jax.Array  # bool[B, R]: a real segment's row at this window's ratio.
  read_gate: jax.Array | None = None  # [layers, heads] tanh(g) (ccf.memory_gate='tanh'), else None.


def module_config(cfg) -> ml_collections.ConfigDict:
  """The model section with the ccf section nested as `.ccf` (what CCFModel is built from)."""
  mc = ml_collections.ConfigDict(cfg.model.to_dict())
  mc.ccf = ml_collections.ConfigDict(cfg.ccf.to_dict())
  return mc


def separate_encoder(ccf_cfg) -> bool:
  return ccf_cfg.mode == 'pretrain' and not ccf_cfg.shared_weights


@contextlib.contextmanager
def segments_as_batch(num_segments: int):
  """While [B * n, ...] arrays flow through the foundation layers, 'batch' also takes the mesh axes
  of 'segment' (when n is divisible by them): the segment axis stays sharded."""
  rules, mesh = sharding.active_rules(), jax.sharding.get_abstract_mesh()
  with contextlib.ExitStack() as stack:
    if rules is not None and mesh is not None and not mesh.empty:
      axes = lambda e: () if e is None else ((e,) if isinstance(e, str) else tuple(e))
      table = dict(rules)
      batch = axes(table.get('batch'))
      seg = tuple(a for a in axes(table.get('segment')) if a not in batch)
      if seg and num_segments % math.prod(mesh.shape[a] for a in seg) == 0:
        merged = tuple((k, batch + seg) if k == 'batch' else (k, v) for k, v in rules)
        stack.enter_context(sharding.use_rules(merged))
    yield


# ------------------------------------------------------------------------------------------------
# Adapter parameters.


class LoRA(nnx.Module):
  """A low-rank update x -> (x A) B * alpha / rank per layer: A [layers, d, r] random, B zero."""

  def __init__(self, cfg, heads: int, heads_axis: str, rngs: nnx.Rngs):
    layers, d, r = cfg.num_layers, cfg.d_model, cfg.ccf.lora_rank
    self.a = nnx.Param(jax.random.normal(rngs.params(), (layers, d, r), jnp.float32) / math.sqrt(d),
                       out_sharding=('layers', 'embed', None))
    self.b = nnx.Param(jnp.zeros((layers, r, heads, cfg.head_dim), jnp.float32),
                       out_sharding=('layers', None, heads_axis, 'head_dim'))


def lora_delta(h, a, b, scale: float):
  """h [B, L, d] -> [B, L, heads, head_dim]: the additive LoRA term of one layer."""
  return dense(dense(h, a.astype(h.dtype)), b.astype(h.dtype)) * scale


def lora_scale(ccf_cfg) -> float:
  return float(ccf_cfg.lora_alpha) / ccf_cfg.lora_rank


def memory_from_embedding(memory, embed, token: int):
  """Memory vectors initialised to one token's embedding (the released code uses eos)."""
  return jnp.broadcast_to(jnp.asarray(embed)[token].astype(jnp.float32), memory.shape)


class Adapter(nnx.Module):
  """Everything CCF adds to a base decoder (the trainable part in adapter mode)."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    x, d = cfg.ccf, cfg.d_model
    n = x.num_memory if x.distinct_memory_tokens else 1
    self.memory = nnx.Param(jax.random.normal(rngs.params(), (n, d), jnp.float32) * cfg.init_std,
                            out_sharding=('memory', 'embed'))
    self.repeat = nnx.Param(jax.random.normal(rngs.params(), (d,), jnp.float32) * cfg.init_std,
                            out_sharding=('embed',))
    self.enc_q = LoRA(cfg, cfg.num_heads, 'heads', rngs)
    self.enc_v = LoRA(cfg, cfg.num_kv_heads, 'kv_heads', rngs)
    self.mem_k = LoRA(cfg, cfg.num_kv_heads, 'kv_heads', rngs)
    self.mem_v = LoRA(cfg, cfg.num_kv_heads, 'kv_heads', rngs)
    if x.memory_gate == 'tanh':  # At g = 0 the decoder starts as segment_local (see read_gate).
      self.memory_gate = nnx.Param(jnp.full((cfg.num_layers, cfg.num_heads), x.memory_gate_init,
                                            jnp.float32),
                                   out_sharding=('layers', 'heads'))


# ------------------------------------------------------------------------------------------------
# The model.


class CCFModel(nnx.Module):
  """Base decoder + (optional separate encoder layers) + adapter; built from `module_config`."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    self.cfg = ml_collections.FrozenConfigDict(cfg)
    self.decoder = model_lib.Decoder(cfg, rngs)
    if separate_encoder(cfg.ccf):
      encoder = model_lib.Decoder(cfg, rngs)
      del encoder.embed, encoder.final_norm
      if not cfg.tie_embeddings:
        del encoder.lm_head
      self.encoder = encoder
    self.adapter = Adapter(cfg, rngs)
    if cfg.ccf.memory_init_token >= 0:
      self.adapter.memory[...] = memory_from_embedding(
          self.adapter.memory[...], self.decoder.embed[...], cfg.ccf.memory_init_token)

  @property
  def ccf(self):
    return self.cfg.ccf

  def encoder_layers(self) -> model_lib.Decoder:
    """The module whose `run_layers` encodes: the separate encoder, or the decoder itself."""
    return getattr(self, 'encoder', self.decoder)

  def memory_tokens(self, n: int) -> jax.Array:
    """[n, c, d] encoder inputs at the memory positions."""
    m = self.adapter.memory[...].astype(DTYPES[self.cfg.dtype])
    return jnp.broadcast_to(m[None], (n, self.ccf.num_memory, m.shape[-1]))

  def encode(self, x: jax.Array, span: jax.Array, remat_policy: str | None = None) -> jax.Array:
    """Segment embeddings x [N, l, d] -> per-layer latents z [layers, N, c, d] (the normed
    attention input of every layer at the memory positions). `remat_policy` overrides
    model.remat_policy for the encoder's layers (ccf.encoder_remat)."""
    n, l, _ = x.shape
    plain = self.ccf.mask == 'plain'
    positions, _ = masks.encoder_layout(span, l, self.ccf.num_memory, plain)
    mask = masks.encoder_spans(span, l, self.ccf.num_memory, plain)
    scale = lora_scale(self.ccf)
    ad = self.adapter
    weights = (ad.enc_q.a[...], ad.enc_q.b[...], ad.enc_v.a[...], ad.enc_v.b[...])

    def lora_kwargs(w):
      qa, qb, va, vb = w
      return dict(q_delta_fn=lambda h: lora_delta(h, qa, qb, scale),
                  v_delta_fn=lambda h: lora_delta(h, va, vb, scale))

    inputs = jnp.concatenate([x, self.memory_tokens(n)], axis=1)
    inputs = sharding.constrain(inputs, ('batch', 'length', 'embed'))
    _, hs = self.encoder_layers().run_layers(inputs, positions, mask, xs=weights,
                                             block_kwargs=lora_kwargs, remat_policy=remat_policy,
                                             latents_from=l,
                                             constant_weights=not self.ccf.encoder_trains_base)
    return hs

  def project_memory(self, z: jax.Array, positions: jax.Array):
    """Latents z [layers, N, c, d] at decoder positions [N, c] -> rotated keys and values
    [layers, N, c, kv_heads, head_dim]: the decoder's own k/v projection of each layer plus the
    transfer-head LoRA (memory rows only)."""
    gdef, layer_state = nnx.split(self.decoder.layers)
    scale = lora_scale(self.ccf)
    ad = self.adapter
    weights = (ad.mem_k.a[...], ad.mem_k.b[...], ad.mem_v.a[...], ad.mem_v.b[...])

    def one_layer(state, z_l, w):
      ka, kb, va, vb = w
      attn = nnx.merge(gdef, state).attn
      return attn.project_kv(z_l, positions, k_delta=lora_delta(z_l, ka, kb, scale),
                             v_delta=lora_delta(z_l, va, vb, scale))

    return jax.vmap(one_layer)(layer_state, z, weights)

  def latents(self, tokens: jax.Array, span: jax.Array,
              remat_policy: str | None = None) -> jax.Array:
    """Segments tokens int32[B, n, l] -> latents z [layers, B, n, c, d]: the first half of
    `compress`, apart so that training can cut or gate the gradient between the encoder and the
    memory projection (ccf.grad_mode, see incremental.py)."""
    b, n, l = tokens.shape
    with segments_as_batch(n):
      x = self.decoder.embed_tokens(tokens.reshape(b * n, l))
      if not self.ccf.encoder_trains_base:  # The shared table too is the decoder's alone.
        x = jax.lax.stop_gradient(x)
      z = self.encode(x, jnp.repeat(span, n), remat_policy)
    return z.reshape(z.shape[0], b, n, *z.shape[2:])

  def read_gate(self) -> jax.Array | None:
    """[layers, heads] weight of the decoder's memory read, tanh(g) with g zero at
    initialisation (`ccf.memory_gate='tanh'`), or None: one softmax over [memory ; raw] (paper).

    Why a gate: trained from scratch, a joint softmax lets up to T*c memory rows of a still random
    encoder take attention mass from the local tokens from the first step, which might be why the
    decoder learned worse than segment_local. With the gate, memory rows get a softmax of their own
    whose output is added with weight tanh(g): at g = 0 the decoder is exactly segment_local, g
    moves only where reading memory lowers the loss (its gradient at 0 is the correlation of the
    read with the loss gradient), and the rows' own gradient grows with it (Flamingo's gated
    cross-attention, applied per head). What it costs and buys at the tiny size is recorded in
    WORKSPACE.md; the paper's ungated read is the default.
    """
    if self.ccf.memory_gate != 'tanh':
      return None
    return jnp.tanh(self.adapter.memory_gate[...])

  def latents_to_memory(self, z: jax.Array, span: jax.Array, valid_segments: jax.Array,
                        segments: jax.Array | None = None) -> Memory:
    """Latents z [layers, B, n, c, d] -> their projected `Memory` (second half of `compress`)."""
    layers, b, n, c = z.shape[:4]
    if segments is None:
      segments = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    with segments_as_batch(n):
      positions = masks.memory_positions(self.ccf, span, segments).reshape(b * n, c)
      k, v = self.project_memory(z.reshape(layers, b * n, c, -1), positions)
    k, v = (a.reshape(a.shape[0], b, n * c, *a.shape[3:]) for a in (k, v))
    l = self.ccf.segment_len
    valid = valid_segments[:, :, None] & masks.memory_valid(span, l, c)[:, None, :]
    return Memory(k, v, jnp.repeat(segments, c, axis=1), valid.reshape(b, n * c), self.read_gate())

  def compress(self, tokens: jax.Array, span: jax.Array, valid_segments: jax.Array,
               segments: jax.Array | None = None) -> Memory:
    """Encodes segments tokens int32[B, n, l] (indices `segments` [B, n], default 0..n-1; padded
    ones marked False in `valid_segments` [B, n]) into their projected `Memory` (R = n * c rows)."""
    return self.latents_to_memory(self.latents(tokens, span), span, valid_segments, segments)


def decode_segments(decoder: model_lib.Decoder, ccf_cfg, tokens: jax.Array, span: jax.Array,
                    lo: jax.Array, hi: jax.Array, memory: Memory | None = None,
                    first_input: jax.Array | None = None,
                    remat_policy: str | None = None) -> jax.Array:
  """Logits float32[B, n, l, vocab] of segments tokens int32[B, n, l] given memory.

  Query segment k of window b sees the memory rows of segments lo[b, k] <= s < hi[b, k] (see
  masks.visible_range) and its own tokens causally; its raw positions follow hi (masks doc).
  `memory=None` is the plain decoder on each segment alone (segment_local). `first_input` [d]
  replaces every segment's first input embedding (the auto-encoding "repeat" vector). Memory k/v
  may also come per query segment, [layers, B, n, R, K, D]: the same rows seen through a different
  gradient gate by each query segment (ccf.grad_mode truncated / streaming reservoir).
  `remat_policy` overrides model.remat_policy for the decoder's layers.
  """
  b, n, l = tokens.shape
  positions = masks.raw_positions(ccf_cfg, span, hi).reshape(b * n, l)
  with segments_as_batch(n):
    x = decoder.embed_tokens(tokens.reshape(b * n, l))
    if first_input is not None:
      x = x.at[:, 0].set(first_input.astype(x.dtype))
    if memory is None:
      out, _ = decoder.run_layers(x, positions, spans.causal(l), remat_policy=remat_policy)
    else:
      mask = masks.decoder_spans(memory.segment, memory.valid, lo, hi, l)
      kv = tuple(_per_query_segment(a, n) for a in (memory.k, memory.v))
      out, _ = decoder.run_layers(x, positions, mask, xs=(kv, memory.read_gate),
                                  block_kwargs=memory_kwargs, remat_policy=remat_policy)
    logits = decoder.logits(out)
  return logits.reshape(b, n, l, -1)


def memory_kwargs(xs, memory_rows: int | None = None) -> dict:
  """Block arguments of one layer's slice of (memory (k, v), read_gate or None)."""
  kv, gate = xs
  out = {'kv_prefix': kv}
  return out if gate is None else dict(out, memory_gate=gate, memory_rows=memory_rows)


def _per_query_segment(a: jax.Array, n: int) -> jax.Array:
  """[layers, B, R, K, D] (or already per query segment, [layers, B, n, R, K, D]) ->
  [layers, B * n, R, K, D]: every query segment gets the memory rows (the block mask decides which
  it sees)."""
  layers, b = a.shape[:2]
  if a.ndim == 5:
    a = jnp.broadcast_to(a[:, :, None], (layers, b, n, *a.shape[2:]))
  a = a.reshape(layers, b * n, *a.shape[3:])
  return sharding.constrain(a, ('layers', 'batch', 'memory', 'kv_heads', 'head_dim'))
