"""Safetensors weights of a Hugging Face Llama-family checkpoint <-> ccf_jax decoder params.

Reading uses only `config.json` and the safetensors shards (through the `safetensors` package's
numpy API; bfloat16 arrives as ml_dtypes.bfloat16), so no torch is needed at run time. The mapping
is a reshape/transpose per tensor and nothing else: HF stores `nn.Linear` weights as [out, in]
(ccf_jax: [in, out] with heads split out), and ccf_jax's rotary uses the same half-split
(`rotate_half`) layout as Hugging Face's Llama, so q/k need no row permutation (the permutation
people remember is between Meta's original interleaved checkpoints and HF's layout, and HF files
are already permuted). Qwen2's q/k/v biases ([heads * head_dim]) become [heads, head_dim]
(`model.qkv_bias`). Tensors are written back with the exact inverse, so a round trip
reproduces the files' arrays bit for bit. Checkpoints with tensors a Llama block does not have, or
.bin-only checkpoints, are refused with the fix. `init.from_hf=DIR` in any experiment calls
`load_hf_params`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os

import numpy as np

from ccf_jax.interop.hf_config import (CONFIG, SUPPORTED, ConvertError, check_against,
                                       hf_config_to_model_config, read_hf_config)

INDEX, SINGLE = 'model.safetensors.index.json', 'model.safetensors'
DTYPES = ('float32', 'bfloat16', 'float16')
# Per-layer tensors: ccf_jax path under params['layers'] -> HF name under model.layers.{i}.
LAYER_NAMES = {
    ('attn_norm', 'scale'): 'input_layernorm.weight', ('attn', 'wq'): 'self_attn.q_proj.weight',
    ('attn', 'wk'): 'self_attn.k_proj.weight', ('attn', 'wv'): 'self_attn.v_proj.weight',
    ('attn', 'wo'): 'self_attn.o_proj.weight', ('mlp', 'w_gate'): 'mlp.gate_proj.weight',
    ('mlp_norm', 'scale'): 'post_attention_layernorm.weight', ('mlp', 'w_up'): 'mlp.up_proj.weight',
    ('mlp', 'w_down'): 'mlp.down_proj.weight'}
BIAS_NAMES = {('attn', 'bq'): 'self_attn.q_proj.bias', ('attn', 'bk'): 'self_attn.k_proj.bias',
              ('attn', 'bv'): 'self_attn.v_proj.bias'}  # With model.qkv_bias (Qwen2).
STORED = {'BF16': 'bfloat16', 'F32': 'float32', 'F16': 'float16'}  # safetensors dtype -> ours.
IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)  # Buffers some old checkpoints saved; recomputed.


def np_dtype(name: str):
  import ml_dtypes
  return {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}[name]


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
  if f.get('qkv_bias'):
    per_layer.update({('attn', 'bq'): (h, hd), ('attn', 'bk'): (k, hd), ('attn', 'bv'): (k, hd)})
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
  if name in ('bq', 'bk', 'bv'):
    a = a.reshape(-1)
  elif name in ('wq', 'wk', 'wv', 'w_gate', 'w_up'):
    a = a.reshape(a.shape[0], -1).T
  elif name in ('wo', 'w_down', 'lm_head'):
    a = a.reshape(-1, a.shape[-1]).T
  return np.ascontiguousarray(a)


def _hf_name(path: tuple, layer: int | None = None) -> str:
  if path[0] == 'layers':
    return f'model.layers.{layer}.{(LAYER_NAMES | BIAS_NAMES)[path[1:]]}'
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
    check_against(fields, model_cfg, path)
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
    dtype = stored_dtype(path, files)
    dtype = 'float32' if dtype == 'float16' else dtype
  flat, target, by_file = {}, np_dtype(dtype), {}
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


def stored_dtype(path, files: dict | None = None) -> str:
  """'float32' | 'bfloat16' | 'float16': how a Hugging Face directory stores its embedding (the
  dtype of the whole checkpoint; `--to_hf` writes it back in it)."""
  files = _weight_files(os.fspath(path)) if files is None else files
  name = 'model.embed_tokens.weight'
  if name not in files:
    raise ConvertError(f'{path} has no {name}. Fix: download every shard of the checkpoint.')
  with _open(files[name]) as fh:
    stored = fh.get_slice(name).get_dtype()
  if stored not in STORED:
    raise ConvertError(f'{path}: weights stored as {stored} are not supported. Fix: convert '
                       'a bfloat16, float16 or float32 release.')
  return STORED[stored]


def params_to_hf_state(params: dict, tie_embeddings: bool) -> dict:
  """{HF tensor name: C-contiguous numpy array} of decoder params, in Hugging Face's order."""
  out = {'model.embed_tokens.weight': np.ascontiguousarray(np.asarray(params['embed']))}
  layers = params['layers']
  num_layers = np.shape(layers['attn']['wq'])[0]
  names = list(LAYER_NAMES) + [b for b in BIAS_NAMES if b[1] in layers['attn']]
  for i in range(num_layers):
    for sub in names:
      a = np.asarray(layers[sub[0]][sub[1]][i])
      out[_hf_name(('layers',) + sub, i)] = _to_hf(sub, a)
  out['model.norm.weight'] = np.ascontiguousarray(np.asarray(params['final_norm']['scale']))
  if not tie_embeddings:
    out['lm_head.weight'] = _to_hf(('lm_head',), np.asarray(params['lm_head']))
  return out


def write_shards(state: dict, out_dir: str, max_shard_bytes: int):
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
