"""`python -m ccf_jax.bench SUBCOMMAND --config=experiments/X.py [--config.a.b=V]`: benchmarks that
print JSON (one object per line). Numbers quoted in issues and notes come from here, never from
timings asserted in unit tests.

Subcommands:
  train   tokens/s, step time, model GFLOP/s and memory (XLA memory analysis + peak RSS) of the
          jitted train step of an experiment, on synthetic tokens of the configured shape.
  data    the input pipeline's tokens/s next to the train step's (the pipeline must not bottleneck).
Others (memory, signal, passkey, decode, efficiency) are registered by their modules as they land.
"""

from __future__ import annotations

import importlib
import json
import time

from absl import app, flags
from ml_collections import config_flags

from ccf_jax import config_lib

_FLAGS = {}  # Defined only when run as a script: library users (evaluation, tests) import this
# module next to other entry points that define --config too.


def _define_flags():
  _FLAGS['config'] = config_flags.DEFINE_config_file(
      'config', 'experiments/tiny.py', 'Experiment config.', lock_config=True)
  _FLAGS['steps'] = flags.DEFINE_integer('steps', 20, 'Timed steps (after one compile/warm-up step).')

# name -> 'module:function'; each function takes (config) and returns a dict (or list of dicts).
SUBCOMMANDS = {
    'train': 'bench_train',  # Defined below.
    'data': 'bench_data_vs_train',
    'memory': 'ccf_jax.ccf.bench_memory:bench_memory',
    'signal': 'ccf_jax.ccf.bench_signal:bench_signal',
    'passkey': 'ccf_jax.ccf.bench_signal:bench_passkey',
    'decode': 'ccf_jax.generate_bench:bench_decode',
    'efficiency': 'ccf_jax.eval_efficiency:bench_efficiency',
}


def compiled_memory(compiled) -> dict:
  """XLA's memory analysis of a compiled executable, in bytes."""
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  return {'temp_bytes': int(ma.temp_size_in_bytes), 'argument_bytes': int(ma.argument_size_in_bytes),
          'output_bytes': int(ma.output_size_in_bytes), 'alias_bytes': int(ma.alias_size_in_bytes)}


class TrainTimer:
  """The real jitted train step of `config`, compiled once on synthetic tokens shaped like its
  batches, with its own (donated) state, so that several configurations can be timed in
  alternating blocks (bench memory pairs them so that drift in the machine's load hits all alike)."""

  def __init__(self, config):
    import jax
    import numpy as np

    from ccf_jax import arch as arch_lib, config_lib, sharding, train_step as ts, trainer
    config_lib.validate(config, jax.device_count())
    self.config = config
    self._mesh = sharding.make_mesh(config.mesh)
    self.length = config_lib.window_len(config)
    rng = np.random.default_rng(0)
    b = config.data.batch_size
    batch = {'tokens': rng.integers(0, config.model.vocab_size, (b, self.length)).astype(np.int32),
             'loss_mask': np.ones((b, self.length), np.float32),
             'num_valid_segments': np.full((b,), config.ccf.num_segments, np.int32)}
    with sharding.use_mesh(self._mesh, config.mesh.rules):
      self._state, step, batch_sh = ts.fresh_state_and_step(config, self._mesh, batch)
      self._batch = trainer.to_device(batch, batch_sh)
      t = time.time()
      self._compiled = step.lower(self._state, self._batch).compile()
      self.compile_s = time.time() - t
    self.block(1)  # Warm-up.
    self.params = sum(int(x.size) for x in jax.tree.leaves(self._state.params))
    self.flops = arch_lib.get_arch(config).train_flops(config, b)

  def block(self, steps: int) -> float:
    """Mean seconds per step over `steps` consecutive steps."""
    import jax
    t = time.time()
    for _ in range(steps):
      self._state, m = self._compiled(self._state, self._batch)
    jax.block_until_ready(m)
    return (time.time() - t) / steps

  def record(self, step_s: float) -> dict:
    """bench train's JSON object for a measured step time."""
    import jax

    from ccf_jax import trainer
    c = self.config
    tokens = c.data.batch_size * self.length
    return {'bench': 'train', 'config': c.name, 'arch': c.model.arch, 'params': self.params,
            'devices': jax.device_count(), 'batch': c.data.batch_size, 'length': self.length,
            'step_s': round(step_s, 5), 'tokens_per_s': round(tokens / step_s, 1),
            'model_gflops_per_s': round(self.flops / step_s / 1e9, 2),
            'compile_s': round(self.compile_s, 2), **compiled_memory(self._compiled),
            'peak_rss_gb': round(trainer.peak_rss_gb(), 3)}


def bench_train(config, steps: int | None = None, repeats: int = 1) -> dict:
  """Times the real jitted train step on synthetic tokens shaped like the config's batches:
  `repeats` blocks of `steps` steps after a warm-up step; step_s is the fastest block's mean (as
  `timeit` takes the best repeat: other load on the machine only ever adds time)."""
  steps = steps or (_FLAGS['steps'].value if 'steps' in _FLAGS else 20)
  timer = TrainTimer(config)
  return timer.record(min(timer.block(steps) for _ in range(repeats)))


def bench_data_vs_train(config) -> list:
  from ccf_jax.bench_data import bench_data
  return [bench_data(config), bench_train(config)]


def main(argv):
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f'usage: python -m ccf_jax.bench {{{",".join(SUBCOMMANDS)}}} --config=...')
  target = SUBCOMMANDS[argv[1]]
  if ':' not in target:
    func = globals()[target]
  else:
    mod, fn = target.split(':')
    try:
      func = getattr(importlib.import_module(mod), fn)
    except ModuleNotFoundError as e:
      raise app.UsageError(f'bench {argv[1]} is not available yet ({e})') from None
  out = func(_FLAGS['config'].value)
  for rec in out if isinstance(out, list) else [out]:
    print(json.dumps(rec), flush=True)


def _import_subcommand_flags(argv):
  """Imports the chosen subcommand's module before flag parsing, so its own flags parse."""
  target = SUBCOMMANDS.get(argv[1]) if len(argv) > 1 else None
  if target and ':' in target:
    try:
      importlib.import_module(target.split(':')[0])
    except ModuleNotFoundError:
      pass  # main() reports it.


if __name__ == '__main__':
  import sys
  _define_flags()
  _import_subcommand_flags(sys.argv)
  app.run(main, flags_parser=config_lib.parse_flags)
