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
import functools
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


def _mix_sum(u, idx, valid=None):
  """sum_i fmix32(u[i] ^ hash(idx[i])) mod 2^32 over uint32 words `u` at flat positions `idx`.

  murmur3's fmix32 of (bits xor position hash) is a bijection per position, so any change of one
  element changes exactly one term (every 1-bit flip is caught), and, being non-linear, a
  systematic change (e.g. every value doubled) does not cancel out in the sum. The sum splits
  over any partition of the positions, which the host path below uses."""
  h = u ^ (idx * jnp.uint32(0x9E3779B1))
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  h = h ^ (h >> 16)
  if valid is not None:
    h = jnp.where(valid, h, jnp.uint32(0))
  return jnp.sum(h, dtype=jnp.uint32)


def _words(x):
  """The uint32 words hashed for `x`: bits widened for 1/2-byte types, a trailing dim of 2 for
  8-byte ones, key data for PRNG keys."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return lax.bitcast_convert_type(x, uint).astype(jnp.uint32)


@jax.jit
def _leaf_fingerprint(x):
  """The checksum of a whole (possibly sharded) array; exact under any sharding."""
  u = _words(x)
  idx = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(u.ndim)):  # Flat index without a reshape (no resharding of the input).
    idx = idx + lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
    stride *= u.shape[d]
  return _mix_sum(u, idx)


@jax.jit
def _chunk_fingerprint(chunk, offset, n):
  """The checksum's terms for the first `n` elements of a 1-D host chunk starting at flat
  position `offset` (chunks are padded to a power of two, so few sizes compile)."""
  i = lax.iota(jnp.uint32, chunk.shape[0])
  return _mix_sum(_words(chunk), offset + i, valid=i < n)


@functools.partial(jax.jit, static_argnames='size')
def _slice_fingerprint(x, start, *, size):
  """The terms for flat positions [start, start + size) of a single-device array, read in place
  (a row-major reshape is a bitcast). dynamic_slice clamps a slice that would run past the end
  back inside it; positions before `start` are then masked out, as an earlier slice counted them."""
  n = x.size
  lo = jnp.minimum(start, n - size).astype(jnp.uint32)
  idx = lo + lax.iota(jnp.uint32, size)
  chunk = lax.dynamic_slice(x.reshape(-1), (lo,), (size,))
  return _mix_sum(_words(chunk), idx, valid=idx >= start.astype(jnp.uint32))


# Elements per chunk: XLA:CPU materialises the hashed words before the reduction, so hashing a
# whole array at once needs several times its size in temporaries; chunks bound them.
_CHUNK = 1 << 22


def _fingerprint_leaf(x) -> int:
  """One leaf's checksum: numpy in padded chunks of zero-copy views; a large single-device array
  in slices read in place; anything else (sharded, PRNG keys, bool, 8-byte) whole, on device."""
  kind = np.dtype(x.dtype) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else None
  chunkable = kind is not None and kind != np.bool_ and kind.itemsize in (1, 2, 4)
  if chunkable and isinstance(x, (np.ndarray, np.generic)):
    flat, total = np.asarray(x).reshape(-1), 0
    for start in range(0, flat.size, _CHUNK):
      chunk = flat[start:start + _CHUNK]
      n = chunk.size
      size = min(_CHUNK, 1 << max(n - 1, 0).bit_length())
      if size != n:
        chunk = np.concatenate([chunk, np.zeros(size - n, chunk.dtype)])
      total += int(_chunk_fingerprint(chunk, np.uint32(start % 2**32), np.uint32(n)))
    return total % 2**32
  if chunkable and len(x.sharding.device_set) == 1 and _CHUNK < x.size < 2**31:
    total = sum(int(_slice_fingerprint(x, np.int32(start), size=_CHUNK))
                for start in range(0, x.size, _CHUNK))
    return total % 2**32
  return int(np.asarray(_leaf_fingerprint(x).addressable_data(0)))


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
  # One leaf at a time, host arrays in chunks: the extra memory is one chunk, not the tree.
  return {k: _fingerprint_leaf(x) for k, x in flat}


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
