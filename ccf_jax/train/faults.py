"""Faults that must never cost good work: exit codes, the workdir lock, storage checks, and the
one-line error reporting every entry point shares.

Exit codes (README "Where outputs go" documents them for schedulers):

  0   finished: train.steps reached, or train.time_budget_s spent (a checkpoint was written).
  1   an error in the input (config, data, checkpoint, export, flags): one line naming the fix.
  3   diverged: a non-finite loss, gradient or update, an update over train.max_update_ratio, or
      a loss over train.divergence_factor times its best (`LossWatch`); the bad state was not
      saved, the last good checkpoint is kept.
  73  the workdir is locked by another live run (EX_CANTCREAT).
  74  a storage fault: a path not writable, a read-only file system, a full disk (EX_IOERR).
  75  stopped by SIGTERM after a checkpoint: resumable, run the same command again (EX_TEMPFAIL).

No JAX here: the entry points import this before anything heavy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from typing import Iterable, Optional

from absl import logging

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_DIVERGED = 3
EXIT_LOCKED = 73
EXIT_STORAGE = 74
EXIT_PREEMPTED = 75

LOCK_FILE = '.lock'
STORAGE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)


class StorageError(OSError):
  """A path that cannot be written (permissions, read-only file system, full disk)."""
  exit_code = EXIT_STORAGE

  def __str__(self):
    return str(self.strerror)


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir's lock."""
  exit_code = EXIT_LOCKED


def storage_errno(e: BaseException) -> Optional[int]:
  """The errno of a storage fault anywhere in `e`'s cause/context chain, else None.

  Besides OSErrors this reads TensorStore's errors (raised as ValueError by Orbax's array
  writes, e.g. a disk filling up in the middle of a save), which carry the errno as
  `[os_error_code='28']`."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
      return e.errno
    m = re.search(r"os_error_code='?(\d+)", str(e)) if not isinstance(e, OSError) else None
    if m and int(m.group(1)) in STORAGE_ERRNOS:
      return int(m.group(1))
    e = e.__cause__ or e.__context__
  return None


def free_bytes(path) -> Optional[int]:
  """Free bytes on the file system holding `path` (its nearest existing parent), or None."""
  path = os.path.abspath(str(path))
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def describe_storage_fault(e: BaseException, path, needed: Optional[int] = None) -> str:
  """One line: what failed where, the space needed against the space free, and the fix."""
  code = storage_errno(e)
  free = free_bytes(path)
  if code == errno.ENOSPC or code == errno.EDQUOT:
    need = f'{needed:,} bytes needed, ' if needed else ''
    space = f' ({need}{free:,} free)' if free is not None else ''
    return (f'no space left writing {path}{space}. Fix: free space there or pass another '
            '--workdir; the earlier checkpoints are intact, rerun to resume.')
  if code == errno.EROFS:
    return (f'{path} is on a read-only file system. Fix: pass a --workdir on writable storage '
            '(the earlier checkpoints are intact).')
  return (f'cannot use {path}: {os.strerror(code) if code else e}. Fix: make it writable '
          '(permissions, owner) or pass another --workdir.')


def is_local(path) -> bool:
  """A path of this machine's file systems (not a URL such as gs://bucket/dir)."""
  return '://' not in str(path)


def check_writable(*paths) -> None:
  """Creates each local directory and writes a probe file in it; StorageError names the first
  that fails and the fix. Called before the data pipeline is built. URLs are left to the
  checkpoint manager's own probe before each save."""
  for path in paths:
    if not is_local(path):
      continue
    path = os.path.abspath(str(path))
    try:
      os.makedirs(path, exist_ok=True)
      probe = os.path.join(path, f'.write_probe.{socket.gethostname()}.{os.getpid()}')
      with open(probe, 'wb') as f:
        f.write(b'0')
      os.remove(probe)
    except OSError as e:
      if isinstance(e, (NotADirectoryError, FileExistsError)):
        raise StorageError(e.errno, f'{path} is not a directory (a file is in the way). Fix: '
                           'pass a --workdir that is a directory or does not exist yet.') from None
      raise StorageError(e.errno, describe_storage_fault(e, path)) from None


# ------------------------------------------------------------------------------------- the lock
def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Someone else's live process.
  return True


def _read_owner(path) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      return json.loads(f.read() or '{}')
  except (OSError, ValueError):
    return {}


def _owner_str(owner: dict) -> str:
  if not owner:
    return 'an unknown process'
  started = owner.get('started', '?')
  return f'pid {owner.get("pid", "?")} on host {owner.get("host", "?")} (started {started})'


class WorkdirLock:
  """An exclusive lock on `workdir/.lock` (fcntl.flock), held for the life of a run.

  The file records the owner (host, pid, start time) for the error a second run prints. The
  kernel drops a flock when its holder dies, so a lock file left by a killed run is free: it is
  taken over, and one log line says whose it was (and that the process is gone when it ran on
  this host). The file is removed on release; an acquirer checks that the file it locked is
  still the one at the path, so a release racing an acquire never lets two runs in.
  """

  def __init__(self, workdir):
    self.path = os.path.join(os.path.abspath(str(workdir)), LOCK_FILE)
    self._fd = None

  def acquire(self) -> 'WorkdirLock':
    for _ in range(10):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        owner = _read_owner(self.path)
        raise WorkdirLockedError(
            f'workdir {os.path.dirname(self.path)} is in use by {_owner_str(owner)} (lock file '
            f'{self.path}). Fix: wait for that run to end or stop it, or pass another '
            '--workdir.') from None
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if not same:  # Released and removed between our open and our flock: try the new file.
        os.close(fd)
        continue
      self._fd = fd
      self._report_stale(_read_owner(self.path))
      me = {'host': socket.gethostname(), 'pid': os.getpid(),
            'started': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(me).encode(), 0)
      return self
    raise WorkdirLockedError(f'could not take the lock {self.path} (it kept changing). Fix: check '
                             'that only one run uses this --workdir.')

  @staticmethod
  def _report_stale(owner: dict):
    if not owner or owner.get('pid') == os.getpid():
      return
    here = owner.get('host') == socket.gethostname()
    dead = here and not _pid_alive(int(owner.get('pid', -1)))
    logging.warning('taking over the workdir lock left by %s%s.', _owner_str(owner),
                    ', which is no longer running' if dead else ' (its lock was released)')

  def release(self):
    if self._fd is None:
      return
    try:
      os.remove(self.path)
    except OSError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# ---------------------------------------------------------------------------------- divergence
class LossWatch:
  """Detects a loss that exploded while staying finite, from the losses the loop already fetches.

  The baseline is the best (lowest) exponential moving average of the training loss seen so far:
  the average smooths out single easy batches (a running minimum of raw losses would latch onto
  one and call ordinary batches divergence), and its best value does not follow a slow climb the
  way the average itself would. A step whose loss exceeds `factor * max(best, floor)` is
  divergence: a sudden jump (lr far too high) and a slow climb to that level both cross it, and
  the floor of 1 nat keeps a task trained to a near-zero loss (passkey) from calling a few
  hundredths of a nat a factor of three. Cheap: a few float operations per step on the host.

  Its state travels in each checkpoint's metadata (`state_dict`), so a resumed run keeps the
  baseline of the run it continues rather than taking a diverged state's loss as its reference.
  """

  def __init__(self, factor: float, decay: float = 0.99, floor: float = 1.0,
               state: Optional[dict] = None):
    self.factor, self.decay, self.floor = float(factor), decay, floor
    state = state or {}
    self.ema: Optional[float] = state.get('ema')
    self.best: Optional[float] = state.get('best')

  def check(self, loss: float) -> Optional[str]:
    """Takes one step's (finite) loss; returns why it is divergence, or None and updates the
    baseline."""
    if self.factor <= 0:
      return None
    if self.best is not None and loss > self.factor * max(self.best, self.floor):
      return (f'loss {loss:.4g} exceeds train.divergence_factor={self.factor:g} times its best '
              f'smoothed value {self.best:.4g}')
    self.ema = loss if self.ema is None else self.decay * self.ema + (1 - self.decay) * loss
    self.best = self.ema if self.best is None else min(self.best, self.ema)
    return None

  def state_dict(self) -> dict:
    return {'ema': self.ema, 'best': self.best}


# ------------------------------------------------------------------------- entry-point errors
def exit_code_for(e: BaseException) -> int:
  code = getattr(e, 'exit_code', None)
  if code is not None:
    return int(code)
  if storage_errno(e) is not None:
    return EXIT_STORAGE
  return EXIT_ERROR


def fail(prog: str, e: BaseException, hard: bool = False, prefix: Optional[str] = None):
  """Prints `prog: error (Type): message` (or `prefix + message`) as one line and exits with the
  error's code.

  `hard` exits at once (os._exit): a distributed run must not wait in JAX's shutdown barrier, and
  a storage fault must not run exit handlers that write to the same full disk."""
  msg = ' '.join(str(e).split()) or type(e).__name__
  line = (prefix if prefix is not None else f'{prog}: error ({type(e).__name__}): ') + msg
  code = exit_code_for(e)
  print(line, file=sys.stderr, flush=True)
  if hard or code == EXIT_STORAGE:
    sys.stdout.flush()
    os._exit(code)
  sys.exit(code)


@contextlib.contextmanager
def one_line_errors(prog: str, errors: Iterable[type] = (), hard: bool = False,
                    prefix: Optional[str] = None):
  """Turns the entry point's own errors (`errors`, plus storage faults, missing files and the
  fault classes of this module) into one line and an exit code; anything else keeps its
  traceback."""
  mine = tuple(errors) + (StorageError, WorkdirLockedError)
  try:
    yield
  except mine as e:
    fail(prog, e, hard, prefix)
  except OSError as e:
    if storage_errno(e) is None and not isinstance(e, FileNotFoundError):
      raise
    fail(prog, e, hard, prefix)
