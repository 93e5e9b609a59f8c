"""`python -m ccf_jax.bench peer --config=experiments/tiny.py [--peer_shapes=S1,S2,S3,CCF8x]
[--peer_rounds=2] [--steps=N] [--peer_systems=ccf_jax,torch,jax_plain]`: ccf_jax's train step
against two peers on the same Llama shapes.

Why: a tokens/s figure of ccf_jax alone says nothing about whether the step is slow for the
machine; the same model trained by other code in the same run does. The peers:
  torch      transformers' `LlamaForCausalLM` (attn_implementation='sdpa': its fused causal
             attention) with torch.optim.AdamW and clip_grad_norm_: a mainstream stack. torch and
             transformers are optional (requirements-peer.txt, never a dependency of the library or
             the tests): without them its rows say skipped, with the command that installs them.
  jax_plain  `plain_jax.py`: the same step written directly in jnp in ~100 lines (dense causal
             softmax, unrolled layers, optax), on the same JAX: what ccf_jax's layers cost.
Both run in float32 on random tokens, the same model, loss and update as ccf_jax's plain decoder
(ccf_jax's learning-rate schedule is a scalar per step, left out of the peers).

How: each (shape, system) runs in its own subprocess, so that the peak RSS (`ru_maxrss` of that
child, from os.wait4) is one system's alone and none inherits another's allocator or thread pools.
ccf_jax's child is the real jitted train step (`train/timing.py` TrainTimer: state donated, AdamW
with clipping as the config sets it). Every child takes one warm-up step and then times one block
of `--steps` steps. Rounds alternate the order of the systems (reversed in odd rounds), so a change
in the load of a shared machine lands on all; step_s is the fastest block over rounds (`timeit`'s
rule: other load only ever adds time), and the summary's `vs_<peer>` also gives the median over
rounds of the per-round ratio. cpu_s is the child's CPU seconds (all its threads) per timed step:
the work a step costs, which on a machine shared with other jobs moves less than wall time does
(threads that spin while waiting for a core count in it too). One FLOP formula serves every system
(`core/flops.py` decoder_train_flops); the CCF rows use their arch's own count and have no peer.

Variants (`--peer_variant='NAME=ARGS'`, repeatable): ccf_jax again as system ccf_jax+NAME, in the
same alternation, with ARGS' `--xla*` flags appended to its child's XLA_FLAGS and its
`--config.section.field=value` overrides set on each shape; the summary gives each variant's
speedup over ccf_jax (fastest blocks, and the median of per-round ratios). This is how XLA:CPU
options and `model.scan_layers` were measured (WORKSPACE "Train-step throughput").

Shapes (on top of --config; `config` is --config itself with its --config.* overrides, which is
how a test times a shrunk model):
  S1      d 128, 4 layers, 4 heads, mlp 512, vocab 2048, seq 512, batch 8
  S2      d 512, 8 layers, 8 heads, mlp 1408, vocab 8192, seq 1024, batch 4
  S3      SmolLM2-135M: d 576, 30 layers, 9 heads / 3 kv heads, head_dim 64, mlp 1536,
          vocab 49152, tied embeddings; seq 512, batch 2
  CCF8x   experiments/tiny_ccf.py's train step (8 segments of 128 tokens, 8x), ccf_jax only
  CCF8x_4k  the same with 32 segments: a 4,096-token window, ccf_jax only
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile

import ml_collections
from absl import flags

from ccf_jax.bench import peer_child, steps_flag
from ccf_jax.core import config_lib
from ccf_jax.core import flops as flops_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEMS = tuple(peer_child.SYSTEMS)  # ccf_jax, torch, jax_plain.
PEERS = ('torch', 'jax_plain')  # Decoder shapes only: neither has a CCF counterpart.
SKIP_HINT = 'pip install -r requirements-peer.txt'

SHAPES = {  # name -> {'model': overrides, 'data': overrides}, applied on top of --config.
    'S1': dict(model=dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32,
                          mlp_dim=512, vocab_size=2048, tie_embeddings=False),
               data=dict(seq_len=512, batch_size=8)),
    'S2': dict(model=dict(d_model=512, num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64,
                          mlp_dim=1408, vocab_size=8192, tie_embeddings=False),
               data=dict(seq_len=1024, batch_size=4)),
    'S3': dict(model=dict(d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                          mlp_dim=1536, vocab_size=49152, tie_embeddings=True,
                          rope_theta=100000.0), data=dict(seq_len=512, batch_size=2)),
}
CCF_SHAPES = {'CCF8x': {}, 'CCF8x_4k': dict(ccf=dict(num_segments=32))}  # On tiny_ccf.py.
SHAPE_NAMES = (*SHAPES, *CCF_SHAPES, 'config')

_SHAPES = flags.DEFINE_list('peer_shapes', 'S1,S2,S3,CCF8x', f'bench peer: shapes to time, of '
                            f'{list(SHAPE_NAMES)} ("config": --config as given).')
_ROUNDS = flags.DEFINE_integer('peer_rounds', 2, 'bench peer: alternating rounds (one subprocess '
                               'per system and shape each); step_s is the fastest.', lower_bound=1)
_SYSTEMS = flags.DEFINE_list('peer_systems', ','.join(SYSTEMS), f'bench peer: of {list(SYSTEMS)}.')
_VARIANTS = flags.DEFINE_multi_string(
    'peer_variant', [], "bench peer: a variant of ccf_jax, 'NAME=--xla_flag=v --config.a.b=v ...' "
    '(repeatable), timed as system ccf_jax+NAME in the same alternation: its --xla* flags are '
    'appended to XLA_FLAGS in its child only, its --config.* overrides set on each shape; the '
    "summary gives its speedup against ccf_jax.")
for _flag, _names in ((_SHAPES, SHAPE_NAMES), (_SYSTEMS, SYSTEMS)):
  flags.register_validator(_flag, lambda v, names=_names: bool(v) and set(v) <= set(names),
                           f'--{_flag.name} takes a non-empty list of {list(_names)}.')


def shape_config(base, shape: str) -> ml_collections.ConfigDict:
  """The config of `shape`, an unlocked copy: SHAPES' overrides on `base`, tiny_ccf.py's config
  (plus CCF_SHAPES' overrides) for the CCF shapes, `base` as it is for 'config'."""
  if shape in CCF_SHAPES:
    from experiments import tiny_ccf
    cfg, overrides = tiny_ccf.get_config(), CCF_SHAPES[shape]
  elif shape in SHAPES or shape == 'config':
    cfg, overrides = ml_collections.ConfigDict(base.to_dict()), SHAPES.get(shape, {})
  else:
    raise ValueError(f'unknown peer shape {shape!r}; choose from {list(SHAPE_NAMES)}.')
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  for section, fields in overrides.items():
    for k, v in fields.items():
      cfg[section][k] = v
  if shape in SHAPES:
    cfg.model.max_position = max(cfg.model.max_position, cfg.data.seq_len)
    cfg.name = f'peer_{shape}'
  cfg.model.dtype = cfg.model.param_dtype = 'float32'
  return cfg


def parse_variants(specs) -> dict:
  """{NAME: (xla_flags str, {'section.field': value})} from --peer_variant's 'NAME=ARGS'
  entries; a malformed one is a ConfigError (one line from the entry point). Values are Python
  literals where they parse as one ('False', '256'), else strings. An XLA flag this jaxlib does
  not know aborts that variant's children only: its rows carry the error."""
  out = {}
  for spec in specs:
    name, sep, args = spec.partition('=')
    xla, overrides = [], {}
    for arg in args.split():
      key, eq, val = arg.partition('=')
      if key.startswith('--xla'):
        xla.append(arg)
      elif key.startswith('--config.') and eq and key.count('.') == 2:
        try:
          overrides[key[len('--config.'):]] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
          overrides[key[len('--config.'):]] = val
      else:
        xla = overrides = None
        break
    if not sep or not name.isidentifier() or name in out or xla is None or not (xla or overrides):
      raise config_lib.ConfigError(
          f"--peer_variant={spec!r} is not 'NAME=ARGS' with a new NAME (letters, digits, _) and "
          "ARGS of --xla* flags and --config.section.field=value overrides. Fix: e.g. "
          "--peer_variant='onednn=--xla_cpu_use_onednn=true' or "
          "--peer_variant='unrolled=--config.model.scan_layers=False'.")
    out[name] = (' '.join(xla), overrides)
  return out


def variant_config(cfg, overrides: dict) -> ml_collections.ConfigDict:
  """An unlocked copy of `cfg` with a variant's 'section.field' overrides (the field must exist:
  a typo is a ConfigError, not a silently ignored option)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  for path, value in overrides.items():
    section, field = path.split('.')
    if section not in cfg or field not in cfg[section]:
      raise config_lib.ConfigError(f'--peer_variant override config.{path}: no such field. Fix: '
                                   'name one that experiments/base.py defines.')
    cfg[section][field] = value
  return cfg


def peer_available() -> bool:
  """Whether torch and transformers are importable (checked without importing them here)."""
  return all(importlib.util.find_spec(m) is not None for m in ('torch', 'transformers'))


def train_flops(cfg) -> tuple[float, str]:
  """(FLOPs of one step, the formula's name): decoder_train_flops for decoder shapes (every
  system), the arch's own count for CCF."""
  b, length = cfg.data.batch_size, config_lib.window_len(cfg)
  if cfg.model.arch == 'decoder':
    return flops_lib.decoder_train_flops(cfg, b, length), 'decoder_train_flops'
  from ccf_jax import registry
  return registry.get_arch(cfg).train_flops(cfg, b), f'{cfg.model.arch}.train_flops'


# ---------------------------------------------------------------- children (peer_child.py)


def run_child(system: str, cfg, steps: int, env: dict | None = None) -> dict:
  """Runs `system` on `cfg` in a fresh subprocess; its result plus `peak_rss_gb`, the child's own
  ru_maxrss (os.wait4 reports the rusage of that one process), or {'error': ...}."""
  with tempfile.TemporaryDirectory(prefix='ccf_peer_') as d:
    spec, out, log = (os.path.join(d, n) for n in ('spec.pkl', 'out.json', 'log.txt'))
    with open(spec, 'wb') as f:
      pickle.dump({'system': system, 'config': cfg.to_dict(), 'steps': steps}, f)
    code = 'import sys; from ccf_jax.bench import peer_child; peer_child.main(*sys.argv[1:])'
    with open(log, 'w') as logf:
      p = subprocess.Popen([sys.executable, '-c', code, spec, out], cwd=ROOT, stdout=logf,
                           stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
      _, status, usage = os.wait4(p.pid, 0)
      p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0 or not os.path.exists(out):
      with open(log) as f:
        return {'error': f'exit {p.returncode}: ' + ' | '.join(f.read().splitlines()[-5:])}
    with open(out) as f:
      res = json.load(f)
  res['peak_rss_gb'] = round(usage.ru_maxrss / 1e6, 3)  # Linux reports KiB (as trainer.py's).
  return res


# ---------------------------------------------------------------- rows


def system_row(shape: str, system: str, cfg, runs: list) -> dict:
  """One (shape, system) row from its per-round child results."""
  length = config_lib.window_len(cfg)
  row = {'bench': 'peer', 'shape': shape, 'system': system, 'arch': cfg.model.arch,
         'batch': cfg.data.batch_size, 'length': length}
  errors = [r['error'] for r in runs if 'error' in r]
  ok = [r for r in runs if 'error' not in r]
  if not ok:
    return {**row, 'error': errors[-1] if errors else 'not run'}
  step_s = min(r['block_s'] for r in ok)
  fl, formula = train_flops(cfg)
  row.update(
      params=ok[0]['params'], step_s=round(step_s, 5),
      tokens_per_s=round(cfg.data.batch_size * length / step_s, 1),
      model_gflops_per_s=round(fl / step_s / 1e9, 2), flops=fl, flops_formula=formula,
      cpu_s=round(min(r['cpu_s'] for r in ok), 5),
      peak_rss_gb=max(r['peak_rss_gb'] for r in ok),
      block_s=[round(r['block_s'], 5) if 'error' not in r else None for r in runs],
      setup_s=max(r['compile_s'] for r in ok), version=ok[0]['version'])
  if errors:
    row['errors'] = errors
  return row


def _ratios(row: dict, other: dict) -> dict:
  """One system's row against another's (ccf_jax against a peer; a variant against ccf_jax):
  tokens/s of the fastest blocks, the median over rounds of the per-round ratio, peak RSS and CPU
  seconds (above 1: `row` faster; RSS above 1: larger)."""
  paired = [b / a for a, b in zip(row['block_s'], other['block_s']) if a and b]
  return {'ratio_tokens_per_s': round(other['step_s'] / row['step_s'], 3),
          'ratio_paired_median': round(statistics.median(paired), 3) if paired else None,
          'ratio_peak_rss': round(row['peak_rss_gb'] / other['peak_rss_gb'], 3),
          'ratio_cpu_s': round(other['cpu_s'] / row['cpu_s'], 3)}


def summary_row(shape: str, rows: dict) -> dict:
  """The per-shape line: each system's tokens/s and peak RSS, and for each peer `vs_<peer>`:
  ccf_jax's ratios against it (`_ratios`), or why there is none."""
  out = {'bench': 'peer_summary', 'shape': shape}
  for name, r in rows.items():
    keys = [k for k in ('skipped', 'error') if k in r] or [
        'tokens_per_s', 'step_s', 'model_gflops_per_s', 'peak_rss_gb', 'cpu_s']
    out[name] = {k: r[k] for k in keys}
  jx = rows.get('ccf_jax', {})
  for name, r in rows.items():
    if name.startswith('ccf_jax+') and 'step_s' in r and 'step_s' in jx:
      speedup = _ratios(r, jx)  # The variant as the system, ccf_jax as its peer.
      out[name].update(speedup_vs_ccf_jax=speedup['ratio_tokens_per_s'],
                       speedup_paired_median=speedup['ratio_paired_median'])
  for name in PEERS:
    pr = rows.get(name, {})
    if 'step_s' in jx and 'step_s' in pr:
      out[f'vs_{name}'] = _ratios(jx, pr)
    elif shape in CCF_SHAPES:
      out[f'vs_{name}'] = 'none: CCF has no counterpart in the peer'
    elif 'step_s' not in jx and 'error' in jx:
      out[f'vs_{name}'] = f"ccf_jax failed: {jx['error']}"
    else:
      out[f'vs_{name}'] = pr.get('skipped') or pr.get('error') or 'not run'
  return out


def bench_peer(config) -> list:
  """`bench peer`: rows per (shape, system), then one summary per shape (see the module doc)."""
  shapes = list(_SHAPES.value)
  variants = parse_variants(_VARIANTS.value)
  systems = [s for s in SYSTEMS if s in _SYSTEMS.value] + [f'ccf_jax+{n}' for n in variants]
  steps, rounds = steps_flag(), _ROUNDS.value
  skipped = None
  if 'torch' in systems and not peer_available():
    skipped = f'torch and transformers are not importable, peer skipped: {SKIP_HINT}'
    print(f'bench peer: {skipped}', file=sys.stderr, flush=True)
  cfgs, envs = {}, {}
  for s in shapes:
    shape_cfg = shape_config(config, s)
    for y in systems:
      xla, overrides = variants.get(y.partition('+')[2], ('', {}))
      cfgs[s, y] = variant_config(shape_cfg, overrides) if overrides else shape_cfg
      envs[y] = {'XLA_FLAGS': f"{os.environ.get('XLA_FLAGS', '')} {xla}".strip()} if xla else None
  runs = {(s, y): [] for s in shapes for y in systems}
  for rnd in range(rounds):
    for s in shapes:
      order = systems if rnd % 2 == 0 else systems[::-1]
      for y in order:
        if y in PEERS and ((y == 'torch' and skipped) or cfgs[s, y].model.arch != 'decoder'):
          continue
        res = run_child(y.partition('+')[0], cfgs[s, y], steps, envs[y])
        runs[s, y].append(res)
        print(f'bench peer: round {rnd} {s} {y}: ' + (res.get('error') or
              f"{res['block_s']:.4f} s/step, peak RSS {res['peak_rss_gb']} GB"),
              file=sys.stderr, flush=True)
  out, summaries = [], []
  for s in shapes:
    rows = {}
    for y in systems:
      if y in PEERS and cfgs[s, y].model.arch != 'decoder':
        continue
      if y == 'torch' and skipped:
        rows[y] = {'bench': 'peer', 'shape': s, 'system': y, 'skipped': skipped}
      else:
        rows[y] = system_row(s, y, cfgs[s, y], runs[s, y])
      out.append(rows[y])
    summaries.append(summary_row(s, rows))
  return out + summaries
