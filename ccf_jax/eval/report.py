"""The evaluation report: markdown tables and matplotlib plots from a results.json (the
comparison of several runs, `python -m ccf_jax.eval.compare`, reuses these pieces).

Reading conventions, stated in every report: perplexities are token level with the named
tokenizer (never compare across tokenizers); a dagger marks a result beyond the positions the model
was trained on; n/a cells carry their reason as a numbered note. Plots use a log scale for context
length, position, throughput and memory (they span orders of magnitude); K = 0 sits on the linear
part of a symlog axis.
"""

from __future__ import annotations

import os

from ccf_jax.eval import common as ec

DAGGER = '\u2020'


class _Notes:
  """Numbered n/a reasons of one table, printed under it."""

  def __init__(self):
    self.items = []

  def ref(self, reason: str) -> str:
    if reason not in self.items:
      self.items.append(reason)
    return f'n/a ({self.items.index(reason) + 1})'

  def lines(self) -> list:
    return [f'({i + 1}) {r}' for i, r in enumerate(self.items)] + ([''] if self.items else [])


def _fmt(x, digits=2) -> str:
  if x is None:
    return '-'
  if isinstance(x, float):
    return f'{x:.{digits}f}' if abs(x) < 1e5 else f'{x:.3g}'
  return str(x)


def _bytes(x) -> str:
  if not isinstance(x, (int, float)):
    return '-'
  for unit, scale in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
    if x >= scale:
      return f'{x / scale:.2f} {unit}'
  return f'{int(x)} B'


def _ppl_cell(cell, notes) -> str:
  if ec.is_na(cell):
    return notes.ref(cell[ec.NA])
  return _fmt(cell['ppl']) + (DAGGER if 'beyond_trained' in cell else '')


# ------------------------------------------------------------------------------------------------
# Markdown.


def _ppl_md(r: dict) -> list:
  p, notes = r['ppl'], _Notes()
  ks = p['ks']
  out = ['## Perplexity', '',
         f"Token level, tokenizer `{os.path.basename(p['tokenizer'])}`; {p['docs']} held-out "
         f"document(s) of `{p['corpus']}` ({p['split']} split, "
         f"{min(p['doc_tokens'])}-{max(p['doc_tokens'])} tokens).", '',
         f"### Last N given K (N = {p['n_tail']} tokens: the {p['targets_per_doc']} predictions "
         'inside the final N tokens of each document, given the K tokens before them; '
         f"{p.get('tails', p['docs'])} scored tails: each document's end and earlier cut points)",
         '',
         '| setting | ' + ' | '.join(f'K={k}' for k in ks) + ' |',
         '|---|' + '---|' * len(ks)]
  for row in p['last_n']:
    out.append(f"| {row['name']} | " + ' | '.join(_ppl_cell(row['cells'][str(k)], notes)
                                                 for k in ks) + ' |')
  beyond = {c['beyond_trained'] for row in p['last_n'] for c in row['cells'].values()
            if isinstance(c, dict) and 'beyond_trained' in c}
  out += [''] + [f'{DAGGER} {b}.' for b in sorted(beyond)] + ([''] if beyond else [])
  out += notes.lines()
  out += ['### Streaming perplexity vs position (whole documents, segment by segment, memory '
          'carried)', '', '| setting | ppl | tokens | scored up to | trained window | limit |',
          '|---|---|---|---|---|---|']
  for row in p['streaming']:
    out.append(f"| {row['name']} | {_fmt(row['ppl_total'])} | {row['tokens_total']} | "
               f"{row['scored_up_to']} | {row['trained_tokens']} | {row['limit'] or '-'} |")
  out += ['', '### Held-out windows (as the trainer evaluates)', '',
          '| setting | loss | ppl | accuracy | tokens |', '|---|---|---|---|---|']
  for name, v in p['windows'].items():
    if ec.is_na(v):
      out.append(f'| {name} | n/a: {v[ec.NA]} | | | |')
    else:
      out.append(f"| {name} | {v['loss']:.4f} | {v['ppl']:.2f} | {v['accuracy']:.3f} | "
                 f"{v['tokens']} |")
  return out + ['']


def _passkey_md(r: dict) -> list:
  p = r['passkey']
  ch = p['chance']
  out = ['## Passkey retrieval', '',
         f"{p['batch']} documents per cell, {p['digits']}-digit keys; chance: per digit "
         f"{_fmt(ch['per_digit_accuracy'])}, exact match {ch['exact_match']:.0e}. Greedy decoding: "
         f"{p['greedy_path']}. Cells: greedy per-digit accuracy / teacher-forced per-digit "
         'accuracy (greedy exact match). Depth 0 = key at the start of the document.', '']
  for row in p['rows']:
    notes = _Notes()
    out += [f"### {row['name']}", '', '| depth \\ length | ' +
            ' | '.join(str(n) for n in p['lengths']) + ' |', '|---|' + '---|' * len(p['lengths'])]
    for d in p['depths']:
      cells = []
      for n in p['lengths']:
        c = row['cells'][f'{n}@{d}']
        if ec.is_na(c):
          cells.append(notes.ref(c[ec.NA]))
        else:
          tf = (f" / {c['teacher_forced']['per_digit_accuracy']:.2f}"
                if 'teacher_forced' in c else ' / -')
          cells.append(f"{c['greedy']['per_digit_accuracy']:.2f}{tf} "
                       f"({c['greedy']['exact_match']:.2f})" + (DAGGER if 'beyond_trained' in c
                                                                else ''))
      out.append(f'| {d} | ' + ' | '.join(cells) + ' |')
    out += [''] + notes.lines()
  return out


def _ae_md(r: dict) -> list:
  a = r['ae']
  if ec.is_na(a):
    return ['## Auto-encoding', '', f'n/a: {a[ec.NA]}', '']
  out = ['## Auto-encoding (compress one segment, reconstruct it from its memory)', '',
         f"{a['segments']} held-out segments, {a['reconstructed_tokens']} tokens reconstructed "
         f"each. ROUGE-L: {a['rouge_l']}." + (f" Note: {a['note']}." if a.get('note') else ''), '',
         '| setting | TF loss | TF token acc | greedy token acc | exact match | ROUGE-L tokens | '
         'ROUGE-L words | BLEU-4 tokens |', '|---|---|---|---|---|---|---|---|']
  for row in a['rows']:
    t, g = row['teacher_forced'], row['greedy']
    out.append(f"| {row['name']} | {t['loss']:.3f} | {t['token_accuracy']:.3f} | "
               f"{g['token_accuracy']:.3f} | {g['exact_match']:.3f} | {g['rouge_l_tokens']:.3f} | "
               f"{g['rouge_l_words']:.3f} | {g.get('bleu4_tokens', float('nan')):.3f} |")
  return out + ['']


def _eff_md(r: dict) -> list:
  e = r['efficiency']
  notes = _Notes()
  out = ['## Efficiency (batch 1, this machine)', '',
         '| arch | context | prefill tok/s | decode tok/s | decode ms/token | cache | '
         'inference XLA temp | train tok/s | train XLA temp | '
         'peak RSS GB (prefill / decode / train) |',
         '|---|---|---|---|---|---|---|---|---|---|']
  for rec in e['records']:
    name = rec['arch'] + (f" {rec['ratio']}x" if rec.get('ratio') else '')
    if 'na' in rec:
      out.append(f"| {name} | {rec['context']} | {notes.ref(rec['na'])} | | | | | | | |")
      continue
    rss = ' / '.join(_fmt(rec.get(k)) for k in ('prefill_peak_rss_gb', 'decode_peak_rss_gb',
                                                 'train_peak_rss_gb'))
    train = (notes.ref(rec['train_na']) if rec.get('train_na')
             else _fmt(rec.get('train_tokens_per_s'), 0))
    out.append(f"| {name} | {rec['context']}{DAGGER if rec.get('positions_extended') else ''} | "
               f"{_fmt(rec['prefill_tokens_per_s'], 0)} | {_fmt(rec['decode_tokens_per_s'], 0)} | "
               f"{_fmt(rec['decode_ms_per_token'])} | {_bytes(rec['cache_bytes'])} | "
               f"{_bytes(rec.get('xla_temp_bytes_max'))} | {train} | "
               f"{_bytes(rec.get('train_temp_bytes'))} | "
               f'{rss} |')
  out += ['', f'{DAGGER} rotary positions extended for timing only.', ''] + notes.lines()
  return out + ['### Headline: CCF / full attention at each context', ''] + headline_table(e)


HEADLINE_KEYS = ('prefill_tokens_per_s', 'decode_tokens_per_s', 'train_tokens_per_s', 'cache_bytes',
                 'xla_temp_bytes_max', 'train_temp_bytes')


def headline_table(e: dict) -> list:
  """The CCF / full-attention ratios (above 1 is better for throughputs, below 1 for bytes)."""
  out = ['| context | ratio | prefill tok/s | decode tok/s | train tok/s | cache bytes | '
         'inference XLA temp | train XLA temp |', '|---|---|---|---|---|---|---|---|']
  for h in e['headline']:
    out.append(f"| {h['context']} | {h['ratio']}x | " + ' | '.join(
        (f'{h[k]:.2f}x' if h.get(k) is not None else '-') for k in HEADLINE_KEYS) + ' |')
  return out + ['']


def markdown(r: dict, plots: dict | None = None) -> str:
  m = r['meta']
  tok = m['tokenizer']
  out = [f"# Evaluation: {m['label']} (`{m['name']}`), step {m['checkpoint']['step']}", '',
         f"- export: `{m['export']}` ({_fmt(m['checkpoint'].get('num_params'))} parameters)",
         f"- preset: {m['preset']}; updated {m.get('updated', '?')}; section wall times (s): "
         + ', '.join(f'{k} {v}' for k, v in r.get('timing_s', {}).items()),
         f"- tokenizer: `{os.path.basename(tok['path'])}` (vocab {tok['vocab_size']}, sha256 "
         f"{tok['sha256'][:12]}); perplexities are token level: never compare across tokenizers",
         f"- machine: {m['machine']['platform']}, {m['machine']['cpus']} CPUs, "
         f"{m['machine']['device']}; jax {m['versions']['jax']}, flax {m['versions']['flax']}",
         f"- trained context: {m['trained_tokens']} tokens (segment length {m['segment_len']})", '']
  for name, fn in (('ppl', _ppl_md), ('passkey', _passkey_md), ('ae', _ae_md),
                   ('efficiency', _eff_md)):
    if name in r:
      out += fn(r)
      for title, f in (plots or {}).get(name, []):
        out += [f'![{title}]({f})', '']
  return '\n'.join(out) + '\n'


def console_summary(r: dict) -> str:
  """A few lines for the terminal: the numbers a person looks for first."""
  lines = []
  if 'ppl' in r:
    for name, v in r['ppl']['windows'].items():
      if not ec.is_na(v):
        lines.append(f"{name}: loss {v['loss']:.4f} ppl {v['ppl']:.2f} ({v['tokens']} tokens)")
    for row in r['ppl']['streaming']:
      lines.append(f"streaming {row['name']}: ppl {row['ppl_total']:.2f} up to "
                   f"{row['scored_up_to']} tokens")
  if 'passkey' in r:
    for row in r['passkey']['rows']:
      ok = [c for c in row['cells'].values() if not ec.is_na(c)]
      if ok:
        g = sum(c['greedy']['per_digit_accuracy'] for c in ok) / len(ok)
        em = sum(c['greedy']['exact_match'] for c in ok) / len(ok)
        lines.append(f"passkey {row['name']}: greedy per-digit accuracy {g:.2f}, exact match "
                     f"{em:.2f} over {len(ok)} cells (chance "
                     f"{r['passkey']['chance']['per_digit_accuracy']})")
  if 'ae' in r and not ec.is_na(r['ae']):
    for row in r['ae']['rows']:
      lines.append(f"auto-encoding {row['name']}: ROUGE-L {row['greedy']['rouge_l_tokens']:.3f}, "
                   f"exact {row['greedy']['exact_match']:.2f}")
  if 'efficiency' in r:
    for h in r['efficiency']['headline']:
      if h['prefill_tokens_per_s'] is not None:
        lines.append(f"efficiency {h['context']} tokens: CCF/full prefill "
                     f"{h['prefill_tokens_per_s']:.2f}x, decode {h['decode_tokens_per_s']:.2f}x, "
                     f"cache {h['cache_bytes']:.3f}x")
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------
# Plots.


def _plt():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plots(r: dict, out_dir: str, prefix: str = '') -> dict:
  """Writes the PNGs of every section present; {section: [(title, file name)]}."""
  plt = _plt()
  made = {}

  def save(fig, section, title, name):
    if fig.get_layout_engine() is None:
      fig.tight_layout()
    fig.savefig(os.path.join(out_dir, prefix + name), dpi=110)
    plt.close(fig)
    made.setdefault(section, []).append((title, prefix + name))

  label = r['meta']['label']
  if 'ppl' in r:
    p = r['ppl']
    fig, ax = plt.subplots(figsize=(6.5, 4))
    plot_last_n(ax, p, '')
    ax.set_title(f'{label}: last {p["n_tail"]} tokens given K')
    save(fig, 'ppl', 'perplexity vs context length', 'ppl_vs_context.png')
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, row in enumerate(p['streaming']):
      plot_position(ax, row, r['meta']['segment_len'], f'C{i}', row['name'])
    trained = p['streaming'][0]['trained_tokens'] if p['streaming'] else 0
    if trained:
      ax.axvline(trained, color='gray', ls='--', lw=0.8, label='trained window')
    ax.set_xscale('log'), ax.set_xlabel('position (tokens, log)'), ax.set_ylabel('perplexity')
    ax.set_title(f'{label}: streaming perplexity vs position'), ax.legend(fontsize=7)
    save(fig, 'ppl', 'perplexity vs position', 'ppl_vs_position.png')
  if 'passkey' in r:
    fig = passkey_heatmaps(plt, r['passkey'], label)
    save(fig, 'passkey', 'passkey heatmap', 'passkey.png')
  if 'efficiency' in r:
    e = r['efficiency']
    for name, keys, ylabel in (
        ('efficiency_throughput.png', ('prefill_tokens_per_s', 'decode_tokens_per_s',
                                       'train_tokens_per_s'), 'tokens/s (log)'),
        ('efficiency_memory.png', ('cache_bytes', 'xla_temp_bytes_max', 'train_temp_bytes'),
         'bytes (log)')):
      fig, ax = plt.subplots(figsize=(6.5, 4))
      for i, (rec_name, recs) in enumerate(_by_setting(e['records']).items()):
        for k, ls in zip(keys, ('-', '--', ':')):  # Colour: model; line style: quantity.
          pts = [(x['context'], x[k]) for x in recs if isinstance(x.get(k), (int, float))]
          if pts:
            ax.plot(*zip(*pts), ls=ls, marker='o', ms=3, color=f'C{i}',
                    label=f"{rec_name}: {k.replace('_tokens_per_s', '').replace('_', ' ')}")
      ax.set_xscale('log', base=2), ax.set_yscale('log')
      ax.set_xlabel('context (tokens, log)'), ax.set_ylabel(ylabel), ax.legend(fontsize=6)
      ax.set_title(f'{label}: {name.split("_")[1][:-4]} vs context length')
      save(fig, 'efficiency', name[:-4].replace('_', ' '), name)
  return made


def plot_position(ax, row: dict, segment_len: int, color, label: str):
  """Streaming perplexity per segment (faint) and over doubling bins of segments (1, 1, 2, 4, ...
  segments: token-weighted, so late noisy segments average out), at segment mid-points."""
  import numpy as np
  pos = np.asarray(row['positions'], float)
  loss, tokens = np.asarray(row['loss']), np.asarray(row['tokens'], float)
  if not len(pos):
    return
  ax.plot(pos + segment_len / 2, [ec.ppl(v) for v in loss], color=color, lw=0.6, alpha=0.35)
  seg = pos // segment_len
  edges = [0, 1] + [2 ** i for i in range(1, int(np.log2(max(seg.max(), 1))) + 2)]
  xs, ys = [], []
  for lo, hi in zip(edges[:-1], edges[1:]):
    m = (seg >= lo) & (seg < hi)
    if m.any():
      xs.append(((lo + hi) / 2) * segment_len)
      ys.append(ec.ppl(float((loss[m] * tokens[m]).sum() / tokens[m].sum())))
  ax.plot(xs, ys, color=color, marker='o', ms=3, lw=1.2, label=label)


def plot_last_n(ax, p: dict, prefix: str):
  """Perplexity vs K (symlog: K = 0 on the linear part), one line per setting."""
  for row in p['last_n']:
    pts = [(int(k), c['ppl']) for k, c in row['cells'].items() if not ec.is_na(c)]
    if pts:
      ax.plot(*zip(*pts), marker='o', ms=3, label=prefix + row['name'])
  ax.set_xscale('symlog', linthresh=max(p['n_tail'], 1))
  ax.set_xlabel('K context tokens (symlog)'), ax.set_ylabel('perplexity of the last N tokens')
  ax.legend(fontsize=7)


# Heat-map panels: (title, cell kind, metric). Teacher-forced only where it was measured.
_PASSKEY_PANELS = (('greedy exact match', 'greedy', 'exact_match'),
                   ('greedy per digit', 'greedy', 'per_digit_accuracy'),
                   ('teacher-forced per digit', 'teacher_forced', 'per_digit_accuracy'))


def passkey_heatmaps(plt, p: dict, label: str):
  """Per setting, greedy exact match, greedy and teacher-forced per-digit accuracy over depth x
  length; n/a grey."""
  import numpy as np
  rows = p['rows']
  cells = [c for row in rows for c in row['cells'].values() if not ec.is_na(c)]
  panels = [x for x in _PASSKEY_PANELS if any(x[1] in c for c in cells)]
  fig, axes = plt.subplots(len(rows), len(panels), figsize=(4 * len(panels),
                                                            0.25 * len(p['depths']) * len(rows)
                                                            + 1.6 * len(rows) + 0.4),
                           squeeze=False, layout='constrained')
  for i, row in enumerate(rows):
    for j, (title, kind, metric) in enumerate(panels):
      ax = axes[i, j]
      grid = np.full((len(p['depths']), len(p['lengths'])), np.nan)
      beyond = np.zeros(grid.shape, bool)
      for a, d in enumerate(p['depths']):
        for b, n in enumerate(p['lengths']):
          c = row['cells'][f'{n}@{d}']
          if not ec.is_na(c) and kind in c:
            grid[a, b] = c[kind][metric]
            beyond[a, b] = 'beyond_trained' in c
      cmap = plt.get_cmap('viridis').copy()
      cmap.set_bad('lightgray')
      im = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap=cmap, aspect='auto')
      for (a, b), v in np.ndenumerate(grid):
        text = 'n/a' if np.isnan(v) else f'{v:.2f}' + (DAGGER if beyond[a, b] else '')
        ax.text(b, a, text, ha='center', va='center', fontsize=7,
                color='black' if np.isnan(v) or v > 0.5 else 'white')
      ax.set_xticks(range(len(p['lengths'])), [str(n) for n in p['lengths']], fontsize=7)
      ax.set_yticks(range(len(p['depths'])), [str(d) for d in p['depths']], fontsize=7)
      ax.set_xlabel('length (tokens)'), ax.set_ylabel('depth')
      ax.set_title(f"{row['name']}: {title} (chance {p['chance'][metric]:.0e})"
                   if metric == 'exact_match' else
                   f"{row['name']}: {title} (chance {p['chance'][metric]})", fontsize=8)
  fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
  fig.suptitle(f'{label}: passkey retrieval ({DAGGER} beyond the trained window; grey: n/a)',
               fontsize=9)
  return fig


def _by_setting(records):
  out = {}
  for rec in records:
    out.setdefault(rec['arch'] + (f" {rec['ratio']}x" if rec.get('ratio') else ''), []).append(rec)
  return out
