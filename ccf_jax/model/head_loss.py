"""The LM head and its cross-entropy fused over chunks of positions, gradients made in the forward
pass (`model.loss_chunk`): the [B, L, vocab] logits never exist whole.

Why: with a large vocabulary the logits are the step's largest activations. SmolLM2-135M's shape
(vocab 49,152) at 1,024 tokens a step holds [1024, 49152] float32 logits and as much again for
their gradient: 0.47 GB of the step's 2.57 GB of XLA temp memory (bench peer's S3 shape,
WORKSPACE "Peak memory"). The loss is a sum, so its cotangent is one scalar g, and
d(loss)/d(logits) = g * w_i * (softmax_i - onehot_i) is known as soon as a chunk's logits are: the forward pass
computes, chunk by chunk along the length axis, the loss, the accuracy count and the chunk's
gradients dx = dlogits W^T and dW += x^T dlogits, then drops the logits. The backward pass only
scales those by g. The FLOPs are autodiff's (three products per chunk, none recomputed), and the
transient memory is one chunk's [B, C, vocab] (the approach of Liger-Kernel's fused linear
cross-entropy, in jnp).

Chunks run along the length axis, and a vocabulary sharded over `tensor` gives sharded logits
whose log-sum-exp GSPMD all-reduces. The head's gradient accumulates in a replicated carry, so a
batch split over devices would all-reduce all of it once per chunk: the config refuses that mesh
(`config_lib.check_mesh`). Products are as `decoder.head_matmul` makes them: compute-dtype
operands, float32 logits; the cotangent scales float32 copies of the gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ccf_jax.model.blocked_attention import pad_to


def _chunks(x, targets, weights, chunk: int):
  """[n, B, C, ...] chunks of the length axis, n = ceil(L / chunk) of equal size C <= chunk
  (the last padded with zero weights by at most n - 1 positions)."""
  b, length = targets.shape
  n = -(-length // min(chunk, length))
  chunk = -(-length // n)
  cut = lambda a: pad_to(a, 1, n * chunk).reshape(b, n, chunk, *a.shape[2:]).swapaxes(0, 1)
  return n, cut(x), cut(targets), cut(weights)


def _forward(x, w, targets, weights, chunk: int):
  """(loss_sum, correct_sum), (dx, dw): the sums and their gradients for a unit cotangent."""
  b, length, d = x.shape
  n, xs, ts, ws = _chunks(x, targets, weights, chunk)
  chunk = xs.shape[2]

  def one(dw, inp):
    xc, tc, wc = inp  # [B, C, d], [B, C], [B, C]
    rows = xc.reshape(-1, d)
    logits = jnp.matmul(rows, w, preferred_element_type=jnp.float32)  # [B*C, V]
    t, wt = tc.reshape(-1), wc.reshape(-1).astype(jnp.float32)
    onehot = jnp.arange(logits.shape[1], dtype=t.dtype)[None] == t[:, None]  # Fused, not stored.
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.where(onehot, logits, 0.0).sum(-1)
    loss = ((lse - picked) * wt).sum()
    correct = ((jnp.argmax(logits, -1) == t) * wt).sum()
    dlogits = ((jnp.exp(logits - lse[:, None]) - onehot) * wt[:, None]).astype(x.dtype)
    dxc = jax.lax.dot_general(dlogits, w, (((1,), (1,)), ((), ())))  # [B*C, d]
    dw = dw + jax.lax.dot_general(rows, dlogits, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
    return dw, (loss, correct, dxc.reshape(b, chunk, d))

  dw, (loss, correct, dx) = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32), (xs, ts, ws))
  dx = dx.swapaxes(0, 1).reshape(b, n * chunk, d)[:, :length]
  return (loss.sum(), correct.sum()), (dx, dw.astype(w.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def head_ce_sums(x, w, targets, weights, chunk: int):
  """(sum_i weights_i * CE(x_i @ w, targets_i), sum_i weights_i * [argmax == target]).

  x: [B, L, d] final-normed hidden states (compute dtype); w: [d, vocab] the head in the same
  dtype; targets int32[B, L]; weights float32[B, L]; chunk: positions per chunk. Gradients flow
  to x and w through the first output only (the second is a count)."""
  return _forward(x, w, targets, weights, chunk)[0]


def _bwd(chunk, grads, g):
  """The forward's gradients scaled by the loss's cotangent; targets and weights get none."""
  del chunk
  (dx, dw), g_loss = grads, g[0]
  scale = lambda a: (a.astype(jnp.float32) * g_loss).astype(a.dtype)
  return scale(dx), scale(dw), None, None


head_ce_sums.defvjp(_forward, _bwd)
