"""One comparison report from several evaluation runs (what ./launch/local_suite.sh writes).

    python -m ccf_jax.eval.compare --runs=EVAL_DIR1,EVAL_DIR2,... --out=DIR

Each run is a directory written by `python -m ccf_jax.evaluate` (its results.json). The report puts
the models side by side: a headline table (held-out and streaming perplexity, passkey accuracy,
reconstruction ROUGE-L), perplexity of the last N tokens given K for every setting of every model
(rows K), the efficiency headline of the CCF runs, and plots of all models together (perplexity vs
context length and vs position). Perplexities are only put side by side when every run used the
same tokenizer (checked by its SHA-256; otherwise the report says so and leaves them apart), as the
numbers are token level.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from ccf_jax.eval import common as ec
from ccf_jax.eval import report as er


def load_runs(dirs) -> list:
  runs = []
  for d in dirs:
    path = os.path.join(d, 'results.json')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} does not exist. Fix: run python -m ccf_jax.evaluate '
                              f'--checkpoint=EXPORT --out={d} first.')
    with open(path) as f:
      runs.append(json.load(f))
  return runs


def _mean_cells(rows, kind):
  """Mean per-digit accuracy over the computed passkey cells of the first (memory-on) row."""
  if not rows:
    return None
  vals = [c[kind]['per_digit_accuracy'] for c in rows[0]['cells'].values()
          if not ec.is_na(c) and kind in c]
  return (sum(vals) / len(vals), len(vals)) if vals else None


def summary_rows(runs) -> list:
  out = ['| model | arch | params | step | held-out windows ppl | streaming ppl (tokens) | '
         'passkey greedy / TF per digit (cells) | AE ROUGE-L (tokens) |',
         '|---|---|---|---|---|---|---|---|']
  for r in runs:
    m = r['meta']
    win = r.get('ppl', {}).get('windows', {}).get('test', {})
    stream = r.get('ppl', {}).get('streaming', [])
    stream = (f"{stream[0]['ppl_total']:.2f} ({stream[0]['scored_up_to']})" if stream else '-')
    pk = r.get('passkey', {}).get('rows', [])
    g, t = _mean_cells(pk, 'greedy'), _mean_cells(pk, 'teacher_forced')
    pk_s = f'{g[0]:.2f} / {t[0]:.2f} ({g[1]})' if g else '-'
    ae = r.get('ae', {})
    ae_s = (' / '.join(f"{row['greedy']['rouge_l_tokens']:.3f}" for row in ae['rows'])
            if ae and not ec.is_na(ae) else 'n/a')
    out.append(f"| {m['name']} | {m['label']} | {er._fmt(m['checkpoint'].get('num_params'))} | "
               f"{m['checkpoint']['step']} | {er._fmt(win.get('ppl'))} | {stream} | {pk_s} | "
               f'{ae_s} |')
  return out


def last_n_rows(runs) -> list:
  """Rows K, one column per (model, setting); K values of the first run."""
  cols = [(r['meta']['name'], row) for r in runs if 'ppl' in r for row in r['ppl']['last_n']]
  if not cols:
    return []
  ks = runs[0]['ppl']['ks']
  notes = er._Notes()
  names = [f'{n}: {row["name"]}' if row['name'] not in n else n for n, row in cols]
  out = ['| K | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(cols)]
  for k in ks:
    cells = [er._ppl_cell(row['cells'].get(str(k), ec.na('not measured')), notes)
             for _, row in cols]
    out.append(f'| {k} | ' + ' | '.join(cells) + ' |')
  return out + [''] + notes.lines()


def _first_row(runs, arch):
  """(name, first last-N row, scored tails' ends) of the first run exported as `arch`, or None."""
  for r in runs:
    if r['meta']['arch'] == arch and r.get('ppl', {}).get('last_n'):
      return r['meta']['name'], r['ppl']['last_n'][0], r['ppl'].get('tail_ends')
  return None


def _paired(a: dict, b: dict):
  """(mean, standard error) of the per-tail loss differences a - b, or None when the two cells
  were not measured on the same tails."""
  import numpy as np
  x, y = a.get('doc_losses'), b.get('doc_losses')
  if not x or not y or len(x) != len(y):
    return None
  d = np.asarray(x) - np.asarray(y)
  return float(d.mean()), ec.stderr(d)


def gap_rows(runs) -> list:
  """The fraction of the segment_local -> full_attention gap each CCF setting closes, per K where
  full attention was measured: (segment_local - ccf) / (segment_local - full_attention) of the
  token-level losses, with the paired differences (nats, standard error over the scored tails)."""
  local, full = _first_row(runs, 'segment_local'), _first_row(runs, 'full_attention')
  if not local or not full:
    return []
  base = local[1]['cells']['0']
  out = [f'Gap closed: (`{local[0]}` - CCF) / (`{local[0]}` - `{full[0]}`), losses of the last N '
         'tokens at each K; the paired differences are in nats, +- their standard error over the '
         'scored tails (the same tails for every model).', '',
         '| CCF setting | K | gap closed | segment_local - CCF | CCF - full attention |',
         '|---|---|---|---|---|']
  for r in runs:
    if r['meta']['arch'] != 'ccf' or 'ppl' not in r:
      continue
    for row in r['ppl']['last_n']:
      if row['memory'] != 'on':
        continue
      for k, cell in row['cells'].items():
        f = full[1]['cells'].get(k)
        if k == '0' or ec.is_na(cell) or f is None or ec.is_na(f):
          continue
        gap = base['loss'] - f['loss']
        frac = f"{(base['loss'] - cell['loss']) / gap:.3f}" if gap > 0 else 'n/a (no gap)'
        same = local[2] == full[2] == r['ppl'].get('tail_ends')  # Else not paired.
        pairs = [_paired(base, cell), _paired(cell, f)] if same else [None, None]
        diffs = ['-' if p is None else f'{p[0]:+.4f} +- {p[1]:.4f}' for p in pairs]
        out.append(f"| {r['meta']['name']}: {row['name']} | {k} | {frac} | {diffs[0]} | "
                   f'{diffs[1]} |')
  return out + ['']


def efficiency_rows(runs) -> list:
  out = []
  for r in runs:
    e = r.get('efficiency')
    if not e or not e.get('headline'):
      continue
    out += [f"CCF / full attention, measured with `{r['meta']['name']}` (batch 1):", '']
    out += er.headline_table(e)
  return out


def compare(dirs, out_dir: str, title: str = 'Comparison') -> str:
  """Writes comparison.md (+ plots) into out_dir; returns its path."""
  runs = load_runs(dirs)
  os.makedirs(out_dir, exist_ok=True)
  shas = {r['meta']['tokenizer']['sha256'] for r in runs}
  same_tok = len(shas) == 1
  lines = [f'# {title}', '',
           'Runs: ' + ', '.join(f"`{r['meta']['name']}` ({r['meta']['preset']}, `{d}`)"
                                for r, d in zip(runs, dirs)), '',
           (f"Tokenizer `{os.path.basename(runs[0]['meta']['tokenizer']['path'])}` (sha256 "
            f"{runs[0]['meta']['tokenizer']['sha256'][:12]}) for every run: perplexities are "
            'comparable (token level).' if same_tok else
            '**The runs use different tokenizers: their perplexities are not comparable.**'), '',
           '## Headline', ''] + summary_rows(runs) + ['']
  lines += ['Passkey cells averaged over the computed (not n/a) cells of each model\'s first row; '
            f"chance 0.10 per digit. {er.DAGGER}: beyond the trained positions.", '']
  if same_tok:
    n_tail = runs[0].get('ppl', {}).get('n_tail')
    lines += [f'## Perplexity of the last {n_tail} tokens given K context tokens', ''] + \
        last_n_rows(runs) + gap_rows(runs)
  lines += ['## Efficiency', ''] + (efficiency_rows(runs) or ['(no efficiency section)', ''])
  plt = er._plt()
  if same_tok and all('ppl' in r for r in runs):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
      er.plot_last_n(ax, r['ppl'], f"{r['meta']['name']}: ")
    ax.set_title('perplexity of the last N tokens vs K')
    fig.tight_layout(), fig.savefig(os.path.join(out_dir, 'ppl_vs_context.png'), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [(r['meta'], row) for r in runs for row in r['ppl']['streaming']]
    for i, (meta, row) in enumerate(rows):
      er.plot_position(ax, row, meta['segment_len'], f'C{i % 10}', f"{meta['name']}: {row['name']}")
    ax.set_xscale('log')
    ax.set_xlabel('position (tokens, log)'), ax.set_ylabel('perplexity'), ax.legend(fontsize=6)
    ax.set_title('streaming perplexity vs position')
    fig.tight_layout(), fig.savefig(os.path.join(out_dir, 'ppl_vs_position.png'), dpi=110)
    plt.close(fig)
    lines += ['![perplexity vs context](ppl_vs_context.png)', '',
              '![perplexity vs position](ppl_vs_position.png)', '']
  path = os.path.join(out_dir, 'comparison.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path


_RUNS = flags.DEFINE_list('runs', None, 'Evaluation directories (each with results.json).')
_OUT = flags.DEFINE_string('out', None, 'Where comparison.md and its plots go.')
_TITLE = flags.DEFINE_string('title', 'Comparison', 'Title of the report.')


def main(argv):
  if len(argv) > 1 or not _RUNS.value or not _OUT.value:
    raise app.UsageError('usage: python -m ccf_jax.eval.compare --runs=DIR1,DIR2 --out=DIR')
  print(f'comparison: {compare(_RUNS.value, _OUT.value, _TITLE.value)}', flush=True)


if __name__ == '__main__':
  from ccf_jax.core import config_lib
  app.run(main, flags_parser=config_lib.parse_flags)
