"""Causal softmax attention as one product per query block (`model.attention_impl='rows'`).

Why: the blocked kernel (blocked_attention.py) serves every mask, including masks that are only
known when the step runs (the CCF encoder's and decoder's `Spans`), so it walks all block pairs in a
`lax.scan`, decides per pair with `lax.switch`, and rescales its online softmax at every visited
pair. The plain decoder's causal mask (optionally a sliding window) is known when the model is
traced: query block [q0, q1) sees exactly the keys [k0, q1). Here each query block runs one product
against that whole key range and an exact softmax, in a Python loop unrolled at trace time; the
backward pass recomputes each block's probabilities from the saved log-sum-exp.

Memory and cache: the work is cut by (batch row, kv head) pair, and `lax.map` runs as many pairs
at a time as keep one query block's [pairs, heads per kv head, block, L] scores within SCORE_BYTES
(`pairs_per_step`: 2 at S2's 1,024 tokens), so the scores stay in cache between the product that
writes them and the softmax that reads them; all 32 of S2's pairs at once wrote 16 MB a block to
memory and ran 1.3x slower. Within a step, `_after` keeps two query blocks in flight. No
[B, heads, Lq, Lk] array exists; a step's transients are at most its pairs' causal scores, which
grow with L^2, so `auto` caps the length (below). Measured on the 2-core CPU (WORKSPACE "The
attention kernel alone"): faster than the blocked kernel at every shape of `bench attention`.

The unrolled loop grows the program with the number of query blocks, so `auto`
(attention.cpu_choice) takes it only up to MAX_BLOCKS of them; longer sequences, and every mask that
is not the static causal one, run the blocked kernel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_NEG = jnp.finfo(jnp.float32).min
MAX_BLOCKS = 16  # Query blocks `auto` unrolls at most (compile time grows with them).
SCORE_BYTES = 1 << 20  # One query block's scores per `lax.map` step: about an L2 cache (doc).


def row_blocks(length: int, block: int, window: int = 0) -> list[tuple[int, int, int]]:
  """(q0, q1, k0) per query block: queries [q0, q1) see keys [k0, q1) (`window` > 0: only the
  `window` keys up to and including each query, so the block's first key is q0 - window + 1)."""
  return [(q0, min(q0 + block, length), max(0, q0 - window + 1) if window else 0)
          for q0 in range(0, length, block)]


def _after(x, previous):
  """x, computed only once `previous` is: a zero taken from `previous` and added to x (XLA does
  not fold a float x * 0). Block i's products read their keys through it after block i - 2's
  result, so two blocks' scores exist at a time; given independent blocks, XLA:CPU's scheduler
  ran every block's products at once."""
  return x + previous.reshape(-1)[0] * 0.0


def _scores(qb, kb, q0: int, q1: int, k0: int, window: int):
  """Scores [G, q1 - q0, q1 - k0] of one pair's query block against its key range, the keys a
  query may not see at the float32 minimum."""
  i = jnp.arange(q0, q1)[:, None]
  j = jnp.arange(k0, q1)[None, :]
  seen = (j <= i) & (j > i - window) if window else j <= i
  return jnp.where(seen, jnp.einsum('gqd,sd->gqs', qb, kb), _NEG)


def _pair_forward(q, k, v, block: int, window: int):
  """One pair: q [G, L, D] (scaled), k, v [L, D] float32 -> (out [G, L, D], lse [G, L])."""
  outs, lses = [], []
  for n, (q0, q1, k0) in enumerate(row_blocks(q.shape[1], block, window)):
    kk = _after(k, outs[n - 2]) if n >= 2 else k
    s = _scores(q[:, q0:q1], kk[k0:q1], q0, q1, k0, window)
    m = s.max(-1)  # Every query sees itself: finite, and the masked entries' exp is 0.
    p = jnp.exp(s - m[..., None])
    total = p.sum(-1)
    outs.append(jnp.einsum('gqs,sd->gqd', p, v[k0:q1]) / total[..., None])
    lses.append(m + jnp.log(total))
  return jnp.concatenate(outs, 1), jnp.concatenate(lses, 1)


def _pair_backward(q, k, v, out, lse, do, block: int, window: int):
  """One pair's (dq, dk, dv) of the scaled q, k, v."""
  delta = (do * out).sum(-1)  # [G, L]: the softmax backward's row term.
  dk, dv, dq = jnp.zeros_like(k), jnp.zeros_like(v), []
  for n, (q0, q1, k0) in enumerate(row_blocks(q.shape[1], block, window)):
    kk, vv = (_after(k, dq[n - 2]), _after(v, dq[n - 2])) if n >= 2 else (k, v)
    qb, dob, kb, vb = q[:, q0:q1], do[:, q0:q1], kk[k0:q1], vv[k0:q1]
    p = jnp.exp(_scores(qb, kb, q0, q1, k0, window) - lse[:, q0:q1, None])
    dv = dv.at[k0:q1].add(jnp.einsum('gqs,gqd->sd', p, dob))
    ds = p * (jnp.einsum('gqd,sd->gqs', dob, vb) - delta[:, q0:q1, None])
    dk = dk.at[k0:q1].add(jnp.einsum('gqs,gqd->sd', ds, qb))
    dq.append(jnp.einsum('gqs,sd->gqd', ds, kb))
  return jnp.concatenate(dq, 1), dk, dv


def _pairs(a, kh: int):
  """[B, L, H, D] -> [B * K, H / K, L, D] float32."""
  b, length, h, d = a.shape
  a = a.astype(jnp.float32).reshape(b, length, kh, h // kh, d).transpose(0, 2, 3, 1, 4)
  return a.reshape(b * kh, h // kh, length, d)


def _kv_pairs(a):
  """[B, L, K, D] -> [B * K, L, D] float32."""
  b, length, kh, d = a.shape
  return a.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b * kh, length, d)


def _unpairs(a, b: int):
  """[B * K, G, L, D] -> [B, L, K * G, D]."""
  _, g, length, d = a.shape
  return a.reshape(b, -1, g, length, d).transpose(0, 3, 1, 2, 4).reshape(b, length, -1, d)


def pairs_per_step(q, k, block: int) -> int:
  """(batch row, kv head) pairs per `lax.map` step: one query block's scores within SCORE_BYTES."""
  group, length = q.shape[2] // k.shape[2], q.shape[1]
  return max(1, SCORE_BYTES // (group * min(block, length) * length * 4))


def _forward(q, k, v, block: int, window: int):
  qp = _pairs(q / math.sqrt(q.shape[3]), k.shape[2])
  fwd = lambda x: _pair_forward(*x, block, window)
  return jax.lax.map(fwd, (qp, _kv_pairs(k), _kv_pairs(v)),
                     batch_size=pairs_per_step(q, k, block))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def rows_attend(q, k, v, block: int, window: int = 0):
  """`attention.dense_attend(q, k, v, spans.causal(L, window).dense(L))` one query block of
  `block` rows at a time (module doc). q: [B, L, H, D]; k, v: [B, L, K, D] with H % K == 0;
  softmax in float32."""
  return _unpairs(_forward(q, k, v, block, window)[0], q.shape[0]).astype(q.dtype)


def _fwd(q, k, v, block, window):
  out, lse = _forward(q, k, v, block, window)
  return _unpairs(out, q.shape[0]).astype(q.dtype), (q, k, v, out, lse)


def _bwd(block, window, res, dout):
  q, k, v, out, lse = res
  b, d, kh = q.shape[0], q.shape[3], k.shape[2]
  bwd = lambda x: _pair_backward(*x, block, window)
  dq, dk, dv = jax.lax.map(bwd, (_pairs(q / math.sqrt(d), kh), _kv_pairs(k), _kv_pairs(v), out, lse,
                                 _pairs(dout, kh)), batch_size=pairs_per_step(q, k, block))
  unkv = lambda a: a.reshape(b, kh, *a.shape[1:]).transpose(0, 2, 1, 3)
  dq = _unpairs(dq, b) / math.sqrt(d)
  return dq.astype(q.dtype), unkv(dk).astype(k.dtype), unkv(dv).astype(v.dtype)


rows_attend.defvjp(_fwd, _bwd)
