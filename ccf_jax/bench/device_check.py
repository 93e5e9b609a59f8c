"""`python -m ccf_jax.bench device_check [--smoke] [--budget_s=400]` (`launch/device_check.sh`):
one JSON report of what this machine's accelerator does with ccf_jax, in one call.

Device time is scarce (a lent GPU for minutes), so the check is one prepared run that always ends
with a report: stages run in order of importance, each within its share of `--budget_s`; an item
that would not fit in what is left of its stage is skipped with the reason recorded, and a watchdog
writes the report as it stands and exits at budget + 30 s whatever is running (a compile cannot be
interrupted otherwise). The report is rewritten after every item, so a killed run leaves one too.

Stages (report keys):
  device      platform, device kind, versions, peak FLOP/s, which API variants this JAX has.
  attention   each implementation that runs here against dense float32 on the models' masks
              (plain causal; the CCF encoder's nested prefixes over [segment; memory]; the CCF
              decoder's [memory rows; tokens] with memory_window and a short last window), built
              by the library (`ccf/masks.py`, `model/spans.py`): max abs error of the output and of
              dq, dk, dv, against the reference's largest value, in the training dtype.
  train       the real jitted train step (`train/timing.TrainTimer`) of a ~1B-parameter decoder
              and the same model as CCF 8x, bf16 compute with f32 parameters, at the two lengths:
              tokens/s, step time, MFU, XLA's memory figures and the device's peak bytes, with
              the first implementation that ran in the attention stage; then `ccf_vs_full` at the
              longer length (full attention = the plain decoder over the same tokens).
  inference   prefill seconds and decode ms/token of CCF 8x and full attention at the contexts
              (`inference/engine.Engine`, timed as `bench decode` times them).
  train_other_impls  the train items again with every other implementation that ran, while
              time remains (a dense-score implementation whose scores alone would not fit in the
              device's memory is skipped with that reason, not run into an out-of-memory error).
`--smoke` runs the same code on the CPU with tiny shapes (the suite runs it).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import threading
import time

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# bench decode's engine and timing, reused as they are, so that both benchmarks measure alike.
from ccf_jax.bench.decode import DECODE_REPEATS, WARMUP
from ccf_jax.bench.decode import _engine as random_engine
from ccf_jax.bench.decode import _time_decodes as time_decodes
from ccf_jax.bench.decode import _time_prefill as time_prefill
from ccf_jax.ccf import masks
from ccf_jax.core import config_lib
from ccf_jax.core import flops as flops_lib
from ccf_jax.model import attention, spans as spans_lib
from ccf_jax.train import timing

_SMOKE = flags.DEFINE_bool('smoke', False, 'device_check: tiny shapes on the CPU (the suite runs '
                           'it; the same code as the device run).')
_BUDGET = flags.DEFINE_float('budget_s', 0.0, 'device_check: seconds for all stages (0 = 400, '
                             'or 60 with --smoke); the run ends by budget + 30 s whatever happens.')
_REPORT = flags.DEFINE_string('report', '', 'device_check: where to write the JSON report '
                              '(default: $OUT/device_check.json when OUT is set, else nowhere).')

GRACE_S = 30.0  # The watchdog's margin after the budget.
# Attention implementations worth timing per platform, preferred first (`attention.resolve`).
PLATFORM_IMPLS = {'gpu': ('cudnn', 'blocked', 'xla'), 'tpu': ('splash', 'blocked', 'xla'),
                  'cpu': ('xla', 'blocked')}  # cpu: `cpu_choice` for the small CCF masks here.
TOLERANCE = {'float32': 1e-3, 'bfloat16': 3e-2}  # Max error / largest reference value.
# Where each stage must end, as a fraction of the budget (cumulative: time a stage leaves unused
# goes to the next ones, and an overrun comes out of theirs); the other impls get what is left.
STAGE_END = {'attention': 0.15, 'train': 0.55, 'inference': 0.85, 'train_other_impls': 1.0}


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The shapes of a run: ~1B parameters on a device, tiny ones for --smoke."""
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  vocab_size: int
  lengths: tuple  # Train window lengths (tokens).
  step_tokens: int  # Tokens per train step (batch = step_tokens // length, at least 1).
  segment_len: int  # CCF l; c = l / ratio.
  contexts: tuple  # Inference contexts (tokens).
  attn_len: int  # Attention stage: causal length; CCF masks use segment_len and 4 segments.
  block: int  # Blocked kernel's block in the attention stage.
  dtype: str
  train_steps: int = 5
  decode_steps: int = 16
  ratio: int = 8


DEVICE = Sizes(d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8, head_dim=128,
               mlp_dim=8192, vocab_size=32000, lengths=(4096, 16384), step_tokens=16384,
               segment_len=512, contexts=(16384, 65536), attn_len=2048, block=128,
               dtype='bfloat16')
SMOKE = Sizes(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
              vocab_size=256, lengths=(128,), step_tokens=256, segment_len=32, contexts=(256,),
              attn_len=64, block=16, dtype='float32', train_steps=2, decode_steps=2)


def one_line(e: BaseException) -> str:
  msg = ' '.join(str(e).split())
  return f'{type(e).__name__}: {msg[:400]}'


class Report:
  """The report dict, rewritten to `path` after every item, and the clock every stage reads."""

  def __init__(self, path: str, budget_s: float):
    self.path, self.budget_s, self.start = path, budget_s, time.time()
    self.data = {'bench': 'device_check', 'budget_s': budget_s, 'complete': False}
    self.data.update({name: {} for name in STAGE_END})
    self.data['ccf_vs_full'] = {'skipped': 'not reached'}
    self._lock = threading.Lock()
    self._done = False
    self._watchdog = threading.Timer(budget_s + GRACE_S, self._out_of_time)
    self._watchdog.daemon = True
    self._watchdog.start()

  def elapsed(self) -> float:
    return time.time() - self.start

  def write(self):
    with self._lock:
      if self._done:
        return
      self.data['elapsed_s'] = round(self.elapsed(), 1)
      if self.path:
        tmp = self.path + '.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
          json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)

  def mark_unreached(self, why: str):
    for name in STAGE_END:
      if not self.data[name]:
        self.data[name] = {'skipped': why}

  def finish(self) -> dict:
    self._watchdog.cancel()
    self.data['complete'] = True
    self.mark_unreached('not reached')
    self.write()
    self._done = True
    return self.data

  def _out_of_time(self):
    """Ends the process with the report as it stands: a compile or step cannot be interrupted."""
    self.data['interrupted'] = (f'the watchdog stopped the run at {self.elapsed():.0f}s (budget '
                                f'{self.budget_s:.0f}s + {GRACE_S:.0f}s) inside the item running '
                                'then; later items did not run.')
    self.mark_unreached('not reached: the watchdog stopped the run')
    self.write()
    with self._lock:
      self._done = True
      print(json.dumps(self.data), flush=True)
    os._exit(0)  # pylint: disable=protected-access


class Stage:
  """Items of one stage within its deadline: an item is skipped, with the reason, when what is
  left is less than the longest item so far took (the best guess of the next one's cost)."""

  def __init__(self, report: Report, name: str):
    self.report, self.name = report, name
    self.rows = report.data.setdefault(name, {})
    self.deadline = report.start + STAGE_END[name] * report.budget_s
    self.longest = 0.0

  def run(self, key: str, fn, *args):
    left = self.deadline - time.time()
    if left <= self.longest or left <= 0:
      self.rows[key] = {'skipped': f'out of time: {max(left, 0):.0f}s left of stage '
                                   f'{self.name!r}, its longest item took {self.longest:.0f}s'}
      self.report.write()
      return None
    self.rows[key] = {'interrupted': 'the watchdog stopped the run inside this item'}
    t = time.time()
    try:
      out = fn(*args)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('device_check %s/%s: %s', self.name, key, one_line(e))
      out = {'error': one_line(e)}
    finally:
      gc.collect()
    took = time.time() - t
    self.longest = max(self.longest, took)
    self.rows[key] = dict(out, wall_s=round(took, 1)) if isinstance(out, dict) else out
    self.report.write()
    return out


# ------------------------------------------------------------------------------------------------
# Stage: device.


def _version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def memory_stats(device=None) -> dict:
  """The device's allocator figures where it has them (GPU, TPU); {} elsewhere (CPU: None)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  except Exception:  # pylint: disable=broad-except
    stats = None
  return dict(stats or {})


def device_info() -> dict:
  d = jax.devices()[0]
  peak, why = flops_lib.peak_flops_per_device(d.device_kind)
  try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                            text=True, timeout=10, check=False).stdout.strip() or None
  except OSError:
    commit = None
  dpa = inspect.signature(jax.nn.dot_product_attention).parameters
  return {'platform': jax.default_backend(), 'device_kind': d.device_kind,
          'device_count': jax.device_count(), 'python': sys.version.split()[0],
          'versions': {n: v for n in ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda13-plugin',
                                      'libtpu', 'flax', 'optax', 'orbax-checkpoint', 'grain',
                                      'ml-collections', 'numpy') if (v := _version(n))},
          'commit': commit,
          'peak_tflops_per_device': round(peak / 1e12, 1) if peak else None,
          **({'mfu_note': why} if why else {}),
          'memory_bytes_limit': memory_stats(d).get('bytes_limit'),
          'api': {'dot_product_attention_local_window': 'local_window_size' in dpa,
                  'memory_stats': bool(memory_stats(d))}}


# ------------------------------------------------------------------------------------------------
# Stage: attention errors against dense float32.


def mask_cases(s: Sizes) -> dict:
  """name -> (Spans, batch, Lq, Lk): the models' masks, from the library's own builders."""
  l, c, t = s.segment_len, s.segment_len // s.ratio, 4
  span = jnp.full((2,), s.ratio, jnp.int32)
  # Two windows of T segments: the second short (2 valid segments); memory_window = 2.
  seg_ok = jnp.arange(t)[None] < jnp.asarray([t, 2])[:, None]
  mem_segment = jnp.broadcast_to(jnp.repeat(jnp.arange(t), c), (2, t * c))
  mem_valid = jnp.repeat(seg_ok, c, axis=1)
  window = ml_collections.ConfigDict({'memory_window': 2})
  lo, hi = masks.visible_range(window, jnp.broadcast_to(jnp.arange(t), (2, t)))
  return {
      'causal': (spans_lib.causal(s.attn_len), 1, s.attn_len, s.attn_len),
      'ccf_encoder_nested': (masks.encoder_spans(span, l, c), 2, l + c, l + c),
      'ccf_decoder_window_ragged': (masks.decoder_spans(mem_segment, mem_valid, lo, hi, l),
                                    2 * t, l, t * c + l),
  }


def _fwd_bwd(fn, q, k, v, w):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out.astype(jnp.float32),) + tuple(g.astype(jnp.float32) for g in vjp(w.astype(out.dtype)))


def attention_error(s: Sizes, impl: str, case) -> dict:
  """Max abs error of out, dq, dk, dv of `impl` in the sizes' dtype against dense_attend in
  float32 on the same (rounded) inputs, with the reference's largest magnitude as the scale."""
  mask, b, lq, lk = case
  dtype = jnp.dtype(s.dtype)
  r = np.random.default_rng(0)
  shape_q, shape_k = (b, lq, s.num_heads, s.head_dim), (b, lk, s.num_kv_heads, s.head_dim)
  q, w = (jnp.asarray(r.normal(size=shape_q), dtype) for _ in range(2))
  k, v = (jnp.asarray(r.normal(size=shape_k), dtype) for _ in range(2))
  dense = jnp.broadcast_to(mask.dense(lk), (b, lq, lk))
  block = 128 if impl == 'splash' else s.block
  want = jax.jit(lambda *a: _fwd_bwd(lambda q, k, v: attention.dense_attend(q, k, v, dense),
                                     *a))(*(x.astype(jnp.float32) for x in (q, k, v, w)))
  got = jax.jit(lambda *a: _fwd_bwd(lambda q, k, v: attention.attend(q, k, v, mask, impl, block),
                                    *a))(q, k, v, w)
  out = {}
  for name, g, ref in zip(('out', 'dq', 'dk', 'dv'), got, want):
    scale = float(jnp.abs(ref).max())
    out[name] = {'max_abs_err': float(jnp.abs(g - ref).max()), 'ref_max_abs': scale}
  worst = max(x['max_abs_err'] / max(x['ref_max_abs'], 1e-6) for x in out.values())
  out['ok'] = worst <= TOLERANCE[s.dtype]
  out['worst_relative'] = worst
  return out


def attention_stage(stage: Stage, s: Sizes, impls) -> list:
  """Runs every impl on every mask, mask by mask (so that every impl meets the first masks
  when time is short); returns the impls that ran ('ran': at least one mask, none failing), in
  preference order. Those also within TOLERANCE on all their masks are 'within_tolerance': an
  impl that runs but errs is still timed, and the report shows both."""
  rows = {impl: [] for impl in impls}
  for name, case in mask_cases(s).items():
    for impl in impls:
      rows[impl].append(stage.run(f'{impl}/{name}', attention_error, s, impl, case))
  done = {impl: [r for r in got if r is not None] for impl, got in rows.items()}
  ran = [i for i in impls if done[i] and all('ok' in r for r in done[i])]
  accurate = [i for i in ran if all(r['ok'] for r in done[i])]
  stage.rows.update(ran=ran, within_tolerance=accurate)
  return ran


# ------------------------------------------------------------------------------------------------
# Stage: the train step.


def model_config(base, s: Sizes, arch: str, length: int, impl: str):
  """`base` with the sizes' model, a window of `length` tokens, one device, fresh weights."""
  c = ml_collections.ConfigDict(base.to_dict())
  c.name = f'device_check_{arch}_{length}'
  m = c.model
  m.arch, m.attention_impl = arch, impl
  for f in ('d_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim',
            'vocab_size'):
    m[f] = getattr(s, f)
  m.dtype, m.param_dtype, m.remat_policy, m.scan_layers = s.dtype, 'float32', 'none', True
  m.max_position = 2 * max(max(s.contexts), length)
  m.attention_block = 128  # The blocked and splash kernels' block (splash: a multiple of 128).
  m.sliding_window, m.tie_embeddings = 0, False
  c.init.params_only = c.init.from_hf = c.init.from_checkpoint = ''
  c.data.batch_size = max(1, s.step_tokens // length)
  c.train.grad_accum = 1
  if arch == 'decoder':
    c.data.mode, c.data.seq_len = 'packed', length
  else:
    l = s.segment_len
    c.data.mode = 'windows'
    x = c.ccf
    x.segment_len, x.num_segments, x.num_memory, x.ratios = l, length // l, l // s.ratio, ()
    x.mode, x.shared_weights, x.grad_mode, x.ae_mode = 'pretrain', True, 'full', 'off'
    x.memory_window, x.decoder_segment_chunk, x.encoder_remat = 0, 0, 'model'
    x.memory_init_token = -1
  c.mesh.num_devices, c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1, 1
  return c


def dense_score_bytes(cfg) -> int:
  """Bytes of the float32 scores and probabilities a dense-mask attention keeps for the backward
  pass over all layers (no remat): what decides whether 'xla' can run at a length at all."""
  m, b = cfg.model, cfg.data.batch_size
  if m.arch == 'decoder':
    rect = b * cfg.data.seq_len ** 2
  else:
    x = cfg.ccf
    l, c, t = x.segment_len, x.num_memory, x.num_segments
    rect = b * t * (l * (t * c + l) + (l + c) ** 2)
  return 2 * 4 * rect * m.num_heads * m.num_layers


def train_item(cfg, steps: int) -> dict:
  if cfg.model.attention_impl == 'xla':
    limit = memory_stats().get('bytes_limit')
    need = dense_score_bytes(cfg)
    if limit and need > 0.6 * limit:
      return {'skipped': f'dense scores need {need / 2**30:.0f} GiB of the device\'s '
                         f'{limit / 2**30:.0f} GiB'}
  timer = timing.TrainTimer(cfg)
  step_s = timer.block(steps)
  rec = timer.record(step_s)
  rec.pop('mfu_note', None)  # Said once, in the device section.
  stats = memory_stats()
  rec.update(attention_impl=cfg.model.attention_impl, dtype=cfg.model.dtype,
             xla_peak_bytes=rec.get('argument_bytes', 0) + rec.get('output_bytes', 0)
             + rec.get('temp_bytes', 0) - rec.get('alias_bytes', 0),
             device_peak_bytes_so_far=stats.get('peak_bytes_in_use'))
  del timer
  return rec


def train_stage(stage: Stage, base, s: Sizes, impls) -> None:
  for length in s.lengths:
    for arch in ('decoder', 'ccf'):
      for impl in impls:
        stage.run(f'{arch}_{length}/{impl}', train_item,
                  model_config(base, s, arch, length, impl), s.train_steps)


def ccf_vs_full(train: dict, s: Sizes, impl: str) -> dict:
  n = max(s.lengths)
  full, ccf = train.get(f'decoder_{n}/{impl}', {}), train.get(f'ccf_{n}/{impl}', {})
  if 'tokens_per_s' not in full or 'tokens_per_s' not in ccf:
    return {'skipped': f'needs both train items at {n} tokens with {impl}'}
  ratio = ccf['tokens_per_s'] / full['tokens_per_s']
  return {'tokens': n, 'attention_impl': impl, 'full_tokens_per_s': full['tokens_per_s'],
          'ccf_tokens_per_s': ccf['tokens_per_s'], 'ccf_over_full': round(ratio, 3),
          'target_3x_met': ratio >= 3.0}


# ------------------------------------------------------------------------------------------------
# Stage: inference.


def inference_item(base, s: Sizes, impl: str, arch: str, n: int) -> dict:
  cfg = model_config(base, s, arch, min(s.lengths), impl)
  engine = random_engine(cfg, arch, s.ratio if arch == 'ccf' else None, cfg.model.max_position)
  prompt = np.random.default_rng(0).integers(4, s.vocab_size, n).astype(np.int32)
  prefill_s, state = time_prefill(engine, prompt)
  if engine.mode == 'full':  # Exact capacity for the timed decode steps: no bucket growth.
    del state
    gc.collect()
    rows = n + DECODE_REPEATS * s.decode_steps + WARMUP
    state = engine.synthetic_state(1, n, capacity=rows)
  ms = time_decodes({arch: (engine, state)}, s.decode_steps)[arch]
  return {'context': n, 'attention_impl': impl, 'prefill_s': round(prefill_s, 4),
          'prefill_tokens_per_s': round(n / prefill_s, 1), 'decode_ms_per_token': round(ms, 3),
          'compile_s': round(engine.compile_seconds, 2),
          'device_peak_bytes_so_far': memory_stats().get('peak_bytes_in_use')}


def inference_stage(stage: Stage, base, s: Sizes, impl: str) -> None:
  for n in s.contexts:
    for arch in ('ccf', 'decoder'):
      name = 'ccf_8x' if arch == 'ccf' else 'full_attention'
      stage.run(f'{name}_{n}', inference_item, base, s, impl, arch, n)


# ------------------------------------------------------------------------------------------------


def report_path() -> str:
  if _REPORT.value:
    return _REPORT.value
  out = os.environ.get('OUT')
  return os.path.join(out, 'device_check.json') if out else ''


def device_check(config) -> dict:
  """The whole check (module doc); returns the report (bench prints it as one JSON line)."""
  smoke = _SMOKE.value
  if smoke and jax.default_backend() != 'cpu':
    raise config_lib.ConfigError('device_check --smoke runs on the CPU, but JAX chose '
                                 f'{jax.default_backend()!r}. Fix: JAX_PLATFORMS=cpu (what '
                                 'launch/device_check.sh --smoke sets).')
  if not smoke and jax.default_backend() == 'cpu':
    raise config_lib.ConfigError('device_check found no accelerator (JAX\'s backend is cpu), and '
                                 'the ~1B shapes are out of reach there. Fix: install jax with its '
                                 'CUDA or TPU plugin, or run launch/device_check.sh --smoke.')
  s = SMOKE if smoke else DEVICE
  report = Report(report_path(), _BUDGET.value or (60.0 if smoke else 400.0))
  report.data.update(smoke=smoke, sizes=dataclasses.asdict(s))
  report.data['device'] = device_info()
  report.write()
  platform = jax.default_backend()
  impls = PLATFORM_IMPLS.get(platform, ('xla',))
  passed = attention_stage(Stage(report, 'attention'), s, impls)
  first = passed[:1]
  if not first:
    report.data['ccf_vs_full'] = {'skipped': 'no attention implementation ran here'}
    report.mark_unreached('no attention implementation ran here')
    return report.finish()
  train = Stage(report, 'train')
  train_stage(train, config, s, first)
  report.data['ccf_vs_full'] = ccf_vs_full(train.rows, s, first[0])
  inference_stage(Stage(report, 'inference'), config, s, first[0])
  others = Stage(report, 'train_other_impls')
  if passed[1:]:
    train_stage(others, config, s, passed[1:])
  else:
    others.rows['skipped'] = 'no other attention implementation passed here'
  return report.finish()
