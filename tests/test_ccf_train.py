"""CCF under the generic train step: sharded meshes match one device; adapter mode trains only the
adapter and keeps the exported base exact."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccf_jax import registry as arch_lib
from ccf_jax.model import decoder as model_lib
from ccf_jax.train import optim
from ccf_jax.core import config_lib, sharding
from ccf_jax.train import step as ts
from ccf_jax.ccf import arch as ccf_arch
from tests import ccf_testing

FAST = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
B, T, L_SEG = 8, 4, 8
SEGMENT_RULES = (('batch', ('data',)), ('segment', ('fsdp',)))  # Segments sharded over fsdp.


def small_cfg(**ccf):
  c = ccf_testing.tiny_ccf_from_scratch()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers = 64, 32, 2
  m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 4, 2, 8, 48
  c.ccf.segment_len, c.ccf.num_segments, c.ccf.num_memory = L_SEG, T, 4
  c.ccf.lora_rank, c.ccf.lora_alpha = 4, 8.0
  c.data.batch_size = B
  for k, v in ccf.items():
    c.ccf[k] = v
  return c


def init_params(cfg, seed=0, module_cls=None):
  """Fresh params, initialised in one compiled program (eager init compiles every op)."""
  arch = arch_lib.get_arch(cfg)
  if module_cls is None:
    return jax.jit(lambda: model_lib.init_params(arch.module_config(cfg), seed, arch.module_cls),
                   compiler_options=FAST)()
  return jax.jit(lambda: model_lib.init_params(cfg.model, seed, module_cls),
                 compiler_options=FAST)()


def make_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.model.vocab_size, (B, T * L_SEG)).astype(np.int32)
  mask = np.ones_like(tokens, np.float32)
  mask[0, 5:9] = 0.0
  valid = np.full((B,), T, np.int32)
  valid[1], valid[2] = 1, 3
  return {'tokens': tokens, 'loss_mask': mask, 'num_valid_segments': valid}


def loss_and_grads(cfg, params, batch, shape, rules=None):
  """(loss, count, grads) of the CCF training objective on a (data, fsdp, tensor) mesh."""
  c = cfg.copy_and_resolve_references()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = shape
  c.mesh.num_devices = math.prod(shape)
  if rules:
    c.mesh.rules = tuple(dict(c.mesh.rules, **dict(rules)).items())
  arch = arch_lib.get_arch(c)
  mesh = sharding.make_mesh(c.mesh)
  with sharding.use_mesh(mesh, c.mesh.rules):
    specs = model_lib.logical_specs(arch.module_config(c), arch.module_cls)
    p_sh = sharding.tree_shardings(specs, mesh, c.mesh.rules)
    b_sh = ts.batch_shardings(c, mesh, batch)
    fn = jax.jit(jax.value_and_grad(lambda p, b: arch.loss(c, p, b, jax.random.key(7))[:2],
                                    has_aux=True),
                 in_shardings=(p_sh, b_sh), compiler_options=FAST)
    (loss, n), grads = fn(jax.device_put(params, p_sh), jax.device_put(batch, b_sh))
    wq = grads['decoder']['layers']['attn']['wq']
    return float(loss), float(n), jax.device_get(grads), wq.sharding.spec


@functools.lru_cache(maxsize=1)
def reference():
  cfg = small_cfg(ratios=(2, 4), ae_mode='extra')  # Sampled ratios and auto-encoding too.
  params = init_params(cfg)
  batch = make_batch(cfg)
  return cfg, params, batch, loss_and_grads(cfg, params, batch, (1, 1, 1))


@pytest.mark.parametrize('shape,rules', [((8, 1, 1), None), ((2, 2, 2), SEGMENT_RULES)])
def test_sharded_loss_and_grads_match_one_device(shape, rules):
  cfg, params, batch, (loss, n, grads, _) = reference()
  got_loss, got_n, got_grads, spec = loss_and_grads(cfg, params, batch, shape, rules)
  assert got_n == n
  np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  if shape == (2, 2, 2):
    assert tuple(spec)[:3] == (None, 'fsdp', 'tensor')  # Parameters really are sharded.


def test_adapter_step_trains_only_the_adapter_and_keeps_the_base():
  cfg = small_cfg(mode='adapter', memory_init_token=3)
  base = init_params(cfg, 5, model_lib.Decoder)  # A plain-decoder export.
  arch = arch_lib.get_arch(cfg)
  params = jax.jit(lambda b: arch.from_base_params(cfg, b), compiler_options=FAST)(base)
  memory = params['adapter']['memory']
  np.testing.assert_array_equal(memory, np.broadcast_to(base['embed'][3], memory.shape))
  tx = optim.make_optimizer(cfg.train)
  state = jax.jit(ts.init_state_fn(cfg, tx), compiler_options=FAST)(params)
  assert set(state.params) == {'adapter'} and set(state.frozen) == {'decoder'}
  n_train, n_opt = model_lib.param_count(state.params), model_lib.param_count(state.opt_state)
  assert n_opt <= 2 * n_train + 8  # Adam moments of the adapter only (plus counters).
  step = jax.jit(ts.make_train_step(cfg, tx), compiler_options=FAST)
  batch = make_batch(cfg, 1)
  new, metrics = step(state, batch)
  assert bool(metrics['finite'])
  for a, b in zip(jax.tree.leaves(new.frozen), jax.tree.leaves({'decoder': base})):
    np.testing.assert_array_equal(a, b)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, state.params)
  assert changed['adapter']['memory'] and changed['adapter']['mem_k']['b']
  assert changed['adapter']['enc_q']['b'] and changed['adapter']['enc_v']['b']
  # With memory off the trained model is still exactly the exported base decoder.

  @functools.partial(jax.jit, compiler_options=FAST)
  def off_and_base(params, base):
    off = ccf_arch.lm_logits(cfg, arch_lib.merge_params(params, new.frozen), batch, 'off')
    decoder = model_lib.bind(cfg.model, base)
    segs = batch['tokens'].reshape(B, T, L_SEG)
    return off.reshape(B, T, L_SEG, -1), jnp.stack([decoder(segs[:, t]) for t in range(T)], 1)

  off, ref = off_and_base(new.params, base)
  np.testing.assert_allclose(off, ref, rtol=1e-5, atol=1e-5)


def test_eval_step_uses_the_lm_objective_without_sampling():
  cfg = small_cfg(ae_mode='extra', ratios=(2, 4))
  arch = arch_lib.get_arch(cfg)
  params = init_params(cfg)
  batch = make_batch(cfg, 2)
  ratio = np.full((B,), 2, np.int32)  # l / num_memory.
  out, ref = jax.jit(lambda p: (ccf_arch.eval_loss(cfg, p, batch),
                                ccf_arch.lm_loss(cfg, p, dict(batch, ratio=ratio))),
                     compiler_options=FAST)(params)
  np.testing.assert_allclose(float(out[0]), float(ref[0]), rtol=1e-6)
  assert 'ae_ce' not in out[2]


def test_fresh_memory_vectors_start_as_the_chosen_token_embedding():
  cfg = small_cfg(memory_init_token=3, distinct_memory_tokens=True)
  params = init_params(cfg)
  np.testing.assert_array_equal(params['adapter']['memory'],
                                np.broadcast_to(params['decoder']['embed'][3], (4, 32)))


def test_auto_encoding_targets_follow_the_batch_ae_mask():
  # data.passkey_ae_key's wiring: a batch may name the segment to auto-encode and give the
  # auto-encoding loss its own targets; only those positions (not the LM's loss_mask) count.
  cfg = small_cfg(ae_mode='extra')
  params = init_params(cfg)
  batch = make_batch(cfg)
  batch['ae_segment'] = np.full((B,), 1, np.int32)
  ae_mask = np.zeros_like(batch['loss_mask'])
  ae_mask[:, L_SEG + 2:L_SEG + 5] = 1.0  # Tokens 2..4 of segment 1.
  loss = jax.jit(lambda p, b: ccf_arch.ccf_loss(cfg, p, b, jax.random.key(0)))
  *_, aux = loss(params, dict(batch, ae_mask=ae_mask))
  valid = int((batch['num_valid_segments'] > 1).sum())  # Window 1 has no segment 1.
  assert float(aux['ae_tokens']) == 3 * valid
  *_, aux_lm = loss(params, batch)  # Without ae_mask: the LM's loss mask on tokens 0..l-2 of
  # segment 1 (reconstruction is teacher-forced after the repeat vector, as the first l-1 tokens).
  lm_mask = batch['loss_mask'][batch['num_valid_segments'] > 1, L_SEG:2 * L_SEG - 1]
  assert float(aux_lm['ae_tokens']) == lm_mask.sum() == (L_SEG - 1) * valid - 1  # Window 0: one 0.
  assert float(aux['ae_ce']) != float(aux_lm['ae_ce'])


def test_a_ccf_export_continues_whole_under_another_window():
  """init.params_only of a CCF export (decoder + adapter): taken as it is at another T (passkey
  at 4k, then at 16k); a model whose memory shapes differ is refused with the fix."""
  cfg = small_cfg()
  arch = arch_lib.get_arch(cfg)
  trained = arch.from_base_params(cfg, init_params(cfg, 5, model_lib.Decoder))
  longer = small_cfg()
  longer.ccf.num_segments = 2 * cfg.ccf.num_segments
  got = arch.from_base_params(longer, trained)
  assert jax.tree.structure(got) == jax.tree.structure(trained)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(a, b)
  other = small_cfg(num_memory=cfg.ccf.num_memory // 2)
  with pytest.raises(config_lib.ConfigError, match='the CCF export does not match'):
    arch.from_base_params(other, trained)
