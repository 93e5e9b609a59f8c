"""Test setup: 8 virtual CPU devices, set before JAX is imported anywhere, and one XLA compilation
cache per test session.

Compilation dominates this suite's time (tiny models, short runs). JAX's persistent compilation
cache, in a fresh directory per session (nothing carries over between runs, so no stale entry can
mask a change), lets a program compiled once be loaded by every later test, and by every
subprocess a test launches (the trainer CLI, the launchers, resumed runs), which compile the same
programs again. The environment variables are how JAX's own config reads these options, so the
subprocesses inherit them.
"""

import atexit
import os
import shutil
import sys
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='ccf_jax_test_xla_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
