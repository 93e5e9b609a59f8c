"""`CheckpointManager`: Orbax's manager with our items (state, grain iterator, config, metadata),
async atomic saves, and `restore_or_init` (resume from the first good checkpoint, else initialise).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import os
import platform
import shutil
import time
from typing import Any, Callable, Optional

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
import grain
from ccf_jax.checkpoint.integrity import (CHECKPOINTS_SUBDIR, CONFIG, DATA, FORMAT_VERSION,
                                          METADATA, STATE, CorruptCheckpointError, abspath,
                                          fingerprint, short_error)
from ccf_jax.checkpoint.restore import (RestoreInfo, restore_first_good, restore_step_dir, step_dirs)



# --------------------------------------------------------------------------------- the manager
@dataclasses.dataclass
class LastGood(ocp.checkpoint_managers.PreservationPolicy):
  """Orbax preservation policy: keep the newest checkpoint at or before `good_step`.

  A checkpoint's parameters are known good only once a later step has computed a loss on them
  (the loss of step s+1 is that of the state saved at s), so the newest checkpoint may still turn
  out to hold a diverged state. `keep_last` alone would then already have rotated out the one
  before it; with this policy beside it (Orbax keeps a step when any policy does) the newest
  validated checkpoint stays until a newer one is validated, which costs at most one extra
  checkpoint on disk, for one step. The trainer moves `good_step` forward as losses arrive; a
  restored checkpoint starts as good. `good_step` None keeps nothing.
  """
  good_step: Optional[int] = None

  def should_preserve(self, checkpoints, *, context):
    del context
    good = self.good_step
    kept = max((c.step for c in checkpoints if good is not None and c.step <= good), default=None)
    return [c.step == kept for c in checkpoints]


def _versions() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
          'orbax_checkpoint': ocp.__version__, 'grain': getattr(grain, '__version__', 'unknown')}


def _jsonable(x):
  """JSON-safe copy (numpy scalars/arrays -> python, unknown objects -> str)."""
  def default(o):
    if isinstance(o, (np.generic, np.ndarray, jax.Array)):
      return np.asarray(o).tolist()
    return str(o)
  return json.loads(json.dumps(x, default=default))


def _config_dict(config) -> dict:
  if config is None:
    return {}
  if hasattr(config, 'to_json_best_effort'):
    return json.loads(config.to_json_best_effort())
  return _jsonable(dict(config))


def _mesh_shape(state) -> Optional[dict]:
  for x in jax.tree.leaves(state):
    mesh = getattr(getattr(x, 'sharding', None), 'mesh', None)
    if mesh is not None and hasattr(mesh, 'shape'):
      return {str(k): int(v) for k, v in dict(mesh.shape).items()}
  return None


class CheckpointManager:
  """Saves and restores `workdir/checkpoints/<step>/`; see the module docstring for the layout.

  Policies come from `config.checkpoint`: `every` (save cadence; <= 0 saves only when forced),
  `keep_last` (newest N kept; <= 0 keeps all), `keep_every` (also keep every K-th step; 0 = off)
  and `async_save`. Keyword arguments override the config (handy in tests and tools). Whatever
  they say, the last checkpoint marked good (`mark_good`, `LastGood`) is never rotated out.
  """

  def __init__(self, workdir, config=None, *, every=None, keep_last=None, keep_every=None,
               async_save=None):
    ck = getattr(config, 'checkpoint', None)
    pick = lambda v, name, default: v if v is not None else getattr(ck, name, default)
    self.every = int(pick(every, 'every', 200))
    self.keep_last = int(pick(keep_last, 'keep_last', 3))
    self.keep_every = int(pick(keep_every, 'keep_every', 0))
    self.async_save = bool(pick(async_save, 'async_save', True))
    self.config = config
    self.directory = abspath(workdir) / CHECKPOINTS_SUBDIR
    self.directory.mkdir(parents=True, exist_ok=True)
    for tmp in sorted(self.directory.glob(f'*{ocp.step.TMP_DIR_SUFFIX}*')):
      logging.warning('Found %s, an interrupted save (the process died mid-write). It was never a '
                      'valid checkpoint and is ignored; Orbax deletes it now.', tmp)
    self.last_good = LastGood()
    policies = [ocp.checkpoint_managers.LatestN(self.keep_last if self.keep_last > 0 else None),
                self.last_good]
    if self.keep_every > 0:
      policies.append(ocp.checkpoint_managers.EveryNSteps(self.keep_every))
    # Step directories are created in the calling thread: created in Orbax's background threads,
    # a directory that fails (read-only or full file system between `check_storage` and the save)
    # leaves the threads waiting for its signal, and the save blocks until Orbax's timeout
    # (minutes) instead of raising. The creation costs a few mkdirs per save.
    options = ocp.CheckpointManagerOptions(
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        enable_async_checkpointing=self.async_save,
        cleanup_tmp_directories=True,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(STATE, DATA, CONFIG, METADATA),
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: grain.checkpoint.CheckpointHandler(),
                       CONFIG: ocp.JsonCheckpointHandler(),
                       METADATA: ocp.JsonCheckpointHandler()})
    self._config_json = _config_dict(config)
    self.last_save_blocking_s = None  # Seconds `maybe_save` blocked (the whole save if sync).

  # ---------------------------------------------------------------------------------- queries
  def all_steps(self) -> list:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def mark_good(self, step: int):
    """The state of `step` is known good (a loss computed on it was in bounds): the newest
    checkpoint at or before it is protected from rotation from the next save on."""
    self.last_good.good_step = max(int(step), self.last_good.good_step or 0)

  def good_checkpoint(self) -> Optional[int]:
    """The step of the protected last good checkpoint on disk, or None."""
    good = self.last_good.good_step
    steps = [s for s in self.all_steps() if good is not None and s <= good]
    return max(steps) if steps else None

  def should_save(self, step: int, force: bool = False) -> bool:
    """Step 0 (a fresh init, reproducible from the seed) is saved only when forced."""
    if step in self._manager.all_steps():
      return False  # Already on disk (e.g. a forced final save right after a periodic one).
    return force or (self.every > 0 and step > 0 and step % self.every == 0)

  # ---------------------------------------------------------------------------------- saving
  def maybe_save(self, step: int, state, data_iter=None, force: bool = False,
                 extra: Optional[dict] = None) -> bool:
    """Saves `state` (and the data iterator position) at `step` if the policy says so.

    Returns True if a save was started. With async saves the call returns once arrays are copied
    to host and the iterator state is captured; call `wait()` before relying on the files.
    `extra` (JSON-able) lands in metadata['extra']; 'tokens_seen' there is also lifted to the top.
    """
    step = int(step)
    if not self.should_save(step, force):
      return False
    self.check_storage(state)
    t0 = time.time()
    extra = _jsonable(dict(extra or {}))
    now = time.time()
    metadata = {
        'format': FORMAT_VERSION, 'step': step, 'tokens_seen': extra.get('tokens_seen'),
        'saved_at_unix': now,
        'saved_at': datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
        'versions': _versions(), 'process_count': jax.process_count(),
        'device_count': jax.device_count(), 'mesh': _mesh_shape(state),
        'has_data_state': data_iter is not None,
        'fingerprint': fingerprint(state), 'extra': extra}
    items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(self._config_json),
             METADATA: ocp.args.JsonSave(metadata)}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.last_save_blocking_s = time.time() - t0
    logging.info('Checkpoint step %d %s in %.2fs: %s', step,
                 'started (async)' if self.async_save else 'written', self.last_save_blocking_s,
                 self.step_dir(step))
    return bool(saved)

  def check_storage(self, state):
    """Raises OSError (EROFS, EACCES, ENOSPC: path, bytes needed and free) before a save that
    cannot succeed. Orbax's async save of an unwritable directory fails in a background thread
    and leaves the caller waiting about 5 minutes; a full disk fails mid-write with many
    tracebacks. A probe file and the state's size against the free space catch both first."""
    self._manager.wait_until_finished()  # The previous save's bytes count as used.
    probe = self.directory / f'.write_probe.{platform.node()}.{os.getpid()}'
    try:
      probe.write_bytes(b'0')
      probe.unlink()
    except OSError as e:  # The errors name the directory, not the probe file.
      raise OSError(e.errno, e.strerror, str(self.directory)) from e
    needed = sum(int(getattr(x, 'nbytes', 0)) for x in jax.tree.leaves(state))
    try:
      free = shutil.disk_usage(str(self.directory)).free
    except OSError:  # Not a local file system (gs://...): no free-space figure.
      return
    if free < needed:
      raise OSError(errno.ENOSPC, f'No space left on device: a checkpoint of {needed:,} bytes '
                    f'does not fit in the {free:,} bytes free', str(self.directory))

  def wait(self):
    """Blocks until pending async saves are committed (re-raises their errors)."""
    self._manager.wait_until_finished()

  def close(self, quiet: bool = False):
    """Waits for pending saves and closes. `quiet` (while another error propagates) logs a
    failing pending save instead of raising it over that error."""
    try:
      self._manager.wait_until_finished()
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except
      if not quiet:
        raise
      logging.warning('closing the checkpoint manager after an error: %s', short_error(e))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # --------------------------------------------------------------------------------- restoring
  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores one specific step (no fallback): (state, info)."""
    self.wait()
    step_dir = self.step_dir(step)
    state, metadata, config = restore_step_dir(step_dir, abstract_state, data_iter, step)
    return state, RestoreInfo('restored', step, str(step_dir), [], metadata, config)

  def restore_or_init(self, abstract_state, init_fn: Callable[[], Any], data_iter=None,
                      allow_fresh_start: bool = False):
    """Resumes from the latest good checkpoint, else `init_fn()` at step 0: (state, step, info).

    `abstract_state`: pytree of jax.ShapeDtypeStruct with `.sharding` (arrays are placed exactly
    there, whatever mesh saved them). `data_iter` (grain DatasetIterator) is positioned in place.
    Corrupt checkpoints are renamed `<step>.corrupt` with a WARNING and the previous one is tried;
    a checkpoint that does not fit `abstract_state` raises CheckpointMismatchError. When every
    checkpoint is corrupt, training from step 0 over that run's workdir needs `allow_fresh_start`;
    otherwise CorruptCheckpointError names them.
    """
    self.wait()
    candidates = step_dirs(self.directory)
    state, step, result = restore_first_good(candidates, abstract_state, data_iter,
                                              quarantine=True)
    self._manager.reload()  # Quarantined steps must leave Orbax's cached step list.
    if state is not None:
      logging.info('Resumed: %s', result)
      self.mark_good(step)  # What a run resumes from is its best knowledge of a good state.
      return state, step, result
    if result and not allow_fresh_start:
      moved = ', '.join(d['moved_to'] or d['path'] for d in result)
      raise CorruptCheckpointError(
          f'every checkpoint in {self.directory} is corrupt (moved aside: {moved}); nothing was '
          'trained over them. Fix: repair or restore them and rerun, or start afresh in this '
          'workdir with --allow_fresh_start (python -m ccf_jax.train).')
    if result:
      logging.error('No usable checkpoint in %s (all %d were corrupt and moved aside); starting '
                    'from scratch (allow_fresh_start).', self.directory, len(result))
    return init_fn(), 0, RestoreInfo('initialized', 0, None, result)
