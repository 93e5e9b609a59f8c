"""The training loop: a flat list of intentions around one jitted, sharded, donated train step.

    state = restore_or_init(...)          # resume > init.from_checkpoint > init.params_only > init.from_hf > fresh
    while not done:
      state, metrics = train_step(state, next(batches))
      maybe_log(previous step's metrics)  # one step late: never blocks the device
      maybe_profile / maybe_evaluate / maybe_save_checkpoint / maybe_stop (budget, SIGTERM, non-finite)

Everything a test needs is importable: `train_and_evaluate(config, workdir)` returns a summary dict.
Only process 0 writes metrics; every process loads its own slice of the data.

Before anything is written the workdir and its checkpoint directory are checked writable and
process 0 takes the workdir lock (`faults.WorkdirLock`); the validation split the final evaluation
reads is built before the first step. A storage fault anywhere becomes `faults.StorageError` (one
line: the path, the bytes needed against the bytes free).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time

import jax
import numpy as np
from absl import logging

from ccf_jax import registry as arch_lib
from ccf_jax.core import config_lib, host_memory
from ccf_jax.core import flops as flops_lib
from ccf_jax.train import faults
from ccf_jax.train import metrics as metrics_lib
from ccf_jax.train import optim
from ccf_jax.core import sharding
from ccf_jax import checkpoint as ckpt_lib
from ccf_jax import data as data_lib
from ccf_jax.interop.hf_config import ConvertError
from ccf_jax.train import step as ts
from ccf_jax.model import decoder as model_lib


class DivergedError(FloatingPointError):
  """The run diverged (the entry point exits with `faults.EXIT_DIVERGED`): a loss over
  train.divergence_factor times its best smoothed value (`faults.LossWatch`), or, as
  `NonFiniteError`, a rejected update."""
  exit_code = faults.EXIT_DIVERGED


class NonFiniteError(DivergedError):
  """Raised when train.nonfinite='stop' and a step produced a non-finite loss, gradient or update,
  or an update over train.max_update_ratio; it never entered the state."""


# Errors caused by the user's input or the machine: entry points print them as one line (no
# traceback) and exit with their `faults.exit_code_for` code.
USER_ERRORS = (config_lib.ConfigError, sharding.MeshError, data_lib.DataError, ConvertError,
               ckpt_lib.CheckpointError, DivergedError, faults.StorageError,
               faults.WorkdirLockedError)


@dataclasses.dataclass
class _Clock:
  start: float = dataclasses.field(default_factory=time.time)
  phases: dict = dataclasses.field(default_factory=dict)

  def mark(self, name: str, since: float):
    self.phases[name] = round(self.phases.get(name, 0.0) + time.time() - since, 3)


class _Preemption:
  """Turns SIGTERM into a flag checked at step boundaries (save, then exit cleanly)."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. some notebooks): no handler.
      self._old = None

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the next step boundary.')
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def to_device(batch: dict, shardings: dict) -> dict:
  """Assembles global arrays from this process's slice of the batch."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
          for k, v in batch.items() if k in shardings}


def initial_params(cfg, arch):
  """Parameters from init.params_only / init.from_hf, or None for a fresh init."""
  if cfg.init.params_only:
    from ccf_jax.checkpoint import export as export_lib
    params, _, _ = export_lib.load_export(cfg.init.params_only)
    return _adapt_params(cfg, arch, params, f'init.params_only={cfg.init.params_only}')
  if cfg.init.from_hf:
    from ccf_jax.interop import hf_weights as convert
    params = convert.load_hf_params(cfg.init.from_hf, cfg.model)
    return _adapt_params(cfg, arch, params, f'init.from_hf={cfg.init.from_hf}')
  return None


def init_tokenizer(cfg) -> tuple[str, str, dict] | None:
  """(field, tokenizer file, recorded identity) of the pretrained source the run starts from
  (init.params_only's export or init.from_hf's directory), or None (no such source, or it has no
  tokenizer). init.from_checkpoint continues a run and keeps that run's data.tokenizer."""
  if cfg.init.from_checkpoint:
    return None
  if cfg.init.params_only:
    from ccf_jax.checkpoint import export as export_lib
    path, record = export_lib.tokenizer_of(cfg.init.params_only)
    field = f'init.params_only={cfg.init.params_only}'
  elif cfg.init.from_hf:
    from ccf_jax.interop import hf_tokenizer
    _, path = hf_tokenizer.find(cfg.init.from_hf)
    record = data_lib.load_tokenizer(path).record() if path else None
    field = f'init.from_hf={cfg.init.from_hf}'
  else:
    return None
  return (field, path, record) if path else None


def with_init_tokenizer(config):
  """The config whose data.tokenizer is the pretrained source's tokenizer.

  Pretrained weights only make sense with the ids they were trained on: with data.tokenizer unset
  the run uses the source's tokenizer (never one trained afresh on the corpus), and an explicit
  data.tokenizer whose sha256 differs from the recorded one is refused before any step."""
  src = init_tokenizer(config)
  if src is None:
    return config
  field, path, record = src
  if not config.data.tokenizer:
    config = config.copy_and_resolve_references()
    config.data.tokenizer = path
    logging.info('data.tokenizer: %s, the tokenizer of %s', path, field)
    return config
  given = data_lib.load_tokenizer(config.data.tokenizer)
  if given.sha256 != record.get('sha256'):
    raise data_lib.TokenizerError(
        f'data.tokenizer={config.data.tokenizer} (sha256 {given.sha256[:12]}) is not the tokenizer '
        f'of {field} ({path}, sha256 {str(record.get("sha256"))[:12]}): its ids would mean other '
        f'tokens to the pretrained weights. Fix: --config.data.tokenizer= (the run then uses '
        f'{path}), or --config.data.tokenizer={path}.')
  return config


def _adapt_params(cfg, arch, params, source):
  if arch.from_base_params is not None:
    return arch.from_base_params(cfg, params)
  expected = model_lib.abstract_params(arch.module_config(cfg), arch.module_cls)
  got = jax.tree.map(lambda a: tuple(a.shape), params)
  want = jax.tree.map(lambda a: tuple(a.shape), expected)
  if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
    raise ValueError(f'{source}: parameter shapes do not match model config {cfg.name!r}. '
                     'Fix: use the same model.* fields as the run that produced them.')
  return params


def train_and_evaluate(config, workdir: str, allow_fresh_start: bool = False) -> dict:
  """Trains per `config`, checkpointing into `workdir`; returns a summary of the run.

  `allow_fresh_start`: when every checkpoint in the workdir is corrupt, train from step 0 anyway
  (otherwise that is a CorruptCheckpointError naming them)."""
  config_lib.validate(config, jax.device_count())
  faults.check_writable(workdir)
  # A URL workdir (gs://...) has no flock: only local and network-mounted file systems lock.
  take_lock = jax.process_index() == 0 and faults.is_local(workdir)
  lock = faults.WorkdirLock(workdir).acquire() if take_lock else None
  run = {}
  try:
    faults.check_writable(os.path.join(workdir, ckpt_lib.CHECKPOINTS_SUBDIR))
    return _train(config, workdir, allow_fresh_start, run)
  except Exception as e:  # pylint: disable=broad-except
    code = faults.storage_errno(e)
    if code is None or isinstance(e, USER_ERRORS):  # Those already name their path and fix.
      raise
    path = _failed_path(e) or os.path.join(workdir, ckpt_lib.CHECKPOINTS_SUBDIR)
    raise faults.StorageError(code, faults.describe_storage_fault(
        e, path, run.get('state_bytes'))) from e
  finally:
    if lock is not None:
      lock.release()


def _failed_path(e: BaseException):
  """The file name of the first OSError in `e`'s chain that has one."""
  while e is not None:
    if isinstance(e, OSError) and e.filename:
      return str(e.filename)
    e = e.__cause__ or e.__context__
  return None


def check_eval_split(config, tokenizer, pidx: int, pcount: int):
  """Builds the validation pipeline the final evaluation reads, so that a corpus without one
  fails before the first step rather than after the last."""
  if config.train.eval_batches <= 0:
    return
  try:
    data_lib.make_pipeline(config, 'validation', pidx, pcount, tok=tokenizer)
  except data_lib.DataError as e:
    raise data_lib.DataError(
        f'the run evaluates on the validation split (train.eval_batches='
        f'{config.train.eval_batches}), which cannot be built: {e} (Or skip evaluation: '
        '--config.train.eval_batches=0.)') from None


def _train(config, workdir, allow_fresh_start, run) -> dict:
  clock = _Clock()
  t = time.time()
  pidx, pcount = jax.process_index(), jax.process_count()
  is_main = pidx == 0
  mesh = sharding.make_mesh(config.mesh)
  arch = arch_lib.get_arch(config)
  config = with_init_tokenizer(config)
  tokenizer = data_lib.load_or_train_tokenizer(config)
  data_lib.check_vocab(tokenizer, config.model.vocab_size, f'data.tokenizer={tokenizer.model_path}')
  train_iter = data_lib.make_train_iter(config, 'train', pidx, pcount)
  check_eval_split(config, tokenizer, pidx, pcount)
  clock.mark('data_and_tokenizer', t)

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, total_steps=config.train.steps,
                                    time_budget_s=config.train.time_budget_s)
  preempt = _Preemption()
  ckpt = ckpt_lib.CheckpointManager(workdir, config)
  try:
    with sharding.use_mesh(mesh, config.mesh.rules):
      t = time.time()
      tx = optim.make_optimizer(config.train)
      abstract, state_sh = ts.abstract_state_and_shardings(config, tx, mesh)

      def init_fn():
        if config.init.from_checkpoint:
          state, _, _ = ckpt_lib.restore_from(config.init.from_checkpoint, abstract, train_iter)
          return state
        return ts.init_state(config, tx, state_sh, initial_params(config, arch))

      state, _, info = ckpt.restore_or_init(abstract, init_fn, train_iter, allow_fresh_start)
      step = int(jax.device_get(state.step))  # init.from_checkpoint continues its step count.
      logging.info('init: %s (step %d)', info, step)
      run['state_bytes'] = sum(int(x.nbytes) for x in jax.tree.leaves(state))
      writer.drop_rows_after(step)  # Rows a killed run logged past its last checkpoint.
      n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
      n_frozen = sum(int(x.size) for x in jax.tree.leaves(state.frozen))
      if is_main:
        print(f'model {config.model.arch}: {n_params:,} trainable + {n_frozen:,} frozen params; '
              f'mesh {dict(mesh.shape)}; start step {step}', flush=True)
      first = next(train_iter)
      batch_sh = ts.batch_shardings(config, mesh, {k: np.asarray(v) for k, v in first.items()})
      train_step = ts.jit_train_step(config, tx, mesh, state_sh, batch_sh)
      eval_sh = {k: batch_sh[k] for k in data_lib.BATCH_KEYS}  # Not the training-only keys.
      eval_step = ts.jit_eval_step(config, mesh, state_sh, eval_sh)
      clock.mark('setup', t)

      writer.start_training(step)
      loop = _Loop(config, workdir, writer, ckpt, train_iter, eval_step, batch_sh, arch, clock,
                   preempt, is_main, tokenizer.model_path)
      loop.watch = faults.LossWatch(config.train.divergence_factor,
                                    state=info.metadata.get('extra', {}).get('loss_watch'))
      state = loop.run(state, step, train_step, first)
      summary = loop.summary
      summary.update(params=n_params, frozen_params=n_frozen, phases=clock.phases,
                     peak_rss_gb=round(host_memory.peak_rss_gb(), 3))
      return summary
  finally:
    preempt.restore()
    failing = sys.exc_info()[0] is not None  # Never hide that error behind a pending save's.
    ckpt.close(quiet=failing)
    writer.close(quiet=failing)


class _Loop:
  """Holds the loop's bookkeeping so that `run` reads as a list of intentions."""

  def __init__(self, config, workdir, writer, ckpt, train_iter, eval_step, batch_sh, arch, clock,
               preempt, is_main, tokenizer_path):
    self.tokenizer_path = tokenizer_path
    self.c, self.workdir, self.writer, self.ckpt = config, workdir, writer, ckpt
    self.train_iter, self.eval_step, self.batch_sh = train_iter, eval_step, batch_sh
    self.arch, self.clock, self.preempt, self.is_main = arch, clock, preempt, is_main
    self.pending = None  # (step, device metrics) flushed one step late.
    self.window = {'t': time.time(), 'steps': 0, 'tokens': 0.0, 'loss': 0.0}
    self.summary: dict = {}
    self.stop_reason = ''
    self.profiling = False
    self.watch = faults.LossWatch(config.train.divergence_factor)  # The resumed run's, in _train.
    self.peak_flops, why = flops_lib.local_peak_flops(
        config.train.get('peak_flops_per_device', 0.0))
    if why and is_main:
      print(why, flush=True)  # Once: the console lines then show GFLOP/s without MFU.

  # ---------------------------------------------------------------------------------- the loop
  def run(self, state, step, train_step, first_batch):
    c = self.c
    batch = first_batch
    t_train = time.time()
    while step < c.train.steps:
      self.maybe_profile(step)
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, metrics = train_step(state, to_device(batch, self.batch_sh))
      if batch is first_batch:  # The call compiled the step: hand its freed heap back.
        host_memory.release_freed()
      step += 1
      self.maybe_log(step, metrics)
      state = self.maybe_evaluate(step, state)
      self.maybe_save_checkpoint(step, state)
      if self.should_stop(step):
        break
      batch = next(self.train_iter)
    self.flush_metrics()
    self.clock.mark('train', t_train)
    t = time.time()
    self.ckpt.maybe_save(step, state, self.train_iter, force=True,
                         extra=self._extra(step, stop_reason=self.stop_reason or 'steps'))
    self.ckpt.wait()
    self.clock.mark('final_checkpoint', t)
    t = time.time()
    # After SIGTERM the grace period before SIGKILL is short: save and go, evaluate on resume.
    self.summary['eval'] = {} if self.preempt.requested else self.evaluate(step, state)
    self.clock.mark('final_eval', t)
    self.summary.update(final_step=step, stop_reason=self.stop_reason or 'steps',
                        preempted=self.preempt.requested)
    return state

  # ------------------------------------------------------------------------------- intentions
  def maybe_log(self, step, metrics):
    """Fetches the previous step's metrics (already computed) and queues this step's."""
    prev, self.pending = self.pending, (step, metrics)
    if prev is not None:
      self._consume(*prev)

  def flush_metrics(self):
    if self.pending is not None:
      self._consume(*self.pending)
      self.pending = None

  def _consume(self, step, metrics):
    m = jax.device_get(metrics)
    step_tokens = config_lib.tokens_per_step(self.c)  # Input tokens (padding included), global.
    w = self.window
    w['steps'] += 1
    w['tokens'] += step_tokens
    w['loss'] += float(m['loss'])
    self._check_divergence(step, m)
    if step % self.c.train.log_every and step != self.c.train.steps:
      return
    dt = time.time() - w['t']
    tokens_per_s = w['tokens'] / max(dt, 1e-9)
    step_time = dt / max(1, w['steps'])
    flops = self.arch.train_flops(self.c, self.c.data.batch_size)
    scalars = {'loss': w['loss'] / w['steps'], 'ppl': math.exp(min(50.0, w['loss'] / w['steps'])),
               'grad_norm': float(m['grad_norm']), 'lr': float(m['lr']),
               'accuracy': float(m['accuracy']), 'tokens_per_s': tokens_per_s, 'step_time_s': step_time,
               'tflops': flops / step_time / 1e12, 'skipped_updates': float(m['skipped_updates']),
               'peak_rss_gb': host_memory.peak_rss_gb()}
    mfu = flops_lib.mfu(flops, step_time, jax.device_count(), self.peak_flops)
    if mfu is not None:
      scalars['mfu'] = mfu
    self.summary['train_loss'] = scalars['loss']
    self.summary['tokens_per_s'] = tokens_per_s
    self.summary['step_time_s'] = step_time
    self.writer.write(step, scalars, 'train')
    self.window = {'t': time.time(), 'steps': 0, 'tokens': 0.0, 'loss': 0.0}

  def _check_divergence(self, step, m):
    """A rejected update (step.py: non-finite, or over train.max_update_ratio) stops the run or is
    skipped; a loss over train.divergence_factor times its best stops it. A loss in bounds marks
    the state it was computed on (the previous step's) good, protecting its checkpoint."""
    loss = float(m['loss'])
    if m['update_ok'] < 1:
      ratio = float(m['update_ratio'])
      what = (f'non-finite loss, gradient or update (loss={loss}, update/params norm {ratio:.3g})'
              if m['finite'] < 1 or not math.isfinite(ratio) else
              f'an update {ratio:.3g} times the parameters\' norm, over '
              f'train.max_update_ratio={self.c.train.max_update_ratio:g}')
      msg = f'step {step}: {what}; the update was skipped, params are unchanged.'
      if self.c.train.nonfinite == 'stop':
        raise NonFiniteError(msg + ' Stopping (train.nonfinite=stop): the run diverged; the bad '
                             'state was not saved and the earlier checkpoints are kept. Fix: '
                             'lower train.lr, check the data, or set train.nonfinite=skip.')
      logging.warning(msg)
    if not math.isfinite(loss):
      return
    why = self.watch.check(loss)
    if why:
      good = self.ckpt.good_checkpoint()
      kept = (f'the last good checkpoint, {self.ckpt.step_dir(good)}, is kept (any later one may '
              'hold the diverging state). Fix: lower train.lr and restart from it in a new '
              f'workdir: --config.init.from_checkpoint={self.ckpt.step_dir(good)} '
              '--workdir=NEW' if good is not None else
              'no checkpoint was written before it. Fix: lower train.lr')
      raise DivergedError(f'step {step}: {why}: the run diverged; {kept} (or raise '
                          'train.divergence_factor; 0 turns the check off).')
    self.ckpt.mark_good(step - 1)

  def maybe_evaluate(self, step, state):
    every = self.c.train.eval_every
    if every and step % every == 0 and step != self.c.train.steps:
      self.flush_metrics()
      self.evaluate(step, state)
    return state

  def evaluate(self, step, state) -> dict:
    if self.c.train.eval_batches <= 0:
      return {}
    it = data_lib.make_train_iter(self.c, 'validation', jax.process_index(), jax.process_count())
    loss_sum, tokens, correct = 0.0, 0.0, 0.0
    for i, batch in enumerate(it):
      if i >= self.c.train.eval_batches:
        break
      out = jax.device_get(self.eval_step(state, to_device(batch, self.batch_sh)))
      loss_sum += float(out['loss_sum'])
      tokens += float(out['tokens'])
      correct += float(out.get('correct', 0.0))
    if tokens == 0:
      return {}
    res = {'loss': loss_sum / tokens, 'ppl': math.exp(min(50.0, loss_sum / tokens)),
           'accuracy': correct / tokens, 'tokens': tokens}
    self.writer.write(step, res, 'eval')
    return res

  def maybe_save_checkpoint(self, step, state):
    """Before a save, this step's metrics are checked (one device sync per save, which the save's
    copy to host costs anyway): a rejected update or a diverged loss stops the run before the
    state is written, so a saved state is a validated one plus one update within bounds."""
    if self.ckpt.should_save(step):
      self.flush_metrics()
    self.ckpt.maybe_save(step, state, self.train_iter, extra=self._extra(step))

  def _extra(self, step, **kw):
    tokens_seen = step * config_lib.tokens_per_step(self.c)
    return {'tokens_seen': tokens_seen, 'tokenizer_path': self.tokenizer_path,
            'loss_watch': self.watch.state_dict(), **kw}

  def maybe_profile(self, step):
    c = self.c.train
    if c.profile_start < 0 or not self.is_main:
      return
    if step == c.profile_start and not self.profiling:
      jax.profiler.start_trace(os.path.join(self.workdir, 'profile'))
      self.profiling = True
    elif self.profiling and step >= c.profile_start + c.profile_steps:
      jax.profiler.stop_trace()
      self.profiling = False

  def should_stop(self, step) -> bool:
    """Time budget or SIGTERM. Multi-process runs agree on it (every log_every steps, one tiny
    all-gather), since processes see the clock and signals at different steps."""
    budget = self.c.train.time_budget_s
    over_budget = bool(budget) and time.time() - self.writer.train_t0 >= budget  # The ETA's clock.
    if jax.process_count() > 1:
      if step % self.c.train.log_every:
        return False
      from jax.experimental import multihost_utils
      flags_ = multihost_utils.process_allgather(np.array([over_budget, self.preempt.requested]))
      over_budget, self.preempt.requested = (bool(x) for x in np.asarray(flags_).reshape(-1, 2).any(0))
    if over_budget:
      self.stop_reason = f'time budget {budget:.0f}s reached at step {step}'
    elif self.preempt.requested:
      self.stop_reason = f'SIGTERM at step {step}'
    if self.stop_reason:
      if self.profiling:
        jax.profiler.stop_trace()
        self.profiling = False
      logging.warning('stopping: %s', self.stop_reason)
      if self.is_main:
        print(f'stopping: {self.stop_reason}', flush=True)
      return True
    return False
