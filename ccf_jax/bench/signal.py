"""`python -m ccf_jax.bench signal --config=experiments/tiny_ccf.py`: does the memory carry signal?

Trains the CCF model and a `segment_local` model (same data, same steps, same seed) for each of
`--signal_seeds` seeds, then scores held-out windows of the validation plays on segments t > 0
only (segment 0 sees no memory in any model, so it would only dilute the difference):

  * ccf (memory on), ccf with memory off (its own weights, no memory rows), segment_local, and
    full_attention (the plain decoder over the whole window: the upper bound CCF compresses), the
    latter trained the same way when `--signal_full_attention` is set.
  * Per-window mean losses give standard errors; the CCF - segment_local difference is paired by
    window, so its standard error is that of the per-window differences.
  * Across seeds: the run-to-run spread (std of the per-seed mean losses).
  * The fraction of the segment_local -> full_attention gap that CCF closes.
  * Equal wall time: segment_local trained again for as many steps as fit in CCF's training time
    at its own seconds per step (it is cheaper per step, so it gets more steps), on a schedule of
    that length (`equal_time_steps`).

Prints one JSON object per trained model and a final summary object. Run outside the test suite;
it takes `steps` x (2..4 models) x seeds training steps.

`python -m ccf_jax.bench passkey --config=experiments/tiny_ccf_passkey.py` is the second bar:
the CCF model and segment_local trained on passkey windows (`data.task='passkey'`, same steps),
then teacher-forced per-digit accuracy and exact match of the key on held-out full-length windows
(key in segment 0, question at the end of segment T-1), for CCF with memory on and off. With
a pretrained plain decoder (experiments/tiny_ccf_passkey.py starts from the tiny.py export); the
measured figures are in WORKSPACE.md.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from ccf_jax import data as data_lib
from ccf_jax.train import trainer
from ccf_jax.ccf import masks
from ccf_jax.ccf.arch import lm_logits
from ccf_jax import checkpoint
from ccf_jax.checkpoint import export as export_lib
from ccf_jax.tasks import passkey

_SEEDS = flags.DEFINE_integer('signal_seeds', 3, 'Seeds per model (bench signal).')
_WINDOWS = flags.DEFINE_integer('signal_eval_batches', 8, 'Held-out batches scored (bench signal).')
_FULL = flags.DEFINE_bool('signal_full_attention', True, 'Also train full_attention (bench signal).')
_PASSKEY_BASELINE = flags.DEFINE_bool(
    'passkey_train_baseline', True, 'bench passkey: also train segment_local for the same steps '
    '(it cannot see the key; the CCF model with memory off is the same-weights control).')
_CURVE = flags.DEFINE_integer(
    'signal_curve_every', 0, 'bench signal: also score the checkpoint every N steps of ccf and '
    'segment_local (a learning curve on one schedule; 0 = final step only).')
_EQUAL_TIME = flags.DEFINE_bool('signal_equal_time', True,
                                'Also train segment_local for CCF\'s wall time (bench signal).')
_BASE_STEPS = flags.DEFINE_integer(
    'base_steps', 0, 'bench signal / passkey: first pretrain the plain decoder for N steps per '
    'seed (base_config) and start every compared model from its export (init.params_only), as '
    'CCF fine-tunes a pretrained LM in the paper; 0 = every model as the config says (for '
    'tiny_ccf.py: one shared base, the tiny.py export).')


def window_losses(cfg, params, batch, memory: str) -> tuple[np.ndarray, np.ndarray]:
  """Per-window (loss sum, target count) over segments t > 0, as scored in training."""
  logits = lm_logits(cfg, params, batch, memory)
  tokens = batch['tokens']
  scored = masks.scored_mask(cfg.ccf, batch['loss_mask'], batch['num_valid_segments'])
  later = (jnp.arange(tokens.shape[1]) >= cfg.ccf.segment_len)[None]
  w = (scored * later)[:, 1:]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]) * w
  return ce.sum(1), w.sum(1)


def heldout(cfg, params, memory: str, max_batches: int) -> np.ndarray:
  """Per-window mean loss on segments t > 0 of the validation split (windows with targets)."""
  fn = jax.jit(lambda p, b: window_losses(cfg, p, b, memory))
  sums, counts = [], []
  for i, batch in enumerate(data_lib.make_train_iter(cfg, 'validation', 0, 1)):
    if i >= max_batches:
      break
    s, n = jax.device_get(fn(params, batch))
    sums.append(s)
    counts.append(n)
  s, n = np.concatenate(sums), np.concatenate(counts)
  return s[n > 0] / n[n > 0]


def _single_device_run(cfg, seed: int, budget_s: float = 0.0):
  """A copy of cfg as every bench run trains: seeded model and data order, one device, no
  evaluation during training, the given time budget (0 = the steps)."""
  c = copy.deepcopy(cfg)
  c.train.seed = c.data.shuffle_seed = seed
  c.train.time_budget_s = budget_s
  c.train.eval_every = 0
  c.mesh.num_devices = 1
  c.mesh.data = c.mesh.fsdp = c.mesh.tensor = 1
  return c


def _train(cfg, arch: str, seed: int, steps: int | None = None, budget_s: float = 0.0,
           curve_every: int = 0):
  """Trains one model; returns (config, final params, summary, wall s, {step: params} kept every
  `curve_every` steps (empty when 0))."""
  c = _single_device_run(cfg, seed, budget_s)
  c.model.arch = arch
  if steps is not None:
    c.train.steps = steps
  if curve_every:
    c.checkpoint.every = c.checkpoint.keep_every = curve_every
  with tempfile.TemporaryDirectory() as wd:
    t = time.time()
    summary = trainer.train_and_evaluate(c, wd)
    wall = time.time() - t
    ckpts, final = os.path.join(wd, 'checkpoints'), summary['final_step']
    restore = lambda step: checkpoint.restore_params(os.path.join(ckpts, str(step)))[0]
    steps_on_disk = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if curve_every else []
    kept = {s: restore(s) for s in steps_on_disk if s % curve_every == 0 or s == final}
    params = kept[final] if final in kept else restore(final)
  return c, params, summary, wall, kept


def base_config(cfg, seed: int, steps: int):
  """The plain decoder of `cfg`'s model fields on `cfg`'s corpus and tokenizer, pretrained from
  scratch with experiments/tiny.py's recipe (packed sequences, its batch, peak lr and warmup), so
  that every CCF config of these model fields gets the same kind of base."""
  from experiments import tiny
  recipe = tiny.get_config()
  c = copy.deepcopy(cfg)
  c.name = f'{cfg.name}_base'
  c.model.arch = 'decoder'
  c.data.mode, c.data.task = 'packed', ''
  c.data.seq_len, c.data.batch_size = recipe.data.seq_len, recipe.data.batch_size
  c.train.lr, c.train.steps = recipe.train.lr, steps
  c.train.warmup_steps = min(recipe.train.warmup_steps, steps)
  c.train.seed = c.data.shuffle_seed = seed
  c.init.params_only = c.init.from_checkpoint = c.init.from_hf = ''
  return c


def pretrain_base(cfg, seed: int, steps: int, out_dir: str) -> tuple[str, float]:
  """Trains base_config(cfg, seed, steps) and exports it to out_dir; returns (out_dir, train s)."""
  c = _single_device_run(base_config(cfg, seed, steps), seed)
  c.checkpoint.every = steps
  with tempfile.TemporaryDirectory() as wd:
    summary = trainer.train_and_evaluate(c, wd)
    export_lib.export(wd, out_dir, overwrite=True)
  return out_dir, summary['phases']['train']


def _from_base(config, seed: int, base_dir: str, out: list):
  """`config` itself, or with --base_steps a copy that starts from a base pretrained into
  base_dir (its record appended to `out`)."""
  if not _BASE_STEPS.value:
    return config
  start = copy.deepcopy(config)
  start.init.params_only, base_s = pretrain_base(config, seed, _BASE_STEPS.value,
                                                 os.path.join(base_dir, 'export'))
  out.append({'bench': 'base', 'seed': seed, 'steps': _BASE_STEPS.value, 'train_s': base_s})
  print(out[-1], flush=True)
  return start


def learning_curve(c_ccf, kept_ccf, c_sl, kept_sl, max_batches: int) -> list:
  """Held-out t > 0 losses at each step both runs kept: ccf on/off, segment_local, and the paired
  differences (by window, same data order) with their standard errors."""
  out = []
  for step in sorted(set(kept_ccf) & set(kept_sl)):
    on = heldout(c_ccf, kept_ccf[step], 'on', max_batches)
    off = heldout(c_ccf, kept_ccf[step], 'off', max_batches)
    sl = heldout(c_sl, kept_sl[step], 'off', max_batches)
    out.append({'bench': 'signal_curve', 'step': step, 'ccf': _stats(on)['mean'],
                'ccf_memory_off': _stats(off)['mean'], 'segment_local': _stats(sl)['mean'],
                'segment_local_minus_ccf': _stats(sl - on),
                'memory_effect_off_minus_on': _stats(off - on)})
    print(out[-1], flush=True)
  return out


def _stats(x: np.ndarray) -> dict:
  return {'mean': float(x.mean()), 'se': float(x.std(ddof=1) / math.sqrt(len(x))), 'windows': len(x)}


def equal_time_steps(ccf_summary: dict, baseline_summary: dict) -> int:
  """Steps the baseline takes in CCF's training time at its own measured seconds per step. The
  baseline then trains that many steps on a schedule of that length: a run cut by a time budget
  instead stops with its learning rate still high, and scores worse than a shorter run that
  completed its schedule."""
  per_step = baseline_summary['phases']['train'] / baseline_summary['final_step']
  return max(ccf_summary['final_step'], round(ccf_summary['phases']['train'] / per_step))


def _compare(config, seed: int, curve: int, out: list) -> dict:
  """One seed: trains CCF and segment_local (and full_attention, segment_local at CCF's wall time
  when asked) from `config`'s initialisation; appends their records to `out` and returns the
  per-window held-out losses by model."""
  rec = {'seed': seed}
  c_ccf, p_ccf, s_ccf, wall_ccf, kept_ccf = _train(config, 'ccf', seed, curve_every=curve)
  rec['ccf'] = heldout(c_ccf, p_ccf, 'on', _WINDOWS.value)
  rec['ccf_memory_off'] = heldout(c_ccf, p_ccf, 'off', _WINDOWS.value)
  c_sl, p_sl, s_sl, wall_sl, kept_sl = _train(config, 'segment_local', seed,
                                              steps=s_ccf['final_step'], curve_every=curve)
  rec['segment_local'] = heldout(c_sl, p_sl, 'off', _WINDOWS.value)
  out += [dict(r, seed=seed) for r in learning_curve(c_ccf, kept_ccf, c_sl, kept_sl,
                                                      _WINDOWS.value)]
  runs = {'ccf': (s_ccf, wall_ccf), 'segment_local': (s_sl, wall_sl)}
  if _FULL.value:
    c_fa, p_fa, s_fa, wall_fa, _ = _train(config, 'full_attention', seed, steps=s_ccf['final_step'])
    rec['full_attention'] = heldout(c_fa, p_fa, 'off', _WINDOWS.value)
    runs['full_attention'] = (s_fa, wall_fa)
  if _EQUAL_TIME.value:
    c_eq, p_eq, s_eq, wall_eq, _ = _train(config, 'segment_local', seed,
                                          steps=equal_time_steps(s_ccf, s_sl))
    rec['segment_local_equal_time'] = heldout(c_eq, p_eq, 'off', _WINDOWS.value)
    runs['segment_local_equal_time'] = (s_eq, wall_eq)
  for name, (s, wall) in runs.items():
    out.append({'bench': 'signal', 'seed': seed, 'model': name, 'steps': s['final_step'],
                'train_s': s['phases']['train'], 'wall_s': round(wall, 1),
                'heldout_t_gt_0': _stats(rec[name]),
                **({'memory_off': _stats(rec['ccf_memory_off'])} if name == 'ccf' else {})})
    print(out[-1], flush=True)
  return rec


def summarize(per_seed: list, config_name: str, base_steps: int = 0) -> dict:
  """The bars from per-seed {model: per-window held-out losses} (windows paired across models)."""
  def seed_means(model):
    return np.array([r[model].mean() for r in per_seed if model in r])

  diffs = [r['segment_local'] - r['ccf'] for r in per_seed]  # Paired by window (same data order).
  summary = {'bench': 'signal', 'summary': True, 'config': config_name, 'seeds': len(per_seed),
             'base_steps': base_steps}
  for model in ('ccf', 'ccf_memory_off', 'segment_local', 'full_attention',
                'segment_local_equal_time'):
    m = seed_means(model)
    if len(m):
      summary[model] = {'mean_over_seeds': float(m.mean()),
                       'seed_spread_std': float(m.std(ddof=1)) if len(m) > 1 else None}
  d = np.concatenate(diffs)
  mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
  # Equal differences in every window leave no spread: the sign is then certain (z of +-inf),
  # or there is no difference at all (z of 0).
  z = mean / se if se > 0 else math.copysign(math.inf, mean) if mean else 0.0
  summary['segment_local_minus_ccf'] = {'mean': mean, 'se': se, 'z': z}
  spread = summary['ccf'].get('seed_spread_std') or 0.0
  summary['bar_3se'] = bool(summary['segment_local_minus_ccf']['z'] > 3)
  summary['bar_beyond_seed_spread'] = (None if len(per_seed) < 2 else bool(d.mean() > max(
      spread, summary['segment_local'].get('seed_spread_std') or 0.0)))  # No spread from 1 seed.
  # The bar above compares the difference with the spread of each model's own loss over seeds, which
  # also holds what moves both models of a seed alike (its data order; with --base_steps its base).
  # The spread of the per-seed differences is the paired figure, reported beside it.
  per_seed_diff = np.array([x.mean() for x in diffs])
  summary['segment_local_minus_ccf']['per_seed'] = per_seed_diff.tolist()
  if len(per_seed_diff) > 1:
    summary['segment_local_minus_ccf']['seed_spread_std'] = float(per_seed_diff.std(ddof=1))
  if 'full_attention' in summary:
    gap = summary['segment_local']['mean_over_seeds'] - summary['full_attention']['mean_over_seeds']
    closed = summary['segment_local']['mean_over_seeds'] - summary['ccf']['mean_over_seeds']
    summary['gap_closed_fraction'] = float(closed / gap) if gap > 0 else None
  return summary


def bench_signal(config) -> list:
  """Trains and scores the models; returns JSON-able records (the last one is the summary)."""
  out, per_seed, curve = [], [], _CURVE.value
  for seed in range(_SEEDS.value):
    with tempfile.TemporaryDirectory() as base_dir:
      per_seed.append(_compare(_from_base(config, seed, base_dir, out), seed, curve, out))

  out.append(summarize(per_seed, config.name, _BASE_STEPS.value))
  return out


def passkey_accuracy(cfg, params, memory: str) -> dict:
  """Teacher-forced per-digit accuracy / exact match over the validation passkey windows."""
  fn = jax.jit(lambda p, b: lm_logits(cfg, p, b, memory))
  hits = digits = exact = n = 0
  for batch in data_lib.make_train_iter(cfg, 'validation', 0, 1):
    s = passkey.score(jax.device_get(fn(params, batch)), batch)
    m = int((batch['loss_mask'][:, 1:] > 0).sum())
    b = int((batch['num_valid_segments'] > 0).sum())
    hits, digits = hits + s['per_digit_accuracy'] * m, digits + m
    exact, n = exact + s['exact_match'] * b, n + b
  return {'per_digit_accuracy': hits / max(digits, 1), 'exact_match': exact / max(n, 1),
          'windows': n, 'chance_per_digit': 0.1}


def bench_passkey(config) -> list:
  """Trains CCF and segment_local on passkey windows; per-digit accuracy at T segments."""
  if config.data.task != 'passkey':
    raise ValueError("bench passkey needs a passkey config (data.task='passkey'), e.g. "
                     '--config=experiments/tiny_ccf_passkey.py.')
  out, seed = [], int(config.train.seed)
  with tempfile.TemporaryDirectory() as base_dir:
    config = _from_base(config, seed, base_dir, out)
    c_ccf, p_ccf, s_ccf, wall, _ = _train(config, 'ccf', seed, budget_s=config.train.time_budget_s)
    runs = [('ccf', c_ccf, p_ccf, s_ccf, wall, 'on'),
            ('ccf_memory_off', c_ccf, p_ccf, s_ccf, wall, 'off')]
    if _PASSKEY_BASELINE.value:
      c_sl, p_sl, s_sl, wall_sl, _ = _train(config, 'segment_local', seed,
                                         steps=s_ccf['final_step'])
      runs.append(('segment_local', c_sl, p_sl, s_sl, wall_sl, 'off'))
  for name, c, p, s, w, memory in runs:
    rec = {'bench': 'passkey', 'model': name, 'T': config.ccf.num_segments,
           'segment_len': config.ccf.segment_len, 'steps': s['final_step'],
           'train_s': s['phases']['train'], 'wall_s': round(w, 1),
           **passkey_accuracy(c, p, memory)}
    print(rec, flush=True)
    out.append(rec)
  return out
