"""`python -m ccf_jax.bench SUBCOMMAND --config=experiments/X.py [--config.a.b=V]`: benchmarks that
print JSON (one object per line). Numbers quoted in issues and notes come from here, never from
timings asserted in unit tests.

Subcommands (one module each; a subcommand's own flags are defined by its module):
  train       tokens/s, step time, model GFLOP/s and memory (XLA memory analysis + peak RSS) of the
              jitted train step of an experiment, on synthetic tokens (`train/timing.py`).
  data        the input pipeline's tokens/s next to the train step's (`bench/data.py`).
  memory      train-step memory and time against T for every gradient mode (`bench/memory.py`).
  signal      CCF against segment_local / full attention on real text, over seeds
              (`bench/signal.py`).
  passkey     passkey training of CCF and segment_local (`bench/signal.py`).
  decode      prefill and per-token decode time against context (`bench/decode.py`).
  prefill     plain-decoder prefill tokens/s against prompt length, of an export or a config
              (`bench/decode.py`).
  convert     the import's peak host memory against the model's size (`bench/convert.py`).
  efficiency  the efficiency evaluation's tables (`eval/efficiency.py`).
  peer        the train step against PyTorch + transformers on the same shapes (`bench/peer.py`).
  profile     the train step's time per operation, by kind and by model component, from a
              jax.profiler trace (`bench/profile.py`).
  attention   one layer's attention, forward and backward, per model.attention_impl, at bench
              peer's shapes, checked against the dense reference (`bench/attention.py`).
  device_check  one JSON report of an accelerator: attention errors, ~1B train steps with MFU,
              CCF against full attention, prefill and decode (`bench/device_check.py`;
              `launch/device_check.sh`).
"""

from __future__ import annotations

import importlib
import json
import sys

from absl import app, flags
from ml_collections import config_flags

from ccf_jax import checkpoint as ckpt_lib
from ccf_jax import data as data_lib
from ccf_jax.core import config_lib, sharding
from ccf_jax.train import faults

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/tiny.py', 'Experiment config.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps (after one compile/warm-up step).')

# name -> 'module:function'; each function takes (config) and returns a dict (or list of dicts).
SUBCOMMANDS = {
    'train': 'ccf_jax.bench.data:bench_train_step',
    'data': 'ccf_jax.bench.data:bench_data_vs_train',
    'memory': 'ccf_jax.bench.memory:bench_memory',
    'signal': 'ccf_jax.bench.signal:bench_signal',
    'passkey': 'ccf_jax.bench.signal:bench_passkey',
    'decode': 'ccf_jax.bench.decode:bench_decode',
    'prefill': 'ccf_jax.bench.decode:bench_prefill',
    'convert': 'ccf_jax.bench.convert:bench_convert',
    'efficiency': 'ccf_jax.eval.efficiency:bench_efficiency',
    'peer': 'ccf_jax.bench.peer:bench_peer',
    'profile': 'ccf_jax.bench.profile:bench_profile',
    'attention': 'ccf_jax.bench.attention:bench_attention',
    'device_check': 'ccf_jax.bench.device_check:device_check',
}


def main(argv):
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f'usage: python -m ccf_jax.bench {{{",".join(SUBCOMMANDS)}}} --config=...')
  mod, fn = SUBCOMMANDS[argv[1]].split(':')
  # A bad config, corpus or checkpoint: one line and an exit code (faults.py), no traceback.
  with faults.one_line_errors(f'bench {argv[1]}', (config_lib.ConfigError, sharding.MeshError,
                                                   data_lib.DataError, ckpt_lib.CheckpointError)):
    out = getattr(importlib.import_module(mod), fn)(_CONFIG.value)
  for rec in out if isinstance(out, list) else [out]:
    print(json.dumps(rec), flush=True)


def _import_subcommand_flags(argv):
  """Imports the chosen subcommand's module before flag parsing, so its own flags parse."""
  target = SUBCOMMANDS.get(argv[1]) if len(argv) > 1 else None
  if target:
    importlib.import_module(target.split(':')[0])


if __name__ == '__main__':
  _import_subcommand_flags(sys.argv)
  app.run(main, flags_parser=config_lib.parse_flags)
