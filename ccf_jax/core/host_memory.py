"""Host memory of this process: its peak, and handing freed heap back to the OS.

XLA:CPU compiles through LLVM, whose many small allocations land in glibc's heap; freed, they stay
mapped (glibc returns only the top of the heap), and a 135M-parameter train step's compile leaves
about 0.45 GB resident that the step's own buffers then stack on (WORKSPACE "Peak memory").
`release_freed` asks glibc to unmap every free page (`malloc_trim(0)`): it costs milliseconds, moves
no live data, and is a no-op where the C library has no such call (macOS, musl).
"""

from __future__ import annotations

import ctypes
import functools
import resource


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB.


@functools.cache
def _malloc_trim():
  try:
    trim = ctypes.CDLL(None).malloc_trim  # The C library this process already runs on.
  except (OSError, AttributeError):
    return None
  trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
  return trim


def release_freed() -> bool:
  """Returns freed heap pages to the OS; False where the C library cannot."""
  trim = _malloc_trim()
  if trim is None:
    return False
  trim(0)
  return True
