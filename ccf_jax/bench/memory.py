"""`python -m ccf_jax.bench memory [--config=experiments/X.py]`: training memory and time of the
CCF gradient modes against the window length.

For T in T_VALUES segments per window it measures the real jitted train step (`timing.bench_train`:
value_and_grad + optimizer update, donated state) of every configuration in MODES, each with the
decoder serial (k=1) and fully parallel (k=T), plus the plain decoder with full attention over the
same window. One JSON object per configuration:
  temp_bytes     XLA `memory_analysis()` of the compiled step: its transient buffers (activations
                 kept for the backward pass, gradients, workspace), i.e. what grows with T;
  buffer_bytes   analytic size of the memory buffer (latents z and projected K/V of T*c rows per
                 layer and window, float32): the part that must grow with T;
  flops          analytic FLOPs the step executes (ccf_flops.train_flops: the reduced encoder
                 backward and remat recomputation included; XLA's cost_analysis counts a scan body
                 once, so it is never used for scanned code); model_flops: the objective's (full
                 back-propagation, no recomputation);
  step_s         measured seconds per step: the fastest of --memory_rounds blocks of
                 --memory_steps steps (each block's mean) after a warm-up step; block_s lists them.
The modes of one (T, k) are compiled together (`timing.TrainTimer`) and timed in alternating rounds,
one block each per round, so that a change in the machine's load lands on all of them alike.
A last object ('memory_targets') evaluates the issue's targets for `reservoir_final` (S=2) from the
rows above; its step-time ratios are medians over rounds of the per-round ratio. Pairing is what
makes the ratios stable on a shared machine: unpaired blocks of short steps vary by tens of percent
with the machine's load, while a round's paired ratio moves far less.
`--memory_modes=reservoir_final,full_remat --memory_steps=20` re-measures just the step-time target;
`--memory_t` picks the window lengths and `--memory_rounds` the number of rounds (3 by default) that
the ratios are medians over.

The model is `config` when its arch is 'ccf'; any other config (the default, experiments/tiny.py)
means `bench_model()`, a tiny CCF model sized so that the whole sweep (44 compilations, which
dominate) takes about 18 minutes on 2 CPU cores with --memory_steps=10.
"""

from __future__ import annotations

import logging

import ml_collections
import numpy as np
from absl import flags
from ccf_jax import registry as arch_lib
from ccf_jax.ccf import flops as ccf_flops
from ccf_jax.train import timing

T_VALUES = (4, 8, 16, 32)
STEPS = 5
REPEATS = 3
_MODES = flags.DEFINE_list('memory_modes', None, 'bench memory: only these MODES (and '
                           'full_attention if listed); default all.')
_TS = flags.DEFINE_list('memory_t', None, 'bench memory: these T (segments per window) instead of '
                        f'{list(T_VALUES)}.')
_STEPS = flags.DEFINE_integer('memory_steps', STEPS, 'bench memory: timed steps per configuration '
                              '(more steps, less noise in step_s; compilation dominates anyway).',
                              lower_bound=1)
_ROUNDS = flags.DEFINE_integer('memory_rounds', REPEATS, 'bench memory: alternating rounds (one '
                               'block per configuration each); the ratios are medians over rounds.',
                               lower_bound=1)
# Remat the encoder layers and each decoder chunk step (or, with a single chunk, its layers). The
# decoder layers inside a chunk step are not remat'd again (model.remat_policy='none'): the chunk's
# recomputation in the backward pass keeps one chunk's residuals alive, which does not grow with T
# at a fixed k, and a nested layer remat would cost one more decoder forward per segment (5 instead
# of 4 forward-equivalents) to shrink that constant. Large chunks of deep models (the 7B configs:
# 32 segments x 32 layers) do nest it, through model.remat_policy.
REMAT = dict(model=dict(remat_policy='none'), ccf=dict(encoder_remat='full', decoder_remat='full'))
NO_REMAT = dict(model=dict(remat_policy='none'), ccf=dict(encoder_remat='none',
                                                          decoder_remat='none'))
MODES = {  # name -> {'model': overrides, 'ccf': overrides}.
    'full': NO_REMAT,
    'full_remat': REMAT,
    'truncated': dict(REMAT, ccf=dict(REMAT['ccf'], grad_mode='truncated', reservoir_size=2)),
    # The final reservoir back-propagates S live encoder segments (the other T - S run without
    # residuals, in lax.map chunks of 4). Those S are remat'd like everything in full_remat: S more
    # encoder forwards (+0.012-0.05 in the FLOP ratio), but writing and re-reading their residuals
    # costs more than recomputing them on CPU (WORKSPACE.md, Benchmarks). Its decoder is remat'd as
    # full_remat's.
    'reservoir_final': dict(REMAT, ccf=dict(
        REMAT['ccf'], grad_mode='reservoir', reservoir_semantics='final', reservoir_size=2,
        compensate=True, encoder_map_batch=4)),
    'reservoir_streaming': dict(REMAT, ccf=dict(
        REMAT['ccf'], grad_mode='reservoir', reservoir_semantics='streaming', reservoir_size=2,
        compensate=True)),
}


def bench_model() -> ml_collections.ConfigDict:
  """The tiny CCF model of the default sweep: d=64, 2 layers, vocab 512, segments of 64 tokens
  with 8 memory slots (8x), 2 windows per step, no auto-encoding term (the LM path alone)."""
  from experiments import tiny_ccf
  c = tiny_ccf.get_config()
  c.name = 'bench_memory'
  m = c.model
  m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 512, 64, 2, 4, 2
  m.head_dim, m.mlp_dim = 16, 256
  c.ccf.segment_len, c.ccf.num_memory, c.ccf.lora_rank = 64, 8, 8
  c.ccf.ae_mode = 'off'
  c.data.batch_size = 2
  return c


def buffer_bytes(cfg) -> int:
  """float32 bytes of a step's memory buffer: latents [layers, B, T*c, d] and K/V [layers, B, T*c,
  kv_heads, head_dim] twice."""
  m, x = cfg.model, cfg.ccf
  rows = cfg.data.batch_size * x.num_segments * x.num_memory * m.num_layers
  return 4 * rows * (m.d_model + 2 * m.num_kv_heads * m.head_dim)


def _configured(base, num_segments: int, arch: str, model: dict,
                ccf: dict) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(base.to_dict())
  cfg.model.arch = arch
  cfg.ccf.num_segments = num_segments
  for section, overrides in (('model', model), ('ccf', ccf)):
    for k, v in overrides.items():
      cfg[section][k] = v
  if cfg.model.attention_impl == 'auto':
    # Every mode attends in blocks of one segment's length (blocked attention): the dense scores
    # of one chunk, [B, heads, l, T*c + l] per layer and alive for all layers in a remat'd chunk's
    # backward pass, would otherwise be most of what temp memory gains with T. A config that sets
    # the kernel keeps its own choice.
    cfg.model.attention_impl = 'blocked'
    cfg.model.attention_block = cfg.ccf.segment_len
  return cfg


def _record(cfg, mode: str, timer, blocks: list[float]) -> dict:
  rec = timer.record(min(blocks))
  x = cfg.ccf
  ccf = cfg.model.arch == 'ccf'
  out = {'bench': 'memory', 'mode': mode, 'T': x.num_segments,
         'k': (x.decoder_segment_chunk or x.num_segments) if ccf else None,
         'window_tokens': rec['length'], 'batch': rec['batch'], 'temp_bytes': rec.get('temp_bytes'),
         'buffer_bytes': buffer_bytes(cfg) if ccf else 0,
         'flops': ccf_flops.train_flops(cfg, rec['batch']) if ccf else
                  arch_lib.get_arch(cfg).train_flops(cfg, rec['batch']),
         'model_flops': arch_lib.get_arch(cfg).train_flops(cfg, rec['batch']),
         'step_s': rec['step_s'], 'block_s': [round(b, 5) for b in blocks],
         'compile_s': rec['compile_s']}
  logging.info('bench memory: %s', out)
  return out


def _measure_together(cfgs: dict, steps: int, repeats: int = REPEATS) -> list[dict]:
  """Times the configurations {mode: cfg} in alternating blocks (round robin, `repeats` rounds of
  `steps` steps each), so that a change in the machine's load lands on every mode of the round;
  each row keeps its blocks, and its step_s is the fastest."""
  timers = {mode: timing.TrainTimer(cfg) for mode, cfg in cfgs.items()}
  blocks = {mode: [] for mode in cfgs}
  for _ in range(repeats):
    for mode, timer in timers.items():
      blocks[mode].append(timer.block(steps))
  return [_record(cfgs[mode], mode, timers[mode], blocks[mode]) for mode in cfgs]


def paired_ratio(res: dict, ref: dict) -> float:
  """Median over rounds of res / ref block times (the two timed in the same rounds), falling back
  to the ratio of the fastest blocks for rows measured apart."""
  a, b = res.get('block_s'), ref.get('block_s')
  if a and b and len(a) == len(b):
    return float(np.median(np.asarray(a) / np.asarray(b)))
  return res['step_s'] / ref['step_s']


def targets(rows: list[dict]) -> dict:
  """The issue's targets for reservoir_final (S=2), per k ('1' and 'T'), from measured rows."""
  get = lambda mode, t, k: next((r for r in rows if r['mode'] == mode and r['T'] == t
                                 and r['k'] == (t if k == 'T' else k)), None)
  out = {'bench': 'memory_targets'}
  t_values = sorted({r['T'] for r in rows})
  if not t_values:
    return out
  for k in ('1', 'T'):
    kk = 1 if k == '1' else 'T'
    lo, hi = get('reservoir_final', t_values[0], kk), get('reservoir_final', t_values[-1], kk)
    if lo and hi and hi is not lo:
      out[f'k={k}: temp T={hi["T"]} / T={lo["T"]} (target <= 1.5)'] = round(
          hi['temp_bytes'] / lo['temp_bytes'], 3)
    res, full = get('reservoir_final', 16, kk), get('full', 16, kk)
    if res and full:
      out[f'k={k}: temp at T=16 / full without remat (target <= 0.5)'] = round(
          res['temp_bytes'] / full['temp_bytes'], 3)
    for t in t_values:
      res, remat = get('reservoir_final', t, kk), get('full_remat', t, kk)
      if res and remat:
        out[f'k={k}: step time at T={t} / full with remat (target <= 0.8)'] = round(
            paired_ratio(res, remat), 3)
  return out


def bench_memory(config, t_values=T_VALUES, steps: int = STEPS,
                 rounds: int = REPEATS) -> list[dict]:
  """One record per (T, mode, k) and one per T for full attention, then the targets."""
  base = config if config.model.arch == 'ccf' else bench_model()
  wanted = set(MODES) | {'full_attention'}
  if flags.FLAGS.is_parsed():
    steps = _STEPS.value if steps == STEPS else steps
    rounds = _ROUNDS.value if rounds == REPEATS else rounds
    t_values = tuple(int(t) for t in _TS.value) if _TS.value else t_values
    if _MODES.value:
      unknown = set(_MODES.value) - wanted
      if unknown:
        raise ValueError(f'--memory_modes: unknown {sorted(unknown)}; choose from {sorted(wanted)}.')
      wanted = set(_MODES.value)
  rows = []
  for t in t_values:
    for k in sorted({1, t}):
      rows += _measure_together({
          mode: _configured(base, t, 'ccf', over['model'], dict(over['ccf'], decoder_segment_chunk=k))
          for mode, over in MODES.items() if mode in wanted}, steps, rounds)
    if 'full_attention' in wanted:
      attention = _configured(base, t, 'full_attention', NO_REMAT['model'], {})
      rows += _measure_together({'full_attention': attention}, steps, rounds)
  return rows + [targets(rows)]
