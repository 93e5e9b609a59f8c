"""Softmax attention over key blocks with an online softmax and a recomputing backward pass.

`layers.attend` materialises the scores of every query against every key, and autodiff keeps them
(and the probabilities) for the backward pass: [B, heads, Lq, Lk] float32, several times over. For
the CCF decoder the keys are the memory buffer (T*c rows) plus the segment's own l tokens, so the
scores grow with the window length T, and under a remat'd chunk step (`ccf.decoder_remat`) all
layers' scores of one chunk are alive at once in the backward pass. That, not the buffer itself,
was most of what the train step's temp memory gained from T=4 to T=32 (stop 17: 29 MB against a
3.7 MB buffer on tiny_ccf at k=1).

`blocked_attend` computes the same function key block by key block (a `lax.scan` with the running
max / sum / output of an online softmax, as in FlashAttention) under a `jax.custom_vjp` whose
residuals are only q, k, v, the mask, the output and the per-query log-sum-exp; the backward pass
recomputes each block's probabilities. Transient memory is then one block of scores, whatever Lk.
Blocks whose keys no query may see (the memory of segments after the query's, at k=1 most of the
buffer) are skipped by `lax.cond`, in both passes: FLOPs the dense path spends on masked scores.

Pure JAX, so it runs on CPU, GPU and TPU and under SPMD partitioning; a fused kernel (Pallas, cuDNN)
would go further on accelerators. Enabled by `model.attention_block` (key rows per block; 0 = the
dense `attend`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_NEG = jnp.finfo(jnp.float32).min


def _blocks(q, k, v, mask, block: int):
  """Grouped queries [B, K, G, Lq, D] (float32, pre-scaled) and per-block keys, values [n, B, blk,
  K, D] and mask [n, B, Lq, blk]; keys padded to a multiple of `block` are masked."""
  b, lq, h, d = q.shape
  lk, kh = k.shape[1], k.shape[2]
  n = -(-lk // block)
  pad = n * block - lk
  mask = jnp.broadcast_to(mask, (b, lq, lk))
  if pad:
    k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (k, v))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))
  qg = (q.astype(jnp.float32) / math.sqrt(d)).reshape(b, lq, kh, h // kh, d).transpose(0, 2, 3, 1, 4)
  split = lambda a: a.astype(jnp.float32).reshape(b, n, block, kh, d).swapaxes(0, 1)
  mask = mask.reshape(b, lq, n, block).transpose(2, 0, 1, 3)
  return qg, split(k), split(v), mask


def _scores(qg, kb, mb):
  """Scores [B, K, G, Lq, blk] of one block, masked entries at the float32 minimum."""
  s = jnp.einsum('bkgqd,bskd->bkgqs', qg, kb)
  return jnp.where(mb[:, None, None], s, _NEG)


def _forward(q, k, v, mask, block):
  qg, kb, vb, mb = _blocks(q, k, v, mask, block)
  init = (jnp.full(qg.shape[:-1], _NEG), jnp.zeros(qg.shape[:-1]), jnp.zeros(qg.shape))

  def step(carry, blk):
    def visit(carry):
      m_old, l_old, acc = carry
      kk, vv, mm = blk
      s = _scores(qg, kk, mm)
      m_new = jnp.maximum(m_old, s.max(-1))
      p = jnp.exp(s - m_new[..., None]) * mm[:, None, None]  # Exactly 0 where masked.
      corr = jnp.exp(m_old - m_new)
      return (m_new, l_old * corr + p.sum(-1),
              acc * corr[..., None] + jnp.einsum('bkgqs,bskd->bkgqd', p, vv))
    return jax.lax.cond(blk[2].any(), visit, lambda c: c, carry), None

  (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, mb))
  seen = l > 0  # A query that sees no key returns zeros, as layers.attend does.
  out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -_NEG)  # +max: exp(s - lse) = 0.
  b, kh, g, lq, d = out.shape
  return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, kh * g, d).astype(q.dtype), (out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blocked_attend(q, k, v, mask, block: int):
  """`layers.attend(q, k, v, mask)` computed over key blocks of `block` rows (module docstring).

  q: [B, Lq, H, D]; k, v: [B, Lk, K, D] with H % K == 0; mask: bool broadcastable to [B, Lq, Lk]
  (True = may attend). Softmax in float32; a fully masked query row returns zeros.
  """
  return _forward(q, k, v, mask, block)[0]


def _fwd(q, k, v, mask, block):
  out, (out_g, lse) = _forward(q, k, v, mask, block)
  return out, (q, k, v, mask, out_g, lse)


def _bwd(block, res, dout):
  q, k, v, mask, out_g, lse = res
  b, lq, h, d = q.shape
  lk, kh = k.shape[1], k.shape[2]
  qg, kb, vb, mb = _blocks(q, k, v, mask, block)
  do = dout.astype(jnp.float32).reshape(b, lq, kh, h // kh, d).transpose(0, 2, 3, 1, 4)
  delta = (do * out_g).sum(-1)  # [B, K, G, Lq]: the softmax backward's row term.

  def step(dq, blk):
    kk, vv, mm = blk
    def visit(dq):
      p = jnp.exp(_scores(qg, kk, mm) - lse[..., None]) * mm[:, None, None]
      dv = jnp.einsum('bkgqs,bkgqd->bskd', p, do)
      ds = p * (jnp.einsum('bkgqd,bskd->bkgqs', do, vv) - delta[..., None])
      dk = jnp.einsum('bkgqs,bkgqd->bskd', ds, qg)
      return dq + jnp.einsum('bkgqs,bskd->bkgqd', ds, kk), dk, dv
    skip = lambda dq: (dq, jnp.zeros_like(kk), jnp.zeros_like(vv))
    dq, dk, dv = jax.lax.cond(mm.any(), visit, skip, dq)
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros_like(qg), (kb, vb, mb))
  unblock = lambda a, like: a.swapaxes(0, 1).reshape(b, -1, kh, d)[:, :lk].astype(like.dtype)
  dq = (dq / math.sqrt(d)).transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d).astype(q.dtype)
  return dq, unblock(dk, k), unblock(dv, v), None


blocked_attend.defvjp(_fwd, _bwd)
