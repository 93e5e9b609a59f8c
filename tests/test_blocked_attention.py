"""Blocked attention (ccf_jax/blocked_attention.py) against the dense `layers.attend`.

The dense path is the reference: same function, computed in one softmax and differentiated by
autodiff. The blocked one must match it in value and in all three gradients for every block size
(one row, a size that leaves a padded last block, one block covering everything), with query rows
that see nothing and whole blocks that no query sees (skipped by its lax.cond).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccf_jax.model import layers
from ccf_jax.model.blocked_attention import blocked_attend
from tests.ccf_testing import jit

B, LQ, H, K, D, LK = 2, 5, 4, 2, 8, 13


def inputs(seed=0):
  r = np.random.default_rng(seed)
  q, w = (jnp.asarray(r.normal(size=(B, LQ, H, D)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(r.normal(size=(B, LK, K, D)), jnp.float32) for _ in range(2))
  mask = r.random((B, LQ, LK)) < 0.5
  mask[0, 1] = False  # A query that sees no key.
  mask[:, :, 4:8] = False  # Keys no query sees: whole blocks at block sizes 1 and 4.
  return q, k, v, jnp.asarray(mask), w


def value_and_grads(attend_fn, q, k, v, w):
  return jit(jax.value_and_grad(lambda q, k, v: (attend_fn(q, k, v) * w).sum(), (0, 1, 2)))(q, k, v)


@pytest.mark.parametrize('block', [1, 3, 4, LK, 16])
def test_blocked_attention_equals_dense_in_value_and_gradients(block):
  q, k, v, mask, w = inputs()
  want = value_and_grads(lambda q, k, v: layers.attend(q, k, v, mask), q, k, v, w)
  got = value_and_grads(lambda q, k, v: blocked_attend(q, k, v, mask, block), q, k, v, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-6)
  out = blocked_attend(q, k, v, mask, block)
  np.testing.assert_array_equal(out[0, 1], 0.0)  # Sees nothing: zeros, as the dense path.
  np.testing.assert_array_equal(got[1][1][:, 4:8], 0.0)  # Unseen keys get no gradient.
  assert np.abs(got[1][1]).max() > 0


def test_backward_keeps_one_block_of_scores_not_all():
  """The point of the module: with many keys the compiled gradient's transient buffers stay far
  below the dense path's, which keeps [B, heads, Lq, Lk] scores and probabilities."""
  b, lq, lk = 2, 64, 2048
  r = np.random.default_rng(1)
  q = jnp.asarray(r.normal(size=(b, lq, H, D)), jnp.float32)
  k, v = (jnp.asarray(r.normal(size=(b, lk, K, D)), jnp.float32) for _ in range(2))
  mask = jnp.ones((b, lq, lk), bool)

  def temp(attend_fn):
    fn = jax.jit(jax.grad(lambda q, k, v: attend_fn(q, k, v).sum(), (0, 1, 2)))
    return fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  dense = temp(lambda q, k, v: layers.attend(q, k, v, mask))
  blocked = temp(lambda q, k, v: blocked_attend(q, k, v, mask, 128))
  scores = b * H * lq * lk * 4
  print(f'grad temp bytes: dense {dense}, blocked {blocked}, one score matrix {scores}')
  assert dense > scores
  assert blocked < 0.5 * scores
