"""Attention masks as compact descriptors, and the one dispatcher every attention goes through.

Every mask the models use is a union of a few key-index ranges per query, intersected with a
per-key validity flag:
  * causal (plain decoder): query i sees keys [0, i + 1), or [i - W + 1, i + 1) with a sliding
    window of W keys (`model.sliding_window`: the blocked kernel skips key blocks below it);
  * CCF encoder over [segment ; memory]: token i sees [0, i + 1); memory slot j sees [0, cover_j)
    (the tokens it summarises) and [l + j, l + j + 1) (itself): two ranges;
  * CCF decoder over [memory rows ; tokens] and the inference cache over [memory ; raw ; new]:
    query i sees [0, P + i + 1) with P the prefix rows, and a prefix row only where it is visible
    to the query's segment (its segment in [lo, hi), a real row at this ratio, a written cache
    slot): per-key flags, shared by every query of a batch row.
`Spans` (model/spans.py) holds exactly that: lo/hi int32[B|1, Lq, R] and key_ok bool[B|1, Lk] or
None. It costs O(Lq * R + Lk) memory where a boolean mask costs O(Lq * Lk), so the blocked and
splash kernels can compute each block's mask from it (and know which blocks no query may see)
without a [B, Lq, Lk] array ever existing. `Spans.dense()` is the boolean form, the reference in tests.
A plain boolean mask (e.g. from a caller that builds its own) is still accepted everywhere.

`attend(q, k, v, mask, impl, block)` is the single entry point (`model.attention_impl`):
  xla      jax.nn.dot_product_attention(implementation='xla') on the dense mask;
  blocked  blocked_attention.py: online softmax over query x key blocks, per-block masks, skipped
           blocks, a recomputing backward (never [B, heads, Lq, Lk]);
  rows     causal_rows.py: the plain decoder's causal mask (known at trace time, `static_causal`)
           as one product per query block over its key range; every other mask (the CCF
           encoder's and decoder's, a decode cache's) has no trace-time structure to unroll and
           runs the blocked kernel (`CALLS` counts it as 'blocked'; one log line says so);
  cudnn    jax.nn.dot_product_attention(implementation='cudnn'), bf16/fp16 on NVIDIA GPUs;
  splash   splash.py: Pallas TPU splash attention (interpret mode off TPU, for tests);
  auto     `resolve`: per platform, with one warning line whenever it leaves the preferred one.
`CALLS` counts, at trace time, which implementation each traced attention used: tests read it to
prove the configured one is the one that runs. `target_platform` makes `auto` (and the kernels'
platform checks) answer for the platform a program is compiled for rather than the host's:
`ccf_jax.plan` compiles a TPU slice's step on a CPU host and must plan splash, not the CPU choice.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import math

import jax
import jax.numpy as jnp

from ccf_jax.core.config_lib import ATTENTION_IMPLS as IMPLS, ConfigError
from ccf_jax.model import blocked_attention, causal_rows, splash
from ccf_jax.model.per_device import per_device
from ccf_jax.model.spans import Spans, as_dense

CALLS: collections.Counter = collections.Counter()  # impl -> attentions traced with it.
_TARGET = contextvars.ContextVar('attention_target_platform', default=None)


def platform() -> str:
  """The platform attentions are traced for: `target_platform`'s, else JAX's default backend."""
  return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def target_platform(name: str | None):
  """Traces attentions for platform `name` ('tpu', 'gpu', 'cpu'; None = the default backend):
  what an ahead-of-time compile for another platform (train/plan.py) wraps its lowering in."""
  token = _TARGET.set(name)
  try:
    yield
  finally:
    _TARGET.reset(token)


# ------------------------------------------------------------------------------------------------
# Implementations.


def dense_attend(q, k, v, mask):
  """The reference: grouped-query softmax attention with a boolean mask (float32 softmax; a fully
  masked query row returns zeros). q: [B, Lq, H, D]; k, v: [B, Lk, K, D]; mask broadcastable to
  [B, Lq, Lk] (True = may attend)."""
  b, lq, h, d = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, lq, kh, h // kh, d)
  scores = jnp.einsum('bqkgd,bskd->bkgqs', qg, k).astype(jnp.float32) / math.sqrt(d)
  m = jnp.asarray(mask)[:, None, None]
  scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(m, probs, 0.0).astype(v.dtype)
  out = jnp.einsum('bkgqs,bskd->bqkgd', probs, v)
  return out.reshape(b, lq, h, d)


def dpa_attend(q, k, v, mask, implementation: str):
  """jax.nn.dot_product_attention with the mask as that API takes it: boolean [B|1, 1, Lq, Lk]
  (a 3-D mask would be read as [1, B, Lq, Lk], the batch as heads). Its fully masked rows return
  mean(V) (masked logits are finite), so they are zeroed to match `dense_attend`. The square
  causal mask goes as is_causal, a sliding window as local_window_size (cuDNN's native causal and
  local-window modes, no dense bias)."""
  if isinstance(mask, Spans) and mask.causal and q.shape[1] == k.shape[1]:
    # local_window_size only when there is a window: the plain causal call then needs nothing
    # beyond is_causal, which every JAX with this API has.
    local = {'local_window_size': (mask.window - 1, 0)} if mask.window else {}
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation,
                                        **local)
  m = as_dense(mask, k.shape[1])
  out = jax.nn.dot_product_attention(q, k, v, mask=m[:, None], implementation=implementation)
  return out * m.any(-1)[:, :, None, None].astype(out.dtype)


_warned: set = set()


def _warn_once(msg: str):
  if msg not in _warned:
    _warned.add(msg)
    logging.warning('%s', msg)


def static_causal(q, k, mask) -> bool:
  """Whether `mask` is the square causal mask (optionally a sliding window) whose structure is
  known at trace time: what the `rows` kernel takes."""
  return isinstance(mask, Spans) and mask.causal and q.shape[1] == k.shape[1]


def cpu_choice(q, k, mask=None, block: int = 128) -> str:
  """`auto` on CPU: rows for the causal mask up to `causal_rows.MAX_BLOCKS` query blocks, blocked
  for it beyond, and for any other mask once the score rectangle reaches 512 x 512; xla (the dense
  product) for the CCF masks below that.

  Measured idle (WORKSPACE "The attention kernel alone" and "The rows kernel", `bench
  attention`): causal, the rows kernel ran one layer's forward and backward 1.72x faster than the
  blocked one at S2, 1.32x at S3, 1.08x at tiny.py's 256 tokens and level (0.99x) at S1; the
  blocked kernel 0.79x (one 128-token block) to 0.35x the dense product's time. CCF8x's step (a
  144-row encoder over [segment; memory], 128 x 256 decoder windows) was 0.95-0.99x with blocked,
  where the dense product's few, larger matmuls on a mask of mostly visible blocks still win."""
  if static_causal(q, k, mask):
    return 'rows' if -(-q.shape[1] // block) <= causal_rows.MAX_BLOCKS else 'blocked'
  if isinstance(mask, Spans) and mask.causal:
    return 'blocked'
  return 'blocked' if q.shape[1] * k.shape[1] >= 512 * 512 else 'xla'


def resolve(impl: str, q, k, mask=None, block: int = 128) -> str:
  """The implementation `impl` runs as on this platform; `auto` picks (module doc) and logs one
  warning line when it cannot take the platform's preferred kernel."""
  if impl != 'auto':
    return impl
  target = platform()
  if target == 'gpu':
    if q.dtype in (jnp.bfloat16, jnp.float16):
      return 'cudnn'
    _warn_once(f'model.attention_impl=auto: cudnn needs bf16/fp16 ({q.dtype} here); using xla.')
    return 'xla'
  if target == 'tpu':
    return 'splash'
  if target != 'cpu':
    _warn_once(f'model.attention_impl=auto: no preferred kernel on {target!r}; using xla.')
    return 'xla'
  return cpu_choice(q, k, mask, block)


@jax.named_scope('attention_kernel')  # Profiles attribute its time (bench profile).
def attend(q, k, v, mask, impl: str = 'xla', block: int = 128):
  """Grouped-query softmax attention, q: [B, Lq, H, D]; k, v: [B, Lk, K, D] with H % K == 0;
  mask: `Spans` or bool broadcastable to [B, Lq, Lk] (True = may attend). Softmax in float32; a
  fully masked query row returns zeros, in every implementation. `block`: query/key rows per
  block of the blocked, rows and splash kernels."""
  impl = resolve(impl, q, k, mask, block)
  if impl == 'rows' and not static_causal(q, k, mask):
    _warn_once("model.attention_impl='rows' takes the plain decoder's causal mask only; this "
               "model's other masks (CCF encoder/decoder, decode cache) run 'blocked'.")
    impl = 'blocked'  # No trace-time structure to unroll (module doc).
  CALLS[impl] += 1
  if impl == 'xla':
    return dpa_attend(q, k, v, mask, 'xla')
  if impl == 'blocked':
    return blocked_attention.blocked_attend(q, k, v, mask, block)
  if impl == 'rows':  # Per device: its map over pairs must not scan a sharded axis.
    rows = lambda q, k, v, mask: causal_rows.rows_attend(q, k, v, block, mask.window)
    return per_device(rows, q, k, v, mask)
  if impl == 'cudnn':
    if platform() != 'gpu':
      raise ConfigError(f"model.attention_impl='cudnn' needs an NVIDIA GPU (backend is "
                        f"{platform()!r}). Fix: use 'auto', 'xla' or 'blocked'.")
    return dpa_attend(q, k, v, mask, 'cudnn')
  if impl == 'splash':
    return splash.splash_attend(q, k, v, mask, block, interpret=platform() != 'tpu')
  raise ConfigError(f'model.attention_impl={impl!r}; choose one of {IMPLS}.')
