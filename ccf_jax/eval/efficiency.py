"""What compression buys: throughput and memory of CCF vs full attention of the same size, as a
function of context length. `python -m ccf_jax.bench efficiency --config=experiments/X.py` prints
one JSON record per (architecture, context) (lengths: $CCF_BENCH_CONTEXTS, default 1k..32k) and a
headline record; the evaluation's `efficiency` section calls `bench_efficiency` with the export's
parameters and draws the curves (log scale).

Per (arch, context n), on this machine, batch 1:
  * prefill tokens/s: `inference.Engine.prefill` of an n-token prompt (CCF: complete segments
    encoded into memory, the last kept raw; full attention: causal chunks over a growing KV
    cache), compilation excluded, best of repeats (as `python -m ccf_jax.bench decode`);
  * decode tokens/s (and ms/token): greedy `Engine.decode` steps after warm-up, best of repeats,
    from CCF's real prefill state, and for full attention from a cache of the n rows it needs
    plus the decoded ones (as bench decode does: no power-of-two bucket for or against it);
  * cache bytes: `Engine.cache_bytes` (rows in use; CCF: n/r memory rows + at most l raw rows),
    and XLA's memory analysis of the engine's compiled programs (largest temporaries);
  * training-step tokens/s and XLA memory analysis: `timing.bench_train` on a variant of the config
    whose window is n tokens (CCF: n / l segments; full attention: one n-token sequence);
  * peak RSS of each measurement: the kernel's high-water mark, reset before it
    (`/proc/self/clear_refs`), so each number is that measurement's own peak.
Rotary positions are extended (`model.max_position`) where n exceeds the model's range: these
are timings only, with no claim on quality at that length. A measurement is n/a, with the reason,
when an estimate of its largest buffers (`estimate_bytes`: inference and the training step
separately, so inference is still measured where training no longer fits) exceeds a third of the
memory available here (XLA's other temporaries come on top), or when the
arch's previous context already took longer than `max_seconds` (the next one costs at least as
much). The headline is the ratio CCF / full attention at each n (`ratios`).
"""

from __future__ import annotations

import os
import time

import numpy as np
from ccf_jax import registry as arch_lib
from ccf_jax.model import decoder as model_lib
from ccf_jax.eval import common as ec
from ccf_jax.inference import engine as inference
from ccf_jax.core import config_lib, host_memory
from ccf_jax.train import timing

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)


def _reset_peak_rss():
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')  # Resets VmHWM to the current RSS (Linux >= 4.0).
  except OSError:
    pass


def _peak_rss_gb() -> float:
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1e6  # KiB -> GB.
  except OSError:
    pass
  return host_memory.peak_rss_gb()


def variant(config, arch: str, context: int):
  """The config at `arch` with a training window of `context` tokens, batch 1, positions extended
  to what that window needs (timing only)."""
  cfg = config.copy_and_resolve_references()
  l = cfg.ccf.segment_len
  cfg.model.arch = arch
  cfg.data.mode, cfg.data.batch_size = 'windows', 1
  cfg.train.grad_accum = 1
  cfg.ccf.num_segments = max(1, context // l)
  need = config_lib.max_relative_position(cfg.ccf, cfg.ccf.num_segments) if arch == 'ccf' else context
  cfg.model.max_position = max(int(cfg.model.max_position), need + 2 * l)  # + decoded tokens.
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.num_devices = 1, 1, 1, 1
  return cfg


def estimate_bytes(cfg, context: int, training: bool = True) -> int:
  """Largest buffers at this context, float32: for a training step the attention scores kept for
  the backward pass; for inference the KV cache plus the scores of one prefill chunk (1,024
  queries, full attention) or one segment (CCF). What decides whether a context fits here."""
  m, x = cfg.model, cfg.ccf
  l, heads = x.segment_len, m.num_heads
  t = max(1, context // l)
  keys = (t * x.num_memory if cfg.model.arch == 'ccf' else 0) + l  # What a CCF segment attends to.
  if not training:
    row = m.num_layers * 2 * m.num_kv_heads * m.head_dim * 4
    if cfg.model.arch == 'full_attention':
      return int(context * row + 2 * heads * min(context, 1024) * context * 4)
    return int(keys * row + 2 * heads * l * keys * 4 + t * (l + x.num_memory) * m.d_model * 4)
  per = 3 * m.num_layers * heads * 4  # Scores + probabilities + cotangent, every layer.
  if cfg.model.arch == 'full_attention':
    return int(per * context * context)
  return int(per * t * l * keys)


def _too_big(need: int, have: int, what: str) -> str:
  if need <= have / 3:
    return ''
  return (f'{what} needs ~{need / 1e9:.1f} GB (estimate) > a third of the {have / 1e9:.1f} GB '
          'available here')


def engine_xla_bytes(engine) -> dict:
  """XLA memory analysis of the engine's compiled programs (the largest temporaries of any of
  them, and of the decode step alone). The engine keeps its executables per input signature in
  `_Compiled._exe`; read defensively, as that is its internal layout."""
  out = {}
  for attr in vars(engine).values():
    exes = getattr(attr, '_exe', None)
    if not isinstance(exes, dict):
      continue
    for exe in exes.values():
      temp = timing.compiled_memory(exe).get('temp_bytes')
      if temp is not None:
        out['xla_temp_bytes_max'] = max(out.get('xla_temp_bytes_max', 0), temp)
        if getattr(attr, 'name', '') == 'decode':
          out['decode_xla_temp_bytes'] = max(out.get('decode_xla_temp_bytes', 0), temp)
  return out


def _params_for(config, arch: str, params):
  """Parameters of `arch` at the config's size: the given ones if they are of that arch, the CCF
  decoder for full attention / segment_local, else a fresh init (timings do not depend on
  values)."""
  if params is not None:
    if config.model.arch == arch or (config.model.arch in ('full_attention', 'segment_local')
                                     and arch in ('full_attention', 'segment_local')):
      return params
    if config.model.arch == 'ccf' and arch != 'ccf':
      return params['decoder']
  cfg = config.copy_and_resolve_references()
  cfg.model.arch = arch
  a = arch_lib.get_arch(cfg)
  return model_lib.init_params(a.module_config(cfg), cfg.train.seed, a.module_cls)


def time_prefill(engine, prompt, repeats: int = 2):
  """(seconds, state) of `Engine.prefill`: a first call that compiles, then the best of
  `repeats` more (this machine is shared: single timings are noisy). A first call longer than 5 s
  (compilation excluded) is the measurement: repeating it would only cost time."""
  import jax
  compiled = engine.compile_seconds
  t = time.perf_counter()
  state, logits = engine.prefill([prompt])
  jax.block_until_ready(logits)
  best = time.perf_counter() - t - (engine.compile_seconds - compiled)
  for _ in range(repeats if best < 5.0 else 0):
    t = time.perf_counter()
    state, logits = engine.prefill([prompt])
    jax.block_until_ready(logits)
    best = min(best, time.perf_counter() - t)
  return best, state


def time_decode(engine, state, steps: int, warmup: int = 2, repeats: int = 3) -> float:
  """ms per token of greedy `Engine.decode` (batch 1): `warmup` compiling steps, then the best of
  `repeats` runs of `steps` steps."""
  import jax
  tok = np.zeros(state.lengths.shape, np.int32)
  for _ in range(warmup):
    state, tok, _ = engine.decode(state, tok)
  jax.block_until_ready(tok)
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(steps):
      state, tok, _ = engine.decode(state, tok)
    jax.block_until_ready(tok)
    best = min(best, (time.perf_counter() - t) / steps * 1e3)
  return best


def measure(config, arch: str, context: int, params, ratio=None, decode_steps: int = 16,
            train_steps: int = 2, train_na: str = '') -> dict:
  """One record: prefill, decode, cache bytes, training step and memory at one context (the
  training step skipped, with `train_na` as the reason, when that is set)."""
  cfg = variant(config, arch, context)
  rec = {'bench': 'efficiency', 'arch': arch, 'ratio': ratio if arch == 'ccf' else None,
         'context': int(context),
         'positions_extended': cfg.model.max_position > config.model.max_position}
  engine = inference.Engine(cfg, params, ratio=ratio, max_position=cfg.model.max_position,
                            compiler_options=ec.COMPILER_OPTIONS)
  prompt = np.random.default_rng(0).integers(4, cfg.model.vocab_size, context).astype(np.int32)
  _reset_peak_rss()
  prefill_s, state = time_prefill(engine, prompt)
  rec['prefill_tokens_per_s'] = round(context / prefill_s, 1)
  rec['prefill_peak_rss_gb'] = round(_peak_rss_gb(), 3)
  cache = engine.cache_bytes(state)
  if engine.mode == 'full':  # As bench decode: the rows decoding needs, not a power-of-two bucket.
    slack = max(cfg.ccf.segment_len, 4 * decode_steps)  # Warm-up + 3 timed runs.
    state = engine.synthetic_state(1, context, capacity=context + slack)
  _reset_peak_rss()
  ms = time_decode(engine, state, decode_steps)
  rec.update(decode_tokens_per_s=round(1e3 / ms, 1), decode_ms_per_token=round(ms, 3),
             decode_peak_rss_gb=round(_peak_rss_gb(), 3))
  rec.update(cache_bytes=cache['used_bytes'], cache_allocated_bytes=cache['allocated_bytes'],
             compiles=dict(engine.compile_counts), **engine_xla_bytes(engine))
  del state, engine
  if train_steps <= 0 or train_na:
    rec['train_na'] = train_na or 'not measured (train_steps=0)'
    return rec
  _reset_peak_rss()
  tr = timing.bench_train(cfg, train_steps)
  rec.update(train_tokens_per_s=tr['tokens_per_s'], train_step_s=tr['step_s'],
             train_temp_bytes=tr.get('temp_bytes'), train_argument_bytes=tr.get('argument_bytes'),
             train_peak_rss_gb=round(_peak_rss_gb(), 3))
  return rec


def headline(records: list) -> list:
  """Per context: CCF / full-attention ratios of every number both measured (the headline)."""
  keys = ('prefill_tokens_per_s', 'decode_tokens_per_s', 'train_tokens_per_s', 'cache_bytes',
          'xla_temp_bytes_max', 'train_temp_bytes', 'train_peak_rss_gb')
  full = {r['context']: r for r in records if r['arch'] == 'full_attention'}
  out = []
  for r in records:
    if r['arch'] != 'ccf':
      continue
    f = full.get(r['context'], {})
    row = {'context': r['context'], 'ratio': r['ratio']}
    for k in keys:
      a, b = r.get(k), f.get(k)
      row[k] = (round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float))
                and b else None)
    row['full_attention'] = f.get('na', 'measured') if f else 'not measured'
    out.append(row)
  return out


def default_lengths() -> tuple:
  """Context lengths of the CLI: $CCF_BENCH_CONTEXTS (comma-separated, as `bench decode` reads
  it) or DEFAULT_LENGTHS."""
  env = os.environ.get('CCF_BENCH_CONTEXTS', '')
  return tuple(int(x) for x in env.split(',') if x.strip()) or DEFAULT_LENGTHS


def bench_efficiency(config, params=None, lengths=None, archs=None, ratios=None,
                     decode_steps: int = 16, train_steps: int = 2, max_seconds: float = 300.0,
                     progress=None) -> list:
  """Records for the config's arch (each ratio for CCF) and full attention of the same size, at
  every context length that fits here (the others n/a with the reason), then a headline record."""
  lengths = default_lengths() if lengths is None else lengths
  if archs is None:
    archs = [config.model.arch] + (['full_attention'] if config.model.arch != 'full_attention'
                                   else [])
  if ratios is None:
    x = config.ccf
    ratios = tuple(x.ratios) or (x.segment_len // x.num_memory,)
  records = []
  for arch in archs:
    p = _params_for(config, arch, params)
    for ratio in (ratios if arch == 'ccf' else (None,)):
      slow = ''
      for n in lengths:
        cfg, have = variant(config, arch, n), ec.available_bytes()
        base = {'bench': 'efficiency', 'arch': arch, 'ratio': ratio, 'context': int(n)}
        too_big = _too_big(estimate_bytes(cfg, n, training=False), have, 'inference')
        if slow or too_big:
          rec = dict(base, na=slow or too_big)
        else:
          train_na = _too_big(estimate_bytes(cfg, n), have, 'the training step (attention buffers)')
          t = time.time()
          try:
            rec = measure(config, arch, n, p, ratio, decode_steps, train_steps, train_na)
          except (MemoryError, RuntimeError, ImportError) as e:  # XLA OOM is a RuntimeError.
            rec = dict(base, na=f'failed here: {type(e).__name__}: {str(e)[:160]}')
          rec['wall_s'] = round(time.time() - t, 2)
          if rec['wall_s'] > max_seconds:
            slow = (f'the {n}-token context already took {rec["wall_s"]:.0f}s > '
                    f'max_seconds={max_seconds:.0f}')
        records.append(rec)
        if progress:
          progress.update(f"{arch}{f' {ratio}x' if ratio else ''} n={n}")
  records.append({'bench': 'efficiency_headline', 'ccf_over_full': headline(records)})
  return records


def run(model, p: dict) -> dict:
  """The efficiency section with preset `p` (keys: lengths, decode_steps, train_steps,
  max_seconds)."""
  archs = [model.arch] + (['full_attention'] if model.arch != 'full_attention' else [])
  n_ratios = len(model.ratios) if model.arch == 'ccf' else 1
  prog = ec.Progress('efficiency', len(p['lengths']) * (n_ratios + len(archs) - 1))
  recs = bench_efficiency(model.config, model.params, tuple(p['lengths']), archs,
                          model.ratios or None, p['decode_steps'], p['train_steps'],
                          p['max_seconds'], progress=prog)
  return {'records': recs[:-1], 'headline': recs[-1]['ccf_over_full'], 'batch': 1,
          'machine_memory_gb': round(ec.available_bytes() / 1e9, 1)}
