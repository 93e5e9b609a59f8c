"""Memory planning: analytic shard sizes against hand counts, the compiled step, fit / no fit."""

import importlib.util
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ccf_jax.model import decoder as model_lib
from ccf_jax.train import plan as plan_lib
from experiments import base, tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}


def small_cfg(**mesh):
  cfg = tiny.get_config()
  cfg.model.vocab_size, cfg.model.d_model, cfg.model.mlp_dim = 256, 64, 128
  cfg.model.num_layers, cfg.model.head_dim = 2, 16
  cfg.data.seq_len, cfg.data.batch_size = 64, 8
  for axis, default in (('data', 1), ('fsdp', 8), ('tensor', 1)):
    cfg.mesh[axis] = mesh.get(axis, default)
  return cfg


def param_bytes(cfg):
  return sum(math.prod(a.shape) * a.dtype.itemsize
             for a in jax.tree.leaves(model_lib.abstract_params(cfg.model)))


@pytest.fixture(scope='module')
def tiny_plan():
  return plan_lib.plan(small_cfg(fsdp=8))


def test_tiny_plan_fits_and_adds_up(tiny_plan):
  cfg, r = small_cfg(fsdp=8), tiny_plan
  rows, total = r['analytic_bytes'], param_bytes(cfg)
  # Every parameter has an `embed` axis, sharded over fsdp=8 (d=64 divides): exactly 1/8 each.
  assert rows['trainable_params'] == rows['gradients'] == total // 8
  assert rows['frozen_params'] == 0
  assert 2 * total // 8 <= rows['optimizer_state'] <= 2 * total // 8 + 64  # Adam mu, nu + counts.
  assert rows['batch'] == (8 // 8) * 64 * (4 + 4) + 4  # tokens + loss_mask rows, num_valid.
  c = r['compiled_bytes']
  assert r['compiler'] == 'XLA:CPU on 8 host devices'
  # The compiled step's arguments are the same state and batch, plus step/rng scalars.
  state = rows['trainable_params'] + rows['optimizer_state'] + rows['batch']
  assert state <= c['argument'] <= state + 256
  assert c['temp'] > 0
  assert c['peak'] == c['argument'] + c['output'] - c['alias'] + c['temp'] + c['generated_code']
  n = 8 * 64  # Tokens per step; matmul FLOPs per token below (2 per multiply-add).
  dense = 2 * n * 2 * (64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128)
  attn, head = 4 * n * 64 * 2 * 4 * 16, 2 * n * 64 * 256
  assert r['flops_per_step'] == pytest.approx(3 * (dense + attn + head))
  plan_lib.check_fit(r)
  report = plan_lib.format_report(r)
  assert 'per device, analytic' in report and 'temporaries' in report
  # The kernel the compiled step traced (auto on CPU: rows for the causal mask), and the policy.
  # Counted per traced attention: tiny.py unrolls its layers, so each of the 2 is traced (twice).
  assert r['attention'] == {'configured': 'auto', 'traced': {'rows': 4}}
  assert r['precision'] == {'compute': 'float32', 'trainable': ['float32'],
                            'optimizer_state': ['float32'], 'frozen': []}
  assert 'attention traced: rows x4' in report and 'precision: compute float32' in report


def test_attention_is_traced_for_the_target_platform():
  """A TPU slice's step is compiled on this CPU host: `auto` must resolve to splash and splash
  must lower its Mosaic kernels (not the interpreter), per device under shard_map (a Mosaic
  call cannot be partitioned by XLA). Lowered for TPU here, no libtpu or TPU needed."""
  from jax.sharding import AxisType
  import jax.numpy as jnp
  from ccf_jax.core import sharding
  from ccf_jax.model import attention, spans
  q, k = jnp.zeros((8, 128, 4, 16), jnp.bfloat16), jnp.zeros((8, 256, 2, 16), jnp.bfloat16)
  mask = spans.prefix_causal(jnp.ones((8, 128), bool), 128)
  assert attention.resolve('auto', q, k) == attention.cpu_choice(q, k)
  with attention.target_platform('tpu'):
    assert attention.resolve('auto', q, k) == 'splash'
  loss = lambda q, k, v: attention.attend(q, k, v, mask, 'auto', 128).astype(jnp.float32).sum()
  mesh = jax.make_mesh((8, 1, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  before = attention.CALLS['splash']
  with sharding.use_mesh(mesh, base.get_config().mesh.rules), attention.target_platform('tpu'):
    text = jax.jit(jax.grad(loss)).trace(q, k, k).lower(lowering_platforms=('tpu',)).as_text()
  assert attention.CALLS['splash'] == before + 1
  assert text.count('tpu_custom_call') == 3  # Forward, dq and dkv kernels.
  assert 'sdy.manual_computation' in text or 'shard_map' in text


def test_tensor_axis_shards_heads():
  """tensor=2 splits heads, mlp and vocab; fsdp=4 splits embed: 1/8 of each again."""
  cfg = small_cfg(fsdp=4, tensor=2)
  r = plan_lib.plan(cfg, compile='no')
  total = param_bytes(cfg)
  norms = 4 * 64 * (2 * 2 + 1)  # Norm scales have only `embed`: split 4 ways, not 8.
  assert r['analytic_bytes']['trainable_params'] == (total - norms) // 8 + norms // 4


def test_does_not_fit_names_the_cause_and_fix(tiny_plan):
  assert plan_lib.plan(small_cfg(fsdp=8), device_memory_gb=1e-4, compile='no')[
      'device_memory_gb'] == 1e-4
  r = dict(tiny_plan, device_memory_gb=1e-4)  # The same compiled step on a 100 KiB device.
  with pytest.raises(plan_lib.PlanError) as e:
    plan_lib.check_fit(r)
  msg = str(e.value)
  assert "config 'tiny' does not fit" in msg and 'the largest part is activations' in msg
  assert 'Fix: recompute activations' in msg and 'remat_policy=full' in msg
  r = plan_lib.plan(small_cfg(fsdp=8), device_memory_gb=1e-4, compile='no')
  with pytest.raises(plan_lib.PlanError, match='a lower bound: activations were not compiled'):
    plan_lib.check_fit(r)


def test_mesh_larger_than_process_falls_back_to_analytic():
  cfg = small_cfg(fsdp=16)
  cfg.data.batch_size = 16
  r = plan_lib.plan(cfg)
  assert 'compiled_bytes' not in r
  assert 'this process has 8 CPU devices and the mesh needs 16' in r['compiler']
  with pytest.raises(plan_lib.PlanError, match='needs 16'):
    plan_lib.plan(cfg, compile='yes')
  with pytest.raises(plan_lib.PlanError, match='not divisible by the 3 devices'):
    plan_lib.plan(small_cfg(fsdp=3))


def test_topologies():
  t = plan_lib.parse_topology('v5e:16x16')
  assert (t.num_devices, t.chip.memory_gb, t.chip.platform) == (256, 16, 'tpu')
  assert plan_lib.parse_topology('h100:8').num_devices == 8
  with pytest.raises(plan_lib.PlanError, match='CHIP:DIMS'):
    plan_lib.parse_topology('v5e-256')


def llama2_7b():
  """Llama-2-7B shapes as a plain decoder (the 7B CCF configs reuse them)."""
  cfg = base.get_config()
  m = cfg.model
  m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 32000, 4096, 32, 32, 32
  m.head_dim, m.mlp_dim, m.remat_policy = 128, 11008, 'full'
  m.dtype = 'bfloat16'  # With float32 masters (model.param_dtype): the mixed-precision policy.
  cfg.data.seq_len, cfg.data.batch_size = 4096, 256
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 256, 1
  return cfg


def test_llama2_7b_analytic_on_v5e_256():
  r = plan_lib.plan(llama2_7b(), plan_lib.parse_topology('v5e:16x16'), compile='no')
  assert r['trainable_params'] == 6_738_415_616  # Llama-2-7B's published count.
  rows = r['analytic_bytes']
  assert rows['trainable_params'] == pytest.approx(6_738_415_616 * 4 / 256, rel=1e-3)
  assert rows['optimizer_state'] == pytest.approx(2 * rows['trainable_params'], rel=1e-3)
  assert r['precision']['trainable'] == r['precision']['optimizer_state'] == ['float32']
  assert 'compiled_bytes' not in r and r['compiler'].startswith('not compiled')
  plan_lib.check_fit(r)  # 0.4 GiB of state per chip: a lower bound that fits.


@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, 'experiments', 'ccf_llama2_7b_8x.py')),
                    reason='the 7B CCF config is not in this tree')
def test_ccf_7b_config_analytic():
  from experiments import ccf_llama2_7b_8x
  cfg = ccf_llama2_7b_8x.get_config()
  r = plan_lib.plan(cfg, plan_lib.parse_topology('v5e:16x16'), compile='no')
  assert r['frozen_params'] == 6_738_415_616 and r['mesh'] == {'data': 8, 'fsdp': 32, 'tensor': 1}
  assert r['analytic_bytes']['frozen_params'] == pytest.approx(6_738_415_616 * 2 / 32, rel=1e-3)


@pytest.mark.slow
def test_cli_virtual_devices_and_failure():
  cmd = [sys.executable, '-m', 'ccf_jax.plan', '--config=experiments/tiny.py']
  run = lambda *a: subprocess.run(cmd + list(a), cwd=REPO, env=ENV, capture_output=True, text=True,
                                  timeout=600)
  # 16 devices: more than the 8 the test process has; the entry point creates them.
  proc = run('--config.mesh.fsdp=16', '--config.data.batch_size=16')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'XLA:CPU on 16 host devices' in proc.stdout and 'plan: fits.' in proc.stdout
  proc = run('--topology=v5e:2x2', '--device_memory_gb=0.001', '--config.mesh.fsdp=4',
             '--config.data.batch_size=4', '--json')
  assert proc.returncode == 1 and "plan: config 'tiny' does not fit v5e:2x2" in proc.stderr
  assert 'Traceback' not in proc.stderr
  label = ('TPU compiler' if importlib.util.find_spec('libtpu') else
           'XLA:CPU estimate on 4 virtual host devices (not the TPU compiler')
  assert label in proc.stdout


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='libtpu is not installed (optional `tpu` extra): TPU topologies are '
                    'planned with the CPU compiler instead, covered above')
def test_tpu_topology_compiles_with_libtpu():
  cfg = small_cfg(fsdp=4)
  cfg.data.batch_size = 4
  r = plan_lib.plan(cfg, plan_lib.parse_topology('v5e:2x2'))
  assert r['compiler'].startswith('TPU compiler') and r['compiled_bytes']['peak'] > 0
  np.testing.assert_array_less(r['compiled_bytes']['peak'], 16 * 2**30)
