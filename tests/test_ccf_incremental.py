"""Incremental segment decoding and the gradient modes (ccf_jax/ccf/incremental.py).

The reference is written here: a differentiable Python loop over loss segments t that encodes the
window again for every loss (naive BPTT recomputation: no scan over segments, no shared memory
buffer, no chunks, no scatter, no second projection) and gates the pair (t, s) on the latents,
sg(z) + w (z - sg(z)), with w re-derived from the documented contract: truncated s+1 <= t <= s+S;
the reservoirs drawn by `reservoir.algorithm_r` from fold_in(fold_in(step key, 3), window); final:
s in the final reservoir, weight max(1, num_valid/S); streaming: s in membership row t-1, weight
max(1, t/S). The reference's model pieces (`latents`, `latents_to_memory`, `decode_segments`) are
checked against a fully naive model in test_ccf_model.py. Compiled programs are few and shared:
compile time dominates here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccf_jax import registry as arch_lib
from ccf_jax.core import config_lib
from ccf_jax.model import decoder as model_lib
from ccf_jax.train import optim
from ccf_jax.ccf import reservoir
from ccf_jax.core import sharding
from ccf_jax.train import step as ts
from ccf_jax.ccf import arch as ccf_arch, flops as ccf_flops, incremental, masks
from ccf_jax.ccf.model import decode_segments, module_config
from tests import ccf_testing
from tests.ccf_testing import B, C, FAST, L_SEG, jit

T = 4
NUM_VALID = (T, 3)  # Window 1 has a padded last segment.
ENCODER_ONLY = (('adapter', 'enc_q'), ('adapter', 'enc_v'), ('adapter', 'memory'))


def small_cfg(**ccf):
  return ccf_testing.small_cfg(T, **ccf)


CFG = small_cfg()


@functools.lru_cache(maxsize=None)
def params():
  """Fresh params with every leaf perturbed (zero LoRA B would hide the encoder's gradient)."""
  arch = arch_lib.get_arch(CFG)

  def init(key):
    p = model_lib.init_params(arch.module_config(CFG), 0, arch.module_cls)
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape, a.dtype)
                                     for a, k in zip(leaves, keys)])
  return jit(init)(jax.random.key(0))


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.model.vocab_size, (B, T * L_SEG)).astype(np.int32)
  mask = np.ones((B, T * L_SEG), np.float32)
  mask[0, 3] = 0.0
  return {'tokens': tokens, 'loss_mask': mask, 'num_valid_segments': np.array(NUM_VALID, np.int32)}


BATCH = make_batch()


# ------------------------------------------------------------------------------------------------
# The reference and the gates, re-derived.


def naive_term(p, gate, t):
  """(loss_sum, count) of loss t alone: segment t decoded from the latents of every segment, all
  encoded again for this loss, rows of segments >= t hidden, pair (t, s) gated by gate[b, t, s].
  One program serves every t (traced), so the reference compiles once."""
  model = model_lib.bind(module_config(CFG), p, arch_lib.get_arch(CFG).module_cls)
  tokens = jnp.asarray(BATCH['tokens'])
  nvs = jnp.asarray(BATCH['num_valid_segments'])
  span = jnp.full((B,), L_SEG // C, jnp.int32)
  valid = jnp.arange(T)[None] < nvs[:, None]
  z = model.latents(tokens.reshape(B, T, L_SEG), span)  # [layers, B, T, c, d]
  w = gate[:, t][None, :, :, None, None]
  z = jax.lax.stop_gradient(z) + w * (z - jax.lax.stop_gradient(z))
  memory = model.latents_to_memory(z, span, valid)
  segment = jax.lax.dynamic_slice_in_dim(tokens, t * L_SEG, L_SEG, 1)[:, None]
  edge = jnp.full((B, 1), t, jnp.int32)
  logits = decode_segments(model.decoder, CFG.ccf, segment, span, 0 * edge, edge, memory)[:, 0]
  scored = masks.scored_mask(CFG.ccf, BATCH['loss_mask'], nvs)
  pad = lambda a: jnp.concatenate([a, jnp.zeros_like(a[:, :1])], 1)  # Past the last segment.
  targets = jax.lax.dynamic_slice_in_dim(pad(tokens), t * L_SEG + 1, L_SEG, 1)
  weights = jax.lax.dynamic_slice_in_dim(pad(scored), t * L_SEG + 1, L_SEG, 1)
  logp = jax.nn.log_softmax(logits, -1)
  ce = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return (ce * weights).sum(), weights.sum()


naive_term_value_and_grad = jit(jax.value_and_grad(naive_term, has_aux=True))


def reference(gate):
  """(loss, count, grads) of the naive loop: the sum over loss segments t in Python."""
  loss, n, grads = 0.0, 0.0, None
  for t in range(T):
    (lt, nt), gt = naive_term_value_and_grad(params(), jnp.asarray(gate, jnp.float32), t)
    loss, n = loss + float(lt), n + float(nt)
    grads = gt if grads is None else jax.tree.map(jnp.add, grads, gt)
  return loss, n, grads


@functools.lru_cache(maxsize=1)
def full_reference():
  return reference(causal())


def causal():
  t, s = np.arange(T)[:, None], np.arange(T)[None]
  return np.broadcast_to(s < t, (B, T, T)).astype(np.float32)


def truncated_gate(size):
  t, s = np.arange(T)[:, None], np.arange(T)[None]
  return np.broadcast_to((s + 1 <= t) & (t <= s + size), (B, T, T)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def sampler(size):
  """Algorithm R over the windows of one step key, in one compiled program."""
  return jit(lambda key: jax.vmap(lambda b, n: reservoir.algorithm_r(
      jax.random.fold_in(key, b), T, size, n))(jnp.arange(B), jnp.asarray(NUM_VALID)))


def draws(step_key, size):
  """Per window (final reservoir, membership) as ccf_loss draws them from the step's key."""
  res, membership = sampler(size)(jax.random.fold_in(step_key, 3))
  return [(set(np.asarray(res[b]).tolist()) - {-1}, np.asarray(membership[b])) for b in range(B)]


def reservoir_gate(step_key, semantics, size, compensate):
  gate = np.zeros((B, T, T), np.float32)
  for b, (final, membership) in enumerate(draws(step_key, size)):
    for t in range(1, T):
      for s in range(t):
        if semantics == 'final' and s in final:
          gate[b, t, s] = max(1.0, NUM_VALID[b] / size) if compensate else 1.0
        if semantics == 'streaming' and membership[t - 1, s]:
          gate[b, t, s] = max(1.0, t / size) if compensate else 1.0
  return gate


# ------------------------------------------------------------------------------------------------
# The production path.


def objective(cfg):
  return lambda p, key: ccf_arch.ccf_loss(cfg, p, BATCH, key)[:2]


@functools.lru_cache(maxsize=None)
def value_and_grad_fn(**ccf):
  return jit(jax.value_and_grad(objective(small_cfg(**ccf)), has_aux=True))


def run(key=0, **ccf):
  (loss, n), grads = value_and_grad_fn(**ccf)(params(), jax.random.key(key))
  return float(loss), float(n), grads


def assert_same(got, want, rtol=2e-4, atol=2e-6):
  loss, n, grads = got
  ref_loss, ref_n, ref_grads = want
  assert n == ref_n
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  flat = dict(jax.tree_util.tree_flatten_with_path(ref_grads)[0])
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    np.testing.assert_allclose(g, flat[path], rtol=rtol, atol=atol, err_msg=str(path))


def encoder_grads(grads):
  return np.concatenate([np.ravel(g) for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
                         if tuple(k.key for k in path[:2]) in ENCODER_ONLY])


# ------------------------------------------------------------------------------------------------
# Tests.


CHUNKINGS = {  # Every k, the remat paths and the debug loop.
    'k1_scan_remat': dict(decoder_segment_chunk=1, decoder_remat='full', encoder_remat='full'),
    'k2_unrolled_remat': dict(decoder_segment_chunk=2, decoder_remat='full', encoder_remat='full',
                              unrolled=True),
    'k4_layer_remat': dict(decoder_segment_chunk=T, decoder_remat='dots'),
}


@functools.lru_cache(maxsize=None)
def chunked(name):
  return run(**CHUNKINGS[name])


@pytest.mark.parametrize('name', list(CHUNKINGS))
def test_full_mode_equals_the_naive_loop_for_every_chunking(name):
  got = chunked(name)
  assert_same(got, full_reference())
  assert np.abs(encoder_grads(got[2])).max() > 0  # Not vacuous.


def test_unrolled_debug_loop_equals_the_scan():
  assert_same(chunked('k2_unrolled_remat'), chunked('k1_scan_remat'), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('mode', [{}, dict(grad_mode='truncated', reservoir_size=2)],
                         ids=['full', 'truncated_per_pair_gates'])
def test_memory_window_row_slicing_equals_the_masked_buffer(mode):
  """With memory_window W and W + k < T each chunk reads only W + k segments' rows of the buffer;
  k = T reads the whole buffer under the block mask. Same loss and gradients."""
  want = run(memory_window=1, decoder_segment_chunk=T, **mode)
  got = run(memory_window=1, decoder_segment_chunk=1, **mode)
  assert_same(got, want)
  assert abs(got[0] - run(**mode)[0]) > 1e-4  # The window changes what is seen: not vacuous.


@pytest.mark.parametrize('k', [1, T])
def test_blocked_attention_in_the_decoder_equals_the_naive_loop(k):
  """model.attention_impl='blocked' with blocks of 3 over T*c + l = 16 key rows: blocks that
  straddle memory and local rows, a padded last block and, at k=1, blocks that the chunk's segment
  may not see (skipped); the encoder's nested prefixes blocked too. The naive loop attends
  densely."""
  cfg = small_cfg(decoder_segment_chunk=k, decoder_remat='full', encoder_remat='full')
  cfg.model.attention_impl, cfg.model.attention_block = 'blocked', 3
  (loss, n), grads = jit(jax.value_and_grad(objective(cfg), has_aux=True))(params(),
                                                                           jax.random.key(0))
  assert_same((float(loss), float(n), grads), full_reference())


LARGE_RESERVOIR = {
    'truncated': dict(grad_mode='truncated'),
    'final': dict(grad_mode='reservoir', reservoir_semantics='final'),
    'final_compensated': dict(grad_mode='reservoir', reservoir_semantics='final', compensate=True),
    'streaming': dict(grad_mode='reservoir', reservoir_semantics='streaming'),
    'streaming_compensated': dict(grad_mode='reservoir', reservoir_semantics='streaming',
                                  compensate=True),
}


@pytest.mark.parametrize('name', list(LARGE_RESERVOIR))
def test_modes_with_s_at_least_t_equal_full(name):
  assert_same(run(reservoir_size=T, **LARGE_RESERVOIR[name]), full_reference())


# Sampled reservoirs: one compiled program per (semantics, compensate), called with N_KEYS step
# keys.
# Streaming uses S=1: with S=2 < T=4 only loss 3's pairs would be random.
N_KEYS = 256
LEVELS = (16, 64, 256)
SAMPLED = {
    'final': dict(grad_mode='reservoir', reservoir_semantics='final', reservoir_size=2,
                  decoder_segment_chunk=2, encoder_map_batch=2),
    'streaming': dict(grad_mode='reservoir', reservoir_semantics='streaming', reservoir_size=1,
                      decoder_segment_chunk=2),
}


KEYS = jax.random.split(jax.random.key(11), N_KEYS)


@functools.lru_cache(maxsize=None)
def key_runs(semantics, compensate):
  """[(loss, count, grads)] for every step key in KEYS, from one compiled program."""
  fn = value_and_grad_fn(compensate=compensate, **SAMPLED[semantics])
  out = [fn(params(), k) for k in KEYS]
  assert fn._cache_size() == 1  # The key is traced: the program compiles once across keys.
  return [(float(loss), float(n), grads) for (loss, n), grads in out]


def encoder_grads_per_key(semantics, compensate):
  return np.stack([encoder_grads(g) for _, _, g in key_runs(semantics, compensate)])


@pytest.mark.parametrize('semantics', list(SAMPLED))
def test_sampled_reservoir_gradients_equal_the_naive_loop(semantics):
  size = SAMPLED[semantics]['reservoir_size']
  runs = key_runs(semantics, True)
  for i in (0, 1, 2):
    assert_same(runs[i], reference(reservoir_gate(KEYS[i], semantics, size, True)))
  assert len({encoder_grads(g).tobytes() for _, _, g in runs}) > 1  # The key matters.


def relative_errors(per_key, full):
  """Relative error of the mean of n keys' gradients, root-mean-square over the N/n disjoint
  groups of n keys, for each n in LEVELS."""
  out = []
  for n in LEVELS:
    means = per_key.reshape(N_KEYS // n, n, -1).mean(1)
    out.append(float(np.sqrt((((means - full) ** 2).sum(1)).mean()) / np.linalg.norm(full)))
  return out


@pytest.mark.parametrize('semantics', list(SAMPLED))
def test_compensated_reservoir_gradients_are_unbiased(semantics):
  full = encoder_grads(full_reference()[2])
  report = {}
  for compensate in (True, False):
    per_key = encoder_grads_per_key(semantics, compensate)
    errors = relative_errors(per_key, full)
    mean = per_key.mean(0)
    report[compensate] = (errors, float(mean @ full / (full @ full)))
    print(f'{semantics} compensate={compensate}: relative error of the mean gradient over '
          f'{LEVELS} keys = {np.round(errors, 4).tolist()}, projection on full = '
          f'{report[compensate][1]:.3f}')
  errors, projection = report[True]
  assert errors[-1] < 0.05 and abs(projection - 1) < 0.03
  assert errors[0] / errors[-1] > 2.0  # ~4 = sqrt(256 / 16) expected.
  biased_errors, _ = report[False]
  assert biased_errors[-1] > max(0.02, 5 * errors[-1])  # Bias, not noise.


def test_train_step_compiles_once_across_steps():
  """The reservoir key is the step's (state.rng folded with the step): a new draw every step, one
  compiled train step."""
  cfg = small_cfg(grad_mode='reservoir', reservoir_semantics='streaming', compensate=True)
  tx = optim.make_optimizer(cfg.train)
  initial = params()
  state = jit(ts.init_state_fn(cfg, tx))(initial)
  traces = []

  def counted(state, batch):
    traces.append(1)
    return ts.make_train_step(cfg, tx)(state, batch)

  step = jit(counted)
  for _ in range(3):
    state, metrics = step(state, BATCH)
    assert bool(metrics['finite'])
  assert len(traces) == 1 and step._cache_size() == 1


def test_truncated_mode_with_sharded_chunks_equals_the_naive_loop():
  """Truncated gradient (S=1), k=2 chunks with their segment axis on fsdp (mesh 2x2x1: windows on
  data, segments on fsdp)."""
  cfg = small_cfg(grad_mode='truncated', reservoir_size=1, decoder_segment_chunk=2)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.num_devices = 2, 2, 1, 4
  cfg.mesh.rules = tuple(dict(cfg.mesh.rules, batch=('data',), segment=('fsdp',)).items())
  config_lib.validate(cfg, jax.device_count())
  arch = arch_lib.get_arch(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  with sharding.use_mesh(mesh, cfg.mesh.rules):
    specs = model_lib.logical_specs(arch.module_config(cfg), arch.module_cls)
    p_sh = sharding.tree_shardings(specs, mesh, cfg.mesh.rules)
    b_sh = ts.batch_shardings(cfg, mesh, BATCH)
    fn = jax.jit(jax.value_and_grad(lambda p, b, k: arch.loss(cfg, p, b, k)[:2], has_aux=True),
                 in_shardings=(p_sh, b_sh, None), compiler_options=FAST)
    (loss, n), grads = fn(jax.device_put(params(), p_sh), jax.device_put(BATCH, b_sh),
                          jax.random.key(5))
  got = (float(loss), float(n), jax.device_get(grads))
  assert_same(got, reference(truncated_gate(1)))
  diff = np.abs(encoder_grads(got[2]) - encoder_grads(full_reference()[2])).max()
  assert diff > 1e-4  # Pairs with t > s + 1 really were cut.


@pytest.mark.parametrize('field,value', [('decoder_segment_chunk', 3), ('encoder_map_batch', 3),
                                         ('grad_mode', 'sparse'), ('decoder_remat', 'all')])
def test_config_checks(field, value):
  cfg = small_cfg(**{field: value})
  with pytest.raises(config_lib.ConfigError, match=field):
    config_lib.validate(cfg, 1)


def test_analytic_flops_follow_the_mode():
  full = ccf_flops.train_flops(small_cfg(), B)
  assert full == pytest.approx(ccf_flops.ccf_train_flops(small_cfg(), B))
  f = ccf_flops.ccf_forward_flops(small_cfg(), B)
  final = ccf_flops.train_flops(small_cfg(grad_mode='reservoir', reservoir_size=1), B)
  assert final == pytest.approx(full - f['encoder'] * (3 - 1 - 2 / T))  # Each segment encoded once.
  remat = ccf_flops.train_flops(small_cfg(decoder_remat='full', encoder_remat='full',
                                            decoder_segment_chunk=1), B)
  assert remat == pytest.approx(full + f['encoder'] + f['decoder'])


def test_no_residual_encoder_pass_with_a_remainder_chunk_equals_one_batched_pass():
  """encoder_map_batch m need not divide the segments it gets (reservoir final hands it T - S):
  n // m mapped chunks plus one call on the rest give the latents of one batched call."""
  model = model_lib.bind(module_config(CFG), params(), arch_lib.get_arch(CFG).module_cls)
  tokens = jnp.asarray(BATCH['tokens']).reshape(B, T, L_SEG)[:, :3]
  span = jnp.full((B,), L_SEG // C, jnp.int32)
  cfg = small_cfg(encoder_map_batch=2).ccf
  got = jit(lambda tok: incremental.latents_without_residuals(cfg, model, tok, span))(tokens)
  want = jit(lambda tok: model.latents(tok, span))(tokens)
  assert got.shape == want.shape == (want.shape[0], B, 3) + want.shape[3:]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_unpicked_is_the_ascending_complement_of_the_reservoir():
  picked = np.array([[2, 0], [3, -1], [1, 3]], np.int32)  # -1: an empty slot.
  got = np.asarray(jit(lambda p: incremental.unpicked(p, 5))(picked))
  want = [sorted(set(range(5)) - set(row))[:3] for row in picked.tolist()]
  assert got.tolist() == want


@pytest.mark.parametrize('block,k,window', [(0, 1, 0), (3, 1, 0), (4, 2, 0), (5, 8, 0),
                                            (4, 1, 2), (16, 4, 0)])
def test_decoder_key_rows_count_the_blocks_the_masks_leave_visible(block, k, window):
  """The analytic key rows of train_flops against the decoder masks themselves: per chunk, the
  rows of every (query block, key block) pair in which masks.decoder_mask lets some query see a
  key (what blocked_attention computes), averaged over chunks; block 0: the dense kernel."""
  t = 8
  cfg = ccf_testing.small_cfg(t, decoder_segment_chunk=k, memory_window=window)
  cfg.model.attention_impl = 'blocked' if block else 'xla'
  cfg.model.attention_block = block or 128
  x = cfg.ccf
  c, l = x.num_memory, x.segment_len
  sliced = window + k if window and window + k < t else 0
  counts = []
  for first in range(0, t, k):
    start = min(max(first - window, 0), t - sliced) if sliced else 0
    segs = np.repeat(np.arange(start, start + (sliced or t)), c)[None]
    lo, hi = masks.visible_range(x, jnp.arange(first, first + k)[None])
    mask = np.asarray(masks.decoder_mask(jnp.asarray(segs), jnp.ones(segs.shape, bool), lo, hi, l))
    keys = mask.shape[-1]
    if not block:
      counts.append(keys)
      continue
    bq, bk = min(block, l), min(block, keys)
    union = mask.any(axis=(0, 1))  # [l, keys]: the kernel's batch is the chunk's segments.
    union = np.pad(union, [(0, -l % bq), (0, -keys % bk)])
    pairs = union.reshape(union.shape[0] // bq, bq, -1, bk).any(axis=(1, 3)).sum()
    counts.append(pairs * bq * bk / l)
  assert ccf_flops.decoder_key_rows(cfg) == pytest.approx(np.mean(counts))


def test_chunks_without_targets_are_not_decoded_and_change_nothing():
  """A chunk whose segments score nothing (passkey filler, padding) is skipped by a lax.cond inside
  the decoder remat: with k=1 and targets in two segments only (window 0's last, window 1's
  second), loss and gradients equal k=T, which decodes every segment."""
  mask = np.zeros_like(BATCH['loss_mask'])
  mask[0, -5:] = 1.0
  mask[1, L_SEG + 2:L_SEG + 6] = 1.0
  batch = dict(BATCH, loss_mask=mask)

  def value_and_grad(k):
    cfg = small_cfg(decoder_segment_chunk=k, decoder_remat='full')
    fn = jit(jax.value_and_grad(lambda p, key: ccf_arch.ccf_loss(cfg, p, batch, key)[:2],
                                has_aux=True))
    (loss, n), grads = fn(params(), jax.random.key(0))
    return float(loss), float(n), grads

  got, want = value_and_grad(1), value_and_grad(T)
  assert want[1] == 9  # Only the two scored spans count.
  assert_same(got, want)
  assert np.abs(encoder_grads(got[2])).max() > 0
