"""The data cache under `$CCF_DATA`, atomic writes, fingerprints and `DataError`.

Everything the data pipeline derives from a corpus (the extracted built-in corpus, trained
tokenizers, token arrays) is cached under one directory, `$CCF_DATA` (default
`~/.cache/ccf_jax`), so that a warm start costs seconds and nothing is downloaded at run time
except the built-in corpus on first use.

Why atomic writes: several processes may build the same cache entry at the same time (the
processes of a multi-host run on a shared file system, parallel test runs, a training run next to
an evaluation). Every entry is written under a unique temporary name in the same directory and
then renamed into place with `os.replace`, which is atomic on POSIX: a reader sees either no file
or a complete one, never a partial one, and two writers of the same (deterministic) content simply
race to an identical result. A crash mid-write leaves at most a stray `*.tmp-*` file behind.

Why fingerprints: cache keys must change whenever the content they were derived from changes
(a corpus file edited, a different tokenizer, a new version of the split table), and must be cheap
to compute on a warm start. `file_fingerprint` therefore hashes file metadata (path, size,
mtime) rather than content for user corpora; tokenizers are hashed by content (they are small).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterable, Iterator

# Bump when the cached formats change: old entries are then simply ignored (new keys).
CACHE_VERSION = 1


class DataError(ValueError):
  """Bad data input or data configuration.

  The message names the offending file (or config field) and says how to fix it. A subclass of
  ValueError so that callers that validate configs with `except ValueError` also catch it.
  """


def data_dir() -> str:
  """Returns the cache root: `$CCF_DATA`, default `~/.cache/ccf_jax` (created if needed)."""
  root = os.environ.get('CCF_DATA') or os.path.join(os.path.expanduser('~'), '.cache', 'ccf_jax')
  root = os.path.abspath(os.path.expanduser(root))
  try:
    os.makedirs(root, exist_ok=True)
  except OSError as e:
    raise DataError(f'Cannot create the data cache directory {root!r} ({e}). Set $CCF_DATA to a '
                    'writable directory.') from e
  return root


def subdir(*parts: str) -> str:
  """Returns `data_dir()/parts...`, created if needed."""
  path = os.path.join(data_dir(), *parts)
  os.makedirs(path, exist_ok=True)
  return path


def _tmp_name(path: str) -> str:
  d, base = os.path.split(path)
  fd, tmp = tempfile.mkstemp(prefix=f'.{base}.tmp-', dir=d or '.')
  os.close(fd)
  return tmp


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path next to `path`; renames it onto `path` if the block succeeds.

  For writers that insist on opening the file themselves (sentencepiece, ArrayRecord).
  """
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = _tmp_name(path)
  try:
    yield tmp
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; cache entries may be shared.
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically (see the module docstring)."""
  with atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(data)


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + '\n').encode('utf-8'))


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
  """Yields a temporary directory that replaces `path` when the block succeeds.

  If another process created `path` in the meantime, its copy is kept and ours is discarded
  (both are built deterministically from the same input).
  """
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.tmp-', dir=parent)
  try:
    yield tmp
    os.chmod(tmp, 0o755)
    try:
      os.rename(tmp, path)
    except OSError:
      if not os.path.isdir(path):
        raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str) -> Any:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def hash_strings(parts: Iterable[Any], n: int = 16) -> str:
  """Short stable hex digest of a sequence of values (repr'd); used for cache keys."""
  h = hashlib.sha256()
  for p in parts:
    h.update(repr(p).encode('utf-8'))
    h.update(b'\0')
  return h.hexdigest()[:n]


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def file_fingerprint(paths: Iterable[str]) -> str:
  """Cheap fingerprint of files by (absolute path, size, mtime_ns): changes when any is edited."""
  parts = []
  for p in sorted(paths):
    st = os.stat(p)
    parts.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
  return hash_strings(parts)


def safe_name(s: str, n: int = 40) -> str:
  """A file-name-safe, readable prefix for cache entries (the hash carries uniqueness)."""
  keep = ''.join(ch if ch.isalnum() or ch in '-_.' else '_' for ch in s.strip('/').split('/')[-1])
  return keep[:n] or 'corpus'
