"""What makes a checkpoint trustworthy: its layout constants, the error classes, per-array
fingerprints and the structure check.

Orbax does not checksum array data: a flipped byte in a chunk file restores silently with a wrong
value (checked on orbax-checkpoint 0.12.8). So every save records a 32-bit positional checksum per
array (computed on device, exact for any sharding) and every restore verifies it. A checkpoint that
reads fine but does not fit the target (different parameter names or shapes: a config change) is
not corruption; `check_compatible` raises `CheckpointMismatchError` for it. The package docstring
(`checkpoint/__init__.py`) describes the whole format.
"""

from __future__ import annotations

import contextlib
import gc
import os
import logging as py_logging
import sys

from absl import logging
from etils import epath
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

STATE, DATA, CONFIG, METADATA = 'state', 'data', 'config', 'metadata'
CHECKPOINTS_SUBDIR = 'checkpoints'
CORRUPT_SUFFIX = '.corrupt'
FORMAT_VERSION = 1


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
  for devices, members in groups.items():
    # Host arrays (an importer's numpy params) go one at a time: a single call would copy all of
    # them, and their uint32 views, at once (twice the model again at the import's peak).
    calls = [members] if devices else [[m] for m in members]
    for call in calls:
      sums = _fingerprint_leaves([x for _, x in call])
      out.update({k: int(np.asarray(s.addressable_data(0))) for (k, _), s in zip(call, sums)})
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


def is_resource_error(e: BaseException) -> bool:
  while e is not None:
    if isinstance(e, MemoryError) or 'RESOURCE_EXHAUSTED' in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


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
