"""`python -m ccf_jax.plan --config=experiments/X.py [--topology=v5e:16x16]`: per-device memory and
FLOPs of the train step before booking hardware (the library is `ccf_jax/train/plan.py`)."""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from ccf_jax.core import config_lib
from ccf_jax.train import faults
from ccf_jax.train import plan as plan_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', None, 'CHIP:DIMS, e.g. v5e:16x16, v4:2x2x2, h100:8.')
_MEMORY = flags.DEFINE_float('device_memory_gb', None, 'Memory per device in GiB (default: the '
                             "topology's chip; 16 without --topology).")
_COMPILE = flags.DEFINE_enum('compile', 'auto', ('auto', 'yes', 'no'), 'Compile the train step '
                             '(auto: yes; TPU compiler when libtpu is installed).')
_JSON = flags.DEFINE_bool('json', False, 'Also print the result as one JSON line.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config=experiments/X.py is required.')
  cfg = _CONFIG.value
  with faults.one_line_errors('plan', (plan_lib.PlanError, config_lib.ConfigError),
                              prefix='plan: '):
    topology = plan_lib.parse_topology(_TOPOLOGY.value) if _TOPOLOGY.value else None
    n = plan_lib.mesh_device_count(cfg, topology)
    tpu = topology is not None and topology.chip.platform == 'tpu' and plan_lib.libtpu_available()
    # Before JAX's first operation: CPU devices for compiling (none needed for a TPU topology,
    # whose compile-only devices come from libtpu; no TPU needs to be attached). Only a GPU
    # topology with a CUDA plugin installed may find its target attached (mode 'native').
    native = topology is None or (topology.chip.platform == 'gpu' and plan_lib.cuda_plugin())
    plan_lib.use_virtual_cpu_devices(1 if tpu or _COMPILE.value == 'no' else n, cpu_only=not native)
    result = plan_lib.plan(cfg, topology, _MEMORY.value, _COMPILE.value)
    print(plan_lib.format_report(result), flush=True)
    if _JSON.value:
      print(json.dumps(result), flush=True)
    plan_lib.check_fit(result)
  print('plan: fits.', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
