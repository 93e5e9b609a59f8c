"""Entry point: `python -m ccf_jax.train --config=experiments/X.py --workdir=DIR [--config.a.b=V]`.

Thin by design: flags -> `trainer.train_and_evaluate`. Multi-host launchers pass
`--config.mesh.distributed=True`, which calls `jax.distributed.initialize()`. JAX auto-detects the
cluster (TPU metadata, SLURM, Open MPI, k8s) and reads JAX_COORDINATOR_ADDRESS; JAX 0.10 does not
read a process count or id from the environment, so JAX_NUM_PROCESSES / JAX_PROCESS_ID (set by
launch/local_multiprocess.sh) are passed explicitly here.

In a distributed run a failing process exits at once (os._exit) instead of waiting up to 300 s in
JAX's shutdown barrier, so the launcher sees the failure and stops the others.

Exit codes (`train/faults.py`): 0 finished, 1 input error, 3 diverged, 73 workdir locked by another
run, 74 storage fault, 75 stopped by SIGTERM after a checkpoint (resumable: rerun the command).
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ccf_jax.core import config_lib
from ccf_jax.train import faults

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (experiments/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_ALLOW_FRESH_START = flags.DEFINE_bool(
    'allow_fresh_start', False, 'When every checkpoint in --workdir is corrupt, train from step 0 '
    'anyway (otherwise an error names them).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  import jax
  config = _CONFIG.value
  if config.mesh.distributed:
    kw = {k: int(os.environ[e]) for k, e in (('num_processes', 'JAX_NUM_PROCESSES'),
                                              ('process_id', 'JAX_PROCESS_ID')) if e in os.environ}
    jax.distributed.initialize(**kw)
  from ccf_jax.train import trainer
  logging.info('process %d/%d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    with faults.one_line_errors('train', trainer.USER_ERRORS, hard=config.mesh.distributed):
      summary = trainer.train_and_evaluate(config, _WORKDIR.value, _ALLOW_FRESH_START.value)
  except SystemExit:
    raise
  except BaseException:
    if config.mesh.distributed:
      logging.exception('process %d failed', jax.process_index())
      sys.stderr.flush()
      os._exit(1)
    raise
  if jax.process_index() == 0:
    os.makedirs(_WORKDIR.value, exist_ok=True)
    with open(os.path.join(_WORKDIR.value, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2, default=str)
    print('summary:', json.dumps(summary, default=str), flush=True)
  if summary.get('preempted'):
    sys.exit(faults.EXIT_PREEMPTED)


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
