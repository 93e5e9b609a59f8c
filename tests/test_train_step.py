"""The sharded train step: identical results on every mesh, accumulation, non-finite handling."""

import functools

import jax
import numpy as np
import pytest

from ccf_jax.core import config_lib
from ccf_jax.train import optim
from ccf_jax.core import sharding
from ccf_jax.train import step as ts
from tests.ccf_testing import set_fields
from experiments import tiny


def small_config(**mesh):
  c = set_fields(tiny.get_config(), 'model', vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=8, mlp_dim=64)
  set_fields(c, 'data', seq_len=16, batch_size=8)
  return set_fields(c, 'mesh', **mesh)


def make_batch(c, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, c.model.vocab_size, (c.data.batch_size, c.data.seq_len)).astype(np.int32)
  mask = np.ones_like(tokens, np.float32)
  mask[0, 5:] = 0.0  # Some padding so token-count normalisation matters.
  return {'tokens': tokens, 'loss_mask': mask}


def run_steps(c, batches):
  mesh = sharding.make_mesh(c.mesh)
  with sharding.use_mesh(mesh, c.mesh.rules):
    state, step, batch_sh = ts.fresh_state_and_step(c, mesh, batches[0])
    losses, gnorms = [], []
    for b in batches:
      state, m = step(state, {k: jax.device_put(v, batch_sh[k]) for k, v in b.items()})
      losses.append(float(m['loss']))
      gnorms.append(float(m['grad_norm']))
    return losses, gnorms, jax.device_get(state.params), state


@functools.lru_cache(maxsize=1)
def single_device_reference():
  batches = [make_batch(small_config(), s) for s in range(3)]
  return batches, run_steps(small_config(data=1, fsdp=1, tensor=1, num_devices=1), batches)[:3]


@pytest.mark.parametrize('shape', [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_same_results_on_every_mesh(shape):
  batches, ref = single_device_reference()
  d, f, t = shape
  got = run_steps(small_config(data=d, fsdp=f, tensor=t), batches)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], ref[1], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(ref[2])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_params_are_actually_sharded():
  c = small_config(data=2, fsdp=2, tensor=2)
  _, _, _, state = run_steps(c, [make_batch(c)])
  wq = state.params['layers']['attn']['wq']
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
  mu = state.opt_state[1][0].mu['layers']['attn']['wq']
  assert mu.sharding.spec == wq.sharding.spec


def test_pretrained_params_are_placed_sharded_not_compiled_in():
  """Pretrained weights become sharded arguments of the init program, never its constants: its
  text stays flat when the weights grow ~10x, where a closure over them grows with them."""
  from ccf_jax.model import decoder as model_lib
  sizes, closure_sizes = [], []
  for d in (32, 128):
    c = small_config(data=2, fsdp=2, tensor=2)
    set_fields(c, 'model', d_model=d, mlp_dim=2 * d, head_dim=d // 4, vocab_size=512)
    params = jax.device_get(model_lib.init_params(c.model, 3))
    mesh = sharding.make_mesh(c.mesh)
    with sharding.use_mesh(mesh, c.mesh.rules):
      tx = optim.make_optimizer(c.train)
      _, state_sh = ts.abstract_state_and_shardings(c, tx, mesh)
      state = ts.init_state(c, tx, state_sh, params)
      sizes.append(len(ts.jit_init_state(c, tx, state_sh).lower(params).as_text()))
      closure_sizes.append(len(jax.jit(lambda: ts.init_state_fn(c, tx)(params)).lower().as_text()))
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params)):
      np.testing.assert_array_equal(a, b)
    wq = state.params['layers']['attn']['wq']
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
  assert closure_sizes[1] > 4 * closure_sizes[0], closure_sizes  # The measure can see weights.
  assert sizes[1] < 1.2 * sizes[0], sizes


def test_grad_accumulation_equals_one_big_batch():
  batches = [make_batch(small_config(), s) for s in range(2)]
  one = run_steps(small_config(data=1, num_devices=1), batches)
  c = small_config(data=1, num_devices=1)
  c.train.grad_accum = 4
  four = run_steps(c, batches)
  np.testing.assert_allclose(four[0], one[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(four[2]), jax.tree.leaves(one[2])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nan_in_batch_is_caught_and_skipped():
  c = small_config(data=1, num_devices=1)
  c.model.dtype = 'float32'
  good = make_batch(c, 0)
  bad = dict(good)
  bad['loss_mask'] = good['loss_mask'].copy()
  bad['loss_mask'][1, 3] = np.nan  # A NaN in the batch poisons the loss.
  mesh = sharding.make_mesh(c.mesh)
  with sharding.use_mesh(mesh, c.mesh.rules):
    state, step, _ = ts.fresh_state_and_step(c, mesh, good)
    before = jax.device_get(state.params)
    state, m = step(state, bad)
    assert float(m['finite']) == 0.0 and int(state.nonfinite_count) == 1
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)):
      np.testing.assert_array_equal(a, b)
    state, m = step(state, good)
    assert float(m['finite']) == 1.0 and int(state.nonfinite_count) == 1


def test_adapter_lr_mult_scales_only_the_ccf_parameters():
  """Against optax itself: with clipping off, a step with train.adapter_lr_mult=10 equals plain
  AdamW at lr for the base and AdamW at 10 x lr for the `adapter` subtree, over three steps."""
  import optax
  c = small_config()
  set_fields(c, 'train', clip_norm=0.0, warmup_steps=2, steps=10, adapter_lr_mult=10.0)
  rng = np.random.default_rng(0)
  params = {'adapter': {'memory': rng.normal(size=(4, 8)).astype(np.float32),
                        'memory_gate': np.zeros((2, 2), np.float32)},
            'decoder': {'w': rng.normal(size=(8, 8)).astype(np.float32),
                        'norm': {'scale': np.ones(8, np.float32)}}}
  tx = optim.make_optimizer(c.train)
  ref = {k: optax.adamw(lambda n, m=m: m * optim.schedule(c.train)(n), b1=c.train.b1,
                        b2=c.train.b2, eps=c.train.eps, weight_decay=c.train.weight_decay,
                        mask=optim.decay_mask)
         for k, m in (('adapter', 10.0), ('decoder', 1.0))}
  state, ref_state = tx.init(params), {k: ref[k].init(params[k]) for k in ref}
  for i in range(3):
    grads = jax.tree.map(lambda x, i=i: np.sin(x + i).astype(np.float32), params)
    updates, state = tx.update(grads, state, params)
    for k in ref:
      want, ref_state[k] = ref[k].update(grads[k], ref_state[k], params[k])
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
                   updates[k], want)
    params = optax.apply_updates(params, updates)
  assert float(np.abs(np.asarray(params['adapter']['memory_gate'])).max()) > 0


def test_weight_decay_mask_skips_norms():
  c = small_config()
  from ccf_jax.model import decoder as model_lib
  mask = optim.decay_mask(model_lib.abstract_params(c.model))
  assert mask['layers']['attn']['wq'] is True
  assert mask['layers']['attn_norm']['scale'] is False
  assert mask['final_norm']['scale'] is False


@pytest.mark.parametrize('field,value,needle', [
    ('mesh.data', 3, 'mesh'),
    ('model.num_kv_heads', 3, 'num_kv_heads'),
    ('ccf.num_memory', 7, 'not divisible by ccf.num_memory'),
    ('data.batch_size', 6, 'not divisible by the 8 devices'),
])
def test_clear_config_errors(field, value, needle):
  c = small_config(data=-1)
  sect, key = field.split('.')
  c[sect][key] = value
  if field == 'model.num_kv_heads':
    c.mesh.tensor, c.mesh.data = 2, -1
  with pytest.raises(config_lib.ConfigError, match=needle):
    config_lib.validate(c, 8)


def test_tensor_axis_must_divide_heads():
  c = small_config(data=-1, tensor=8)
  with pytest.raises(config_lib.ConfigError, match='not divisible by mesh.tensor=8'):
    config_lib.validate(c, 8)


def test_unknown_field_is_an_error():
  c = small_config()
  c.model.dmodel = 3
  with pytest.raises(config_lib.ConfigError, match="unknown config field 'model.dmodel'"):
    config_lib.validate(c)


def test_tensor_axis_must_divide_kv_heads():
  # num_heads=4 passes tensor=4, num_kv_heads=2 does not: the kv_heads branch of the check fires.
  c = small_config(data=-1, tensor=4)
  with pytest.raises(config_lib.ConfigError,
                     match='model.num_kv_heads=2 is not divisible by mesh.tensor=4'):
    config_lib.validate(c, 8)


def test_segments_must_divide_the_axes_that_carry_them():
  from tests.ccf_testing import small_cfg
  c = small_cfg(6)  # 6 segments over fsdp=4 (the 7B configs' rules: segments over fsdp).
  c.mesh.data, c.mesh.fsdp = 2, 4
  c.mesh.rules = tuple(dict(c.mesh.rules, batch=('data',), segment=('fsdp',)).items())
  with pytest.raises(config_lib.ConfigError, match=r'ccf.num_segments=6 is not divisible by the 4 '
                     r"devices of the mesh axes \('fsdp',\)"):
    config_lib.validate(c, 8)
  c.ccf.num_segments = 8
  config_lib.validate(c, 8)
