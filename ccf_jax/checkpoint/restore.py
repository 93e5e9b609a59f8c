"""Restoring checkpoints: one step directory, the first good one of a run (corrupt ones renamed
`<step>.corrupt` and skipped), the parameters alone (for export), and the quiet reads that keep
Orbax's per-file tracebacks out of the log when a damaged checkpoint is probed.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
import grain
from ccf_jax.checkpoint.integrity import (CHECKPOINTS_SUBDIR, CONFIG, CORRUPT_SUFFIX,
                                          CheckpointError, CorruptCheckpointError, DATA, METADATA,
                                          STATE, abspath, check_compatible,
                                          is_resource_error, quiet_failed_reads, saved_arrays,
                                          short_error, tree_metadata, verify_fingerprint)
from ccf_jax import registry as arch_lib


_BARRIERS = itertools.count()  # Barrier names must match across processes and never repeat.



@dataclasses.dataclass
class RestoreInfo:
  """What `restore_or_init` / `restore_from` did, for logs and the run summary."""
  status: str  # 'restored' or 'initialized'.
  step: int
  path: Optional[str] = None  # The step directory restored from.
  skipped: list = dataclasses.field(default_factory=list)  # [{step, path, moved_to, error}]
  metadata: dict = dataclasses.field(default_factory=dict)  # The checkpoint's metadata item.
  config: dict = dataclasses.field(default_factory=dict)  # The checkpoint's config item.

  def __str__(self):
    s = f'{self.status} at step {self.step}' + (f' from {self.path}' if self.path else '')
    if self.skipped:
      s += '; skipped corrupt: ' + ', '.join(f"{d['path']} ({d['error'][:120]})"
                                             for d in self.skipped)
    return s


# ------------------------------------------------------------------------------- restore pieces

def restore_step_dir(step_dir, abstract_state, data_iter=None, expected_step=None):
  """Restores one step directory: (state, metadata, config). Raises CorruptCheckpointError or
  CheckpointMismatchError; touches `data_iter` only after the state restored and verified."""
  step_dir = abspath(step_dir)
  if not (step_dir / STATE).exists():
    raise CorruptCheckpointError(f'{step_dir}: the "{STATE}" item is missing.')
  saved = saved_arrays(step_dir / STATE)
  check_compatible(step_dir, saved, abstract_state)
  metadata = read_json_item(step_dir, METADATA)
  config = read_json_item(step_dir, CONFIG)
  if not isinstance(metadata, dict) or 'step' not in metadata:
    raise CorruptCheckpointError(f'{step_dir}: the "{METADATA}" item has no step.')
  if expected_step is not None and int(metadata['step']) != int(expected_step):
    raise CorruptCheckpointError(
        f'{step_dir}: metadata says step {metadata["step"]}, the directory says {expected_step}.')
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    with quiet_failed_reads():
      state = ckptr.restore(step_dir, args=ocp.args.Composite(
          **{STATE: ocp.args.StandardRestore(abstract_state)}))[STATE]
  except Exception as e:  # pylint: disable=broad-except
    if is_resource_error(e):
      raise  # Out of memory is not corruption: the next checkpoint would fail the same way.
    raise CorruptCheckpointError(f'{step_dir / STATE}: {short_error(e)}') from e
  verify_fingerprint(state, metadata.get('fingerprint') or {}, str(step_dir / STATE),
                      {k: v[1] for k, v in saved.items()})
  saved_pc = metadata.get('process_count')
  if data_iter is not None and saved_pc is not None and int(saved_pc) != jax.process_count():
    # grain saves one iterator state per process (process_i-of-N.json); another process count
    # reads a different data stream, so the position cannot carry over.
    logging.warning('%s was written by %d processes and this run has %d: the data iterator state '
                    'is not restored (the data order restarts; params and optimizer are exact).',
                    step_dir, int(saved_pc), jax.process_count())
  elif data_iter is not None:
    if (step_dir / DATA).exists():
      try:
        ckptr.restore(step_dir, args=ocp.args.Composite(
            **{DATA: grain.checkpoint.CheckpointRestore(data_iter)}))
      except Exception as e:  # pylint: disable=broad-except
        raise CorruptCheckpointError(f'{step_dir}: data iterator state: {short_error(e)}') from e
    elif metadata.get('has_data_state', False):
      raise CorruptCheckpointError(f'{step_dir}: the "{DATA}" item is missing.')
    else:
      logging.warning('%s was saved without a data iterator state: the data iterator keeps its '
                      'current position (resume is not exact).', step_dir)
  return state, metadata, config


def _without_prefix(msg: str, step_dir) -> str:
  """'state/_METADATA: ...' rather than repeating the step directory the warning already names."""
  if msg.startswith(str(step_dir)):
    msg = msg[len(str(step_dir)):].lstrip('/: ')
  return msg.rstrip('.') + '.'


def _quarantine(step_dir: epath.Path) -> Optional[str]:
  """Renames a bad step dir to `<step>.corrupt[-k]` so it is neither restored nor overwritten."""
  target, k = step_dir.parent / (step_dir.name + CORRUPT_SUFFIX), 0
  while target.exists():
    k += 1
    target = step_dir.parent / f'{step_dir.name}{CORRUPT_SUFFIX}-{k}'
  if jax.process_index() == 0:
    step_dir.rename(target)
  ocp.multihost.sync_global_processes(f'ccf_quarantine_{step_dir.name}_{next(_BARRIERS)}')
  return str(target)


def restore_first_good(step_dirs, abstract_state, data_iter, quarantine: bool):
  """Tries (step, dir) pairs newest first. Returns (state, step, info) or (None, None, skipped)."""
  saved_iter_state = data_iter.get_state() if data_iter is not None else None
  skipped = []
  for step, step_dir in step_dirs:
    try:
      state, metadata, config = restore_step_dir(step_dir, abstract_state, data_iter, step)
    except CorruptCheckpointError as e:
      moved = _quarantine(step_dir) if quarantine else None
      logging.warning(
          'Checkpoint %s is corrupt or incomplete and was NOT restored: %s %s Falling back to the '
          'previous checkpoint.', step_dir, _without_prefix(str(e), step_dir),
          f'Moved it to {moved} for inspection (rename it back to retry).' if moved
          else 'Left it in place.')
      skipped.append({'step': step, 'path': str(step_dir), 'moved_to': moved, 'error': str(e)})
      continue
    return state, step, RestoreInfo('restored', step, str(step_dir), skipped, metadata, config)
  if data_iter is not None:
    data_iter.set_state(saved_iter_state)
  return None, None, skipped


def step_dirs(ckpt_dir: epath.Path) -> list:
  """[(step, path)] of finalized steps, newest first (tmp and `.corrupt` dirs are not steps)."""
  if not ckpt_dir.exists():
    return []
  steps = ocp.step.checkpoint_steps(ckpt_dir)
  return [(s, ckpt_dir / str(s)) for s in sorted(steps, reverse=True)]


def is_step_dir(path) -> bool:
  """A directory holding checkpoint items (as opposed to a workdir or checkpoints/ dir)."""
  path = abspath(path)
  return path.is_dir() and ((path / STATE).exists() or (path / METADATA).exists())


def resolve_step_dirs(path, step: Optional[int] = None) -> list:
  """[(step, dir)] candidates for a workdir, its checkpoints/ dir or a step dir, newest first.

  A step directory or an explicit `step` gives one candidate (no fallback: the caller asked for it).
  """
  path = abspath(path)
  if not path.exists():
    raise FileNotFoundError(f'Checkpoint path {path} does not exist. Fix: pass a training workdir '
                            '(containing checkpoints/<step>/) or one of its step directories.')
  if is_step_dir(path):
    return [(int(path.name) if path.name.isdigit() else None, path)]
  ckpt_dir = path / CHECKPOINTS_SUBDIR if (path / CHECKPOINTS_SUBDIR).is_dir() else path
  dirs = step_dirs(ckpt_dir)
  if not dirs:
    raise FileNotFoundError(f'No finished checkpoint in {ckpt_dir} (expected {ckpt_dir}/<step>/ '
                            'with a state/ item). Fix: check the path, or train longer than '
                            'checkpoint.every steps.')
  if step is not None:
    match = [d for d in dirs if d[0] == step]
    if not match:
      raise FileNotFoundError(f'No checkpoint for step {step} in {ckpt_dir}; available steps: '
                              f'{sorted(s for s, _ in dirs)}.')
    return match
  return dirs


def restore_from(path, abstract_state, data_iter=None):
  """Full-state restore from another run (`init.from_checkpoint`): (state, step, info).

  `path` is a workdir, its checkpoints/ dir (latest good step, falling back past corrupt ones
  without renaming anything: it is not our directory) or one step directory (no fallback).
  """
  candidates = resolve_step_dirs(path)
  if is_step_dir(path):
    step_dir = candidates[0][1]
    state, metadata, config = restore_step_dir(step_dir, abstract_state, data_iter)
    step = int(metadata['step'])
    return state, step, RestoreInfo('restored', step, str(step_dir), [], metadata, config)
  state, step, info = restore_first_good(candidates, abstract_state, data_iter, quarantine=False)
  if state is None:
    raise CorruptCheckpointError(
        f'Every checkpoint under {path} is corrupt: ' + '; '.join(d['error'] for d in info))
  return state, step, info


def read_json_item(step_dir, item: str) -> dict:
  """The `config` or `metadata` JSON item of a step directory, with a clear error if unreadable."""
  step_dir = abspath(step_dir)
  if not (step_dir / item).exists():
    raise CorruptCheckpointError(f'{step_dir}: the "{item}" item is missing.')
  try:
    with quiet_failed_reads():
      out = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
          step_dir, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
    return out[item]
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(f'{step_dir / item}: {short_error(e)}') from e


def restore_params(step_dir):
  """All model parameters of a step's state (trainable `params` merged with `frozen`, e.g. the
  base of an adapter run), as host numpy arrays on no particular mesh (for export).

  Uses Orbax partial restore, so optimizer moments are never read. Verified against the checksum.
  Returns (params, metadata).
  """
  step_dir = abspath(step_dir)
  saved_arrays(step_dir / STATE)  # Clear error if the state item is missing or unreadable.
  tree = tree_metadata(step_dir / STATE)
  if not isinstance(tree, dict) or 'params' not in tree:
    raise CheckpointError(f'{step_dir / STATE} has no top-level "params" (found '
                          f'{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}).')
  metadata = read_json_item(step_dir, METADATA)
  item = {k: tree[k] for k in ('params', 'frozen') if isinstance(tree.get(k), dict) and tree[k]}
  restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), item)
  try:
    with quiet_failed_reads():
      out = ocp.PyTreeCheckpointer().restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(f'{step_dir / STATE}: {short_error(e)}') from e
  expected = {k: v for k, v in (metadata.get('fingerprint') or {}).items()
              if k.split('.')[0] in item}
  verify_fingerprint(out, expected, str(step_dir / STATE), {})
  return arch_lib.merge_params(out['params'], out.get('frozen', {})), metadata


