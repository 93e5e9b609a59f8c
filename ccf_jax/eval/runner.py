"""`python -m ccf_jax.evaluate --checkpoint=EXPORT [--corpus=...] [--only=ppl,passkey,ae,efficiency]
[--preset=quick|full] [--out=DIR]`

Measures an export the same way whatever its architecture (CCF, segment_local, full_attention, or a
plain decoder) and writes one directory per run:
  results.json   every number, with the config, checkpoint step, tokenizer, machine and versions;
  report.md      the tables (eval/report.markdown), plus PNG plots next to it.
Sections (each in its own module, each documenting its protocol):
  ppl         last-N given K, streaming perplexity vs position, held-out windows (eval/ppl.py);
  passkey     lengths x depths, greedy and teacher-forced per-digit accuracy (eval/passkey.py);
  ae          reconstruct a compressed segment: accuracy, exact match, ROUGE-L (eval/autoencode.py);
  efficiency  prefill/decode/train tokens/s, cache bytes and memory vs context (eval/efficiency.py).
`--only` runs some sections and merges them into the directory's existing results.json (same
export), so one section can be re-run without redoing the others; report and plots are rebuilt from
the merged results.

Presets. `quick` is what ./launch/local.sh runs after training (about 2 minutes on 2 CPU cores for
experiments/tiny_ccf.py): 2 documents, K up to 8 segments, 16-segment streaming, a 2 x 3 passkey
grid, 8 reconstructed segments, efficiency at 1k and 2k without the training step. `full` is what
./launch/local_suite.sh runs: every test document, K up to the document length, 128-segment
streaming, a 6 x 5 passkey grid with memory-off controls, 64 segments, efficiency from 1k upward
with the training step. `long` is the long-context evaluation (launch/recipes/passkey_long.sh):
passkey at 32, 128, 256 and 512 segments (4,096 to 65,536 tokens at l=128) x 11 depths in the
test split's own text, greedy only (the streaming engine encodes the context and decodes only the
question's segment), read through the export's memory and through a 31-segment memory window,
with the memory-off control. Sizes are in segments where they define the model's context, so they
scale with the segment length.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

from ccf_jax.eval import autoencode as eval_ae
from ccf_jax.eval import efficiency as eval_efficiency
from ccf_jax.eval import passkey as eval_passkey
from ccf_jax.eval import ppl as eval_ppl
from ccf_jax.eval import common as ec
from ccf_jax.eval import report as eval_report

SECTIONS = ('ppl', 'passkey', 'ae', 'efficiency')

PRESETS = {
    'quick': {
        'ppl': dict(split='test', docs=2, n_tail_segments=1, k_max_segments=8, stream_segments=16,
                    doc_batch=2, window_batches=2),
        'passkey': dict(length_segments=[2, 8], depths=[0.0, 0.5, 1.0], batch=4, digits=5,
                        seed=0, controls=False),
        'ae': dict(split='test', docs=2, segments=8, batch=8),
        'efficiency': dict(lengths=[1024, 2048], decode_steps=8, train_steps=0, max_seconds=60.0),
    },
    'full': {
        'ppl': dict(split='test', docs=64, n_tail_segments=1, k_max_segments=1 << 16,
                    stream_segments=128, doc_batch=4, window_batches=32),
        'passkey': dict(length_segments=[1, 2, 4, 8, 16, 32], depths=[0.0, 0.25, 0.5, 0.75, 1.0],
                        batch=16, digits=5, seed=0, controls=True),
        'ae': dict(split='test', docs=64, segments=64, batch=16),
        'efficiency': dict(lengths=[1024, 2048, 4096, 8192, 16384, 32768], decode_steps=16,
                           train_steps=2, max_seconds=300.0),
    },
    'long': {  # Long context: passkey at 4k-64k tokens (passkey_long.sh), perplexity vs K to 16k.
        'ppl': dict(split='test', docs=8, n_tail_segments=1, k_max_segments=128, tails_per_doc=16,
                    stream_segments=128, doc_batch=4, window_batches=8),
        'passkey': dict(length_segments=[32, 128, 256, 512],
                        depths=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], batch=8,
                        digits=5, seed=0, controls=True, teacher_forced=False, filler='corpus',
                        memory_windows=[None, 31]),
        'ae': dict(split='test', docs=16, segments=64, batch=16),
        'efficiency': dict(lengths=[4096, 16384, 32768, 65536], decode_steps=8, train_steps=0,
                           max_seconds=300.0),
    },
}


def _section_modules():
  return {'ppl': eval_ppl, 'passkey': eval_passkey, 'ae': eval_ae, 'efficiency': eval_efficiency}


def metadata(model, preset: str) -> dict:
  """Everything needed to reproduce or compare a run: export, config, step, tokenizer, machine."""
  import flax
  import jax
  import jaxlib
  import numpy as np
  import optax
  import orbax.checkpoint

  tok = model.tokenizer
  return {
      'export': model.export_dir, 'preset': preset, 'arch': model.exported_arch,
      'label': model.label, 'name': model.config.name, 'ratios': list(model.ratios),
      'segment_len': model.segment_len, 'trained_tokens': model.trained_tokens,
      'checkpoint': {'step': model.info.get('step'), 'source': model.info.get('source'),
                     'num_params': model.info.get('num_params')},
      'tokenizer': {'path': tok.model_path, 'kind': tok.kind, 'sha256': tok.sha256,
                    'vocab_size': tok.vocab_size},
      'config': model.config.to_dict(),
      'machine': {'platform': platform.platform(), 'python': platform.python_version(),
                  'cpus': os.cpu_count(), 'device': str(jax.devices()[0].device_kind),
                  'backend': jax.default_backend(),
                  'memory_available_gb': round(ec.available_bytes() / 1e9, 1)},
      'versions': {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
                   'optax': optax.__version__, 'numpy': np.__version__,
                   'orbax': getattr(orbax.checkpoint, '__version__', '?')},
  }


def section_params(preset: str, section: str, segment_len: int, overrides: dict | None = None):
  """The preset's parameters of a section, segment counts turned into tokens where needed."""
  p = dict(PRESETS[preset][section])
  p.update((overrides or {}).get(section, {}))
  if section == 'ppl':
    p['k_max'] = p.pop('k_max_segments') * segment_len
    p['stream_tokens'] = p.pop('stream_segments') * segment_len
  return p


def _load_previous(path: str, meta: dict) -> dict:
  """The sections of an earlier run in this directory, if it measured the same export at the same
  step with the same tokenizer and corpus (what --only merges into); else nothing."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    old = json.load(f)
  prev = old.get('meta', {})
  same = (prev.get('export') == meta['export'] and prev.get('checkpoint') == meta['checkpoint']
          and prev.get('tokenizer', {}).get('sha256') == meta['tokenizer']['sha256']
          and prev.get('config', {}).get('data') == meta['config']['data'])
  if not same:
    print(f'[eval] {path} is from another export, step, tokenizer or corpus; starting a new '
          'results.json', flush=True)
    return {}
  return old


def run(export_dir: str, out_dir: str, only=SECTIONS, preset: str = 'quick',
        corpus: str | None = None, overrides: dict | None = None, mesh_sizes=None) -> dict:
  """Runs the sections `only` and writes results.json, report.md and plots into out_dir; with
  `mesh_sizes` (data, fsdp, tensor) the export is sharded over every device (`ec.load`)."""
  unknown = [s for s in only if s not in SECTIONS]
  if unknown or preset not in PRESETS:
    raise ValueError(f'unknown section(s) {unknown} or preset {preset!r}; sections {SECTIONS}, '
                     f'presets {tuple(PRESETS)}.')
  t0 = time.time()
  model = ec.load(export_dir, corpus, mesh_sizes)
  print(f'[eval] {model.label} ({model.config.name}, step {model.info.get("step")}) from '
        f'{export_dir}; preset {preset}; sections {",".join(only)}', flush=True)
  path = os.path.join(out_dir, 'results.json')
  meta = json.loads(json.dumps(metadata(model, preset), default=str))  # As results.json holds it.
  results = _load_previous(path, meta)
  results['meta'] = meta
  timing = results.setdefault('timing_s', {})
  timing['load'] = round(time.time() - t0, 2)
  modules = _section_modules()
  for name in SECTIONS:
    if name not in only:
      continue
    t = time.time()
    results[name] = modules[name].run(model, section_params(preset, name, model.segment_len,
                                                            overrides))
    results[name]['preset'] = preset
    timing[name] = round(time.time() - t, 2)
    print(f'[eval] {name} done in {timing[name]:.1f}s', flush=True)
  results['meta']['updated'] = datetime.datetime.now().isoformat(timespec='seconds')
  results['meta']['command'] = ' '.join(sys.argv) if sys.argv else ''
  os.makedirs(out_dir, exist_ok=True)
  plots = eval_report.plots(results, out_dir)
  timing['total_last_run'] = round(time.time() - t0, 2)
  with open(path + '.tmp', 'w') as f:
    json.dump(results, f, indent=1, default=str)
  os.replace(path + '.tmp', path)
  with open(os.path.join(out_dir, 'report.md'), 'w') as f:
    f.write(eval_report.markdown(results, plots))
  return results
