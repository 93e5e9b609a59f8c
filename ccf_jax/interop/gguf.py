"""GGUF files (llama.cpp's format) -> ccf_jax exports.

    python -m ccf_jax.convert --from_gguf=FILE.gguf --out=EXPORT [--param_dtype=auto|bfloat16]

Why: many small models circulate as GGUF only (llama.cpp, Ollama, PyPI packages that bundle a
model), often quantised. Importing one should give the same export the Hugging Face checkpoint
it came from would give.

How: a Llama GGUF is that Hugging Face checkpoint in llama.cpp's layout, so this module rebuilds
the checkpoint directory and hands it to `hf.hf_to_export`, which owns the config mapping, the
weight layout, validation, the tokenizer files and the export writer (one piece of code per idea;
an export made here is indistinguishable from an HF import except for `export_info.json`'s
`source_format: gguf` and tensor types). In a temporary directory next to `--out`:
  * config.json from the `llama.*` metadata (`hf_config_dict`): block_count, embedding_length,
    feed_forward_length, head counts, key_length, rope.freq_base, layer_norm_rms_epsilon,
    context_length, rope.scaling.*, and tied embeddings when there is no `output.weight`. The
    float32 metadata values are written as the shortest decimal that rounds to them (1e-05, not
    9.99999975e-06), the value the original config.json held.
  * safetensors shards of the tensors, dequantised to float32 with gguf's own
    `gguf.quants.dequantize` (the package's numpy port of ggml's kernels), under their HF names.
    Only F32/F16/BF16/Q8_0/Q4_0/Q4_1 are accepted; every other type is refused before anything is
    read, naming the tensor. llama.cpp's converter permutes the rows of attn_q/attn_k within each
    head (`LlamaModel.permute` in convert_hf_to_gguf.py: HF's half-split rotary layout -> ggml's
    interleaved pairs); `unpermute` is its inverse. Quantisation blocks run along rows, so
    dequantising and then unpermuting is exact. Shards are written as they fill, so peak host
    memory is the float32 model plus about one shard.
  * tokenizer.json rebuilt from `tokenizer.ggml.*` with the `tokenizers` library, and
    tokenizer_config.json with the special tokens (bos/eos/unk/pad ids), add_bos_token and the
    chat template. Byte-level BPE (`tokenizer.ggml.model = gpt2`) is rebuilt fully: vocabulary,
    merges, control tokens as special added tokens, and the pre-tokenizer regexes llama.cpp
    applies for `tokenizer.ggml.pre` (llama-vocab.cpp), for the pre-tokenizers in `PRE`.
    Sentencepiece vocabularies (`llama`) are refused: their GGUF form keeps scores, not merges,
    and a tokenizer rebuilt from scores would not split text exactly as the original does.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import tempfile

import numpy as np

from ccf_jax.interop import hf, hf_tokenizer
from ccf_jax.interop.hf_config import CONFIG, ConvertError

SUPPORTED_TYPES = ('F32', 'F16', 'BF16', 'Q8_0', 'Q4_0', 'Q4_1')
# The intermediate HF directory's shards: safetensors serialises a shard in memory, so a small
# shard keeps the import's peak at the model plus what is being read (near 2N, not 3N).
SHARD_BYTES = 1 << 28
GLOBAL_NAMES = {'token_embd.weight': 'model.embed_tokens.weight',
                'output_norm.weight': 'model.norm.weight', 'output.weight': 'lm_head.weight'}
LAYER_NAMES = {'attn_norm': 'input_layernorm', 'attn_q': 'self_attn.q_proj',
               'attn_k': 'self_attn.k_proj', 'attn_v': 'self_attn.v_proj',
               'attn_output': 'self_attn.o_proj', 'ffn_norm': 'post_attention_layernorm',
               'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj', 'ffn_down': 'mlp.down_proj'}
# tokenizer.ggml.pre -> (llama.cpp's pre-tokenizer regexes, applied in turn; BPE ignore_merges).
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE = {'gpt2': ([_GPT2_RE], False), 'smollm': ([r'\p{N}', _GPT2_RE], False),
       'starcoder': ([r'\p{N}', _GPT2_RE], False), 'llama-bpe': ([_LLAMA3_RE], True)}
CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType values.
SPECIAL_ROLES = {'bos': 'bos_token_id', 'eos': 'eos_token_id', 'unk': 'unknown_token_id',
                 'pad': 'padding_token_id'}


def _reader(path: str):
  import gguf
  if not os.path.isfile(path):
    raise ConvertError(f'{path} does not exist. Fix: pass --from_gguf=PATH/TO/model.gguf.')
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except  (ValueError, struct errors on a bad file)
    raise ConvertError(f'{path} is not a readable GGUF file ({e}). Fix: download it '
                       'again.') from e


def _meta(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _f32(x) -> float:
  """The shortest decimal that rounds to float32 `x` (GGUF stores float32 metadata)."""
  return float(np.format_float_scientific(np.float32(x), unique=True))


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of convert_hf_to_gguf.py's `LlamaModel.permute` on the rows of attn_q/attn_k."""
  return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def hf_config_dict(reader, path: str) -> dict:
  """A Hugging Face LlamaForCausalLM config.json dict from the GGUF metadata."""
  arch = _meta(reader, 'general.architecture')
  if arch != 'llama':
    raise ConvertError(f'{path}: general.architecture={arch!r}; ccf_jax imports llama GGUFs only '
                       '(Llama, Mistral, SmolLM...). Fix: convert the Hugging Face checkpoint '
                       'with --from_hf if ccf_jax supports it.')
  a = lambda key, default=None: _meta(reader, f'llama.{key}', default)
  if a('expert_count', 0):
    raise ConvertError(f'{path}: a mixture-of-experts model (llama.expert_count='
                       f'{a("expert_count")}); ccf_jax has dense MLPs only. Fix: convert a dense '
                       'Llama-family model.')
  names = {t.name: t for t in reader.tensors}
  if 'token_embd.weight' not in names:
    raise ConvertError(f'{path} has no token_embd.weight tensor. Fix: download the file again.')
  try:
    d, heads = int(a('embedding_length')), int(a('attention.head_count'))
    cfg = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_act': 'silu',
           'attention_bias': False, 'mlp_bias': False, 'torch_dtype': 'float32',
           'vocab_size': int(names['token_embd.weight'].shape[1]), 'hidden_size': d,
           'intermediate_size': int(a('feed_forward_length')),
           'num_hidden_layers': int(a('block_count')), 'num_attention_heads': heads,
           'num_key_value_heads': int(a('attention.head_count_kv', heads)),
           'head_dim': int(a('attention.key_length', d // heads)),
           'max_position_embeddings': int(a('context_length', 4096)),
           'rms_norm_eps': _f32(a('attention.layer_norm_rms_epsilon', 1e-5)),
           'rope_theta': _f32(a('rope.freq_base', 10000.0)),
           'tie_word_embeddings': 'output.weight' not in names}
  except TypeError as e:  # int(None): a required key is missing.
    raise ConvertError(f'{path}: llama.block_count, embedding_length, feed_forward_length or '
                       'attention.head_count is missing. Fix: use a GGUF written by llama.cpp\'s '
                       'convert_hf_to_gguf.py.') from e
  rot = a('rope.dimension_count', cfg['head_dim'])
  if rot != cfg['head_dim']:
    raise ConvertError(f'{path}: llama.rope.dimension_count={rot} but head_dim='
                       f'{cfg["head_dim"]}; ccf_jax rotates whole heads. Fix: convert a model '
                       'with full rotary embeddings.')
  kind = a('rope.scaling.type', 'none')
  factor = a('rope.scaling.factor', a('rope.scale_linear'))
  if kind != 'none' or (factor and factor != 1.0):
    scaling = {'rope_type': kind if kind != 'none' else 'linear', 'factor': _f32(factor or 1.0)}
    if a('rope.scaling.original_context_length'):
      scaling['original_max_position_embeddings'] = int(a('rope.scaling.original_context_length'))
    cfg['rope_scaling'] = scaling  # hf_config_to_model_config accepts it or refuses with why.
  for role in ('bos', 'eos'):
    tid = _meta(reader, f'tokenizer.ggml.{SPECIAL_ROLES[role]}')
    if tid is not None:
      cfg[f'{role}_token_id'] = int(tid)
  return cfg


def hf_names(reader, path: str) -> dict:
  """{GGUF name: HF name} of every tensor; refuses unknown tensors and unsupported types."""
  out = {}
  for t in reader.tensors:
    if t.tensor_type.name not in SUPPORTED_TYPES:
      raise ConvertError(
          f'{path}: tensor {t.name} is {t.tensor_type.name}, which ccf_jax does not dequantise '
          f'(it reads {", ".join(SUPPORTED_TYPES)}). Fix: re-quantise with llama.cpp '
          '(`llama-quantize --allow-requantize IN.gguf OUT.gguf Q8_0`), or convert the Hugging '
          'Face checkpoint with --from_hf.')
    parts = t.name.split('.')
    if t.name in GLOBAL_NAMES:
      out[t.name] = GLOBAL_NAMES[t.name]
    elif (len(parts) == 4 and parts[0] == 'blk' and parts[2] in LAYER_NAMES
          and parts[3] == 'weight' and parts[1].isdigit()):
      out[t.name] = f'model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight'
    elif t.name == 'rope_freqs.weight':
      raise ConvertError(f'{path} has a rope_freqs tensor (Llama-3.1-style rope scaling, which '
                         'llama.cpp stores as per-frequency factors without the parameters '
                         'ccf_jax\'s config needs). Fix: convert the Hugging Face checkpoint with '
                         '--from_hf.')
    else:
      raise ConvertError(f'{path} has tensor {t.name}, which a Llama block does not have. Fix: '
                         'convert a plain Llama-family model.')
  return out


def write_weights(reader, names: dict, cfg: dict, out_dir: str) -> collections.Counter:
  """Dequantised tensors as HF-named safetensors shards + index; returns the GGUF type counts."""
  import gguf
  from safetensors.numpy import save_file
  heads = {'attn_q': cfg['num_attention_heads'], 'attn_k': cfg['num_key_value_heads']}
  types, weight_map, shard, size = collections.Counter(), {}, {}, 0

  def flush():
    fname = f'model-{len(set(weight_map.values())) + 1:05d}.safetensors'
    save_file(shard, os.path.join(out_dir, fname), metadata={'format': 'pt'})
    weight_map.update({n: fname for n in shard})
    shard.clear()

  for t in reader.tensors:
    types[t.tensor_type.name] += 1
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    kind = t.name.split('.')[2] if t.name.startswith('blk.') else None
    if kind in heads:
      w = unpermute(w, heads[kind])
    shard[names[t.name]] = np.ascontiguousarray(w)
    size += w.nbytes
    if size >= SHARD_BYTES:
      flush()
      size = 0
  if shard:
    flush()
  with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  return types


def write_tokenizer(reader, path: str, out_dir: str, max_position: int) -> str:
  """tokenizer.json + tokenizer_config.json from tokenizer.ggml.*; returns '<model>/<pre>'."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
  from tokenizers import processors
  model, pre = _meta(reader, 'tokenizer.ggml.model'), _meta(reader, 'tokenizer.ggml.pre', 'gpt2')
  tokens = _meta(reader, 'tokenizer.ggml.tokens')
  if model is None or tokens is None:
    raise ConvertError(f'{path} has no tokenizer.ggml.model/tokens. Fix: use a GGUF with its '
                       'vocabulary, or convert the Hugging Face checkpoint with --from_hf.')
  if model != 'gpt2':
    raise ConvertError(f'{path}: tokenizer.ggml.model={model!r} (a sentencepiece-style '
                       'vocabulary) cannot be rebuilt exactly as a tokenizer.json; ccf_jax '
                       'rebuilds byte-level BPE (gpt2) vocabularies. Fix: convert the Hugging '
                       'Face checkpoint (it ships tokenizer.model) with --from_hf.')
  if pre not in PRE:
    raise ConvertError(f'{path}: tokenizer.ggml.pre={pre!r} is a pre-tokenizer ccf_jax does not '
                       f'know (it knows {", ".join(sorted(PRE))}). Fix: convert the Hugging Face '
                       'checkpoint (its tokenizer.json) with --from_hf.')
  regexes, ignore_merges = PRE[pre]
  merges = [tuple(m.split(' ', 1)) for m in _meta(reader, 'tokenizer.ggml.merges', [])]
  types = _meta(reader, 'tokenizer.ggml.token_type') or [1] * len(tokens)
  ids = {role: _meta(reader, f'tokenizer.ggml.{key}') for role, key in SPECIAL_ROLES.items()}
  ids = {role: int(i) for role, i in ids.items() if i is not None and 0 <= i < len(tokens)}
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False,
                             byte_fallback=False, ignore_merges=ignore_merges))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(r), 'isolated') for r in regexes]
      + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  special = {i for i, ty in enumerate(types) if ty == CONTROL} | set(ids.values())
  tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                          for i in sorted(special)])
  tok.add_tokens([AddedToken(tokens[i], normalized=False)
                  for i, ty in enumerate(types) if ty == USER_DEFINED])
  add_bos = bool(_meta(reader, 'tokenizer.ggml.add_bos_token', False)) and 'bos' in ids
  if add_bos:  # As Llama-3's tokenizer.json does: the BOS a plain `encode` prepends.
    bos = tokens[ids['bos']]
    tok.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, ids['bos'])])
  tok.save(os.path.join(out_dir, hf_tokenizer.HF_FILE))
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'add_bos_token': add_bos,
            'add_eos_token': bool(_meta(reader, 'tokenizer.ggml.add_eos_token', False)),
            'add_prefix_space': False, 'clean_up_tokenization_spaces': False,
            'model_max_length': max_position,
            **{f'{role}_token': tokens[i] for role, i in ids.items()}}
  template = _meta(reader, 'tokenizer.chat_template')
  if template:
    config['chat_template'] = template
  with open(os.path.join(out_dir, hf_tokenizer.AUX_FILES[0]), 'w') as f:
    json.dump(config, f, indent=2)
  return f'{model}/{pre}'


def gguf_to_export(path, out, *, param_dtype: str = 'auto', overwrite: bool = False) -> str:
  """Converts a llama GGUF file into a ccf_jax export at `out` (see the module doc)."""
  path, out = os.path.abspath(os.fspath(path)), os.path.abspath(os.fspath(out))
  if os.path.exists(out) and not overwrite:
    raise ConvertError(f'{out} already exists. Fix: pass --overwrite, or choose another --out.')
  reader = _reader(path)
  cfg = hf_config_dict(reader, path)
  names = hf_names(reader, path)
  stem = os.path.splitext(os.path.basename(path))[0]
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.gguf-', dir=os.path.dirname(out))
  try:
    hf_dir = os.path.join(tmp, stem)
    os.makedirs(hf_dir)
    tokenizer = write_tokenizer(reader, path, hf_dir, cfg['max_position_embeddings'])
    types = write_weights(reader, names, cfg, hf_dir)
    with open(os.path.join(hf_dir, CONFIG), 'w') as f:
      json.dump(cfg, f, indent=2, sort_keys=True)
    del reader  # Unmaps the file before the export is written.
    return hf.hf_to_export(hf_dir, out, param_dtype=param_dtype, overwrite=overwrite,
                           name=f'gguf_{stem}',
                           source_info={'source': path, 'source_format': 'gguf',
                                        'gguf_tensor_types': dict(types),
                                        'gguf_tokenizer': tokenizer})
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
