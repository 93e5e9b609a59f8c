"""Llama-family building blocks in Flax NNX: RMSNorm, rotary embeddings, GQA attention, SwiGLU.

Every parameter carries logical axis names (see sharding.py). Attention takes an explicit key/value
prefix and a mask (`attention.Spans` or boolean; model/attention.py picks the kernel), so that CCF
can prepend per-layer memory rows (already projected and rotated) without touching the block.
`Attention.project_kv` is public for the same reason: CCF projects memory latents with the
decoder's own k/v weights (plus a LoRA on memory rows only).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ccf_jax.model import attention, spans
from ccf_jax.core import sharding

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def dense(x, w, n: int = 1, **kw):
  """x's last `n` axes contracted with w's first `n`, as one 2-D product [rows, k] @ [k, out]
  reshaped back: 'bld,dm->blm' and 'blhk,hkd->bld' without their batch-like axes. The same
  FLOPs, but autodiff's weight gradient is then a 2-D product contracting one axis, where the
  einsum's contracted (batch, length) together and XLA:CPU copied the activations into another
  layout first (the whole train step ran up to 1.2x faster on 2 CPU cores; WORKSPACE
  "Train-step throughput"). Keyword arguments go to `jnp.matmul`
  (e.g. preferred_element_type)."""
  lead, k = x.shape[:x.ndim - n], math.prod(x.shape[x.ndim - n:])
  y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), **kw)
  return y.reshape(*lead, *w.shape[n:])


def _param(rngs, shape, names, std, dtype):
  return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * std, out_sharding=names)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32 (as Llama) and cast back to the compute dtype."""

  def __init__(self, dim: int, eps: float, param_dtype, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=('embed',))
    self.eps = eps
    self.dtype = dtype

  @jax.named_scope('norm')  # Profiles attribute time by component (bench profile).
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling=None) -> jax.Array:
  """Inverse frequencies [head_dim / 2] under `model.rope_scaling` (empty: none), as transformers'
  `modeling_rope_utils` computes them, so converted long-context models keep their logits:
  rope_type 'llama3' (factor, low/high_freq_factor, original length; also a scaling without
  rope_type, as configs written before the key have it), 'linear' (positions divided by factor)
  or 'yarn' (NTK-by-parts: high frequencies kept, low ones interpolated, a linear ramp between;
  its `rope_attention_scale` multiplies cos and sin)."""
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  scaling = dict(scaling or {})
  if not scaling.get('factor'):
    return inv
  kind, factor = scaling.get('rope_type', 'llama3'), float(scaling['factor'])
  if kind == 'linear':
    return inv / factor
  if kind == 'yarn':
    low, high = _yarn_range(head_dim, theta, scaling)
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low)
                    / (high - low if high != low else 0.001), 0, 1)
    return inv / factor * ramp + inv * (1 - ramp)
  low = float(scaling.get('low_freq_factor', 1.0))
  high = float(scaling.get('high_freq_factor', 4.0))
  orig = float(scaling.get('original_max_position_embeddings', 8192))
  wavelen = 2 * math.pi / inv
  low_wl, high_wl = orig / low, orig / high
  smooth = (orig / wavelen - low) / (high - low)
  scaled = jnp.where(wavelen > low_wl, inv / factor, inv)
  mid = (1 - smooth) * inv / factor + smooth * inv
  is_mid = (wavelen <= low_wl) & (wavelen >= high_wl)
  return jnp.where(is_mid, mid, scaled)


def _yarn_range(dim: int, base: float, scaling: dict) -> tuple[float, float]:
  """YaRN's correction range: the frequency indices that make beta_fast and beta_slow rotations
  over the original context (floored/ceiled unless truncate is false), clipped to [0, dim - 1]."""
  orig = float(scaling['original_max_position_embeddings'])
  fast, slow = float(scaling.get('beta_fast') or 32), float(scaling.get('beta_slow') or 1)
  at = lambda rot: dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
  low, high = at(fast), at(slow)
  if scaling.get('truncate', True):
    low, high = math.floor(low), math.ceil(high)
  return max(low, 0), min(high, dim - 1)


def rope_attention_scale(scaling=None) -> float:
  """YaRN's factor on cos and sin (so on every q.k product, squared): `attention_factor` when
  given, else from factor (and mscale / mscale_all_dim), as transformers derives it; 1 otherwise."""
  scaling = dict(scaling or {})
  if scaling.get('rope_type') != 'yarn' or not scaling.get('factor'):
    return 1.0
  if scaling.get('attention_factor') is not None:
    return float(scaling['attention_factor'])
  factor = float(scaling['factor'])
  mscale = lambda m: 1.0 if factor <= 1 else 0.1 * float(m) * math.log(factor) + 1.0
  if scaling.get('mscale') and scaling.get('mscale_all_dim'):
    return mscale(scaling['mscale']) / mscale(scaling['mscale_all_dim'])
  return mscale(1.0)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
               scale: float = 1.0) -> jax.Array:
  """Rotary embedding, half-split layout (Hugging Face Llama's `rotate_half`).

  x: [..., length, heads, head_dim]; positions: [..., length] (broadcastable to x's leading axes);
  scale multiplies cos and sin (`rope_attention_scale`).
  """
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., length, head_dim/2]
  cos = jnp.cos(angles)[..., None, :] * scale
  sin = jnp.sin(angles)[..., None, :] * scale
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """GQA self-attention whose keys/values may be prefixed by externally supplied rows."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    pd, std = DTYPES[cfg.param_dtype], cfg.init_std
    d, h, k, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.wq = _param(rngs, (d, h, hd), ('embed', 'heads', 'head_dim'), std, pd)
    self.wk = _param(rngs, (d, k, hd), ('embed', 'kv_heads', 'head_dim'), std, pd)
    self.wv = _param(rngs, (d, k, hd), ('embed', 'kv_heads', 'head_dim'), std, pd)
    self.wo = _param(rngs, (h, hd, d), ('heads', 'head_dim', 'embed'), std / math.sqrt(2 * cfg.num_layers), pd)
    self.qkv_bias = bool(cfg.get('qkv_bias', False))
    if self.qkv_bias:  # Qwen2's q/k/v projection biases; zero at initialisation.
      self.bq = nnx.Param(jnp.zeros((h, hd), pd), out_sharding=('heads', 'head_dim'))
      self.bk = nnx.Param(jnp.zeros((k, hd), pd), out_sharding=('kv_heads', 'head_dim'))
      self.bv = nnx.Param(jnp.zeros((k, hd), pd), out_sharding=('kv_heads', 'head_dim'))
    self.dtype = DTYPES[cfg.dtype]
    # get(): model configs exported before the fields existed.
    self.attention_impl = cfg.get('attention_impl', 'auto')
    self.attention_block = cfg.get('attention_block', 128)
    self.rope = (hd, float(cfg.rope_theta), tuple(sorted(dict(cfg.rope_scaling).items())))

  @property
  def inv_freq(self):
    hd, theta, scaling = self.rope
    return rope_frequencies(hd, theta, dict(scaling))

  def _rope(self, x, positions):
    return apply_rope(x, positions, self.inv_freq, rope_attention_scale(dict(self.rope[2])))

  def _w(self, p):
    return p[...].astype(self.dtype)

  def project_kv(self, h, positions, k_delta=None, v_delta=None):
    """Keys (rotated) and values of normed hidden states h: [B, L, d].

    `k_delta`/`v_delta` are optional additive terms before rotary (LoRA outputs, [B, L, K, D]).
    """
    k, v = dense(h, self._w(self.wk)), dense(h, self._w(self.wv))
    if self.qkv_bias:
      k, v = k + self._w(self.bk), v + self._w(self.bv)
    if k_delta is not None:
      k = k + k_delta
    if v_delta is not None:
      v = v + v_delta
    k = sharding.constrain(self._rope(k, positions), ('batch', 'length', 'kv_heads', 'head_dim'))
    v = sharding.constrain(v, ('batch', 'length', 'kv_heads', 'head_dim'))
    return k, v

  @jax.named_scope('attention')  # Profiles attribute time by component (bench profile).
  def __call__(self, h, positions, mask, kv_prefix=None, q_delta=None, v_delta=None,
               memory_gate=None, memory_rows=None):
    """h: normed input [B, L, d]; kv_prefix: optional (k, v) rows [B, M, K, D] placed before h's.

    memory_gate: optional [heads] weights (CCF's `ccf.memory_gate='tanh'`): the first
    `memory_rows` key rows (default: all of kv_prefix) are then read by a softmax of their own,
    added to the rest's as `memory_gate * read`, instead of sharing one softmax with them. A zero
    gate is exactly attention without those rows. The mask's last axis then spans every key row
    (memory, prefix and h's), as the CCF decoder's and the inference cache's masks do.
    mask: `attention.Spans` or bool [B|1, L, keys]; every attention goes through
    `attention.attend` with `model.attention_impl` and `model.attention_block`.
    """
    q = dense(h, self._w(self.wq))
    if self.qkv_bias:
      q = q + self._w(self.bq)
    if q_delta is not None:
      q = q + q_delta
    q = sharding.constrain(self._rope(q, positions), ('batch', 'length', 'heads', 'head_dim'))
    k, v = self.project_kv(h, positions, v_delta=v_delta)
    if kv_prefix is not None:
      k = jnp.concatenate([kv_prefix[0].astype(k.dtype), k], axis=1)
      v = jnp.concatenate([kv_prefix[1].astype(v.dtype), v], axis=1)
    attend = functools.partial(attention.attend, impl=self.attention_impl,
                               block=self.attention_block)
    if memory_gate is None:
      out = attend(q, k, v, mask)
    else:
      m = kv_prefix[0].shape[1] if memory_rows is None else memory_rows
      lk = k.shape[1]
      read = attend(q, k[:, :m], v[:, :m], spans.key_range(mask, 0, m, lk))
      out = attend(q, k[:, m:], v[:, m:], spans.key_range(mask, m, lk, lk))
      out = out + read * memory_gate.astype(read.dtype)[:, None]
    out = dense(out, self._w(self.wo), 2)
    return sharding.constrain(out, ('batch', 'length', 'embed'))


class MLP(nnx.Module):
  """SwiGLU feed-forward."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    pd, std = DTYPES[cfg.param_dtype], cfg.init_std
    self.w_gate = _param(rngs, (cfg.d_model, cfg.mlp_dim), ('embed', 'mlp'), std, pd)
    self.w_up = _param(rngs, (cfg.d_model, cfg.mlp_dim), ('embed', 'mlp'), std, pd)
    self.w_down = _param(rngs, (cfg.mlp_dim, cfg.d_model), ('mlp', 'embed'), std / math.sqrt(2 * cfg.num_layers), pd)
    self.dtype = DTYPES[cfg.dtype]

  @jax.named_scope('mlp')  # Profiles attribute time by component (bench profile).
  def __call__(self, x):
    g = dense(x, self.w_gate[...].astype(self.dtype))
    u = dense(x, self.w_up[...].astype(self.dtype))
    hdn = sharding.constrain(jax.nn.silu(g) * u, ('batch', 'length', 'mlp'))
    out = dense(hdn, self.w_down[...].astype(self.dtype))
    return sharding.constrain(out, ('batch', 'length', 'embed'))


class Block(nnx.Module):
  """Pre-norm transformer block. Returns the new residual and this layer's normed attention input.

  The normed attention input is what CCF keeps at memory positions as the per-layer latent z[layer].
  """

  def __init__(self, cfg, rngs: nnx.Rngs):
    pd, dt = DTYPES[cfg.param_dtype], DTYPES[cfg.dtype]
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, dt)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, dt)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, mask, kv_prefix=None, q_delta_fn=None, v_delta_fn=None,
               memory_gate=None, memory_rows=None):
    h = self.attn_norm(x)
    qd = None if q_delta_fn is None else q_delta_fn(h)
    vd = None if v_delta_fn is None else v_delta_fn(h)
    x = x + self.attn(h, positions, mask, kv_prefix, qd, vd, memory_gate, memory_rows)
    x = x + self.mlp(self.mlp_norm(x))
    return x, h
