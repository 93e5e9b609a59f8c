"""Mixed precision: float32 master weights and AdamW moments with bfloat16 compute.

The policy is `model.param_dtype=float32` + `model.dtype=bfloat16` (experiments/base.py): the
optimizer updates float32 masters, matmuls run on bfloat16 casts of them, and logits and loss are
float32. Checked here on the real train step: the loss curve against a float32 run, the dtypes of
the state and of the lowered program's matmuls, the checkpoint and export (real Orbax), and the
config rule that bfloat16 masters are an explicit choice while a frozen bfloat16 base is not.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ccf_jax import checkpoint as ckpt_lib
from ccf_jax.checkpoint import export as export_lib
from ccf_jax.core import config_lib, sharding
from ccf_jax.model import decoder as model_lib
from ccf_jax.train import optim
from ccf_jax.train import step as ts
from experiments import base
from tests import ccf_testing

SEEDS, STEPS = (0, 1, 2), 40
GAP_BOUND = 1e-3  # On max |loss_bf16 - loss_f32| over the run (measured: test_bf16_compute_...).


def tiny_cfg(dtype: str):
  c = base.get_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 96, 64, 2, 4, 2
  m.head_dim, m.mlp_dim, m.attention_impl, m.dtype = 16, 128, 'xla', dtype
  c.data.seq_len, c.data.batch_size = 64, 8
  c.train.update(steps=STEPS, warmup_steps=5, lr=3e-3)
  c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
  return config_lib.validate(c)


def markov_batches(cfg, seed: int):
  """Batches of a sparse random bigram chain (three successors per token): a signal a tiny model
  learns within the run, so the curves compared below fall by well over a nat."""
  rng = np.random.default_rng(1000 + seed)
  v, b, n = cfg.model.vocab_size, cfg.data.batch_size, cfg.data.seq_len
  succ = rng.integers(0, v, (v, 3))
  out = []
  for _ in range(STEPS):
    tok = np.empty((b, n), np.int32)
    tok[:, 0] = rng.integers(0, v, b)
    for i in range(1, n):
      tok[:, i] = succ[tok[:, i - 1], rng.integers(0, 3, b)]
    out.append({'tokens': tok, 'loss_mask': np.ones((b, n), np.float32)})
  return out


class Run:
  """One compiled train step per compute dtype, reused for every seed."""

  def __init__(self, dtype: str):
    self.cfg = tiny_cfg(dtype)
    self.mesh = sharding.make_mesh(self.cfg.mesh)
    self.tx = optim.make_optimizer(self.cfg.train)
    self.init_params = jax.jit(lambda key: model_lib.init_params(self.cfg.model, key))
    batch = markov_batches(self.cfg, 0)[0]
    with sharding.use_mesh(self.mesh, self.cfg.mesh.rules):
      _, self.state_sh = ts.abstract_state_and_shardings(self.cfg, self.tx, self.mesh)
      self.batch_sh = ts.batch_shardings(self.cfg, self.mesh, batch)
      self.step = ts.jit_train_step(self.cfg, self.tx, self.mesh, self.state_sh, self.batch_sh)

  def put(self, batch):
    return {k: jax.device_put(v, self.batch_sh[k]) for k, v in batch.items()}

  def init(self, seed: int):
    """The seed's float32 init, as pretrained parameters: one program for every seed."""
    params = self.init_params(jax.random.key(seed))
    with sharding.use_mesh(self.mesh, self.cfg.mesh.rules):
      return ts.init_state(self.cfg, self.tx, self.state_sh, params=params)

  def train(self, seed: int, state):
    """(losses, final state, last metrics) of STEPS steps from `state` on the seed's batches."""
    with sharding.use_mesh(self.mesh, self.cfg.mesh.rules):
      losses = []
      for b in markov_batches(self.cfg, seed):
        state, metrics = self.step(state, self.put(b))
        losses.append(float(metrics['loss']))
    return np.array(losses), state, metrics

  def hlo(self, state):
    with sharding.use_mesh(self.mesh, self.cfg.mesh.rules):
      return self.step.lower(state, self.put(markov_batches(self.cfg, 0)[0])).as_text()


@pytest.fixture(scope='module')
def runs():
  """Per seed the two runs start from the same float32 init (the state shapes and dtypes do not
  depend on model.dtype), each from its own copy: the step donates its state."""
  f32, bf16 = Run('float32'), Run('bfloat16')
  out = {}
  for seed in SEEDS:
    state = f32.init(seed)
    copy = jax.tree.map(jnp.copy, state)
    out[seed] = (f32.train(seed, state), bf16.train(seed, copy))
  return out, bf16


def test_bf16_compute_tracks_the_float32_loss_curve(runs):
  """Measured (2-core CPU, XLA:CPU, jax 0.10.2), max over the 40 steps, seeds 0-5: 0.000223,
  0.000220, 0.000221, 0.000242, 0.000263, 0.000240 nats, while the loss falls from 4.58 to about
  2.15; the bound is about four times the largest. A gap of exactly 0 would mean no bf16 ran."""
  per_seed, _ = runs
  gaps = {}
  for seed, ((f32, _, _), (bf16, _, _)) in per_seed.items():
    gaps[seed] = float(np.max(np.abs(bf16 - f32)))
    assert f32[-1] < f32[0] - 1.0, f32  # The run learns: the comparison is not of flat curves.
  print(f'max |loss_bf16 - loss_f32| per seed: {gaps}')
  assert max(gaps.values()) < GAP_BOUND, gaps
  assert min(gaps.values()) > 0, 'bf16 compute gave float32 losses bit for bit: not in bf16'


def _float_dtypes(tree):
  return {np.dtype(x.dtype).name for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)}


def test_masters_and_moments_float32_matmuls_bf16_logits_and_loss_float32(runs):
  per_seed, bf16_run = runs
  (_, state, metrics) = per_seed[0][1]
  assert _float_dtypes(state.params) == {'float32'} and state.frozen == {}
  mu, nu = (optax.tree_utils.tree_get(state.opt_state, k) for k in ('mu', 'nu'))  # AdamW's.
  assert _float_dtypes(mu) == _float_dtypes(nu) == {'float32'}
  assert metrics['loss'].dtype == jnp.float32
  cfg = bf16_run.cfg
  tokens = jnp.zeros((2, 8), jnp.int32)
  logits = jax.eval_shape(lambda p: model_lib.bind(cfg.model, p)(tokens), state.params)
  assert logits.dtype == jnp.float32
  # The lowered step: the layers' matmuls (one scanned body: 7 projections, forward and two
  # backward each) and the LM head's three take bfloat16 operands; the head's forward and weight
  # gradient come out float32 (vocab 96 is no other dimension here); no matmul is float32 x float32.
  dots = re.findall(r'stablehlo\.dot_general[^\n]*: \((tensor<[^)]*)\) -> tensor<([0-9x]*)x(\w+)>',
                    bf16_run.hlo(state))
  bf16_dots = [d for d in dots if d[0].count('xbf16>') == 2]
  assert len(bf16_dots) >= 7 * 3 + 3, dots
  head = [d for d in bf16_dots if '96' in re.split(r'[x<>, ]+', f'{d[0]}x{d[1]}')]
  assert sorted(d[2] for d in head) == ['bf16', 'f32', 'f32'], head
  assert not [d for d in dots if d[0].count('xf32>') == 2], dots


def test_checkpoint_and_export_keep_float32_masters(runs, tmp_path):
  (_, state, _) = runs[0][0][1]
  cfg = runs[1].cfg
  workdir, out = tmp_path / 'run', tmp_path / 'export'
  mgr = ckpt_lib.CheckpointManager(str(workdir), cfg, async_save=False)
  assert mgr.maybe_save(STEPS, state, force=True)
  mgr.close()
  masters = jax.device_get(state.params)
  saved, _ = ckpt_lib.restore_params(mgr.step_dir(STEPS))
  export_lib.export(str(workdir), str(out), require_tokenizer=False)
  exported, config, _ = export_lib.load_export(str(out))
  assert config['model']['param_dtype'] == 'float32' and config['model']['dtype'] == 'bfloat16'
  for tree in (saved, exported):
    assert jax.tree.structure(tree) == jax.tree.structure(masters)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(masters)):
      assert a.dtype == np.float32 and np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_adapter_trains_float32_over_a_frozen_bf16_base():
  """CCF's adapter mode: the frozen base may be stored bfloat16 (half its memory); the adapter's
  parameters and their moments are float32. No compile: the abstract train state."""
  cfg = ccf_testing.small_cfg(2, mode='adapter')
  cfg.model.param_dtype = cfg.model.dtype = 'bfloat16'
  config_lib.validate(cfg, 1)
  abstract = jax.eval_shape(ts.init_state_fn(cfg, optim.make_optimizer(cfg.train)))
  assert set(abstract.params) == {'adapter'}
  assert _float_dtypes(abstract.params) == _float_dtypes(abstract.opt_state) == {'float32'}
  assert _float_dtypes(abstract.frozen) == {'bfloat16'}


@pytest.mark.parametrize('arch,mode', [('decoder', None), ('ccf', 'pretrain')])
def test_bf16_masters_are_an_explicit_choice(arch, mode):
  cfg = ccf_testing.small_cfg(2, mode=mode) if arch == 'ccf' else tiny_cfg('bfloat16')
  cfg.model.param_dtype = 'bfloat16'
  with pytest.raises(config_lib.ConfigError,
                     match=r'param_dtype=bfloat16 trains bfloat16 master weights.*Fix: '
                           r'--config.model.param_dtype=float32 --config.model.dtype=bfloat16'):
    config_lib.validate(cfg, 1)
  config_lib.validate(cfg, 1, training=False)  # A stored model's config (a bf16 export).
  cfg.train.bf16_master_weights = True
  config_lib.validate(cfg, 1)
  abstract = jax.eval_shape(ts.init_state_fn(cfg, optim.make_optimizer(cfg.train)))
  base_params = abstract.params.get('decoder', abstract.params)  # CCF: beside its f32 adapter.
  assert _float_dtypes(base_params) == {'bfloat16'}
  assert _float_dtypes(optax.tree_utils.tree_get(abstract.opt_state, 'mu')) >= {'bfloat16'}
