"""model.attention_impl: every implementation against the dense float32 reference on every mask.

The reference is `attention.dense_attend` on a boolean mask: one softmax, differentiated by
autodiff. The masks are the models' own: causal, the CCF encoder's nested prefixes over
[segment ; memory] (mixed ratios, c = 1, 32x, the 'plain' ablation), the CCF decoder's
[memory rows ; tokens] (memory_window, padded segments of a short last window, invalid slots of a
coarser ratio), its gated memory-only read (queries that see nothing), and the inference cache's
[memory ; raw ; new] prefix. First the compact `Spans` descriptors are checked against the dense
masks of ccf/masks.py, then each kernel fed the descriptor is checked against the reference fed the
dense mask, in value and in the gradients of q, k and v. Splash runs in Pallas interpret mode;
the cudnn path's mask translation (`dpa_attend`) runs through the same API with
implementation='xla'. Last, a traced model proves the configured kernel is the one used.
"""

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ccf_jax.ccf import masks
from ccf_jax.core import config_lib
from ccf_jax.model import attention, decoder as model_lib, spans
from ccf_jax.model.blocked_attention import blocked_attend
from tests import ccf_testing
from tests.ccf_testing import jit

H, K, D = 4, 2, 8


def encoder_case(l, c, spans, plain=False):
  span = jnp.asarray(spans, jnp.int32)
  return masks.encoder_spans(span, l, c, plain), masks.encoder_layout(span, l, c, plain)[1]


def decoder_parts(t=4, c=2, l=6, window=0, valid_segments=(4, 2), slots=(2, 1)):
  """(mem_segment, mem_valid, lo, hi): windows of T segments decoded at once, the second window
  short (padded segments) and at a coarser ratio (one of its c slots unused)."""
  b = len(valid_segments)
  segment = jnp.broadcast_to(jnp.repeat(jnp.arange(t), c), (b, t * c))
  seg_ok = jnp.arange(t)[None] < jnp.asarray(valid_segments)[:, None]
  slot_ok = jnp.arange(c)[None] < jnp.asarray(slots)[:, None]
  valid = (seg_ok[:, :, None] & slot_ok[:, None, :]).reshape(b, t * c)
  cfg = ccf_testing.small_cfg(t, memory_window=window).ccf
  lo, hi = masks.visible_range(cfg, jnp.broadcast_to(jnp.arange(t), (b, t)))
  return segment, valid, lo, hi, l


def decoder_case(**kw):
  parts = decoder_parts(**kw)
  l = parts[-1]
  dense = masks.decoder_mask(*parts).reshape(-1, l, parts[0].shape[1] + l)
  return masks.decoder_spans(*parts), dense


def cache_case(b=2, prefix=11, lq=5, seed=0):
  ok = jnp.asarray(np.random.default_rng(seed).random((b, prefix)) < 0.6)
  dense = jnp.concatenate([jnp.broadcast_to(ok[:, None], (b, lq, prefix)),
                           jnp.broadcast_to(model_lib.causal_mask(lq), (b, lq, lq))], -1)
  return spans.prefix_causal(ok, lq), dense


def window_mask(n, w):
  """Causal within the last w keys, built independently of `spans.causal`."""
  i = np.arange(n)
  return jnp.asarray(((i[:, None] >= i[None]) & (i[:, None] - i[None] < w))[None])


CASES = {
    'causal': lambda: (spans.causal(13), model_lib.causal_mask(13)),
    'causal_window': lambda: (spans.causal(13, 4), window_mask(13, 4)),
    'encoder_mixed_ratios': lambda: encoder_case(8, 4, [2, 4, 8]),
    'encoder_c1': lambda: encoder_case(8, 1, [8]),
    'encoder_32x': lambda: encoder_case(32, 1, [32]),
    'encoder_plain': lambda: encoder_case(8, 2, [4], plain=True),
    'decoder': lambda: decoder_case(),
    'decoder_window': lambda: decoder_case(window=1),
    'decoder_c1': lambda: decoder_case(c=1, slots=(1, 1)),
    'cache': lambda: cache_case(),
}


def gated_parts(spans, dense, rows):
  """The gated read's two attentions: memory rows alone, then the tokens."""
  lk = dense.shape[-1]
  return [(spans.keys(0, rows), dense[..., :rows]), (spans.keys(rows, lk), dense[..., rows:])]


@pytest.mark.parametrize('name', sorted(CASES))
def test_spans_equal_the_dense_masks(name):
  spans, dense = CASES[name]()
  lk = dense.shape[-1]
  got = np.broadcast_to(np.asarray(spans.dense(lk)), np.broadcast_shapes(
      spans.dense(lk).shape, dense.shape))
  np.testing.assert_array_equal(got, np.broadcast_to(np.asarray(dense), got.shape))
  if name.startswith('decoder'):
    for part, want in gated_parts(spans, dense, lk - dense.shape[1]):
      np.testing.assert_array_equal(part.dense(want.shape[-1]), want)


def inputs(b, lq, lk, seed=0):
  r = np.random.default_rng(seed)
  q, w = (jnp.asarray(r.normal(size=(b, lq, H, D)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(r.normal(size=(b, lk, K, D)), jnp.float32) for _ in range(2))
  return q, k, v, w


def value_and_grads(fn, q, k, v, w):
  return jit(jax.value_and_grad(lambda q, k, v: (fn(q, k, v) * w).sum(), (0, 1, 2)))(q, k, v)


@jit
def reference(q, k, v, w, dense):
  return jax.value_and_grad(lambda q, k, v: (attention.dense_attend(q, k, v, dense) * w).sum(),
                            (0, 1, 2))(q, k, v)


def assert_matches(got, want):
  """(loss, (dq, dk, dv)) of a kernel against the reference's."""
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=5e-6)


def check(spans, dense, impl, block, seed=0, batch=None):
  """`batch`: batch rows when the masks broadcast over the batch (default: the masks' own)."""
  lq, lk = dense.shape[-2:]
  b = batch or max(dense.shape[0], spans.lo.shape[0],
                   1 if spans.key_ok is None else spans.key_ok.shape[0])
  q, k, v, w = inputs(b, lq, lk, seed)
  want = reference(q, k, v, w, dense)  # Compiled once per shape.
  got = value_and_grads(lambda q, k, v: attention.attend(q, k, v, spans, impl, block), q, k, v, w)
  assert_matches(got, want)
  unseen = ~np.asarray(jnp.broadcast_to(dense, (b, lq, lk))).any(1)  # [B, Lk]
  np.testing.assert_array_equal(np.asarray(got[1][1])[unseen], 0.0)  # No gradient where unseen.
  return got


KERNELS = [(name, 'xla', 128) for name in sorted(CASES)] + [
    (name, 'blocked', 5) for name in sorted(CASES)] + [
    (name, 'blocked', 128) for name in ('causal', 'decoder', 'encoder_32x')] + [
    (name, 'rows', block) for name in ('causal', 'causal_window') for block in (5, 128)]


@pytest.mark.parametrize('name,impl,block', KERNELS)
def test_each_kernel_equals_the_dense_reference(name, impl, block):
  """Blocks of 5: several query and key blocks, padded last blocks, blocks skipped (causal upper
  triangle, memory of later segments, encoder tokens against memory slots, for rows the keys
  below a sliding window); 128: one block. The decoder also as the gated read's two attentions
  (memory alone: queries that see nothing)."""
  spans, dense = CASES[name]()
  before = dict(attention.CALLS)
  check(spans, dense, impl, block)
  assert attention.CALLS[impl] > before.get(impl, 0)  # The named kernel ran, not a fallback.
  if name == 'decoder':
    for part, want in gated_parts(spans, dense, dense.shape[-1] - dense.shape[1]):
      check(part, want, impl, block)


@pytest.mark.parametrize('name', sorted(CASES))
def test_block_kinds_follow_the_dense_mask(name):
  """The blocked kernel's per-block table, from Spans, against tiles of the dense mask (blocks of
  5, padded): a block is skipped exactly when no query sees any of its keys, and runs unmasked only
  when every query sees every key (a union of ranges may cover a block the table still masks)."""
  from ccf_jax.model.blocked_attention import _mask_source
  sp, dense = CASES[name]()
  lq, lk = dense.shape[-2:]
  nq, nk = -(-lq // 5), -(-lk // 5)
  tiles = np.asarray(dense).reshape((-1, lq, lk))
  padded = np.zeros((tiles.shape[0], nq * 5, nk * 5), bool)
  padded[:, :lq, :lk] = tiles
  padded = padded.reshape(-1, nq, 5, nk, 5)
  some, every = padded.any((0, 2, 4)), padded.all((0, 2, 4))
  kind = np.asarray(_mask_source(sp, lq, lk, 5, 5)[1])
  np.testing.assert_array_equal(kind > 0, some)
  assert not (kind == 2)[~every].any()  # Never unmasked where some query misses some key.
  if name.startswith('causal'):  # One range per query: the table is exact.
    np.testing.assert_array_equal(kind == 2, every)
  if name in ('causal', 'encoder_32x'):  # Blocks below the diagonal run unmasked.
    assert (kind == 2).any()
  np.testing.assert_array_equal(np.asarray(_mask_source(dense, lq, lk, 5, 5)[1]),
                                some.astype(int) + every.astype(int))


def test_rows_takes_the_causal_mask_and_leaves_the_others_to_blocked(caplog):
  """`rows` unrolls the causal mask's query blocks at trace time (blocks of 5 over 13 tokens:
  three blocks, the last short; with a window of 4 each block's keys start 3 before it); a mask
  known only when the step runs (the CCF decoder's) goes to the blocked kernel, is counted there
  and says so in one log line, with the same result as the reference."""
  from ccf_jax.model import causal_rows
  assert causal_rows.row_blocks(13, 5) == [(0, 5, 0), (5, 10, 0), (10, 13, 0)]
  assert causal_rows.row_blocks(13, 5, 4) == [(0, 5, 0), (5, 10, 2), (10, 13, 7)]
  sp, dense = CASES['decoder']()
  before = dict(attention.CALLS)
  attention._warned.clear()
  with caplog.at_level(logging.WARNING):
    check(sp, dense, 'rows', 5)
  assert attention.CALLS['blocked'] > before.get('blocked', 0)
  assert attention.CALLS['rows'] == before.get('rows', 0)
  lines = [r for r in caplog.records if "attention_impl='rows'" in r.getMessage()]
  assert len(lines) == 1 and "run 'blocked'" in lines[0].getMessage()


@pytest.mark.parametrize('pairs', [1, 3])
def test_rows_maps_over_pairs_in_steps(monkeypatch, pairs):
  """4 batch rows x 2 kv heads = 8 (batch row, kv head) pairs, mapped 1 per step (8 steps) or
  3 per step (2 steps and a remainder of 2): each equals the reference."""
  from ccf_jax.model import causal_rows
  q, k, _, _ = inputs(4, 13, 13)
  monkeypatch.setattr(causal_rows, 'SCORE_BYTES', pairs * (H // K) * 5 * 13 * 4)
  assert causal_rows.pairs_per_step(q, k, 5) == pairs
  check(spans.causal(13), model_lib.causal_mask(13), 'rows', 5, seed=5, batch=4)


def test_blocked_accepts_a_boolean_mask():
  """Callers that build a dense mask (a plain bool array) get the same kernel, sliced per block."""
  _, dense = cache_case()
  q, k, v, w = inputs(2, *dense.shape[-2:])
  want = value_and_grads(lambda q, k, v: attention.dense_attend(q, k, v, dense), q, k, v, w)
  got = value_and_grads(lambda q, k, v: blocked_attend(q, k, v, dense, 4), q, k, v, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=5e-6)


@pytest.mark.parametrize('name', ['causal', 'causal_window', 'cache'])
def test_cudnn_mask_translation_through_the_xla_implementation(name):
  """dpa_attend is the cudnn path with only `implementation` changed (the xla kernel tests above
  run it on every mask): the 4-D mask with a batch of 3 against 4 heads (a 3-D mask would be read
  as heads), is_causal for the square causal mask and local_window_size for a sliding window. Its
  zeroing of fully masked rows (the API
  returns mean(V) there) is checked by the xla kernel on the decoder's gated memory read."""
  spans, dense = CASES[name]()
  lq, lk = dense.shape[-2:]
  b = 3
  q, k, v, w = inputs(b, lq, lk, seed=1)
  dense_b = jnp.broadcast_to(dense, (b, lq, lk)) if dense.shape[0] == 1 else dense[:1].repeat(b, 0)
  spans_b = spans if dense.shape[0] == 1 else attention.Spans(
      jnp.broadcast_to(spans.lo[:1], (b,) + spans.lo.shape[1:]),
      jnp.broadcast_to(spans.hi[:1], (b,) + spans.hi.shape[1:]),
      None if spans.key_ok is None else jnp.broadcast_to(spans.key_ok[:1], (b, lk)))
  want = value_and_grads(lambda q, k, v: attention.dense_attend(q, k, v, dense_b), q, k, v, w)
  got = value_and_grads(lambda q, k, v: attention.dpa_attend(q, k, v, spans_b, 'xla'), q, k, v, w)
  assert_matches(got, want)


def test_cudnn_off_gpu_is_a_config_error():
  spans, dense = CASES['causal']()
  q, k, v, _ = inputs(1, 13, 13)
  with pytest.raises(config_lib.ConfigError, match='attention_impl'):
    attention.attend(q, k, v, spans, 'cudnn')


@pytest.mark.parametrize('name', ['causal', 'causal_window', 'encoder_32x', 'decoder'])
def test_splash_in_interpret_mode_equals_the_dense_reference(name):
  """Splash pads to blocks of 128 and gives rows that see nothing a zero key: the decoder's
  gated memory-only read (segment 0 sees no memory) must return zeros, not NaN or mean(V)."""
  spans, dense = CASES[name]()
  check(spans, dense, 'splash', 128)
  if name == 'decoder':
    part, want = gated_parts(spans, dense, dense.shape[-1] - dense.shape[1])[0]
    out = check(part, want, 'splash', 128)
    assert np.isfinite(np.asarray(out[0]))


@pytest.mark.parametrize('name', ['causal', 'cache'])
def test_splash_runs_per_device_under_a_mesh(name):
  """Under a mesh of several devices splash runs inside shard_map (XLA cannot partition a Mosaic
  kernel): batch rows over data, heads over tensor, the cache mask's per-row key flags with their
  rows (the causal case has one row: replicated)."""
  from jax.sharding import AxisType
  from ccf_jax.core import sharding
  from experiments import base
  mesh = jax.make_mesh((2, 1, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=jax.devices()[:4])
  with sharding.use_mesh(mesh, base.get_config().mesh.rules):
    check(*CASES[name](), 'splash', 128)


def test_rows_runs_per_device_under_a_mesh():
  """rows maps over (batch row, kv head) pairs; under a mesh it runs inside shard_map, so the
  sharded batch is never gathered onto one device (a scan over a sharded axis would be), and it
  still equals the reference."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec
  from ccf_jax.core import sharding
  from experiments import base
  mesh = jax.make_mesh((2, 1, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=jax.devices()[:4])
  causal, dense = spans.causal(13), model_lib.causal_mask(13)
  q, k, v, w = inputs(4, 13, 13, seed=4)
  want = reference(q, k, v, w, dense)
  loss = lambda q, k, v: (attention.attend(q, k, v, causal, 'rows', 5) * w).sum()
  with sharding.use_mesh(mesh, base.get_config().mesh.rules):
    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)),
                   in_shardings=NamedSharding(mesh, PartitionSpec('data')))
    assert 'all-gather' not in step.lower(q, k, v).compile().as_text()
    got = step(q, k, v)
  assert_matches(got, want)


def test_sliding_window_skips_key_blocks_below_it():
  """A window of 8 keys over 64 queries in blocks of 8: each query block visits only its own key
  block and the one before (the window reaches back at most 7 keys), in both passes; the window
  spans the splash kernel's 128-row blocks too (a window of 100 on 300 tokens)."""
  from ccf_jax.model.blocked_attention import _mask_source
  _, visible = _mask_source(spans.causal(64, 8), 64, 64, 8, 8)
  qi, kj = np.nonzero(np.asarray(visible))
  assert set(qi - kj) == {0, 1} and len(qi) == 8 + 7
  check(spans.causal(300, 100), window_mask(300, 100), 'splash', 128)


def test_blocked_and_rows_backward_keep_one_block_of_scores_not_all():
  """With many keys the compiled gradient's transient buffers stay far below the dense path's,
  which keeps [B, heads, Lq, Lk] scores and probabilities."""
  b, lq, lk = 2, 64, 2048
  q, k, v, _ = inputs(b, lq, lk, seed=2)
  mask = spans.prefix_causal(jnp.ones((1, lk - lq), bool), lq)

  def temp(fn):
    g = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), (0, 1, 2)))
    return g.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  dense = temp(lambda q, k, v: attention.attend(q, k, v, mask, 'xla'))
  blocked = temp(lambda q, k, v: attention.attend(q, k, v, mask, 'blocked', 128))
  scores = b * H * lq * lk * 4
  assert dense > scores
  assert blocked < 0.5 * scores
  # rows, causal over 1024 tokens, 4 batch rows: one (batch row, kv head) pair's scores per step
  # of its map, two query blocks at a time (0.16x the [4, heads, 1024, 1024] scores' bytes with
  # this jaxlib; all pairs and blocks at once took 1.7x).
  q, k, v, _ = inputs(4, 1024, 1024, seed=3)
  causal = spans.causal(1024)
  dense = temp(lambda q, k, v: attention.attend(q, k, v, causal, 'xla'))
  rows = temp(lambda q, k, v: attention.attend(q, k, v, causal, 'rows', 128))
  scores = 4 * H * 1024 * 1024 * 4
  assert dense > scores
  assert rows < 0.25 * scores


# ------------------------------------------------------------------------------------------------
# The switch: config checks, auto, and the kernel a traced model really uses.


@pytest.mark.parametrize('field,value,match', [
    ('attention_impl', 'flash', 'attention_impl'),
    ('attention_block', 0, 'attention_block'),
    ('loss_chunk', -1, r'model.loss_chunk=-1 must be an integer >= 0.*Fix: '),
    ('loss_chunk', 64, r"model.arch='ccf' would ignore it. Fix: --config.model.loss_chunk=0"),
    ('attention_impl', 'cudnn', 'bf16'),
    ('sliding_window', 8, r'sliding_window=8 is implemented for the plain decoder only.*Fix: '),
    ('sliding_window', -1, 'sliding_window=-1 must be an integer >= 0'),
    ('rope_scaling', {'rope_type': 'dynamic', 'factor': 2.0}, "rope_type='dynamic'"),
    ('rope_scaling', {'rope_type': 'yarn', 'factor': 2.0}, 'original_max_position_embeddings'),
])
def test_config_checks(field, value, match):
  """Also: a sliding window on a CCF model (memory rows have no window) and rope scalings the
  model does not implement are refused at validation, never ignored."""
  cfg = ccf_testing.small_cfg(4)
  cfg.model[field] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(cfg, 1)


def test_splash_block_must_be_a_multiple_of_128():
  cfg = ccf_testing.small_cfg(4)
  cfg.model.attention_impl, cfg.model.attention_block = 'splash', 64
  with pytest.raises(config_lib.ConfigError, match='attention_block'):
    config_lib.validate(cfg, 1)


def test_auto_picks_per_platform_and_warns_once_on_fallback(monkeypatch, caplog):
  q32 = jnp.zeros((1, 8, H, D), jnp.float32)
  big = jnp.zeros((1, 1024, K, D), jnp.float32)
  assert attention.resolve('auto', q32, q32) == attention.cpu_choice(q32, q32)
  assert attention.resolve('auto', big, big) in ('xla', 'blocked')
  # CPU: the causal mask takes rows up to MAX_BLOCKS query blocks and the blocked kernel beyond,
  # small CCF masks the dense one.
  causal, prefix = spans.causal(8), spans.prefix_causal(jnp.ones((1, 8), bool), 8)
  assert attention.cpu_choice(q32, q32, causal) == 'rows'
  assert attention.cpu_choice(big, big, spans.causal(1024), 64) == 'rows'  # 16 blocks.
  assert attention.cpu_choice(big, big, spans.causal(1024), 32) == 'blocked'  # 32 blocks.
  assert attention.cpu_choice(q32, jnp.zeros((1, 16, K, D)), prefix) == 'xla'
  assert attention.cpu_choice(big, big, prefix) == 'blocked'
  assert attention.resolve('blocked', q32, q32) == 'blocked'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert attention.resolve('auto', q32, q32) == 'splash'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert attention.resolve('auto', q32.astype(jnp.bfloat16), q32) == 'cudnn'
  attention._warned.clear()
  with caplog.at_level(logging.WARNING):
    assert attention.resolve('auto', q32, q32) == 'xla'
    assert attention.resolve('auto', q32, q32) == 'xla'
  lines = [r for r in caplog.records if 'attention_impl=auto' in r.getMessage()]
  assert len(lines) == 1


def traced_kernels(cfg):
  """Counts of the kernels used while tracing the CCF objective's gradient, and its HLO text."""
  from ccf_jax.ccf import incremental
  from ccf_jax.ccf.model import CCFModel, module_config
  params = model_lib.init_params(module_config(cfg), 0, CCFModel)
  tokens = jnp.ones((ccf_testing.B, cfg.ccf.num_segments, cfg.ccf.segment_len), jnp.int32)
  valid = jnp.ones(tokens.shape[:2], bool)
  scored = jnp.ones((tokens.shape[0], tokens.shape[1] * tokens.shape[2]), jnp.float32)
  span = masks.spans(cfg.ccf, tokens.shape[0])

  def loss(p):
    (s, n, _), _ = incremental.lm_sums(cfg, p, tokens, valid, scored, span, jax.random.key(0))
    return s / n

  before = dict(attention.CALLS)
  text = jax.jit(jax.grad(loss)).lower(params).as_text()
  return {k: v - before.get(k, 0) for k, v in attention.CALLS.items() if v - before.get(k, 0)}, text


@pytest.mark.parametrize('impl', ['xla', 'blocked', 'auto'])
def test_the_configured_kernel_is_the_one_traced(impl):
  """Every attention of the CCF step (encoder, gated decoder read and tokens) goes through the
  configured kernel: a trace-time counter per kernel, and the blocked kernel's loops in the HLO."""
  cfg = ccf_testing.small_cfg(4, memory_gate='tanh')
  cfg.model.attention_impl, cfg.model.attention_block = impl, 4
  counts, text = traced_kernels(cfg)
  if impl == 'auto':
    assert set(counts) <= {'xla', 'blocked'} and counts
  else:
    assert set(counts) == {impl}
    assert counts[impl] >= 3  # Encoder, memory read, token attention (each scanned once).
  if impl != 'auto':
    loops = text.count('stablehlo.while')
    other = 'xla' if impl == 'blocked' else 'blocked'
    cfg.model.attention_impl = other
    other_loops = traced_kernels(cfg)[1].count('stablehlo.while')
    assert (loops > other_loops) == (impl == 'blocked')


def test_bench_attention_times_each_kernel_against_the_dense_reference():
  """`bench attention` on a shrunk model: one row per implementation, each checked against
  dense_attend (a kernel that drifted from the reference would show a large error here)."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  small = ['--config.model.num_heads=4', '--config.model.num_kv_heads=2',
           '--config.model.head_dim=8', '--config.data.seq_len=64', '--config.data.batch_size=2',
           '--config.model.attention_block=16']
  r = subprocess.run([sys.executable, '-m', 'ccf_jax.bench', 'attention',
                      '--config=experiments/tiny.py', '--attention_shapes=config', '--steps=1',
                      '--attention_rounds=2', *small], cwd=root, capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = {x['impl']: x for x in map(json.loads, r.stdout.splitlines())}
  assert set(rows) == {'xla', 'blocked', 'rows'}
  for row in rows.values():
    assert row['q'] == [2, 64, 4, 8] and row['kv'] == [2, 64, 2, 8] and row['block'] == 16
    assert row['max_rel_err_vs_dense'] < 1e-4 and len(row['round_ms']) == 2 and row['ms'] > 0
  assert rows['xla']['speedup_vs_xla'] == 1.0


@pytest.mark.parametrize('impl', ['blocked', 'rows', 'xla'])
def test_masked_scores_far_above_the_visible_ones_keep_gradients_finite(impl):
  """Keys a query may not see score 1e4 above those it sees (a diverging run's logits): their
  exp overflows, and a kernel that masks by multiplying (inf * 0) returns NaN gradients."""
  length = 32
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, length, H, D)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, length, K, D)), jnp.float32)
  k = k.at[:, length // 2:].multiply(1e4 / D)  # Late keys: huge scores for the early queries.
  v = jnp.asarray(rng.normal(size=(1, length, K, D)), jnp.float32)
  mask = spans.causal(length)
  loss = lambda f: lambda q, k, v: (f(q, k, v) ** 2).sum()
  got = jax.grad(loss(lambda q, k, v: attention.attend(q, k, v, mask, impl, 8)), (0, 1, 2))(q, k, v)
  want = jax.grad(loss(lambda q, k, v: attention.dense_attend(q, k, v, mask.dense(length))),
                  (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3 * float(jnp.abs(w).max()))
