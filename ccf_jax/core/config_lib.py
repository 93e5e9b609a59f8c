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

from ccf_jax.core import sharding

ARCHS = ('decoder', 'ccf', 'segment_local', 'full_attention')  # ccf_jax/registry.py maps them.
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch')  # model/decoder.py maps them to jax's.
GRAD_MODES = ('full', 'truncated', 'reservoir')  # ccf.grad_mode (ccf/incremental.py).
RESERVOIR_SEMANTICS = ('final', 'streaming')  # ccf.reservoir_semantics (ccf/incremental.py).


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


def max_relative_position(ccf_cfg, num_segments: int) -> int:
  """Positions a model must cover for windows of `num_segments` segments: the largest distance
  between a decoder query and a key it sees, plus one (and the encoder's l + 1)."""
  l, c = ccf_cfg.segment_len, ccf_cfg.num_memory
  visible = num_segments - 1
  if ccf_cfg.memory_window:
    visible = min(visible, ccf_cfg.memory_window)
  if ccf_cfg.memory_positions == 'sequential':
    decoder = visible * c + l
  else:
    decoder = (visible + 1) * l
  return max(decoder, l + 1)


def validate(cfg, num_devices: int | None = None, *,
             training: bool = True) -> ml_collections.ConfigDict:
  """Raises ConfigError on any inconsistency; returns cfg (unchanged) for chaining. `training`:
  the config will be trained (the precision policy applies); False for a stored model's config
  (an export converted from a bfloat16 checkpoint)."""
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
  if training:
    _check_precision(cfg)
  chunk = m.get('loss_chunk', 0)
  _require(isinstance(chunk, int) and chunk >= 0, f'model.loss_chunk={chunk!r} must be an integer '
           '>= 0 (positions per chunk of the fused head and loss; 0 = whole logits). Fix: '
           '--config.model.loss_chunk=0 or e.g. 256.')
  _require(not chunk or m.arch == 'decoder', f'model.loss_chunk={chunk} fuses the plain '
           f"decoder's head and loss; model.arch={m.arch!r} would ignore it. Fix: "
           '--config.model.loss_chunk=0.')
  _require(m.remat_policy in REMAT_POLICIES,
           f'model.remat_policy={m.remat_policy!r}; choose one of {REMAT_POLICIES}.')
  _check_attention(m)
  _check_positions(m)
  _require(d.mode in ('packed', 'windows'), f"data.mode={d.mode!r}; choose 'packed' or 'windows'.")
  _require(d.task in ('', 'passkey'), f"data.task={d.task!r}; choose '' (corpus text) or 'passkey'.")
  _require(d.passkey_score in ('answer', 'all'),
           f"data.passkey_score={d.passkey_score!r}; choose 'answer' or 'all'.")
  _require(d.passkey_depth in ('segment0', 'uniform'),
           f"data.passkey_depth={d.passkey_depth!r}; choose 'segment0' or 'uniform'.")
  _require(d.passkey_filler in ('sentences', 'corpus'),
           f"data.passkey_filler={d.passkey_filler!r}; choose 'sentences' or 'corpus'.")
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
           f'Fix: pick c dividing l (ratio r = l/c){_divisor_hint(x.segment_len, x.num_memory)}.')
  _require(window_len(cfg) <= m.max_position or m.arch in ('ccf', 'segment_local'),
           f'a window of {window_len(cfg)} tokens exceeds model.max_position={m.max_position}. '
           f'Fix: shorten data.seq_len or raise model.max_position.')
  _require(not (cfg.init.params_only and cfg.init.from_hf),
           f'init.params_only={cfg.init.params_only!r} and init.from_hf={cfg.init.from_hf!r} are '
           'both set, but a run starts from one pretrained model (experiments such as tiny_ccf.py '
           'set init.params_only). Fix: --config.init.params_only= to start from init.from_hf, or '
           '--config.init.from_hf= to start from the export.')
  _require(t.decay in ('cosine', 'linear', 'constant'), f'train.decay={t.decay!r}; cosine|linear|constant.')
  _require(t.nonfinite in ('skip', 'stop'), f"train.nonfinite={t.nonfinite!r}; 'skip' or 'stop'.")
  _require(t.get('peak_flops_per_device', 0.0) >= 0,
           f'train.peak_flops_per_device={t.get("peak_flops_per_device")} must be >= 0 (0 = from '
           'the device kind). Fix: the dense bf16 FLOP/s of one device, e.g. 989e12 for an H100.')
  _require(t.grad_accum >= 1 and d.batch_size % t.grad_accum == 0,
           f'data.batch_size={d.batch_size} must be divisible by train.grad_accum={t.grad_accum}.')
  _require(t.steps > 0, f'train.steps={t.steps}: train.steps must be > 0. Fix: '
           '--config.train.steps=N with N >= 1.')
  _require(0 <= t.warmup_steps <= t.steps,
           f'train.warmup_steps={t.warmup_steps} must lie in [0, train.steps={t.steps}].')
  _require(math.isfinite(t.lr) and t.lr > 0,
           f'train.lr={t.lr}: the learning rate must be finite and > 0. Fix: '
           '--config.train.lr=3e-4 (or another positive value).')
  mult = t.get('adapter_lr_mult', 1.0)
  _require(math.isfinite(mult) and mult > 0,
           f'train.adapter_lr_mult={mult}: must be finite and > 0. Fix: '
           '--config.train.adapter_lr_mult=1 (the CCF parameters at train.lr).')
  _require(mult == 1.0 or (cfg.model.arch == 'ccf' and cfg.ccf.mode != 'adapter'),
           f'train.adapter_lr_mult={mult} sets the lr of CCF parameters next to a trained base, '
           f'but model.arch={cfg.model.arch!r}, ccf.mode={cfg.ccf.get("mode")!r} has '
           f'{"no CCF parameters" if cfg.model.arch != "ccf" else "no trained base"}. Fix: '
           '--config.train.adapter_lr_mult=1 and set the rate with --config.train.lr.')
  _require(t.max_update_ratio == 0 or (math.isfinite(t.max_update_ratio) and t.max_update_ratio > 0),
           f'train.max_update_ratio={t.max_update_ratio} must be finite and > 0, or 0 (off). Fix: '
           '--config.train.max_update_ratio=1.0.')
  _require(t.divergence_factor == 0 or (math.isfinite(t.divergence_factor)
                                        and t.divergence_factor > 1),
           f'train.divergence_factor={t.divergence_factor} must be finite and > 1 (a loss that many '
           'times its best is divergence), or 0 (off). Fix: --config.train.divergence_factor=3.0.')
  if m.arch in ('ccf', 'segment_local', 'full_attention'):
    _check_ccf(cfg)
  if num_devices is not None:
    check_mesh(cfg, num_devices)
  return cfg


def _divisor_hint(l: int, c: int) -> str:
  """', e.g. --config.ccf.num_memory=D' with D the divisors of l (below l) nearest to c, or ''."""
  divisors = [d for d in range(1, l) if l % d == 0]
  if not divisors:
    return ''
  below = [d for d in divisors if d <= c]
  above = [d for d in divisors if d > c]
  picks = ([max(below)] if below else []) + ([min(above)] if above else [])
  return ', e.g. ' + ' or '.join(f'--config.ccf.num_memory={d}' for d in picks)


# ---- model.attention_impl (model/attention.py) -------------------------------------------------
ATTENTION_IMPLS = ('auto', 'xla', 'blocked', 'rows', 'cudnn', 'splash')  # model/attention.py: IMPLS.


def _check_attention(m):
  """The attention switch: a known kernel, a positive block, and cudnn only for bf16 compute
  (the platform itself is checked when the model is traced: plans are made on other hosts)."""
  _require(m.attention_impl in ATTENTION_IMPLS,
           f'model.attention_impl={m.attention_impl!r}; choose one of {ATTENTION_IMPLS}.')
  _require(m.attention_block >= 1,
           f'model.attention_block={m.attention_block} must be >= 1 (query/key rows per block '
           'of the blocked, rows and splash kernels). Fix: 128.')
  _require(m.attention_impl != 'cudnn' or m.dtype == 'bfloat16',
           "model.attention_impl='cudnn' runs bf16/fp16 only. Fix: --config.model.dtype=bfloat16 "
           "or --config.model.attention_impl=auto.")
  _require(m.attention_impl != 'splash' or m.attention_block % 128 == 0,
           f"model.attention_impl='splash' needs model.attention_block={m.attention_block} to be a "
           'multiple of 128 (the kernel computes key blocks of 128 lanes). Fix: 128 or 512.')


# ---- model.param_dtype, model.dtype: the precision policy --------------------------------------


def base_trains(cfg) -> bool:
  """Whether the decoder's own weights (stored in model.param_dtype) are trained: everywhere but
  CCF's adapter mode, whose trainable adapter parameters are float32 always."""
  return not (cfg.model.arch == 'ccf' and cfg.ccf.mode == 'adapter')


def _check_precision(cfg):
  """Mixed precision is model.param_dtype=float32 (master weights; AdamW's moments take their
  dtype) with model.dtype=bfloat16 (compute). bfloat16 parameters that the optimizer updates are
  bfloat16 masters and moments: an update smaller than 2^-8 of a weight rounds away, so training
  stalls at small learning rates. That needs train.bf16_master_weights; a frozen bfloat16 base
  (ccf.mode=adapter) does not."""
  m = cfg.model
  _require(m.param_dtype != 'bfloat16' or not base_trains(cfg)
           or cfg.train.get('bf16_master_weights', False),
           f'model.param_dtype=bfloat16 trains bfloat16 master weights and AdamW moments '
           f'(model.arch={m.arch!r}{"" if m.arch == "decoder" else f", ccf.mode={cfg.ccf.mode!r}"}'
           '): updates below 2^-8 of a weight are lost. Fix: --config.model.param_dtype=float32 '
           '--config.model.dtype=bfloat16 (float32 masters, bfloat16 compute), or '
           '--config.train.bf16_master_weights=True to accept bfloat16 masters.')


# ---- model.rope_scaling, model.sliding_window (model/layers.py, model/spans.py) -----------------
ROPE_TYPES = ('llama3', 'linear', 'yarn')  # model/layers.rope_frequencies implements them.


def _check_positions(m):
  """Rope scaling of a kind the model implements, with its keys; a sliding window only where the
  attention honours it: the plain decoder. CCF's decoder reads [memory rows ; tokens] and a window
  over memory rows is not defined, so it is refused rather than ignored."""
  scaling = dict(m.rope_scaling or {})
  if scaling.get('factor'):
    kind = scaling.get('rope_type', 'llama3')
    _require(kind in ROPE_TYPES, f'model.rope_scaling.rope_type={kind!r}; choose one of '
             f'{ROPE_TYPES} (or an empty model.rope_scaling for none).')
    _require(float(scaling['factor']) > 0, f'model.rope_scaling.factor={scaling["factor"]} must '
             'be > 0.')
    _require(kind != 'yarn' or scaling.get('original_max_position_embeddings'),
             f"model.rope_scaling (rope_type {kind!r}) needs original_max_position_embeddings "
             '(the pretraining context). Fix: --config.model.rope_scaling.'
             'original_max_position_embeddings=N.')
  window = m.get('sliding_window', 0)
  _require(isinstance(window, int) and window >= 0,
           f'model.sliding_window={window!r} must be an integer >= 0 (0 = no window).')
  _require(not window or m.arch == 'decoder',
           f'model.sliding_window={window} is implemented for the plain decoder only, but '
           f'model.arch={m.arch!r} attends over memory rows or whole windows. Fix: '
           '--config.model.sliding_window=0 (with ccf.segment_len <= the window, a segment\'s '
           'own tokens are all within it anyway).')
# -------------------------------------------------------------------------------------------------


def _check_ccf(cfg):
  """Raises ConfigError on CCF settings that cannot work, naming the field and the fix."""
  m, x = cfg.model, cfg.ccf
  l, c, t = x.segment_len, x.num_memory, x.num_segments

  _require(cfg.data.mode == 'windows', f"model.arch={m.arch!r} reads whole-document windows. Fix: "
          f"--config.data.mode=windows (data.mode={cfg.data.mode!r}).")
  _require(t >= 1, f'ccf.num_segments={t} must be at least 1.')
  for name, options in (('mode', ('pretrain', 'adapter')), ('mask', ('nested', 'plain')),
                        ('memory_positions', ('sequential', 'segment')),
                        ('memory_gate', ('none', 'tanh')),
                        ('ae_mode', ('off', 'extra', 'alternate')),
                        ('grad_mode', GRAD_MODES),
                        ('reservoir_semantics', RESERVOIR_SEMANTICS),
                        ('encoder_remat', ('model', *REMAT_POLICIES)),
                        ('decoder_remat', REMAT_POLICIES)):
    _require(x[name] in options, f'ccf.{name}={x[name]!r}; choose one of {options}.')
  _require(x.encoder_trains_base or (x.mode == 'pretrain' and x.shared_weights),
          'ccf.encoder_trains_base=False cuts the encoder\'s gradient into the weights it shares '
          f'with the decoder; it needs ccf.mode=pretrain and ccf.shared_weights=True (got mode='
          f'{x.mode!r}, shared_weights={x.shared_weights}). Fix: --config.ccf.encoder_trains_base'
          '=True.')
  _require(x.memory_gate == 'tanh' or x.memory_gate_init == 0.0,
          f'ccf.memory_gate_init={x.memory_gate_init} initialises the gated read, but '
          f"ccf.memory_gate={x.memory_gate!r}. Fix: --config.ccf.memory_gate=tanh.")
  _require(x.lora_rank >= 1, f'ccf.lora_rank={x.lora_rank} must be at least 1.')
  _require(x.reservoir_size >= 1, f'ccf.reservoir_size={x.reservoir_size} must be at least 1.')
  for name in ('decoder_segment_chunk', 'encoder_map_batch'):
    _require(x[name] >= 0 and (x[name] == 0 or t % x[name] == 0),
            f'ccf.{name}={x[name]} must divide ccf.num_segments={t}. Fix: a divisor of {t} '
            f'(1 = one segment at a time) or 0 (all {t} at once).')
  _require(x.memory_window >= 0, f'ccf.memory_window={x.memory_window} must be >= 0 (0 = all).')
  _require(x.ae_weight >= 0 and (x.ae_mode != 'alternate' or x.ae_weight <= 1),
          f'ccf.ae_weight={x.ae_weight} must be >= 0 (and <= 1 with ae_mode=alternate).')
  _require(-1 <= x.memory_init_token < m.vocab_size,
          f'ccf.memory_init_token={x.memory_init_token} is not -1 or a token id < {m.vocab_size}.')
  ratios = tuple(x.ratios)
  if ratios:
    _require(all(r > 0 and l % r == 0 for r in ratios),
            f'ccf.ratios={ratios}: every ratio must divide ccf.segment_len={l}.')
    _require(l // min(ratios) == c, f'ccf.ratios={ratios} needs ccf.num_memory = segment_len / '
            f'min(ratios) = {l // min(ratios)} memory slots (got {c}). Fix: '
            f'--config.ccf.num_memory={l // min(ratios)}.')
  if m.arch == 'ccf':
    need = max_relative_position(x, t)
    fit = ((m.max_position - l) // c if x.memory_positions == 'sequential'
           else m.max_position // l - 1)
    _require(need <= m.max_position,
            f'windows of {t} segments need rotary positions up to {need} (memory_positions='
            f'{x.memory_positions!r}, memory_window={x.memory_window}) but model.max_position='
            f'{m.max_position}. Fix: --config.ccf.memory_window={max(fit, 1)} (the most segments '
            'whose memory fits), fewer segments, or a larger model.max_position.')
  else:
    _require(l <= m.max_position,
            f'ccf.segment_len={l} exceeds model.max_position={m.max_position}.')


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
  # The fused head's weight gradient accumulates over chunks in a replicated carry: with the batch
  # split over devices, every chunk would all-reduce all of it (model/head_loss.py).
  _require(not m.get('loss_chunk', 0) or carry_b == 1,
           f'model.loss_chunk={m.get("loss_chunk", 0)} runs with the batch on one device, but the '
           f'mesh axes {_axes(batch_axes[0])} split it over {carry_b}; each chunk would all-reduce '
           'the whole head gradient. Fix: --config.model.loss_chunk=0.')
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
