"""The jittable Algorithm R sampler (ccf_jax.reservoir), against statistics and a plain-Python reference.

Statistical tests run the jitted sampler vmapped over N=4000 keys at a fixed seed and use
scipy-free bounds:
- chi-square at alpha = 1e-3, critical values from the Wilson-Hilferty approximation
  df * (1 - 2/(9 df) + z sqrt(2/(9 df)))^3 with z = 3.0902, slightly above the exact quantiles
  (df=4: 18.72 vs 18.47; df=10: 29.76 vs 29.59; df=14: 36.27 vs 36.12; df=15: 37.84 vs 37.70);
- per-cell binomial z-bound |O - N p| <= 5 sqrt(N p (1 - p)).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccf_jax.ccf import reservoir

N_KEYS = 4000
T = 16
Z_CHI2 = 3.0902  # standard normal quantile for alpha = 1e-3 (one-sided upper tail).


def chi2_critical(df, z=Z_CHI2):
  """Upper alpha quantile of chi-square(df) by Wilson-Hilferty (accurate to <0.5% for df >= 3)."""
  a = 2.0 / (9.0 * df)
  return df * (1.0 - a + z * math.sqrt(a)) ** 3


@functools.partial(jax.jit, static_argnums=(2, 3))
def batched(keys, num_valid, num_segments, size):
  """algorithm_r over a batch of keys, each with its own traced num_valid."""
  return jax.vmap(lambda k, n: reservoir.algorithm_r(k, num_segments, size, n))(keys, num_valid)


jitted_algorithm_r = jax.jit(reservoir.algorithm_r, static_argnums=(1, 2))


def sample(size, num_valid, seed=0):
  """(reservoir, membership) for N_KEYS keys; every call shares one compiled program per size."""
  keys = jax.random.split(jax.random.key(seed), N_KEYS)
  res, mem = batched(keys, jnp.full((N_KEYS,), num_valid, jnp.int32), T, size)
  return np.asarray(res), np.asarray(mem)


REF_KEYS = 300


@functools.lru_cache(maxsize=None)
def reference_draws():
  """Independent re-derivation of the documented draw j_t = randint(fold_in(key, t), 0, t+1)."""
  keys = jax.random.split(jax.random.key(6), N_KEYS)[:REF_KEYS]
  draw = lambda k, t: jax.random.randint(jax.random.fold_in(k, t), (), 0, t + 1, dtype=jnp.int32)
  ts = jnp.arange(T, dtype=jnp.int32)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: jax.vmap(lambda t: draw(k, t))(ts)))(keys))
  assert int(draw(keys[7], 15)) == draws[7, 15]  # batched == scalar draw.
  return draws


def reference_algorithm_r(draws, num_segments, size, num_valid):
  """Plain-Python Algorithm R driven by the given per-step draws."""
  res = [-1] * size
  rows = []
  for t in range(num_segments):
    if t < num_valid:
      if t < size:
        res[t] = t
      elif draws[t] < size:
        res[draws[t]] = t
    row = [False] * num_segments
    for s in res:
      if s >= 0:
        row[s] = True
    rows.append(row)
  return np.array(res, np.int32), np.array(rows, bool)


# ---------------------------------------------------------------------------------------------------
# Statistics.


@pytest.mark.parametrize('size,num_valid', [(2, 16), (2, 11), (3, 5), (1, 16), (4, 15)])
def test_final_inclusion_probability(size, num_valid):
  """Each valid segment is in the final reservoir with probability min(1, S/num_valid)."""
  res, _ = sample(size, num_valid, seed=1)
  inc = np.stack([(res == s).any(axis=1) for s in range(T)], axis=1)  # [N, T]
  counts = inc.sum(axis=0)
  assert counts[num_valid:].sum() == 0
  p = min(1.0, size / num_valid)
  obs = counts[:num_valid]
  expected = N_KEYS * p
  sd = math.sqrt(N_KEYS * p * (1 - p))
  assert np.all(np.abs(obs - expected) <= 5 * sd + 1e-9), (obs, expected)
  # Exactly S segments per key are in, so the counts sum to N*S and are exchangeable: with binomial
  # variances, sum((O-E)^2 / (N p (1-p))) * (k-1)/k ~ chi-square(k-1) for k = num_valid cells.
  k = num_valid
  stat = float(((obs - expected) ** 2).sum() / sd**2 * (k - 1) / k)
  crit = chi2_critical(k - 1)
  print(f'final inclusion S={size} num_valid={num_valid}: chi2={stat:.2f} (df={k - 1}, crit {crit:.2f})')
  assert stat < crit


def test_final_inclusion_few_valid_is_sure():
  """With num_valid <= S every valid segment is kept; unused slots hold -1."""
  res, mem = sample(4, 3)
  assert np.all(res[:, :3] == np.arange(3)) and np.all(res[:, 3:] == -1)
  assert np.all(mem[:, 2, :3]) and not mem[:, :, 3:].any()


@pytest.mark.parametrize('size', [1, 2, 3])
def test_entry_probability_at_offer(size):
  """The first S segments enter surely; segment t >= S enters with probability S/(t+1)."""
  _, mem = sample(size, T, seed=2)
  entered = mem[:, np.arange(T), np.arange(T)]  # [N, T]: segment t in the reservoir right after its offer.
  assert entered[:, :size].all()
  ts = np.arange(size, T)
  p = size / (ts + 1)
  obs = entered[:, size:].sum(axis=0)
  var = N_KEYS * p * (1 - p)
  assert np.all(np.abs(obs - N_KEYS * p) <= 5 * np.sqrt(var)), (obs, N_KEYS * p)
  # Entries at different t use independent draws: the sum of squared z-scores ~ chi-square(T-S).
  stat = float(((obs - N_KEYS * p) ** 2 / var).sum())
  crit = chi2_critical(len(ts))
  print(f'entry at offer S={size}: chi2={stat:.2f} (df={len(ts)}, crit {crit:.2f})')
  assert stat < crit


def test_chi_square_has_power_against_off_by_one(monkeypatch):
  """Sanity check of the test itself: drawing j in 0..t-1 (a classic off-by-one) is rejected."""
  monkeypatch.setattr(reservoir, '_draw', lambda key, t: jax.random.randint(
      jax.random.fold_in(key, t), (), 0, t, dtype=jnp.int32))
  keys = jax.random.split(jax.random.key(1), N_KEYS)
  res, _ = jax.vmap(lambda k: reservoir.algorithm_r(k, T, 2))(keys)
  counts = np.asarray(jax.vmap(lambda r: reservoir.final_mask(r, T))(res)).sum(axis=0)
  sd = math.sqrt(N_KEYS * (2 / T) * (1 - 2 / T))
  stat = float(((counts - N_KEYS * 2 / T) ** 2).sum() / sd**2 * (T - 1) / T)
  assert stat > chi2_critical(T - 1)


def test_compensation_is_unbiased():
  """E[compensation * mask] = 1 for every (loss t, memory s < t) pair, both semantics."""
  size, nv = 2, 12
  res, mem = sample(size, nv, seed=3)
  fm = np.asarray(jax.vmap(lambda r: reservoir.final_mask(r, T))(jnp.asarray(res)))
  mean_final = (fm * float(reservoir.compensation_final(nv, size))).mean(axis=0)[:nv]
  np.testing.assert_allclose(mean_final, 1.0, atol=5 * math.sqrt((nv / size - 1) / N_KEYS))
  sm = np.asarray(jax.vmap(reservoir.streaming_mask)(jnp.asarray(mem)))
  comp = np.asarray(reservoir.compensation_streaming(T, size))
  mean_stream = (sm * comp[None, :, None]).mean(axis=0)
  for t in range(1, nv):
    tol = 5 * math.sqrt(max(t / size - 1, 0) / N_KEYS) + 1e-6
    np.testing.assert_allclose(mean_stream[t, :t], 1.0, atol=tol, err_msg=f't={t}')
    assert not mean_stream[t, t:].any()
  # Without compensation the streaming estimate is biased low for t > S.
  assert (sm.mean(axis=0)[nv - 1, :nv - 1] < 0.5).all()


# ---------------------------------------------------------------------------------------------------
# Invariants, on every sampled key.


@pytest.mark.parametrize('size,num_valid', [(2, 16), (3, 9), (2, 1), (2, 0)])
def test_invariants(size, num_valid):
  res, mem = sample(size, num_valid, seed=4)
  counts = mem.sum(axis=2)  # [N, T]
  expect = np.minimum(np.minimum(np.arange(T) + 1, max(num_valid, 0)), size)
  assert np.all(counts == expect[None])  # never more than S, and full once S segments were offered.
  s_idx = np.arange(T)
  assert not (mem & (s_idx[None, None, :] > s_idx[None, :, None])).any()  # only offered segments.
  # An evicted segment never returns: a segment can only switch on at its own offer step.
  prev = np.concatenate([np.zeros_like(mem[:, :1]), mem[:, :-1]], axis=1)
  switched_on = mem & ~prev  # [N, t, s]
  assert not (switched_on & (s_idx[None, :, None] != s_idx[None, None, :])).any()
  # Padded segments never enter; rows after the last valid one repeat it.
  assert not mem[:, :, num_valid:].any()
  assert np.all(res < max(num_valid, 0))
  if num_valid > 0:
    assert np.all(mem[:, num_valid:] == mem[:, num_valid - 1:num_valid])
    # Row num_valid-1 is the final reservoir.
    fm = np.asarray(jax.vmap(lambda r: reservoir.final_mask(r, T))(jnp.asarray(res)))
    np.testing.assert_array_equal(mem[:, num_valid - 1], fm)
  else:
    assert np.all(res == -1)
  # Reservoir entries are distinct.
  same = (res[:, :, None] == res[:, None, :]) & (res[:, :, None] >= 0)
  assert np.all(same.sum(axis=2) == (res >= 0))


def test_traced_num_valid_mixed_in_one_batch():
  """One vmapped jitted call with a different traced num_valid per key keeps padding out."""
  keys = jax.random.split(jax.random.key(5), N_KEYS)
  nv = np.random.default_rng(0).integers(0, T + 1, N_KEYS)
  res, mem = batched(keys, jnp.asarray(nv, jnp.int32), T, 2)
  res, mem = np.asarray(res), np.asarray(mem)
  s_idx = np.arange(T)
  assert not (mem & (s_idx[None, None, :] >= nv[:, None, None])).any()
  assert np.all(res < nv[:, None])
  last = mem[np.arange(N_KEYS), np.maximum(nv - 1, 0)]
  in_res = (res[:, :, None] == s_idx).any(axis=1)
  np.testing.assert_array_equal(last[nv > 0], in_res[nv > 0])
  assert len(np.unique(nv)) == T + 1


# ---------------------------------------------------------------------------------------------------
# Reference and reproducibility.


@pytest.mark.parametrize('size,num_valid', [(2, 16), (3, 10), (1, 7), (4, 3)])
def test_matches_python_reference(size, num_valid):
  draws = reference_draws()
  res, mem = sample(size, num_valid, seed=6)
  res, mem = res[:REF_KEYS], mem[:REF_KEYS]
  ref = [reference_algorithm_r(d.tolist(), T, size, num_valid) for d in draws]
  np.testing.assert_array_equal(np.asarray(res), np.stack([r for r, _ in ref]))
  np.testing.assert_array_equal(np.asarray(mem), np.stack([m for _, m in ref]))
  assert num_valid <= size or len({tuple(r) for r, _ in ref}) > 1


def test_independent_of_num_segments_and_key_kind():
  """Draws depend on (key, t) only: padding length does not change a document's reservoir."""
  key = jax.random.key(7)
  r16, m16 = jitted_algorithm_r(key, 16, 2)
  r24, m24 = jitted_algorithm_r(key, 24, 2, 16)
  np.testing.assert_array_equal(r16, r24)
  np.testing.assert_array_equal(m16, m24[:16, :16])
  assert not m24[:, 16:].any() and np.all(m24[16:] == m24[15])
  # Raw uint32[2] keys work too.
  raw = jax.random.PRNGKey(7)
  rr, mr = jitted_algorithm_r(raw, 16, 2)
  assert rr.shape == (2,) and rr.dtype == jnp.int32 and mr.shape == (16, 16) and mr.dtype == bool


def test_compiles_once_across_keys_and_num_valid():
  traces = []

  def fn(key, num_valid):
    traces.append(1)  # Python side effect: runs once per trace.
    return reservoir.algorithm_r(key, T, 2, num_valid)

  jf = jax.jit(fn)
  seen = set()
  for i in range(12):
    res, _ = jf(jax.random.key(i), jnp.int32(i % (T + 1)))
    seen.add(tuple(np.asarray(res).tolist()))
  assert len(traces) == 1 and jf._cache_size() == 1
  assert len(seen) > 3  # the keys do change the result.


# ---------------------------------------------------------------------------------------------------
# Helpers.


def test_truncated_mask():
  for size in (1, 2, 5):
    m = np.asarray(reservoir.truncated_mask(8, size))
    for t in range(8):
      for s in range(8):
        assert m[t, s] == (s < t <= s + size)
  # S >= T-1 gives the full causal mask.
  np.testing.assert_array_equal(reservoir.truncated_mask(8, 7), np.tril(np.ones((8, 8), bool), -1))


def test_compensation_values():
  np.testing.assert_allclose(reservoir.compensation_streaming(6, 2), [1, 1, 1, 1.5, 2, 2.5])
  assert reservoir.compensation_streaming(6, 2).dtype == jnp.float32
  assert float(reservoir.compensation_final(16, 2)) == 8.0
  assert float(reservoir.compensation_final(1, 2)) == 1.0
  assert float(jax.jit(reservoir.compensation_final, static_argnums=1)(jnp.int32(10), 4)) == 2.5


def test_streaming_mask():
  _, mem = jitted_algorithm_r(jax.random.key(8), 8, 2)
  sm = np.asarray(reservoir.streaming_mask(mem))
  assert not sm[0].any()
  np.testing.assert_array_equal(sm[1:], np.asarray(mem)[:-1])
  assert not np.triu(sm).any()  # causal: loss t only reaches memories s < t.
