"""Hugging Face config.json <-> the `model.*` fields of a ccf_jax config, for Llama-family models.

Supported: LlamaForCausalLM and MistralForCausalLM (silu MLP, no biases), grouped-query
attention, tied or untied embeddings, and rope without scaling or with Llama-3 scaling, read from
either transformers 5's `rope_parameters` or the legacy `rope_theta` + `rope_scaling` keys.
Anything else (biases, other rope scalings, quantized weights) is refused here, before a weight is
read, with the reason, rather than converted into a model that silently computes something else.
Writing a config back keeps the original's other keys and rope style, so a round trip reproduces it.
"""

from __future__ import annotations

import json
import math
import os

from absl import logging

SUPPORTED = ('LlamaForCausalLM', 'MistralForCausalLM')
CONFIG = 'config.json'


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
  if kind in (None, 'default'):
    return float(theta), {}
  if kind != 'llama3':
    raise ConvertError(f'{where}: rope scaling {kind!r} is not supported (ccf_jax implements '
                       "Llama-3's 'llama3' scaling only). Fix: convert a checkpoint without it.")
  keys = ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')
  missing = [k for k in keys if k not in scaling]
  if missing:
    raise ConvertError(f'{where}: llama3 rope scaling lacks {missing}. Fix: complete config.json.')
  out = {k: float(scaling[k]) for k in keys[:3]}
  out[keys[3]] = int(scaling[keys[3]])
  return float(theta), out


def hf_config_to_model_config(hf: dict, where: str = CONFIG) -> dict:
  """The `model.*` fields of a ccf_jax config for a Hugging Face Llama-family config dict."""
  arch = (hf.get('architectures') or [None])[0]
  if arch not in SUPPORTED and hf.get('model_type') not in ('llama', 'mistral'):
    raise ConvertError(f'{where}: architecture {arch or hf.get("model_type")!r} is not supported. '
                       f'Fix: convert a Llama-family checkpoint ({", ".join(SUPPORTED)}).')
  if hf.get('quantization_config'):
    raise ConvertError(f'{where}: quantized checkpoints are not supported. Fix: convert the '
                       'unquantized (bfloat16/float16/float32) release.')
  if hf.get('hidden_act', 'silu') not in ('silu', 'swish'):
    raise ConvertError(f'{where}: hidden_act={hf["hidden_act"]!r}; ccf_jax\'s MLP is SwiGLU '
                       '(silu). Fix: convert a Llama-family checkpoint.')
  for key in ('attention_bias', 'mlp_bias'):
    if hf.get(key):
      raise ConvertError(f'{where}: {key}=true, but ccf_jax\'s Llama blocks have no biases. '
                         'Fix: convert a checkpoint without biases.')
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
  window = hf.get('sliding_window')
  if window and window < fields['max_position']:
    logging.warning('%s: sliding_window=%d is ignored (ccf_jax attends to the whole context); '
                    'logits agree for sequences of up to %d tokens.', where, window, window)
  return fields


def model_config_to_hf_config(model_cfg, base: dict | None = None, dtype: str = 'float32') -> dict:
  """A Hugging Face LlamaForCausalLM config.json dict; keeps `base`'s other keys and rope style."""
  m = model_cfg
  out = dict(base or {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
                      'hidden_act': 'silu', 'attention_bias': False, 'mlp_bias': False,
                      'torch_dtype': dtype})
  out.update(vocab_size=int(m.vocab_size), hidden_size=int(m.d_model),
             intermediate_size=int(m.mlp_dim), num_hidden_layers=int(m.num_layers),
             num_attention_heads=int(m.num_heads), num_key_value_heads=int(m.num_kv_heads),
             head_dim=int(m.head_dim), max_position_embeddings=int(m.max_position),
             rms_norm_eps=float(m.norm_eps), tie_word_embeddings=bool(m.tie_embeddings))
  out['dtype' if 'dtype' in out or base is None else 'torch_dtype'] = dtype
  scaling = dict(m.rope_scaling or {})
  if scaling:  # ccf_jax's defaults are layers.rope_frequencies'.
    scaling = {'factor': float(scaling['factor']), 'rope_type': 'llama3',
               'high_freq_factor': float(scaling.get('high_freq_factor', 4.0)),
               'low_freq_factor': float(scaling.get('low_freq_factor', 1.0)),
               'original_max_position_embeddings': int(scaling.get(
                   'original_max_position_embeddings', 8192))}
  if isinstance(out.get('rope_parameters'), dict):  # transformers 5 style, as the base had it.
    out['rope_parameters'] = {**(scaling or {'rope_type': 'default'}),
                              'rope_theta': float(m.rope_theta)}
  else:  # Legacy keys: read by transformers 4 and 5 alike.
    out['rope_theta'] = float(m.rope_theta)
    out['rope_scaling'] = scaling or None
  return out


def check_against(fields: dict, model_cfg, where: str):
  """The HF checkpoint must be the model the config describes (max_position may differ)."""
  bad = []
  for k, v in fields.items():
    if k in ('max_position', 'tie_embeddings'):
      continue
    have = model_cfg[k]
    if k == 'rope_scaling':
      have, v = ({kk: float(x) for kk, x in dict(d or {}).items()} for d in (have, v))
      if not have.get('factor'):
        have = {}
    same = math.isclose(float(have), float(v), rel_tol=1e-9) if isinstance(v, float) else have == v
    if not same:
      bad.append(f'model.{k}={have} but the checkpoint has {v}')
  if model_cfg.tie_embeddings and not fields['tie_embeddings']:
    bad.append('model.tie_embeddings=True but the checkpoint has a separate lm_head')
  if bad:
    raise ConvertError(f'{where} does not match the model config: {"; ".join(bad)}. Fix: set '
                       'those model.* fields to the checkpoint\'s values (print them with '
                       '`python -m ccf_jax.convert --from_hf=DIR --out=EXPORT` and read the '
                       "export's config.json).")
