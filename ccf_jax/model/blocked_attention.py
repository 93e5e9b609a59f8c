"""Softmax attention over query x key blocks: online softmax, per-block masks, skipped blocks, and a
backward pass that recomputes probabilities (`model.attention_impl='blocked'`).

Dense attention materialises the scores of every query against every key, autodiff keeps them and
the probabilities for the backward pass ([B, heads, Lq, Lk] float32, several times over), and
masked entries (half of a causal square; for the CCF decoder at one segment per chunk, most of the
memory buffer) cost as much as visible ones. Here the queries are cut into blocks of `block` rows
and, for each, a `lax.scan` over key blocks keeps the running max / sum / output of an online
softmax (as in FlashAttention). Everything runs under a `jax.custom_vjp` whose residuals are q, k,
v, the mask descriptor, the output and the per-query log-sum-exp; the backward pass (a scan over
key blocks, each scanning the query blocks) recomputes each block's probabilities. Transient
memory is one block of scores.

Masks are never [B, Lq, Lk]: from an `attention.Spans` descriptor (key ranges per query and flags
per key) each block's [B, bq, bk] mask is computed when the block is visited, and a [nq, nk] table
of the blocks some query may see decides, by `lax.switch`, which blocks run at all, in both passes.
A second table marks the blocks every query sees whole (below a causal diagonal: most of them),
which run without computing or applying a mask.
A plain boolean mask is also accepted (sliced per block) for callers that build one.

Pure JAX, so it runs on CPU, GPU and TPU and under SPMD partitioning.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ccf_jax.model.spans import Spans, block_mask

_NEG = jnp.finfo(jnp.float32).min


def pad_to(a, axis: int, size: int, value=0):
  """`a` padded with `value` at the end of `axis` to `size` (block-aligned lengths; also the fused
  head's chunks, model/head_loss.py)."""
  pad = size - a.shape[axis]
  if not pad:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, pad)
  return jnp.pad(a, widths, constant_values=value)


def _mask_source(mask, lq: int, lk: int, bq: int, bk: int):
  """(block_fn(qi, kj) -> bool[B|1, bq, bk], kind int32[nq, nk]) of either mask form; kind 0: no
  query of the block sees any of its keys, 1: some see some, 2: every query sees every key."""
  nq, nk = -(-lq // bq), -(-lk // bk)
  j0 = jnp.arange(bk, dtype=jnp.int32)
  if isinstance(mask, Spans):
    lo, hi = (pad_to(a.astype(jnp.int32), 1, nq * bq) for a in (mask.lo, mask.hi))
    key_ok = None if mask.key_ok is None else pad_to(mask.key_ok, 1, nk * bk, False)

    def block_fn(qi, kj):
      cut = lambda a: jax.lax.dynamic_slice_in_dim(a, qi * bq, bq, axis=1)
      j = kj * bk + j0
      ok = None if key_ok is None else jax.lax.dynamic_slice_in_dim(key_ok, kj * bk, bk, axis=1)
      return block_mask(cut(lo), cut(hi), ok, j) & (j < lk)

    start = jnp.arange(nk, dtype=jnp.int32) * bk
    touch = ((hi > lo)[..., None] & (lo[..., None] < jnp.minimum(start + bk, lk))
             & (hi[..., None] > start))  # [B, Lq, R, nk]: range r of query i reaches block kb.
    touch = touch.any(2).reshape(touch.shape[0], nq, bq, nk).any(2)
    # Range r of query i covers block kb whole (padded queries, lo = hi = 0, cover nothing).
    cover = (lo[..., None] <= start) & (hi[..., None] >= start + bk) & (start + bk <= lk)
    full = cover.any(2).reshape(cover.shape[0], nq, bq, nk).all(2)
    if key_ok is not None:
      blocks = key_ok.reshape(key_ok.shape[0], nk, bk)
      touch = touch & blocks.any(-1)[:, None, :]
      full = full & blocks.all(-1)[:, None, :]
    return block_fn, _kind(touch.any(0), full.all(0))
  m = jnp.asarray(mask)
  m = m.reshape((1,) * (3 - m.ndim) + m.shape)
  m = jnp.broadcast_to(m, (m.shape[0], lq, lk))
  m = pad_to(pad_to(m, 1, nq * bq, False), 2, nk * bk, False)

  def block_fn(qi, kj):
    return jax.lax.dynamic_slice(m, (0, qi * bq, kj * bk), (m.shape[0], bq, bk))

  tiles = m.reshape(m.shape[0], nq, bq, nk, bk)
  return block_fn, _kind(tiles.any((0, 2, 4)), tiles.all((0, 2, 4)))


def _kind(visible, full):
  return visible.astype(jnp.int32) + (visible & full).astype(jnp.int32)


def _sizes(q, k, block: int):
  return min(block, q.shape[1]), min(block, k.shape[1])


def _group(a, kh: int, nq: int, bq: int):
  """[B, Lq, H, D] -> [nq, B, K, G, bq, D] float32 (H = K * G), padded to nq * bq queries."""
  b, lq, h, d = a.shape
  a = pad_to(a.astype(jnp.float32), 1, nq * bq)
  return a.reshape(b, nq, bq, kh, h // kh, d).transpose(1, 0, 3, 4, 2, 5)


def _ungroup(a, lq: int):
  """[nq, B, K, G, bq, D] -> [B, Lq, H, D]."""
  nq, b, kh, g, bq, d = a.shape
  return a.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, kh * g, d)[:, :lq]


def _split_k(a, nk: int, bk: int):
  """[B, Lk, K, D] -> [nk, B, bk, K, D] float32, padded to nk * bk keys."""
  b, _, kh, d = a.shape
  a = pad_to(a.astype(jnp.float32), 1, nk * bk)
  return a.reshape(b, nk, bk, kh, d).swapaxes(0, 1)


def _scores(qb, kb, mb):
  """Scores [B, K, G, bq, bk] of one block pair, masked entries (mb None: none) at the float32
  minimum."""
  s = jnp.einsum('bkgqd,bskd->bkgqs', qb, kb)
  return s if mb is None else jnp.where(mb[:, None, None], s, _NEG)


def _probs(s, shift, mb):
  """exp(s - shift) over one block, exactly 0 where masked (mb None: nothing masked)."""
  p = jnp.exp(s - shift[..., None])
  return p if mb is None else p * mb[:, None, None]


def _tiles(q, k, v, mask, block):
  """What both passes tile: block sizes and counts, the per-block mask source, and q (scaled and
  grouped by kv head), k and v split into blocks."""
  lq, d = q.shape[1], q.shape[3]
  lk, kh = k.shape[1], k.shape[2]
  bq, bk = _sizes(q, k, block)
  nq, nk = -(-lq // bq), -(-lk // bk)
  block_fn, visible = _mask_source(mask, lq, lk, bq, bk)
  qg = _group(q / math.sqrt(d), kh, nq, bq)
  return bq, bk, nq, nk, block_fn, visible, qg, _split_k(k, nk, bk), _split_k(v, nk, bk)


def _forward(q, k, v, mask, block):
  b, lq, h, d = q.shape
  bq, bk, nq, nk, block_fn, kind, qg, kb, vb = _tiles(q, k, v, mask, block)

  def q_step(_, xs):
    qi, qq, kind_row = xs
    init = (jnp.full(qq.shape[:-1], _NEG), jnp.zeros(qq.shape[:-1]), jnp.zeros(qq.shape))

    def k_step(carry, ys):
      kj, kk, vv, kind = ys

      def visit(carry, masked: bool):
        m_old, l_old, acc = carry
        mb = block_fn(qi, kj) if masked else None
        s = _scores(qq, kk, mb)
        m_new = jnp.maximum(m_old, s.max(-1))
        p = _probs(s, m_new, mb)
        corr = jnp.exp(m_old - m_new)
        return (m_new, l_old * corr + p.sum(-1),
                acc * corr[..., None] + jnp.einsum('bkgqs,bskd->bkgqd', p, vv))

      branches = (lambda c: c, functools.partial(visit, masked=True),
                  functools.partial(visit, masked=False))
      return jax.lax.switch(kind, branches, carry), None

    (m, l, acc), _ = jax.lax.scan(k_step, init, (jnp.arange(nk), kb, vb, kind_row))
    seen = l > 0  # A query that sees no key returns zeros, as the dense reference does.
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -_NEG)  # exp(s - lse) = 0.
    return None, (out, lse)

  _, (out, lse) = jax.lax.scan(q_step, None, (jnp.arange(nq), qg, kind))
  return _ungroup(out, lq).astype(q.dtype), (out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blocked_attend(q, k, v, mask, block: int):
  """`attention.dense_attend(q, k, v, mask.dense())` over blocks of `block` rows (module doc).

  q: [B, Lq, H, D]; k, v: [B, Lk, K, D] with H % K == 0; mask: `attention.Spans` or bool
  broadcastable to [B, Lq, Lk] (True = may attend). Softmax in float32; a fully masked query row
  returns zeros.
  """
  return _forward(q, k, v, mask, block)[0]


def _fwd(q, k, v, mask, block):
  out, (out_g, lse) = _forward(q, k, v, mask, block)
  return out, (q, k, v, mask, out_g, lse)


def _bwd(block, res, dout):
  q, k, v, mask, out_g, lse = res
  b, lq, h, d = q.shape
  lk, kh = k.shape[1], k.shape[2]
  bq, bk, nq, nk, block_fn, kind, qg, kb, vb = _tiles(q, k, v, mask, block)
  do = _group(dout, kh, nq, bq)
  delta = (do * out_g).sum(-1)  # [nq, B, K, G, bq]: the softmax backward's row term.

  def k_step(dq, xs):
    kj, kk, vv, kind_col = xs

    def q_step(carry, ys):
      qi, qq, doi, lsei, deltai, kind = ys

      def visit(carry, masked: bool):
        dk, dv = carry
        mb = block_fn(qi, kj) if masked else None
        p = _probs(_scores(qq, kk, mb), lsei, mb)
        dv = dv + jnp.einsum('bkgqs,bkgqd->bskd', p, doi)
        ds = p * (jnp.einsum('bkgqd,bskd->bkgqs', doi, vv) - deltai[..., None])
        dk = dk + jnp.einsum('bkgqs,bkgqd->bskd', ds, qq)
        return (dk, dv), jnp.einsum('bkgqs,bskd->bkgqd', ds, kk)

      skip = lambda carry: (carry, jnp.zeros_like(qq))
      branches = (skip, functools.partial(visit, masked=True),
                  functools.partial(visit, masked=False))
      return jax.lax.switch(kind, branches, carry)

    zero = (jnp.zeros_like(kk), jnp.zeros_like(vv))
    (dk, dv), dq_col = jax.lax.scan(q_step, zero, (jnp.arange(nq), qg, do, lse, delta, kind_col))
    return dq + dq_col, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(k_step, jnp.zeros_like(qg), (jnp.arange(nk), kb, vb, kind.T))
  unsplit = lambda a, like: a.swapaxes(0, 1).reshape(b, -1, kh, d)[:, :lk].astype(like.dtype)
  dq = (_ungroup(dq, lq) / math.sqrt(d)).astype(q.dtype)
  return dq, unsplit(dk, k), unsplit(dv, v), None


blocked_attend.defvjp(_fwd, _bwd)
