"""`python -m ccf_jax.bench convert [--convert_source=FILE.gguf|HF_DIR]`: peak host memory of the
import (`python -m ccf_jax.convert`) against the model's size.

An import of N bytes of weights should cost about 2N of host memory at its peak (the loaded
weights plus the memory-mapped shard they are read from, then Orbax's write), never a multiple
of N that rules out a 7B model on a 64 GB host. Each convert runs in its own process and its peak
is that process's ru_maxrss (what the kernel saw, native allocations included).

Without --convert_source it converts random float32 Llama directories of --convert_layers layers
(64 MB shards, as the GGUF importer writes them) and prints each peak and the slope between the
smallest and the largest: bytes of peak memory per byte of model, with the interpreter, the
compilers and Orbax's fixed buffers cancelled out. With --convert_source it converts that file or
directory and prints the peak next to N and to an interpreter that only imports the converter.
Each figure is the lowest of --convert_rounds runs: Orbax's writer threads make a single run's
peak vary by a few tens of MB.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile

from absl import flags
import jax
import numpy as np

from ccf_jax.core import config_lib
from ccf_jax.interop import hf_config, hf_weights

_SOURCE = flags.DEFINE_string('convert_source', '', 'bench convert: a .gguf file or Hugging Face '
                              'directory to convert; empty = random Llama models.')
_LAYERS = flags.DEFINE_list('convert_layers', ['4', '24'], 'bench convert: layers of the random '
                            'models (d 512, mlp 1376, vocab 8000: 4 layers are 83 MB).')
_ROUNDS = flags.DEFINE_integer('convert_rounds', 2, 'bench convert: runs per model; the lowest '
                               'peak is reported.', lower_bound=1)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The random models' shapes (a Llama-2-style block of d 512); only the depth varies.
SHAPE = dict(d_model=512, num_heads=8, num_kv_heads=8, head_dim=64, mlp_dim=1376,
             vocab_size=8000, tie_embeddings=False)


def random_hf_dir(d, num_layers: int, seed: int = 0) -> int:
  """Writes a random float32 Llama checkpoint directory at `d` (64 MB shards); returns N."""
  from experiments import base
  m = base.get_config().model
  m.update(SHAPE, num_layers=num_layers)
  rng = np.random.default_rng(seed)
  params = {}
  for path, shape in hf_weights._expected_shapes(m).items():
    functools.reduce(lambda t, k: t.setdefault(k, {}), path[:-1], params)[path[-1]] = (
        rng.standard_normal(shape, np.float32) * 0.02)
  os.makedirs(d)
  hf_weights.write_shards(hf_weights.params_to_hf_state(params, False), os.fspath(d), 64 << 20)
  with open(os.path.join(d, hf_config.CONFIG), 'w') as f:
    json.dump(hf_config.model_config_to_hf_config(m), f, indent=2)
  return int(sum(a.nbytes for a in jax.tree.leaves(params)))


def peak_rss_bytes(args) -> int:
  """Peak resident memory of `python ARGS` run in a fresh probe process (its child's
  ru_maxrss), so that nothing of this process counts."""
  probe = ('import resource, subprocess, sys; '
           'r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); '
           'print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); '
           'sys.exit(r.returncode)')
  out = subprocess.run([sys.executable, '-c', probe, sys.executable] + list(args),
                       capture_output=True, text=True, cwd=REPO)
  if out.returncode:
    last = (out.stderr.strip().splitlines() or ['(no output)'])[-1]
    raise config_lib.ConfigError(f'python {" ".join(args)} failed: {last}')
  return int(out.stdout.split()[-1])


def _convert_peak(src, work, tag) -> int:
  flag = '--from_gguf' if os.fspath(src).endswith('.gguf') else '--from_hf'
  return min(peak_rss_bytes(['-m', 'ccf_jax.convert', f'{flag}={src}',
                             f'--out={os.path.join(work, f"{tag}-{i}")}'])
             for i in range(_ROUNDS.value))


def bench_convert(config) -> list:
  del config  # The models are the source's or random ones, not an experiment's.
  rows = []
  with tempfile.TemporaryDirectory(prefix='ccf_bench_convert_') as work:
    if _SOURCE.value:
      interpreter = peak_rss_bytes(['-c', 'import jax; from ccf_jax import convert; '
                                   'jax.devices()'])
      peak = _convert_peak(os.path.abspath(_SOURCE.value), work, 'source')
      from ccf_jax.checkpoint import export as export_lib
      params, _, _ = export_lib.load_export(os.path.join(work, 'source-0'))
      n = int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(params)))
      rows.append({'bench': 'convert', 'source': _SOURCE.value, 'model_bytes': n,
                   'peak_rss_bytes': peak, 'interpreter_rss_bytes': interpreter,
                   'peak_over_interpreter_per_model_byte': round((peak - interpreter) / n, 3)})
      return rows
    layers_list = sorted({int(x) for x in _LAYERS.value})
    if len(layers_list) < 2 or layers_list[0] < 1:
      raise config_lib.ConfigError(
          f'--convert_layers={",".join(_LAYERS.value)}: give two or more distinct depths >= 1 '
          '(the slope is taken between the smallest and the largest). Fix: '
          '--convert_layers=4,24.')
    for layers in layers_list:
      src = os.path.join(work, f'hf{layers}')
      n = random_hf_dir(src, layers)
      rows.append({'bench': 'convert', 'layers': layers, 'model_bytes': n,
                   'peak_rss_bytes': _convert_peak(src, work, f'x{layers}')})
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  if rows:
    a, b = rows[0], rows[-1]
    rows.append({'bench': 'convert_slope', 'peak_bytes_per_model_byte': round(
        (b['peak_rss_bytes'] - a['peak_rss_bytes']) / (b['model_bytes'] - a['model_bytes']), 3),
        'target': 'near 2'})
  return rows
