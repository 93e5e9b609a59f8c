"""Memory planning before booking hardware: will this config fit, and what does a step cost?

    python -m ccf_jax.plan --config=experiments/X.py [--config.mesh.fsdp=256 ...]
        [--topology=v5e:16x16 | v4:2x2x2 | h100:8 | cpu:8] [--device_memory_gb=16]
        [--compile=auto|yes|no] [--json]

For every device it reports
  * params, frozen params, optimizer state and gradients: analytic, the sum of each array's shard
    under the shardings the trainer will use (train_step.abstract_state_and_shardings), so they
    are exact for any device;
  * the compiled train step's memory (XLA's memory_analysis: arguments, outputs, aliasing from
    the donated state, temporaries = activations and everything else the step allocates);
  * analytic FLOPs per step (`arch.train_flops`) and the step time they imply at the chip's peak.
and exits non-zero with a message naming the biggest consumer and the fix when the step does not
fit `--device_memory_gb` (default: the topology's memory per chip).

Whose compiler: with libtpu installed (`pip install -e .[tpu]`) and a TPU topology, the step is
compiled against `jax.experimental.topologies.get_topology_desc`, i.e. by the TPU compiler for
that slice, with no TPU attached: the figures are the real ones. Otherwise (GPU topologies, or no
libtpu) the step is compiled by XLA:CPU on as many virtual host devices as the mesh has, and its
temporaries are labelled as the CPU compiler's estimate: fusion, layouts, rematerialisation and
bfloat16 handling differ from the target's, so treat them as indicative; the analytic rows are
exact either way. `--compile=no` skips compiling (analytic rows only, clearly labelled; the fit
check is then a lower bound).

The step is traced for the platform it is compiled for (`attention.target_platform`), not for
this host: with the TPU compiler `model.attention_impl=auto` plans splash attention and splash
lowers its Mosaic kernels, as on the slice; under XLA:CPU it plans the CPU's choice. The report
names the kernels traced and the precision of parameters, optimizer state and compute.

Why the entry point sets the device count itself: a mesh of 256 devices can only be compiled on
the CPU by a process that has that many virtual host devices, a setting that only takes effect
before JAX's first operation. `main` learns the count from the topology and the mesh config, then
sets `jax_num_cpu_devices` (the config form of XLA_FLAGS=--xla_force_host_platform_device_count)
before anything runs. Called as a library (`plan(config, ...)`) in a process whose backend is
already up, a mesh larger than its devices falls back to the analytic rows, labelled so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
import numpy as np

# Importing jax and ccf_jax starts no backend (see use_virtual_cpu_devices).
from ccf_jax import registry as arch_lib
from ccf_jax.core import config_lib
from ccf_jax.model import attention
from ccf_jax.train import optim
from ccf_jax.core import sharding
from ccf_jax.train import step as ts

GiB = 2**30


class PlanError(ValueError):
  """The config cannot be planned or does not fit; the message names the cause and the fix."""


@dataclasses.dataclass(frozen=True)
class Chip:
  platform: str  # 'tpu' | 'gpu' | 'cpu'
  memory_gb: float  # Per device (HBM), in GiB.
  peak_tflops: float  # Dense bfloat16 peak per device.


# Public per-chip figures (memory in GiB, dense bf16 TFLOP/s).
CHIPS = {
    'v2': Chip('tpu', 8, 45), 'v3': Chip('tpu', 16, 123), 'v4': Chip('tpu', 32, 275),
    'v5e': Chip('tpu', 16, 197), 'v5p': Chip('tpu', 95, 459), 'v6e': Chip('tpu', 32, 918),
    'a100': Chip('gpu', 80, 312), 'h100': Chip('gpu', 80, 989), 'h200': Chip('gpu', 141, 989),
    'cpu': Chip('cpu', 16, 0.1),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # As given, e.g. 'v5e:16x16'.
  chip_name: str
  chip: Chip
  dims: tuple
  num_devices: int


def parse_topology(spec: str) -> Topology:
  """'v5e:16x16', 'v4:2x2x2', 'h100:8', 'cpu:8' -> Topology (no jax needed)."""
  m = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)*)', spec.strip().lower())
  if not m or m.group(1) not in CHIPS:
    raise PlanError(f'--topology={spec!r} is not CHIP:DIMS with CHIP in {sorted(CHIPS)} (e.g. '
                    'v5e:16x16 for a v5e-256 slice, v4:2x2x2, h100:8).')
  dims = tuple(int(x) for x in m.group(2).split('x'))
  return Topology(spec, m.group(1), CHIPS[m.group(1)], dims, math.prod(dims))


def mesh_device_count(cfg, topology: Topology | None) -> int:
  """Devices the mesh uses: the topology's, else mesh.num_devices, else the product of the fixed
  mesh axes (a -1 axis then has size 1), without starting JAX."""
  if topology is not None:
    return topology.num_devices
  sizes = [int(cfg.mesh.data), int(cfg.mesh.fsdp), int(cfg.mesh.tensor)]
  if int(cfg.mesh.num_devices) > 0:
    return int(cfg.mesh.num_devices)
  return math.prod(s for s in sizes if s != -1)  # A -1 axis takes no devices of its own: 1.


def libtpu_available() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def cuda_plugin() -> bool:
  return any(importlib.util.find_spec(m) for m in ('jax_cuda12_plugin', 'jax_cuda13_plugin'))


# ------------------------------------------------------------------------------------------ plan
def _per_device_bytes(tree, shardings) -> int:
  """Sum over leaves of the largest shard a device holds (uneven splits round up)."""
  total = 0
  for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    spec = tuple(sh.spec) + (None,) * (len(leaf.shape) - len(sh.spec))
    shard = [-(-d // sharding.mesh_axis_size(sh.mesh, e)) for d, e in zip(leaf.shape, spec)]
    total += math.prod(shard) * leaf.dtype.itemsize
  return int(total)


def _abstract_batch(cfg):
  b, length = cfg.data.batch_size, config_lib.window_len(cfg)
  return {'tokens': jax.ShapeDtypeStruct((b, length), jnp.int32),
          'loss_mask': jax.ShapeDtypeStruct((b, length), jnp.float32),
          'num_valid_segments': jax.ShapeDtypeStruct((b,), jnp.int32)}


def _make_mesh(cfg, n: int, topology: Topology | None, mode: str):
  """The mesh for mode 'tpu' (libtpu's compile-only devices of the topology), 'native' (attached
  devices), 'cpu' (host devices) or 'none' (an AbstractMesh: shardings only)."""
  shape = sharding.resolve_mesh_shape(cfg.mesh, n)
  auto = (AxisType.Auto,) * 3
  if mode == 'tpu':
    from jax.experimental import mesh_utils, topologies
    try:
      topo = topologies.get_topology_desc(platform='tpu', topology_name=topology.name)
    except Exception as e:  # pylint: disable=broad-except
      raise PlanError(f'libtpu could not describe topology {topology.name!r} ({e}). Fix: check '
                      'the chip and dims (e.g. v5e:16x16), or pass --compile=no.') from e
    try:  # Physical (torus-aware) order; memory per device does not depend on it.
      devices = mesh_utils.create_device_mesh(shape, list(topo.devices),
                                              allow_split_physical_axes=True)
    except (NotImplementedError, ValueError):
      devices = np.asarray(topo.devices, dtype=object).reshape(shape)
    return jax.sharding.Mesh(devices, sharding.MESH_AXES, axis_types=auto)
  if mode in ('cpu', 'native'):
    devices = jax.devices('cpu' if mode == 'cpu' else None)[:n]
    return jax.make_mesh(shape, sharding.MESH_AXES, axis_types=auto, devices=devices)
  return jax.sharding.AbstractMesh(shape, sharding.MESH_AXES, axis_types=auto)


def plan(cfg, topology: Topology | None = None, device_memory_gb: float | None = None,
         compile: str = 'auto') -> dict:  # pylint: disable=redefined-builtin
  """Per-device memory and FLOPs of one train step of `cfg` (see the module doc). Never raises
  for not fitting: `check_fit(result)` does."""
  n = mesh_device_count(cfg, topology)
  try:
    config_lib.validate(cfg, n)
  except config_lib.ConfigError as e:
    raise PlanError(f'config {cfg.name!r} on {n} devices: {e}') from e
  platform = topology.chip.platform if topology else jax.devices()[0].platform
  if compile not in ('auto', 'yes', 'no'):
    raise PlanError(f'--compile={compile!r}; choose auto, yes or no.')
  mode, why = 'none', 'not compiled (--compile=no): analytic rows only'
  attached = jax.devices()
  if compile != 'no':
    if platform == 'tpu' and libtpu_available() and topology is not None:
      mode = 'tpu'
    elif attached[0].platform == platform != 'cpu' and len(attached) >= n:
      mode = 'native'  # The target is attached: its own compiler.
    elif len(jax.devices('cpu')) >= n:
      mode = 'cpu'
    else:
      why = (f'not compiled: this process has {len(jax.devices("cpu"))} CPU devices and the mesh '
             f'needs {n}. Fix: run `python -m ccf_jax.plan` as its own process (it creates that '
             'many virtual CPU devices)')
      if compile == 'yes':
        raise PlanError(why + '.')
  mesh = _make_mesh(cfg, n, topology, mode)
  arch = arch_lib.get_arch(cfg)
  tx = optim.make_optimizer(cfg.train)
  with sharding.use_mesh(mesh, cfg.mesh.rules) if mode != 'none' else contextlib.nullcontext():
    abstract, shardings = ts.abstract_state_and_shardings(cfg, tx, mesh)
    rows = {'trainable_params': _per_device_bytes(abstract.params, shardings.params),
            'frozen_params': _per_device_bytes(abstract.frozen, shardings.frozen),
            'optimizer_state': _per_device_bytes(abstract.opt_state, shardings.opt_state),
            'gradients': _per_device_bytes(abstract.params, shardings.params)}
    batch = _abstract_batch(cfg)
    batch_sh = ts.batch_shardings(cfg, mesh, batch)
    rows['batch'] = _per_device_bytes(batch, batch_sh)
    compiled, oom, kernels = None, None, {}
    if mode != 'none':
      batch = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           batch, batch_sh)
      step = ts.jit_train_step(cfg, tx, mesh, shardings, batch_sh)
      before = dict(attention.CALLS)
      # Attention (`auto`, and splash's Mosaic kernel rather than its interpreter) is traced for
      # the platform the step is compiled for, which for a TPU slice is not this host's.
      with attention.target_platform(platform if mode in ('tpu', 'native') else 'cpu'):
        lowered = step.lower(abstract, batch)
      kernels = {k: v - before.get(k, 0) for k, v in attention.CALLS.items()
                 if v > before.get(k, 0)}
      try:
        compiled = lowered.compile()
      except Exception as e:  # pylint: disable=broad-except
        if 'RESOURCE_EXHAUSTED' not in str(e):
          raise
        oom = str(e).strip().splitlines()[0][:500]  # The TPU compiler refuses what cannot fit.
  n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract.params))
  n_frozen = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract.frozen))
  flops = arch.train_flops(cfg, cfg.data.batch_size)
  chip = topology.chip if topology else CHIPS['cpu']
  result = {
      'config': cfg.name, 'arch': cfg.model.arch, 'devices': n,
      'mesh': dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(cfg.mesh, n))),
      'topology': topology.name if topology else f'{platform}:{n}',
      'device_memory_gb': float(device_memory_gb or chip.memory_gb),
      'trainable_params': int(n_params), 'frozen_params': int(n_frozen),
      'tokens_per_step': config_lib.tokens_per_step(cfg), 'analytic_bytes': rows,
      'analytic_total_bytes': int(sum(rows.values())),
      'flops_per_step': float(flops), 'flops_per_device': float(flops) / n,
      'step_s_at_peak': float(flops) / n / (chip.peak_tflops * 1e12),
      'compiler': {'tpu': f'TPU compiler (libtpu) for {topology.name if topology else "?"}',
                   'native': f'{platform.upper()} compiler on {n} attached devices',
                   'cpu': (f'XLA:CPU on {n} host devices' if platform == 'cpu' else
                           f'XLA:CPU estimate on {n} virtual host devices (not the '
                           f'{platform.upper()} compiler: indicative only)'),
                   'none': why}[mode]}
  result['fixes'] = _fixes(cfg, n)
  result['attention'] = {'configured': cfg.model.attention_impl, 'traced': kernels}
  float_dtypes = lambda tree: sorted({a.dtype.name for a in jax.tree.leaves(tree)
                                      if jnp.issubdtype(a.dtype, jnp.floating)})
  result['precision'] = {'compute': cfg.model.dtype, 'trainable': float_dtypes(abstract.params),
                         'optimizer_state': float_dtypes(abstract.opt_state),
                         'frozen': float_dtypes(abstract.frozen)}
  if oom is not None:
    result['compile_oom'] = oom
  if compiled is not None:
    ma = compiled.memory_analysis()
    mem = {k: int(getattr(ma, f'{k}_size_in_bytes', 0) or 0) for k in
           ('argument', 'output', 'alias', 'temp', 'generated_code')}
    mem['peak'] = (mem['argument'] + mem['output'] - mem['alias'] + mem['temp']
                   + mem['generated_code'])
    result['compiled_bytes'] = mem
  return result


def _fixes(cfg, n: int) -> list:
  """The changes that can reduce per-device memory for this config, most effective first."""
  out = []
  sizes = dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(cfg.mesh, n)))
  if cfg.model.remat_policy != 'full':
    out.append('recompute activations in the backward pass (--config.model.remat_policy=full)')
  micro = cfg.data.batch_size // cfg.train.grad_accum
  carry = sizes['data'] * (sizes['fsdp'] if 'fsdp' in str(dict(cfg.mesh.rules).get('batch')) else 1)
  if micro % (2 * carry) == 0:
    out.append(f'split the batch into more micro-batches (--config.train.grad_accum='
               f'{2 * cfg.train.grad_accum})')
  else:
    out.append(f'shorter examples: each device already holds one micro-batch row (data.batch_size='
               f'{cfg.data.batch_size} over {carry} devices); reduce the tokens per example ('
               + ('ccf.num_segments or ccf.segment_len' if cfg.model.arch != 'decoder'
                  else 'data.seq_len') + ')')
  if sizes['data'] > 1:
    out.append(f'move devices from data to fsdp (--config.mesh.data={sizes["data"] // 2} '
               f'--config.mesh.fsdp={sizes["fsdp"] * 2}) to shard parameters and optimizer state '
               'further')
  if cfg.model.param_dtype == 'float32' and not config_lib.base_trains(cfg):
    out.append('store the frozen base in bfloat16 (--config.model.param_dtype=bfloat16)')
  elif cfg.model.param_dtype == 'float32':
    out.append('bfloat16 master weights and AdamW moments (--config.model.param_dtype=bfloat16 '
               '--config.train.bf16_master_weights=True; updates below 2^-8 of a weight are lost)')
  out.append('chips with more memory (--topology)')
  return out


def check_fit(result: dict):
  """Raises PlanError when the step needs more than device_memory_gb on a device."""
  limit = result['device_memory_gb'] * GiB
  fix = '; or '.join(result.get('fixes') or ['chips with more memory (--topology)'])
  if 'compile_oom' in result:
    raise PlanError(f'config {result["config"]!r} does not fit {result["topology"]}: the TPU '
                    f'compiler refused it: {result["compile_oom"]} Fix: {fix}.')
  compiled = result.get('compiled_bytes')
  need = compiled['peak'] if compiled else result['analytic_total_bytes']
  if need <= limit:
    return
  rows = dict(result['analytic_bytes'])
  if compiled:
    rows['activations and other temporaries'] = compiled['temp']
  top = max(rows, key=rows.get)
  bound = '' if compiled else ' (a lower bound: activations were not compiled)'
  raise PlanError(
      f'config {result["config"]!r} does not fit {result["topology"]}: it needs '
      f'{need / GiB:.2f} GiB per device{bound} but a device has {result["device_memory_gb"]:g} '
      f'GiB; the largest part is {top} ({rows[top] / GiB:.2f} GiB). Fix: {fix}.')


def format_report(r: dict) -> str:
  gb = lambda b: f'{b / GiB:10.3f} GiB' if b >= GiB / 10 else f'{b / 2**20:10.3f} MiB'
  lines = [f'plan for {r["config"]} ({r["arch"]}) on {r["topology"]}: {r["devices"]} devices, '
           f'mesh {r["mesh"]}',
           f'  parameters: {r["trainable_params"]:,} trainable + {r["frozen_params"]:,} frozen; '
           f'{r["tokens_per_step"]:,} tokens per step',
           '  per device, analytic (shard sizes under the trainer\'s shardings; exact):']
  for k, v in r['analytic_bytes'].items():
    lines.append(f'    {k:<34}{gb(v)}')
  lines.append(f'    {"total (no activations)":<34}{gb(r["analytic_total_bytes"])}')
  p = r['precision']
  lines.append(f'  precision: compute {p["compute"]}; trainable {"/".join(p["trainable"]) or "-"} '
               f'(optimizer state {"/".join(p["optimizer_state"]) or "-"}); frozen '
               f'{"/".join(p["frozen"]) or "-"}')
  lines.append(f'  per device, compiled: {r["compiler"]}')
  if r['attention']['traced']:
    traced = ', '.join(f'{k} x{v}' for k, v in sorted(r['attention']['traced'].items()))
    lines.append(f'    attention traced: {traced} (model.attention_impl='
                 f'{r["attention"]["configured"]})')
  if 'compile_oom' in r:
    lines.append(f'    out of memory: {r["compile_oom"]}')
  if 'compiled_bytes' in r:
    c = r['compiled_bytes']
    for k, label in (('argument', 'arguments (state + batch)'), ('output', 'outputs'),
                     ('alias', 'aliased (donated state)'), ('temp', 'temporaries (activations...)'),
                     ('generated_code', 'generated code'),
                     ('peak', 'peak = arg + out - alias + temp')):
      lines.append(f'    {label:<34}{gb(c[k])}')
  lines.append(f'  device memory: {r["device_memory_gb"]:g} GiB')
  lines.append(f'  analytic FLOPs per step: {r["flops_per_step"]:.4g} ({r["flops_per_device"]:.4g} '
               f'per device; {r["step_s_at_peak"]:.3g} s per step at 100% of peak)')
  return '\n'.join(lines)


def use_virtual_cpu_devices(n: int, cpu_only: bool) -> bool:
  """Gives this process's CPU backend `n` devices (and, with `cpu_only`, no other backend);
  False if JAX already started its backends.

  `jax_num_cpu_devices` (like XLA_FLAGS=--xla_force_host_platform_device_count) only takes effect
  before the first JAX operation; importing jax and ccf_jax performs none.
  """
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    return False
  if cpu_only:  # No attached accelerator will be used (TPU topologies come from libtpu).
    jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', n)
  return True
