"""Llama-family Hugging Face checkpoints <-> ccf_jax exports, and CCF adapters on their own.

    python -m ccf_jax.convert --from_hf=DIR --out=EXPORT [--param_dtype=auto|float32|bfloat16]
    python -m ccf_jax.convert --to_hf=DIR --from_export=EXPORT [--dtype=auto|bfloat16|...]

Reading uses only `config.json` and the safetensors shards (through the `safetensors` package's
numpy API; bfloat16 arrives as ml_dtypes.bfloat16), so no torch is needed at run time. The mapping
is a reshape/transpose per tensor and nothing else: HF stores `nn.Linear` weights as [out, in]
(ccf_jax: [in, out] with heads split out), and ccf_jax's rotary uses the same half-split
(`rotate_half`) layout as Hugging Face's Llama, so q/k need no row permutation (the permutation
people remember is between Meta's original interleaved checkpoints and HF's layout, and HF files
are already permuted). Tensors are written back with the exact inverse, so a round trip
reproduces the files' arrays bit for bit.

Supported: LlamaForCausalLM and MistralForCausalLM (silu MLP, no biases), grouped-query
attention, tied or untied embeddings, and rope without scaling or with Llama-3 scaling, read from
either transformers 5's `rope_parameters` or the legacy `rope_theta` + `rope_scaling` keys.
Anything else (biases, other rope scalings, quantized weights, .bin-only checkpoints) is refused
with the reason rather than converted into a model that silently computes something else.

An export made here is an ordinary ccf_jax export (ccf_jax.export.write_export): `params/`,
`config.json` (a full training config whose model.* fields come from the HF config), the
tokenizer (see ccf_jax.hf_tokenizer), and `hf/` with the original config.json and side files so
`--to_hf` can reproduce them. `init.from_hf=DIR` in any experiment calls `load_hf_params`.

The CCF adapter (LoRA weights, memory and repeat vectors: whatever the architecture trains in
adapter mode) exports on its own with `export_adapter`, recording a reference to its base and a
checksum of the base arrays it was trained on; `load_adapter` rebuilds the full parameters from
that base and refuses a base whose checksum differs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil

from absl import logging
import numpy as np

from ccf_jax.interop import hf_tokenizer
from ccf_jax.core import config_lib
from ccf_jax.checkpoint import export as export_lib
from ccf_jax import registry as arch_lib
from ccf_jax import checkpoint as ckpt_lib
from ccf_jax.model import layers

SUPPORTED = ('LlamaForCausalLM', 'MistralForCausalLM')
CONFIG, INDEX, SINGLE = 'config.json', 'model.safetensors.index.json', 'model.safetensors'
DTYPES = ('float32', 'bfloat16', 'float16')
# Per-layer tensors: ccf_jax path under params['layers'] -> HF name under model.layers.{i}.
LAYER_NAMES = {
    ('attn_norm', 'scale'): 'input_layernorm.weight', ('attn', 'wq'): 'self_attn.q_proj.weight',
    ('attn', 'wk'): 'self_attn.k_proj.weight', ('attn', 'wv'): 'self_attn.v_proj.weight',
    ('attn', 'wo'): 'self_attn.o_proj.weight', ('mlp', 'w_gate'): 'mlp.gate_proj.weight',
    ('mlp_norm', 'scale'): 'post_attention_layernorm.weight', ('mlp', 'w_up'): 'mlp.up_proj.weight',
    ('mlp', 'w_down'): 'mlp.down_proj.weight'}
IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)  # Buffers some old checkpoints saved; recomputed.


class ConvertError(ValueError):
  """A checkpoint that cannot be converted; the message names the file, the problem and the fix."""


def _np_dtype(name: str):
  import ml_dtypes
  return {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}[name]


# --------------------------------------------------------------------------------------- config
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


def _check_against(fields: dict, model_cfg, where: str):
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


# -------------------------------------------------------------------------------------- weights
def _weight_files(hf_dir: str) -> dict:
  """{tensor name: file} from model.safetensors.index.json, or from every *.safetensors file."""
  index = os.path.join(hf_dir, INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(hf_dir, f))]
    if missing:
      raise ConvertError(f'{index} lists shards that are missing: {missing[:4]}. Fix: download '
                         'every shard of the checkpoint.')
    return {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
  files = sorted(f for f in os.listdir(hf_dir) if f.endswith('.safetensors'))
  if not files:
    bins = [f for f in os.listdir(hf_dir) if f.endswith(('.bin', '.pt', '.pth'))]
    fix = ('convert it to safetensors once with transformers (`model.save_pretrained(dir, '
           'safe_serialization=True)`), then run this again' if bins else
           'download the model.safetensors file(s)')
    only = f' (only {bins[:3]})' if bins else ''
    raise ConvertError(f'{hf_dir} has no *.safetensors weights{only}; ccf_jax reads safetensors '
                       f'only (no torch at run time). Fix: {fix}.')
  out = {}
  for f in files:
    with _open(os.path.join(hf_dir, f)) as fh:
      out.update({k: os.path.join(hf_dir, f) for k in fh.keys()})
  return out


@contextlib.contextmanager
def _open(path: str):
  """safetensors' numpy reader, with a damaged file reported as a ConvertError."""
  from safetensors import safe_open
  try:
    handle = safe_open(path, framework='numpy')
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError, OSError)
    raise ConvertError(f'{path} is not a readable safetensors file ({e}). Fix: download it '
                       'again.') from e
  with handle as fh:
    yield fh


def _expected_shapes(f: dict) -> dict:
  """ccf_jax path (tuple) -> shape of every parameter a model with `f` fields has."""
  L, d, h, k, hd, mlp, v = (f['num_layers'], f['d_model'], f['num_heads'], f['num_kv_heads'],
                            f['head_dim'], f['mlp_dim'], f['vocab_size'])
  per_layer = {('attn_norm', 'scale'): (d,), ('attn', 'wq'): (d, h, hd),
               ('attn', 'wk'): (d, k, hd), ('attn', 'wv'): (d, k, hd), ('attn', 'wo'): (h, hd, d),
               ('mlp_norm', 'scale'): (d,), ('mlp', 'w_gate'): (d, mlp), ('mlp', 'w_up'): (d, mlp),
               ('mlp', 'w_down'): (mlp, d)}
  out = {('layers',) + p: (L,) + s for p, s in per_layer.items()}
  out.update({('embed',): (v, d), ('final_norm', 'scale'): (d,)})
  if not f['tie_embeddings']:
    out[('lm_head',)] = (d, v)
  return out


def _to_ours(path: tuple, w: np.ndarray, shape: tuple) -> np.ndarray:
  """One HF tensor -> ccf_jax layout (`shape` without the layer axis for per-layer tensors)."""
  name = path[-1]
  if name in ('wq', 'wk', 'wv', 'wo', 'w_gate', 'w_up', 'w_down', 'lm_head'):
    w = w.T  # nn.Linear stores [out, in].
  return w.reshape(shape)


def _to_hf(path: tuple, a: np.ndarray) -> np.ndarray:
  """Exact inverse of `_to_ours`: [in, out] (heads merged) -> [out, in], C-contiguous."""
  name = path[-1]
  if name in ('wq', 'wk', 'wv', 'w_gate', 'w_up'):
    a = a.reshape(a.shape[0], -1).T
  elif name in ('wo', 'w_down', 'lm_head'):
    a = a.reshape(-1, a.shape[-1]).T
  return np.ascontiguousarray(a)


def _hf_name(path: tuple, layer: int | None = None) -> str:
  if path[0] == 'layers':
    return f'model.layers.{layer}.{LAYER_NAMES[path[1:]]}'
  return {('embed',): 'model.embed_tokens.weight', ('final_norm', 'scale'): 'model.norm.weight',
          ('lm_head',): 'lm_head.weight'}[path]


def load_hf_params(path, model_cfg=None, dtype: str | None = None) -> dict:
  """ccf_jax decoder params (nested dict of host numpy arrays) from a Hugging Face directory.

  With `model_cfg`, the checkpoint must match its model.* fields and arrays are cast to its
  `param_dtype`; otherwise `dtype` (default: the stored dtype, float16 widened to float32).
  Stacked [layers, ...] arrays are preallocated and filled one tensor at a time, so peak host
  memory is the converted model plus one tensor.
  """
  path = os.fspath(path)
  fields = hf_config_to_model_config(read_hf_config(path), os.path.join(path, CONFIG))
  if model_cfg is not None:
    _check_against(fields, model_cfg, path)
    dtype = model_cfg.param_dtype
  files = _weight_files(path)
  # A tied checkpoint loaded into an untied model: lm_head starts as embed.T.
  untie = fields['tie_embeddings'] and model_cfg is not None and not model_cfg.tie_embeddings
  wanted = {}  # HF name -> (ccf path, layer or None, per-tensor shape)
  for p, shape in _expected_shapes(fields).items():
    for i in (range(fields['num_layers']) if p[0] == 'layers' else [None]):
      wanted[_hf_name(p, i)] = (p, i, shape[1:] if i is not None else shape)
  if fields['tie_embeddings']:
    files.pop('lm_head.weight', None)  # Some tied checkpoints store it anyway: a copy of embed.
  extra = sorted(n for n in files if n not in wanted and not n.endswith(IGNORED_SUFFIXES))
  if extra:
    raise ConvertError(f'{path} has tensors a Llama-family model does not: {extra[:6]}'
                       f'{" ..." if len(extra) > 6 else ""}. Fix: convert a plain '
                       f'{"/".join(SUPPORTED)} checkpoint.')
  missing = sorted(n for n in wanted if n not in files)
  if missing:
    raise ConvertError(f'{path} lacks tensors that config.json implies: {missing[:6]}. Fix: '
                       'download every shard, and check config.json belongs to these weights.')

  if dtype is None:  # The embedding's dtype for all (a few checkpoints keep norms in float32).
    with _open(files['model.embed_tokens.weight']) as fh:
      stored = fh.get_slice('model.embed_tokens.weight').get_dtype()
    dtype = {'BF16': 'bfloat16', 'F32': 'float32', 'F16': 'float32'}.get(stored)
    if dtype is None:
      raise ConvertError(f'{path}: weights stored as {stored} are not supported. Fix: convert '
                         'a bfloat16, float16 or float32 release.')
  flat, target, by_file = {}, _np_dtype(dtype), {}
  for name in wanted:
    by_file.setdefault(files[name], []).append(name)
  for f, names in sorted(by_file.items()):
    with _open(f) as fh:
      for name in sorted(names):
        p, layer, shape = wanted[name]
        w = fh.get_tensor(name)
        hf_shape = _to_hf(p, np.empty(shape, np.int8)).shape
        if w.shape != hf_shape:
          raise ConvertError(f'{f}: {name} has shape {list(w.shape)}, but config.json implies '
                             f'{list(hf_shape)}. Fix: use the config.json released with these '
                             'weights.')
        a = _to_ours(p, w, shape).astype(target, copy=False)
        if layer is None:
          flat[p] = np.ascontiguousarray(a)
        else:
          if p not in flat:
            flat[p] = np.empty((fields['num_layers'],) + tuple(shape), target)
          flat[p][layer] = a
  params = {}
  for p, v in flat.items():
    functools.reduce(lambda t, k: t.setdefault(k, {}), p[:-1], params)[p[-1]] = v
  if untie:
    params['lm_head'] = np.ascontiguousarray(params['embed'].T)
  return params


def params_to_hf_state(params: dict, tie_embeddings: bool) -> dict:
  """{HF tensor name: C-contiguous numpy array} of decoder params, in Hugging Face's order."""
  out = {'model.embed_tokens.weight': np.ascontiguousarray(np.asarray(params['embed']))}
  layers = params['layers']
  num_layers = np.shape(layers['attn']['wq'])[0]
  for i in range(num_layers):
    for sub in LAYER_NAMES:
      a = np.asarray(layers[sub[0]][sub[1]][i])
      out[_hf_name(('layers',) + sub, i)] = _to_hf(sub, a)
  out['model.norm.weight'] = np.ascontiguousarray(np.asarray(params['final_norm']['scale']))
  if not tie_embeddings:
    out['lm_head.weight'] = _to_hf(('lm_head',), np.asarray(params['lm_head']))
  return out


# ------------------------------------------------------------------------------ HF <-> export
def hf_to_export(hf_dir, out, *, param_dtype: str = 'auto', overwrite: bool = False) -> str:
  """Converts a Hugging Face Llama-family directory into a ccf_jax export at `out`.

  Its config.json is a full training config (experiments/base.py) with the checkpoint's model.*
  fields and `param_dtype = dtype =` the stored dtype (float32 or bfloat16)."""
  import ml_collections
  from experiments import base
  hf_dir = os.path.abspath(os.fspath(hf_dir))
  hf = read_hf_config(hf_dir)
  fields = hf_config_to_model_config(hf, os.path.join(hf_dir, CONFIG))
  params = load_hf_params(hf_dir, dtype=None if param_dtype == 'auto' else param_dtype)
  cfg = base.get_config()
  cfg.name = f'hf_{os.path.basename(hf_dir.rstrip("/"))}'
  for k, v in fields.items():
    cfg.model[k] = ml_collections.ConfigDict(v) if k == 'rope_scaling' else v
  cfg.model.param_dtype = cfg.model.dtype = np.dtype(params['embed'].dtype).name
  cfg.data.seq_len = min(cfg.data.seq_len, fields['max_position'])
  files = {f'{hf_tokenizer.EXPORT_HF_DIR}/{CONFIG}': os.path.join(hf_dir, CONFIG)}
  for name in hf_tokenizer.AUX_FILES + (hf_tokenizer.HF_FILE,):
    if os.path.isfile(os.path.join(hf_dir, name)):
      files[f'{hf_tokenizer.EXPORT_HF_DIR}/{name}'] = os.path.join(hf_dir, name)
  kind, tok_path = hf_tokenizer.find(hf_dir)
  tok_info = {'kind': kind}
  if kind is None:
    logging.warning('%s has neither tokenizer.model nor tokenizer.json: exporting weights only.',
                    hf_dir)
    cfg.data.tokenizer = ''
  else:
    tok = hf_tokenizer.load(tok_path)
    hf_tokenizer.check_vocab(tok, fields['vocab_size'], tok_path)
    name = (hf_tokenizer.SP_FILE if kind == hf_tokenizer.SENTENCEPIECE
            else f'{hf_tokenizer.EXPORT_HF_DIR}/{hf_tokenizer.HF_FILE}')
    files[name] = tok_path
    cfg.data.tokenizer = name  # Relative to the export directory.
    tok_info.update(file=name, **tok.special_ids())
  try:
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    raise ConvertError(f'{hf_dir}: the converted config is not valid: {e}') from e
  info = {'source': hf_dir, 'source_format': 'huggingface',
          'architecture': (hf.get('architectures') or [hf.get('model_type')])[0],
          'hf_dtype': hf.get('dtype', hf.get('torch_dtype')), 'tokenizer': tok_info}
  export_lib.write_export(out, params, json.loads(cfg.to_json_best_effort()), files=files,
                          info=info, overwrite=overwrite)
  return os.path.abspath(os.fspath(out))


def _write_shards(state: dict, out_dir: str, max_shard_bytes: int):
  """model.safetensors, or model-0000i-of-0000n.safetensors + index when larger than a shard."""
  from safetensors.numpy import save_file
  shards, size = [[]], 0
  for name, a in state.items():
    if shards[-1] and size + a.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += a.nbytes
  meta = {'format': 'pt'}  # transformers refuses safetensors files without it.
  if len(shards) == 1:
    save_file(state, os.path.join(out_dir, SINGLE), metadata=meta)
    return
  weight_map = {}
  for i, names in enumerate(shards):
    fname = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file({n: state[n] for n in names}, os.path.join(out_dir, fname), metadata=meta)
    weight_map.update({n: fname for n in names})
  index = {'metadata': {'total_size': int(sum(a.nbytes for a in state.values()))},
           'weight_map': weight_map}
  with open(os.path.join(out_dir, INDEX), 'w') as f:
    json.dump(index, f, indent=2)


def export_to_hf(export_dir, out, *, dtype: str = 'auto', max_shard_bytes: int = 5 * 2**30,
                 overwrite: bool = False) -> str:
  """Writes a ccf_jax export as a Hugging Face LlamaForCausalLM directory at `out`."""
  import ml_collections
  export_dir, out = os.path.abspath(os.fspath(export_dir)), os.path.abspath(os.fspath(out))
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise ConvertError(f'{out} already exists. Fix: pass --overwrite, or choose another --to_hf.')
  params, config, tok_path = export_lib.load_export(export_dir)
  m = ml_collections.ConfigDict(config['model'])
  if 'embed' not in params and 'decoder' in params:
    logging.warning('%s is a %s export: writing its base decoder only (the adapter has no '
                    'Hugging Face Llama equivalent; use export_adapter for it).', export_dir,
                    m.arch)
    params = params['decoder']
  state = params_to_hf_state(params, m.tie_embeddings)
  stored = np.dtype(state['model.embed_tokens.weight'].dtype).name
  dtype = stored if dtype == 'auto' else dtype
  if dtype != stored:
    state = {k: v.astype(_np_dtype(dtype)) for k, v in state.items()}
  hf_dir = os.path.join(export_dir, hf_tokenizer.EXPORT_HF_DIR)  # Original side files, if any.
  base = read_hf_config(hf_dir) if os.path.isfile(os.path.join(hf_dir, CONFIG)) else None
  hf_cfg = model_config_to_hf_config(m, base, dtype)
  tmp = f'{out}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    _write_shards(state, tmp, max_shard_bytes)
    with open(os.path.join(tmp, CONFIG), 'w') as f:
      json.dump(hf_cfg, f, indent=2, sort_keys=True)
    for name in hf_tokenizer.AUX_FILES + (hf_tokenizer.HF_FILE,):
      if os.path.isfile(os.path.join(hf_dir, name)):
        shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, name))
    if tok_path is not None:
      shutil.copyfile(tok_path, os.path.join(tmp, hf_tokenizer.SP_FILE))
      if not os.path.isfile(os.path.join(tmp, hf_tokenizer.AUX_FILES[0])):
        hf_tokenizer.write_hf_tokenizer_config(os.path.join(tmp, hf_tokenizer.AUX_FILES[0]),
                                               tok_path)
    if os.path.exists(out):
      shutil.rmtree(out)
    os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


# ------------------------------------------------------------------------------ CCF adapters
def _adapter_split(cfg, params):
  """(adapter, base) params: what the architecture trains in adapter mode, and the rest."""
  import ml_collections
  acfg = ml_collections.ConfigDict(cfg.to_dict())
  acfg.ccf.mode = 'adapter'
  arch = arch_lib.get_arch(acfg)
  adapter, base = arch_lib.split_params(acfg, arch, params)
  if not adapter or not base:
    raise ConvertError(f'model.arch={cfg.model.arch!r} has no separate adapter (adapter mode '
                       'trains everything or nothing). Fix: export the whole model with '
                       '`python -m ccf_jax.export`.')
  return adapter, base


def export_adapter(params, out, base_ref: str, cfg, *, overwrite: bool = False) -> str:
  """Writes only the adapter of full `params` (config `cfg`) as an export at `out`.

  `base_ref` names the base (a Hugging Face directory or a ccf_jax export); a checksum of the
  base arrays inside `params` is recorded so `load_adapter` can refuse a different base.
  """
  import jax
  adapter, base = _adapter_split(cfg, params)
  info = {'kind': 'ccf_adapter', 'base_ref': os.fspath(base_ref),
          'base_fingerprint': ckpt_lib.fingerprint(base)}
  export_lib.write_export(out, jax.device_get(adapter), json.loads(cfg.to_json_best_effort()),
                          info=info, overwrite=overwrite)
  return os.path.abspath(os.fspath(out))


def read_adapter(path) -> tuple[dict, dict, dict]:
  """(adapter params, config dict, export info) of an adapter export."""
  adapter, config, _ = export_lib.load_export(path)
  with open(os.path.join(os.fspath(path), export_lib.INFO_JSON)) as f:
    info = json.load(f)
  if info.get('kind') != 'ccf_adapter':
    raise ConvertError(f'{path} is a full export, not an adapter. Fix: load it with '
                       'ccf_jax.export.load_export, or pass an export_adapter directory.')
  return adapter, config, info


def load_adapter(path, base=None):
  """(full params, config) from an adapter export on its base.

  `base`: None (the recorded `base_ref`), a directory (HF or export), or plain decoder params.
  The base is mapped in with the architecture's `from_base_params` and must have the checksum
  recorded at export time.
  """
  import jax
  import ml_collections
  adapter, config, info = read_adapter(path)
  cfg = ml_collections.ConfigDict(config)
  ref = info['base_ref'] if base is None else base
  where = os.fspath(ref) if isinstance(ref, (str, os.PathLike)) else 'the given base params'
  if isinstance(ref, (str, os.PathLike)):
    if not os.path.isdir(ref):
      raise ConvertError(f'the base of adapter {path} ({ref}) does not exist. Fix: pass '
                         'base=PATH to the Hugging Face directory or export it was trained on.')
    ref = os.fspath(ref)  # An export (params/) or a Hugging Face directory.
    base = (export_lib.load_export(ref)[0] if os.path.isdir(os.path.join(ref, export_lib.PARAMS))
            else load_hf_params(ref, cfg.model))
  dt = layers.DTYPES[cfg.model.param_dtype]
  base = jax.tree.map(lambda a: np.asarray(a).astype(dt), base)
  arch = arch_lib.get_arch(cfg)
  full = arch.from_base_params(cfg, base) if arch.from_base_params else base
  _, frozen = _adapter_split(cfg, full)
  want, got = info['base_fingerprint'], ckpt_lib.fingerprint(frozen)
  bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
  if bad:
    raise ConvertError(f'adapter {path} was trained on a different base than {where}: '
                       f'{len(bad)} base array(s) differ ({", ".join(bad[:4])}). Fix: pass the '
                       f'base it was exported with (recorded base_ref: {info["base_ref"]}).')
  return arch_lib.merge_params(adapter, frozen), cfg
