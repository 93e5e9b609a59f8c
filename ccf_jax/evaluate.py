"""`python -m ccf_jax.evaluate --checkpoint=EXPORT [--only=ppl] [--preset=quick|full] [--out=DIR]`.

Measures an export the same way whatever its architecture and writes one directory per run:
`results.json` (every number with config, checkpoint step, tokenizer, machine and versions) and
`report.md` (tables). The `ppl` section is held-out token-level perplexity on the corpus's test
split (with memory on and off for CCF models: `ccf.arch.lm_loss(..., memory='off')`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time

from absl import app, flags

PRESETS = {'quick': {'batches': 4}, 'full': {'batches': 64}}


def load_for_eval(export_dir: str):
  """(config, params, tokenizer_path) from an export, params on the default device."""
  import ml_collections

  from ccf_jax import export as export_lib
  params, config_dict, tok_path = export_lib.load_export(export_dir)
  config = ml_collections.ConfigDict(config_dict)
  config.data.tokenizer = tok_path
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.num_devices = 1, 1, 1, 1
  config.mesh.distributed = False
  return config, params


def heldout_loss(config, params, split: str, max_batches: int, memory: str = 'on') -> dict:
  """Token-level loss over up to `max_batches` batches of a split (single device)."""
  import jax

  from ccf_jax import arch as arch_lib, data as data_lib
  arch = arch_lib.get_arch(config)
  if memory == 'off':
    from ccf_jax.ccf.arch import lm_loss
    step = jax.jit(lambda p, b: lm_loss(config, p, b, 'off'))
  elif arch.eval_loss is not None:
    step = jax.jit(lambda p, b: arch.eval_loss(config, p, b))
  else:
    step = jax.jit(lambda p, b: arch.loss(config, p, b, jax.random.key(0)))
  total, count, correct = 0.0, 0.0, 0.0
  for i, batch in enumerate(data_lib.make_train_iter(config, split, 0, 1)):
    if i >= max_batches:
      break
    s, n, aux = jax.device_get(step(params, {k: v for k, v in batch.items()}))
    total, count, correct = total + float(s), count + float(n), correct + float(aux.get('correct', 0))
  if count == 0:
    return {'loss': float('nan'), 'ppl': float('nan'), 'tokens': 0}
  return {'loss': total / count, 'ppl': math.exp(min(50.0, total / count)),
          'accuracy': correct / count, 'tokens': int(count)}


def run(export_dir: str, out_dir: str, only=('ppl',), preset: str = 'quick') -> dict:
  import jax
  import flax
  import orbax.checkpoint

  config, params = load_for_eval(export_dir)
  from ccf_jax import arch as arch_lib
  arch = arch_lib.get_arch(config)
  p = PRESETS[preset]
  results = {'export': os.path.abspath(export_dir), 'preset': preset, 'config': config.to_dict(),
             'tokenizer': config.data.tokenizer, 'machine': platform.platform(),
             'devices': str(jax.devices()[0].device_kind),
             'versions': {'jax': jax.__version__, 'flax': flax.__version__,
                          'orbax': getattr(orbax.checkpoint, '__version__', '?')}}
  meta_path = os.path.join(export_dir, 'metadata.json')
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      results['checkpoint'] = json.load(f)
  t0 = time.time()
  if 'ppl' in only:
    sec = {'test': heldout_loss(config, params, 'test', p['batches'])}
    if config.model.arch == 'ccf':
      sec['test_memory_off'] = heldout_loss(config, params, 'test', p['batches'], memory='off')
    results['ppl'] = sec
  results['wall_s'] = round(time.time() - t0, 2)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
  with open(os.path.join(out_dir, 'report.md'), 'w') as f:
    f.write(report_markdown(results))
  return results


def report_markdown(r: dict) -> str:
  lines = [f"# Evaluation of `{r['export']}`", '',
           f"model `{r['config']['model']['arch']}` ({r['config']['name']}), tokenizer "
           f"`{os.path.basename(str(r['tokenizer']))}`, preset {r['preset']}, {r['machine']}", '']
  if 'ppl' in r:
    lines += ['## Held-out perplexity (token level, test split)', '',
              '| setting | loss | ppl | accuracy | tokens |', '|---|---|---|---|---|']
    for name, v in r['ppl'].items():
      lines.append(f"| {name} | {v['loss']:.4f} | {v['ppl']:.2f} | {v.get('accuracy', float('nan')):.3f} | {v['tokens']} |")
  return '\n'.join(lines) + '\n'


_CKPT = flags.DEFINE_string('checkpoint', None, 'Export directory (python -m ccf_jax.export).')
_OUT = flags.DEFINE_string('out', None, 'Output directory (default: <checkpoint>/eval).')
_ONLY = flags.DEFINE_list('only', ['ppl'], 'Sections to run.')
_PRESET = flags.DEFINE_enum('preset', 'quick', list(PRESETS), 'Evaluation size.')


def main(argv):
  del argv
  out = _OUT.value or os.path.join(_CKPT.value, 'eval')
  res = run(_CKPT.value, out, tuple(_ONLY.value), _PRESET.value)
  for name, v in res.get('ppl', {}).items():
    print(f"{name}: loss {v['loss']:.4f} ppl {v['ppl']:.2f} ({v['tokens']} tokens)")
  print(f'report: {os.path.join(out, "report.md")}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['checkpoint'])
  app.run(main)
