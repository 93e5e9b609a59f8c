"""Hugging Face config.json <-> the `model.*` fields of a ccf_jax config, for Llama-family models.

Supported: LlamaForCausalLM, MistralForCausalLM (its `sliding_window` becomes
`model.sliding_window`) and Qwen2ForCausalLM (q/k/v biases: `model.qkv_bias`), with silu MLPs,
grouped-query attention, tied or untied embeddings, and rope unscaled or with 'llama3', 'linear' or
'yarn' scaling, read from either transformers 5's `rope_parameters` or the legacy `rope_theta` +
`rope_scaling` keys. Anything else (o_proj or MLP biases, dynamic NTK or other rope scalings,
per-layer windows, quantized weights) is refused here, before a weight is read, with the reason,
rather than converted into a model that silently computes something else. Writing a config back
keeps the original's other keys and rope style, so a round trip reproduces it.
"""

from __future__ import annotations

import json
import math
import os

ARCHITECTURES = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'mistral',
                 'Qwen2ForCausalLM': 'qwen2'}  # The HF class -> its model_type.
SUPPORTED = tuple(ARCHITECTURES)
CONFIG = 'config.json'
# The rope keys each supported scaling reads (transformers' modeling_rope_utils), besides factor.
ROPE_KEYS = {'linear': (), 'llama3': ('low_freq_factor', 'high_freq_factor',
                                      'original_max_position_embeddings'),
             'yarn': ('original_max_position_embeddings', 'beta_fast', 'beta_slow',
                      'attention_factor', 'mscale', 'mscale_all_dim', 'truncate')}


class ConvertError(ValueError):
  """A checkpoint that cannot be converted; the message names the file, the problem and the fix."""


def read_hf_config(hf_dir) -> dict:
  """The config.json of a Hugging Face model directory, as a dict."""
  hf_dir = os.fspath(hf_dir)
  path = os.path.join(hf_dir, CONFIG)
  if not os.path.isdir(hf_dir):
    raise ConvertError(f'{hf_dir} is not a directory. Fix: point at a Hugging Face model '
                       'directory (config.json + *.safetensors), e.g. a snapshot from '
                       '`huggingface-cli download`.')
  if not os.path.isfile(path):
    raise ConvertError(f'{path} is missing, so {hf_dir} is not a Hugging Face model directory. '
                       'Fix: download the whole repository (config.json and the safetensors).')
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ConvertError(f'{path} is not valid JSON ({e}). Fix: download it again.') from e


def _rope(hf: dict, where: str) -> tuple[float, dict]:
  """(rope_theta, ccf_jax rope_scaling) from `rope_parameters` (transformers 5) or legacy keys."""
  params = hf.get('rope_parameters')
  if isinstance(params, dict) and params:
    theta, scaling = params.get('rope_theta', hf.get('rope_theta', 10000.0)), dict(params)
  else:
    theta, scaling = hf.get('rope_theta', 10000.0), dict(hf.get('rope_scaling') or {})
  kind = scaling.pop('rope_type', scaling.pop('type', 'default'))
  scaling.pop('rope_theta', None)
  if float(scaling.get('partial_rotary_factor', hf.get('partial_rotary_factor') or 1.0)) != 1.0:
    raise ConvertError(f'{where}: partial_rotary_factor != 1 (rotary on part of each head) is not '
                       'supported. Fix: convert a checkpoint that rotates whole heads.')
  if kind in (None, 'default'):
    return float(theta), {}
  max_pos = hf.get('max_position_embeddings', 4096)
  if kind == 'dynamic':
    raise ConvertError(
        f"{where}: rope scaling 'dynamic' (dynamic NTK) is not supported: transformers recomputes "
        'its frequencies from the running sequence length (plain rope up to '
        f'max_position_embeddings={max_pos}, a larger base past it, cached keys keeping their '
        'old rotation), which no fixed-frequency model reproduces. Fix: if your contexts stay '
        f'within {max_pos} tokens, delete rope_scaling from config.json (dynamic NTK is plain '
        'rope there), then convert.')
  if kind not in ROPE_KEYS:
    raise ConvertError(f'{where}: rope scaling {kind!r} is not supported (ccf_jax implements '
                       f"{', '.join(repr(k) for k in ROPE_KEYS)}). Fix: convert a checkpoint "
                       'without it.')
  if kind in ('llama3', 'yarn'):  # transformers: a top-level original length wins, else max_pos.
    orig = hf.get('original_max_position_embeddings') or scaling.get(
        'original_max_position_embeddings') or (max_pos if kind == 'yarn' else None)
    scaling['original_max_position_embeddings'] = orig
  if kind == 'yarn' and scaling.get('factor') is None and orig:
    scaling['factor'] = max_pos / orig
  need = ('factor',) + (ROPE_KEYS[kind] if kind == 'llama3' else ())
  missing = [k for k in need if scaling.get(k) is None]
  if missing:
    raise ConvertError(f'{where}: {kind} rope scaling lacks {missing}. Fix: complete config.json.')
  out = {'rope_type': kind, 'factor': float(scaling['factor'])}
  for k in ROPE_KEYS[kind]:
    v = scaling.get(k)
    if v is not None:
      out[k] = (int(v) if k == 'original_max_position_embeddings' else
                bool(v) if k == 'truncate' else float(v))
  return float(theta), out


def _sliding_window(hf: dict, num_layers: int, max_pos: int, where: str) -> int:
  """The window every layer attends within (0: none), as transformers applies it: Mistral's
  `sliding_window` on all layers; Qwen2's only with use_sliding_window, on the layers
  `layer_types` (or max_window_layers..) marks; Llama has none. A window covering
  max_position_embeddings changes nothing and reads as 0. Different windows per layer are
  refused."""
  kind = hf.get('model_type') or ARCHITECTURES.get((hf.get('architectures') or [None])[0])
  window = hf.get('sliding_window')
  if kind not in ('mistral', 'qwen2') or not window:
    return 0
  window = int(window)
  if kind == 'qwen2':
    if not hf.get('use_sliding_window'):
      return 0
    first = int(hf.get('max_window_layers', 28))
    types = hf.get('layer_types') or ['sliding_attention' if i >= first else 'full_attention'
                                      for i in range(num_layers)]
    if len(set(types)) > 1:
      raise ConvertError(
          f'{where}: use_sliding_window=true gives {types.count("sliding_attention")} of '
          f'{num_layers} layers a window of {window} tokens and the rest full attention; ccf_jax '
          'has one window for all layers. Fix: if your contexts stay within '
          f'{window} tokens, set use_sliding_window=false in config.json (the logits agree there).')
    if types[0] != 'sliding_attention':
      return 0
  return 0 if window >= max_pos else window


def hf_config_to_model_config(hf: dict, where: str = CONFIG) -> dict:
  """The `model.*` fields of a ccf_jax config for a Hugging Face Llama-family config dict."""
  arch = (hf.get('architectures') or [None])[0]
  kind = ARCHITECTURES.get(arch, hf.get('model_type'))
  if kind not in ARCHITECTURES.values():
    raise ConvertError(f'{where}: architecture {arch or hf.get("model_type")!r} is not supported. '
                       f'Fix: convert a Llama-family checkpoint ({", ".join(SUPPORTED)}).')
  if hf.get('quantization_config'):
    raise ConvertError(f'{where}: quantized checkpoints are not supported. Fix: convert the '
                       'unquantized (bfloat16/float16/float32) release.')
  if hf.get('hidden_act', 'silu') not in ('silu', 'swish'):
    raise ConvertError(f'{where}: hidden_act={hf["hidden_act"]!r}; ccf_jax\'s MLP is SwiGLU '
                       '(silu). Fix: convert a Llama-family checkpoint.')
  for key in ('attention_bias', 'mlp_bias'):  # Qwen2's q/k/v biases are its class's, not a key.
    if hf.get(key):
      where_bias = 'q/k/v and o_proj' if key == 'attention_bias' else 'the MLP'
      raise ConvertError(f'{where}: {key}=true (biases on {where_bias}), but ccf_jax\'s blocks '
                         'have no biases there (q/k/v biases only, as Qwen2ForCausalLM). Fix: '
                         'convert a checkpoint without biases.')
  try:
    d, heads = int(hf['hidden_size']), int(hf['num_attention_heads'])
    theta, scaling = _rope(hf, where)
    fields = dict(
        vocab_size=int(hf['vocab_size']), d_model=d, num_layers=int(hf['num_hidden_layers']),
        num_heads=heads, num_kv_heads=int(hf.get('num_key_value_heads') or heads),
        head_dim=int(hf.get('head_dim') or d // heads), mlp_dim=int(hf['intermediate_size']),
        rope_theta=theta, rope_scaling=scaling,
        max_position=int(hf.get('max_position_embeddings', 4096)),
        norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)))
  except KeyError as e:
    raise ConvertError(f'{where}: required field {e} is missing. Fix: use the config.json '
                       'released with the weights.') from e
  fields['sliding_window'] = _sliding_window(hf, fields['num_layers'], fields['max_position'],
                                             where)
  fields['qkv_bias'] = kind == 'qwen2'
  return fields


def _architecture(m, base: dict | None) -> str:
  """The HF class to write: the base's when it can express the model, else the simplest that can
  (q/k/v biases: Qwen2; a sliding window: Mistral; otherwise Llama)."""
  can = {'LlamaForCausalLM': not m.get('qkv_bias') and not m.get('sliding_window'),
         'MistralForCausalLM': not m.get('qkv_bias'), 'Qwen2ForCausalLM': True}
  have = (base or {}).get('architectures') or [None]
  if have[0] in can and can[have[0]]:
    return have[0]
  return next(a for a in ('LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM') if can[a])


def _rope_scaling_out(m) -> dict:
  """model.rope_scaling as transformers spells it (rope_type first; llama3's defaults are
  layers.rope_frequencies')."""
  scaling = dict(m.rope_scaling or {})
  if not scaling.get('factor'):
    return {}
  kind = scaling.get('rope_type', 'llama3')
  out = {'factor': float(scaling['factor']), 'rope_type': kind}
  if kind == 'llama3':
    out.update(high_freq_factor=float(scaling.get('high_freq_factor', 4.0)),
               low_freq_factor=float(scaling.get('low_freq_factor', 1.0)),
               original_max_position_embeddings=int(scaling.get(
                   'original_max_position_embeddings', 8192)))
  else:
    out.update({k: v for k, v in scaling.items() if k in ROPE_KEYS[kind]})
  return out


def model_config_to_hf_config(model_cfg, base: dict | None = None, dtype: str = 'float32') -> dict:
  """A Hugging Face config.json dict (Llama, Mistral or Qwen2: `_architecture`); keeps `base`'s
  other keys, and its rope and window keys as they were when they describe the same model."""
  m = model_cfg
  arch = _architecture(m, base)
  if base is not None and (base.get('architectures') or [None])[0] != arch:
    base = {k: v for k, v in base.items() if k not in ('architectures', 'model_type')}
  out = dict(base or {'hidden_act': 'silu', 'torch_dtype': dtype})
  out.update(architectures=[arch], model_type=ARCHITECTURES[arch])
  if arch != 'Qwen2ForCausalLM' and base is None:
    out.update(attention_bias=False, mlp_bias=False)
  out.update(vocab_size=int(m.vocab_size), hidden_size=int(m.d_model),
             intermediate_size=int(m.mlp_dim), num_hidden_layers=int(m.num_layers),
             num_attention_heads=int(m.num_heads), num_key_value_heads=int(m.num_kv_heads),
             head_dim=int(m.head_dim), max_position_embeddings=int(m.max_position),
             rms_norm_eps=float(m.norm_eps), tie_word_embeddings=bool(m.tie_embeddings))
  out['dtype' if 'dtype' in out or base is None else 'torch_dtype'] = dtype
  window = int(m.get('sliding_window', 0))
  if base is None or _sliding_window(base, m.num_layers, m.max_position, CONFIG) != window:
    out.pop('layer_types', None)  # transformers derives it from the keys below.
    if arch == 'Qwen2ForCausalLM':
      out.update(use_sliding_window=bool(window), sliding_window=window or None,
                 max_window_layers=0 if window else int(m.num_layers))
    elif arch == 'MistralForCausalLM':
      out['sliding_window'] = window or None
  if base is not None and _rope(base, CONFIG) == (float(m.rope_theta), _rope_scaling_out(m)):
    return out  # The same rope: its keys stay exactly as the source wrote them.
  scaling = _rope_scaling_out(m)
  if isinstance(out.get('rope_parameters'), dict):  # transformers 5 style, as the base had it.
    out['rope_parameters'] = {**(scaling or {'rope_type': 'default'}),
                              'rope_theta': float(m.rope_theta)}
  else:  # Legacy keys: read by transformers 4 and 5 alike.
    out['rope_theta'] = float(m.rope_theta)
    out['rope_scaling'] = scaling or None
  return out


def _normal_scaling(d) -> dict:
  """A rope_scaling dict in one comparable form: {} when unscaled, rope_type explicit."""
  d = dict(d or {})
  if not d.get('factor'):
    return {}
  d.setdefault('rope_type', 'llama3')
  return {k: v if isinstance(v, (str, bool)) else float(v) for k, v in d.items()}


def check_against(fields: dict, model_cfg, where: str):
  """The HF checkpoint must be the model the config describes (max_position may differ; so may
  sliding_window for CCF architectures, which config validation holds at 0: no window over memory
  rows). Floats agree to float32 rounding: a config from a GGUF or a float32 export stores 1e-5 as
  9.99999975e-06."""
  bad = []
  defaults = {'sliding_window': 0, 'qkv_bias': False}  # Configs written before the fields.
  skip = ('max_position', 'tie_embeddings') + (
      ('sliding_window',) if model_cfg.get('arch', 'decoder') != 'decoder' else ())
  for k, v in fields.items():
    if k in skip:
      continue
    have = model_cfg.get(k, defaults.get(k))
    if k == 'rope_scaling':
      have, v = _normal_scaling(have), _normal_scaling(v)
      same = have.keys() == v.keys() and all(
          have[x] == v[x] if isinstance(v[x], (str, bool)) else
          math.isclose(have[x], v[x], rel_tol=1e-6) for x in v)
    elif isinstance(v, float):
      same = math.isclose(float(have), v, rel_tol=1e-6)
    else:
      same = have == v
    if not same:
      bad.append(f'model.{k}={have} but the checkpoint has {v}')
  if model_cfg.tie_embeddings and not fields['tie_embeddings']:
    bad.append('model.tie_embeddings=True but the checkpoint has a separate lm_head')
  if bad:
    raise ConvertError(f'{where} does not match the model config: {"; ".join(bad)}. Fix: set '
                       'those model.* fields to the checkpoint\'s values (print them with '
                       '`python -m ccf_jax.convert --from_hf=DIR --out=EXPORT` and read the '
                       "export's config.json).")
