"""`model.attention_impl='splash'`: JAX's Pallas TPU splash attention with the CCF masks.

Splash takes a mask object per head and skips the blocks it marks empty, in the forward and the
backward kernels. The plain decoder's causal mask is static and goes as `CausalMask` (with a
sliding window, `LocalMask`: key blocks below the window are skipped). The CCF
masks depend on traced data (each window's ratio, valid rows, the segments a query may see), so
they go through splash's dynamic-mask path: per example a [heads, Lq, Lk] mask, built from the
`attention.Spans` descriptor inside the vmapped kernel (the path MaxText's tokamax splash uses).

Kernel constraints it meets here rather than refusing:
  * lengths must be multiples of the block (a multiple of 128): queries and keys are padded;
    padded keys are masked, padded queries' outputs dropped;
  * a query block whose every key is masked returns NaN, and a fully masked row mean(V), where the
    reference returns zeros (the gated memory read of the first segment sees no memory): one extra
    all-zero key is visible exactly to the rows that see nothing else, so they return 0 and pass
    no gradient to real keys;
  * no softmax scale inside the kernel: q is pre-scaled by 1/sqrt(D);
  * in jax 0.10.2 (and through 0.11) building a dynamic-mask kernel under jit fails on a Python
    bool (`is_dynamic_mask`) turned into an array; the flag is set back after construction;
  * a Mosaic kernel is a custom call that XLA cannot partition ("Mosaic kernels cannot be
    automatically partitioned"): under a mesh of several devices it runs inside `shard_map`,
    each device on its own batch rows and heads (`per_device.py`).
Off TPU it runs in Pallas interpret mode: correct, slow, for tests.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ccf_jax.model.per_device import per_device
from ccf_jax.model.spans import Spans, as_dense


def _modules():
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  return sk, sm


def _block_sizes(sk, bs: int):
  return sk.BlockSizes(block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs,
                       block_kv_dkv=bs, block_kv_dkv_compute=bs, block_q_dq=bs, block_kv_dq=bs)


def _dynamic_kernel(sk, mask, bs: int, interpret: bool):
  """A splash kernel for a traced bool mask [heads, Lq, Lk] (module doc: the jit workaround)."""
  kernel = sk.make_splash_mha_single_device(mask=mask, block_sizes=_block_sizes(sk, bs),
                                            interpret=interpret)
  for name in ('fwd_mask_info', 'dq_mask_info', 'dkv_mask_info'):
    info = getattr(kernel, name, None)
    if info is not None and hasattr(info, 'is_dynamic_mask'):
      setattr(kernel, name, info._replace(is_dynamic_mask=True))
  return kernel


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def splash_attend(q, k, v, mask, block: int = 128, interpret: bool | None = None):
  """`attention.dense_attend(q, k, v, mask)` through splash attention. q: [B, Lq, H, D]; k, v:
  [B, Lk, K, D]; mask: `attention.Spans` or bool [B|1, Lq, Lk]. `block` (a multiple of 128, else
  128) is splash's query/key block. `interpret`: Pallas interpret mode; None = off TPU only (an
  ahead-of-time compile for TPU from a CPU host passes False: the Mosaic kernel is lowered)."""
  if interpret is None:
    interpret = jax.default_backend() != 'tpu'
  local = lambda q, k, v, mask: _splash(q, k, v, mask, block, interpret)
  return per_device(local, q, k, v, mask)


def _splash(q, k, v, mask, block: int, interpret: bool):
  """`splash_attend` on one device's arrays."""
  sk, sm = _modules()
  b, lq, h, d = q.shape
  lk = k.shape[1]
  bs = block if block % 128 == 0 else 128
  qt = (q / jnp.asarray(math.sqrt(d), q.dtype)).transpose(0, 2, 1, 3)  # [B, H, Lq, D]
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, Lk, D]
  if isinstance(mask, Spans) and mask.causal and lq == lk:
    n = _round_up(lq, bs)
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, n - lq), (0, 0)))
    one = (sm.LocalMask((n, n), window_size=(mask.window - 1, 0), offset=0) if mask.window
           else sm.CausalMask((n, n)))  # Static masks: splash skips the blocks they leave empty.
    heads = sm.MultiHeadMask([one for _ in range(h)])
    kernel = sk.make_splash_mha_single_device(mask=heads, block_sizes=_block_sizes(sk, bs),
                                              interpret=interpret)
    out = jax.vmap(kernel)(pad(qt), pad(kt), pad(vt))
    return out[:, :, :lq].transpose(0, 2, 1, 3)
  nq, nk = _round_up(lq, bs), _round_up(lk + 1, bs)  # At least one spare key: the zero key.
  m = jnp.broadcast_to(as_dense(mask, lk), (b, lq, lk))
  m = jnp.pad(m, ((0, 0), (0, nq - lq), (0, nk - lk)))
  empty = ~m.any(-1)  # [B, nq]: rows that see nothing (padded queries included).
  m = m.at[:, :, lk].set(empty)
  pad_q = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, nq - lq), (0, 0)))
  pad_k = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, nk - lk), (0, 0)))

  def one(qe, ke, ve, me):
    kernel = _dynamic_kernel(sk, jnp.broadcast_to(me, (h, nq, nk)), bs, interpret)
    return kernel(qe, ke, ve)

  out = jax.vmap(one)(pad_q(qt), pad_k(kt), pad_k(vt), m)
  return out[:, :, :lq].transpose(0, 2, 1, 3)
