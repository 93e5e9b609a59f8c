"""Config validation and derived fields: the one place that knows what a valid config is.

Experiment files only set values. Everything that can be checked before compiling is checked here,
with an error that names the field and the fix: unknown fields (against the schema in
experiments/base.py), model shape constraints, the mesh against the devices, and the batch against
the mesh axes that carry it. Derived quantities (window length, compression ratio, tokens per step)
are computed here and nowhere else.
"""

from __future__ import annotations

import math

import ml_collections

from ccf_jax import sharding

ARCHS = ('decoder', 'ccf', 'segment_local', 'full_attention')


class ConfigError(ValueError):
  """A config value that cannot work, with the fix in the message."""


def _schema():
  from experiments import base
  return base.get_config()


def _check_known(cfg, schema, prefix=''):
  for key in cfg.keys():
    path = f'{prefix}{key}'
    if key not in schema:
      raise ConfigError(
          f'unknown config field {path!r}. Fix: check the spelling against experiments/base.py '
          f'(fields there: {sorted(schema.keys())}).')
    sub, ref = cfg[key], schema[key]
    if isinstance(ref, ml_collections.ConfigDict) and isinstance(sub, ml_collections.ConfigDict) and len(ref):
      _check_known(sub, ref, path + '.')


def _require(cond, msg):
  if not cond:
    raise ConfigError(msg)


def window_len(cfg) -> int:
  """Tokens per example: num_segments * segment_len for windowed CCF data, else data.seq_len."""
  if cfg.data.mode == 'windows':
    return cfg.ccf.num_segments * cfg.ccf.segment_len
  return cfg.data.seq_len


def compression_ratio(cfg) -> int:
  return cfg.ccf.segment_len // cfg.ccf.num_memory


def tokens_per_step(cfg) -> int:
  return cfg.data.batch_size * window_len(cfg)


def validate(cfg, num_devices: int | None = None) -> ml_collections.ConfigDict:
  """Raises ConfigError on any inconsistency; returns cfg (unchanged) for chaining."""
  _check_known(cfg, _schema())
  m, d, t, x = cfg.model, cfg.data, cfg.train, cfg.ccf
  _require(m.arch in ARCHS, f'model.arch={m.arch!r}; choose one of {ARCHS}.')
  for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim'):
    _require(int(m[name]) > 0, f'model.{name}={m[name]} must be positive.')
  _require(m.num_heads % m.num_kv_heads == 0,
           f'model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={m.num_kv_heads}.')
  _require(m.head_dim % 2 == 0, f'model.head_dim={m.head_dim} must be even for rotary embeddings.')
  _require(m.param_dtype in ('float32', 'bfloat16') and m.dtype in ('float32', 'bfloat16'),
           'model.param_dtype and model.dtype must be float32 or bfloat16.')
  from ccf_jax.model import REMAT_POLICIES
  _require(m.remat_policy in REMAT_POLICIES,
           f'model.remat_policy={m.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}.')
  _require(d.mode in ('packed', 'windows'), f"data.mode={d.mode!r}; choose 'packed' or 'windows'.")
  _require(d.task in ('', 'passkey'), f"data.task={d.task!r}; choose '' (corpus text) or 'passkey'.")
  _require(d.passkey_score in ('answer', 'all'),
           f"data.passkey_score={d.passkey_score!r}; choose 'answer' or 'all'.")
  _require(not d.passkey_ae_key or (d.task == 'passkey' and x.ae_mode != 'off'),
           'data.passkey_ae_key auto-encodes the key segment of passkey windows: it needs '
           "data.task='passkey' and an auto-encoding loss. Fix: --config.ccf.ae_mode=extra.")
  _require(d.task != 'passkey' or (d.mode == 'windows' and 2 <= (d.passkey_min_segments or
                                                                  x.num_segments) <= x.num_segments),
           "data.task='passkey' needs data.mode='windows' and data.passkey_min_segments in "
           f'[2, ccf.num_segments={x.num_segments}] (or 0 = T): the key sits in segment 0 and the '
           'question in the last. Fix: --config.data.mode=windows.')
  _require(x.num_memory > 0 and x.segment_len % x.num_memory == 0,
           f'ccf.segment_len={x.segment_len} is not divisible by ccf.num_memory={x.num_memory}. '
           f'Fix: pick c dividing l (ratio r = l/c), e.g. --config.ccf.num_memory='
           f'{max(1, x.segment_len // 8)}.')
  _require(window_len(cfg) <= m.max_position or m.arch in ('ccf', 'segment_local'),
           f'a window of {window_len(cfg)} tokens exceeds model.max_position={m.max_position}. '
           f'Fix: shorten data.seq_len or raise model.max_position.')
  _require(t.decay in ('cosine', 'linear', 'constant'), f'train.decay={t.decay!r}; cosine|linear|constant.')
  _require(t.nonfinite in ('skip', 'stop'), f"train.nonfinite={t.nonfinite!r}; 'skip' or 'stop'.")
  _require(t.grad_accum >= 1 and d.batch_size % t.grad_accum == 0,
           f'data.batch_size={d.batch_size} must be divisible by train.grad_accum={t.grad_accum}.')
  _require(t.steps > 0 and 0 <= t.warmup_steps <= t.steps,
           f'train.warmup_steps={t.warmup_steps} must lie in [0, train.steps={t.steps}].')
  if m.arch in ('ccf', 'segment_local', 'full_attention'):
    from ccf_jax.ccf import arch as ccf_arch  # CCF's own checks live next to its geometry.
    ccf_arch.check_config(cfg)
  if num_devices is not None:
    check_mesh(cfg, num_devices)
  return cfg


def check_mesh(cfg, num_devices: int) -> tuple[int, int, int]:
  """Checks the mesh against the devices, the model's heads, and the batch it must carry."""
  try:
    shape = sharding.resolve_mesh_shape(cfg.mesh, int(cfg.mesh.num_devices) or num_devices)
  except sharding.MeshError as e:
    raise ConfigError(str(e)) from None
  sizes = dict(zip(sharding.MESH_AXES, shape))
  m = cfg.model
  for name in ('num_heads', 'num_kv_heads'):
    _require(m[name] % sizes['tensor'] == 0,
             f'model.{name}={m[name]} is not divisible by mesh.tensor={sizes["tensor"]}. '
             f'Fix: use a tensor axis that divides {m[name]}.')
  rules = cfg.mesh.rules
  batch_axes = sharding.logical_to_spec(('batch', 'segment'), rules)
  micro = cfg.data.batch_size // cfg.train.grad_accum
  carry_b = math.prod(sizes[a] for a in _axes(batch_axes[0]))
  _require(micro % carry_b == 0,
           f'micro-batch {micro} (data.batch_size={cfg.data.batch_size} / train.grad_accum='
           f'{cfg.train.grad_accum}) is not divisible by the {carry_b} devices of the mesh axes '
           f'{_axes(batch_axes[0])} that carry the batch. Fix: make the batch a multiple of {carry_b} '
           f'or change --config.mesh.*.')
  if cfg.model.arch != 'decoder':
    carry_s = math.prod(sizes[a] for a in _axes(batch_axes[1]))
    _require(cfg.ccf.num_segments % carry_s == 0,
             f'ccf.num_segments={cfg.ccf.num_segments} is not divisible by the {carry_s} devices of '
             f'the mesh axes {_axes(batch_axes[1])} that carry segments. Fix: change num_segments '
             f'or the mesh.')
  return shape


def _axes(entry):
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def parse_flags(argv):
  """absl flags parser for entry points: a bad `--config.a.b=V` becomes one clear line.

  ml_collections raises a chain of KeyError/AttributeError for an unknown override; we name the
  flag and the fix instead.
  """
  import sys

  from absl import flags
  try:
    rest = flags.FLAGS(argv)
    config = flags.FLAGS['config'].value if 'config' in flags.FLAGS else None
    if config is not None:  # ml_collections defers a failed load to the first field read.
      config.keys()
    return rest
  except (OSError, SyntaxError, ImportError) as e:  # A config file missing or broken: one line.
    sys.exit(f'error: could not load --config: {" ".join(str(e).split())} Fix: pass an existing '
             'experiments/*.py whose get_config() returns a ConfigDict.')
  except flags.Error as e:
    sys.exit(f'error: {e}\nPass --help for the flags.')
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if a.startswith('--config.')]
    sys.exit(f'error: could not apply config override(s) {bad}: {type(e).__name__}: {e}. '
             'Fix: check the field names and value types against experiments/base.py.')
