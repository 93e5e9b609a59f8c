"""Timing the real jitted train step: what `bench train`, `bench memory` and the efficiency
evaluation measure.

`TrainTimer` compiles the train step of a config once, on synthetic tokens shaped like its
batches, with its own (donated) state, so that several configurations can be timed in alternating
blocks (bench memory pairs them so that drift in the machine's load hits all alike).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from ccf_jax import registry as arch_lib
from ccf_jax.core import config_lib, host_memory, sharding
from ccf_jax.core import flops as flops_lib
from ccf_jax.train import step as ts
from ccf_jax.train import trainer


def compiled_memory(compiled) -> dict:
  """XLA's memory analysis of a compiled executable, in bytes."""
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  return {'temp_bytes': int(ma.temp_size_in_bytes), 'argument_bytes': int(ma.argument_size_in_bytes),
          'output_bytes': int(ma.output_size_in_bytes), 'alias_bytes': int(ma.alias_size_in_bytes)}


class TrainTimer:
  """The real jitted train step of `config`, compiled once on synthetic tokens."""

  def __init__(self, config):
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
    host_memory.release_freed()  # The compiler's freed heap (host_memory doc).
    self.block(1)  # Warm-up.
    self.params = sum(int(x.size) for x in jax.tree.leaves(self._state.params))
    self.flops = arch_lib.get_arch(config).train_flops(config, b)

  def hlo_text(self) -> str:
    """The optimised HLO of the compiled step (what `bench profile` attributes time by)."""
    return self._compiled.as_text()

  def block(self, steps: int) -> float:
    """Mean seconds per step over `steps` consecutive steps."""
    t = time.time()
    for _ in range(steps):
      self._state, m = self._compiled(self._state, self._batch)
    jax.block_until_ready(m)
    return (time.time() - t) / steps

  def record(self, step_s: float) -> dict:
    """bench train's JSON object for a measured step time: 'mfu' with the peak it divides by,
    or, on a device kind with no known peak, 'mfu_note' saying why there is none."""
    c = self.config
    tokens = c.data.batch_size * self.length
    peak, why = flops_lib.local_peak_flops(c.train.get('peak_flops_per_device', 0.0))
    mfu = flops_lib.mfu(self.flops, step_s, jax.device_count(), peak)
    util = ({'mfu': round(mfu, 4), 'peak_tflops_per_device': round(peak / 1e12, 1)}
            if mfu is not None else {'mfu_note': why})
    return {'bench': 'train', 'config': c.name, 'arch': c.model.arch, 'params': self.params,
            'devices': jax.device_count(), 'batch': c.data.batch_size, 'length': self.length,
            'step_s': round(step_s, 5), 'tokens_per_s': round(tokens / step_s, 1),
            'model_gflops_per_s': round(self.flops / step_s / 1e9, 2), **util,
            'compile_s': round(self.compile_s, 2), **compiled_memory(self._compiled),
            'peak_rss_gb': round(host_memory.peak_rss_gb(), 3)}


def bench_train(config, steps: int = 20, repeats: int = 1) -> dict:
  """Times the real jitted train step on synthetic tokens shaped like the config's batches:
  `repeats` blocks of `steps` steps after a warm-up step; step_s is the fastest block's mean (as
  `timeit` takes the best repeat: other load on the machine only ever adds time)."""
  timer = TrainTimer(config)
  return timer.record(min(timer.block(steps) for _ in range(repeats)))
