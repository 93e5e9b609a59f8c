"""Orbax checkpoints for ccf_jax: atomic async saves, exact resume, fallback on corruption.

Layout: `workdir/checkpoints/<step>/` holds four Orbax items:

  state/     the train state (any pytree of arrays), written by `StandardSave`. Restored with the
             caller's target shardings, which is how a run saved on one mesh resumes on another.
  data/      the grain iterator state (grain's own Orbax handler: one JSON file per process).
  config/    the experiment config as JSON (what the run was trained with, for export/inspection).
  metadata/  JSON: step, tokens seen, save time, library versions, the caller's `extra` dict and a
             per-array fingerprint of the state (see below).

Why each piece exists:
  * Atomicity comes from Orbax: a step is written into `<step>.orbax-checkpoint-tmp-<t>` and renamed
    to `<step>` only after every item is on disk. A process killed mid-save leaves only the tmp
    directory, which Orbax never lists as a step; we log it and let Orbax delete it at startup.
  * Orbax does not checksum array data: a flipped byte in a chunk file restores silently with a
    wrong value (checked on orbax-checkpoint 0.12.8). So every save records a 32-bit positional
    checksum per array (computed on device, exact for any sharding) and every restore verifies it.
  * A latest checkpoint that cannot be read (truncated/missing files, missing items, bad JSON, or a
    checksum mismatch) is renamed to `<step>.corrupt` (kept for inspection, and out of the way of
    the next save of that step) with a WARNING naming it, and the previous step is tried.
  * A checkpoint that reads fine but does not fit the target (different parameter names or shapes:
    a config change) is NOT corruption; falling back would silently restart training. It raises
    `CheckpointMismatchError` instead.
  * The grain iterator state is captured synchronously inside `save` (grain's handler is a sync
    handler run in Orbax's blocking phase), so an async save is safe to overlap with further
    `next(data_iter)` calls; arrays are copied to host before `save` returns, so donated buffers are
    fine too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import itertools
import json
import os
import logging as py_logging
import platform
import sys
import time
from typing import Any, Callable, Optional

from absl import logging
from etils import epath
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import grain

STATE, DATA, CONFIG, METADATA = 'state', 'data', 'config', 'metadata'
CHECKPOINTS_SUBDIR = 'checkpoints'
CORRUPT_SUFFIX = '.corrupt'
FORMAT_VERSION = 1
_BARRIERS = itertools.count()  # Barrier names must match across processes and never repeat.


def abspath(path) -> epath.Path:
  """Orbax needs absolute paths; keep URLs (gs://...) as they are."""
  path = str(path)
  return epath.Path(path if '://' in path else os.path.abspath(os.path.expanduser(path)))


class CheckpointError(RuntimeError):
  """A checkpoint could not be used; the message names the path and the fix."""


class CorruptCheckpointError(CheckpointError):
  """A step directory is unreadable, incomplete or fails its checksum."""


class CheckpointMismatchError(CheckpointError, ValueError):
  """A readable checkpoint whose arrays do not fit the target state (a config change)."""


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


# ---------------------------------------------------------------------------------- fingerprints
def _keystr(path) -> str:
  """'params.blk.w' for a key path; identical for a dataclass attr and a dict key of that name."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '.'.join(parts)


def _leaf_fingerprint(x):
  """sum_i fmix32(bits[i] ^ hash(i)) mod 2^32: exact under any sharding; catches any 1-bit flip."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    u = x.astype(jnp.uint32)
  else:
    uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    u = lax.bitcast_convert_type(x, uint).astype(jnp.uint32)  # 8-byte types gain a trailing dim 2.
  idx = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(u.ndim)):  # Flat index without a reshape (no resharding of the input).
    idx = idx + lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
    stride *= u.shape[d]
  # murmur3's fmix32 of (bits xor position hash): a bijection per position, so any change of one
  # element changes exactly one term (every 1-bit flip is caught), and, being non-linear, a
  # systematic change (e.g. every value doubled) does not cancel out in the sum.
  h = u ^ (idx * jnp.uint32(0x9E3779B1))
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  h = h ^ (h >> 16)
  return jnp.sum(h, dtype=jnp.uint32)


@jax.jit
def _fingerprint_leaves(leaves):
  return [_leaf_fingerprint(x) for x in leaves]


def _fingerprintable(x) -> bool:
  dtype = getattr(x, 'dtype', None)
  if dtype is None or not hasattr(x, 'shape'):
    return False
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return True
  return (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.integer)
          or jnp.issubdtype(dtype, jnp.floating)) and np.dtype(dtype).itemsize in (1, 2, 4, 8)


def fingerprint(tree) -> dict:
  """{'params.blk.w': uint32 checksum} for every numeric array leaf of `tree` (arrays or numpy)."""
  flat = [(_keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
  flat = [(k, x) for k, x in flat if _fingerprintable(x)]
  groups = {}  # One jit call per device set (a jit cannot mix arrays committed to different ones).
  for k, x in flat:
    devices = getattr(getattr(x, 'sharding', None), 'device_set', None)
    groups.setdefault(tuple(sorted(d.id for d in devices)) if devices else (), []).append((k, x))
  out = {}
  for members in groups.values():
    sums = _fingerprint_leaves([x for _, x in members])
    out.update({k: int(np.asarray(s.addressable_data(0))) for (k, _), s in zip(members, sums)})
  return out


def verify_fingerprint(tree, expected: dict, where: str, saved_dtypes: dict):
  """Raises CorruptCheckpointError if restored arrays differ from what was saved."""
  if not expected:
    return
  flat = [(_keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
  # Leaves restored into a different dtype than saved (an intentional cast) cannot be compared.
  keep = {k: x for k, x in flat if k in expected and _fingerprintable(x)
          and str(saved_dtypes.get(k, _dtype_name(x))) == _dtype_name(x)}
  got = fingerprint(keep)
  bad = sorted(k for k, v in got.items() if v != expected[k])
  if bad:
    raise CorruptCheckpointError(
        f'{where}: array data does not match the checksum recorded at save time for {len(bad)} '
        f'array(s): {", ".join(bad[:8])}. The files were modified or damaged after the save.')


def _dtype_name(x) -> str:
  dtype = x.dtype
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return 'uint32'  # Stored as key data.
  return str(np.dtype(dtype))


# ------------------------------------------------------------------------------ structure check
def tree_metadata(item_dir):
  """The saved pytree of ArrayMetadata (nested dicts/lists), or None if _METADATA is missing."""
  return getattr(ocp.PyTreeCheckpointHandler().metadata(abspath(item_dir)), 'tree', None)


def saved_arrays(item_dir) -> dict:
  """{name: (shape, dtype)} from an Orbax pytree item's metadata; raises if it is unreadable."""
  item_dir = abspath(item_dir)
  if not item_dir.exists():
    raise CorruptCheckpointError(f'{item_dir} is missing.')
  try:
    with quiet_failed_reads():
      tree = tree_metadata(item_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(
        f'{item_dir}: cannot read the array metadata ({short_error(e)})') from e
  if tree is None:
    raise CorruptCheckpointError(f'{item_dir}: the Orbax array metadata (_METADATA) is missing.')
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[_keystr(path)] = (tuple(getattr(leaf, 'shape', ()) or ()), str(getattr(leaf, 'dtype', '')))
  return out


def _target_arrays(abstract_state) -> dict:
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    if hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    out[_keystr(path)] = (tuple(getattr(x, 'shape', ())), str(getattr(x, 'dtype', '')))
  return out


_CONFIG_FIX = ('train with the config saved in {where}/config, or use a fresh --workdir '
               '(init.params_only=<export> keeps the parameters of a finished run)')


def check_compatible(where, saved: dict, abstract_state, fix: str = _CONFIG_FIX):
  """Raises CheckpointMismatchError if names or shapes of `saved` differ from `abstract_state`."""
  target = _target_arrays(abstract_state)
  missing = sorted(set(target) - set(saved))
  extra = sorted(set(saved) - set(target))
  shapes = sorted(f'{k}: checkpoint {saved[k][0]} vs target {target[k][0]}'
                  for k in set(saved) & set(target) if saved[k][0] != target[k][0])
  parts = [f'{label}: {", ".join(names[:8])}' for label, names in (
      ('not in the checkpoint', missing), ('only in the checkpoint', extra),
      ('shape differs', shapes)) if names]
  if parts:
    raise CheckpointMismatchError(
        f'{where} does not fit the arrays being restored ({" | ".join(parts)}). This is a config '
        f'change, not corruption. Fix: {fix.format(where=where)}.')


# ------------------------------------------------------------------------------- restore pieces
@contextlib.contextmanager
def quiet_failed_reads():
  """Orbax dumps whole TensorStore specs (hundreds of lines) from leaked tasks when a read fails;
  our one-line WARNING says what matters, so drop that noise while we probe a checkpoint."""
  asyncio_logger = py_logging.getLogger('asyncio')
  old_level, old_hook = asyncio_logger.level, sys.unraisablehook
  asyncio_logger.setLevel(py_logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = old_hook
    asyncio_logger.setLevel(old_level)


def short_error(e: BaseException) -> str:
  """One line: the error and its root cause (Orbax wraps TensorStore's useful message)."""
  def one(x):
    msg = ' '.join(str(x).split()).split(' See full TensorStore details')[0]
    return f'{type(x).__name__}: {msg[:240]}'
  chain, x = [e], e
  while (x.__cause__ or x.__context__) is not None and len(chain) < 8:
    x = x.__cause__ or x.__context__
    chain.append(x)
  return one(e) if len(chain) == 1 else f'{one(e)} (caused by {one(chain[-1])})'


def _is_resource_error(e: BaseException) -> bool:
  while e is not None:
    if isinstance(e, MemoryError) or 'RESOURCE_EXHAUSTED' in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _restore_step_dir(step_dir, abstract_state, data_iter=None, expected_step=None):
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
    if _is_resource_error(e):
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


def _restore_first_good(step_dirs, abstract_state, data_iter, quarantine: bool):
  """Tries (step, dir) pairs newest first. Returns (state, step, info) or (None, None, skipped)."""
  saved_iter_state = data_iter.get_state() if data_iter is not None else None
  skipped = []
  for step, step_dir in step_dirs:
    try:
      state, metadata, config = _restore_step_dir(step_dir, abstract_state, data_iter, step)
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


def _step_dirs(ckpt_dir: epath.Path) -> list:
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
  dirs = _step_dirs(ckpt_dir)
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
    state, metadata, config = _restore_step_dir(step_dir, abstract_state, data_iter)
    step = int(metadata['step'])
    return state, step, RestoreInfo('restored', step, str(step_dir), [], metadata, config)
  state, step, info = _restore_first_good(candidates, abstract_state, data_iter, quarantine=False)
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
  from ccf_jax import arch as arch_lib  # pylint: disable=g-import-not-at-top
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


# --------------------------------------------------------------------------------- the manager
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
  and `async_save`. Keyword arguments override the config (handy in tests and tools).
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
    policies = [ocp.checkpoint_managers.LatestN(self.keep_last if self.keep_last > 0 else None)]
    if self.keep_every > 0:
      policies.append(ocp.checkpoint_managers.EveryNSteps(self.keep_every))
    options = ocp.CheckpointManagerOptions(
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

  def wait(self):
    """Blocks until pending async saves are committed (re-raises their errors)."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # --------------------------------------------------------------------------------- restoring
  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores one specific step (no fallback): (state, info)."""
    self.wait()
    step_dir = self.step_dir(step)
    state, metadata, config = _restore_step_dir(step_dir, abstract_state, data_iter, step)
    return state, RestoreInfo('restored', step, str(step_dir), [], metadata, config)

  def restore_or_init(self, abstract_state, init_fn: Callable[[], Any], data_iter=None):
    """Resumes from the latest good checkpoint, else `init_fn()` at step 0: (state, step, info).

    `abstract_state`: pytree of jax.ShapeDtypeStruct with `.sharding` (arrays are placed exactly
    there, whatever mesh saved them). `data_iter` (grain DatasetIterator) is positioned in place.
    Corrupt checkpoints are renamed `<step>.corrupt` with a WARNING and the previous one is tried;
    a checkpoint that does not fit `abstract_state` raises CheckpointMismatchError.
    """
    self.wait()
    candidates = _step_dirs(self.directory)
    state, step, result = _restore_first_good(candidates, abstract_state, data_iter,
                                              quarantine=True)
    self._manager.reload()  # Quarantined steps must leave Orbax's cached step list.
    if state is not None:
      logging.info('Resumed: %s', result)
      return state, step, result
    if result:
      logging.error('No usable checkpoint in %s (all %d were corrupt and moved aside); starting '
                    'from scratch.', self.directory, len(result))
    return init_fn(), 0, RestoreInfo('initialized', 0, None, result)
