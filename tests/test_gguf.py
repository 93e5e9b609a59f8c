"""GGUF import (`ccf_jax.interop.gguf`) against references it does not share code with.

The GGUF files are written here with gguf's own `GGUFWriter` the way llama.cpp's
convert_hf_to_gguf.py writes a Llama: llama.cpp tensor names, q/k rows permuted per head
(`permute` below is LlamaModel.permute), tensors quantised with `gguf.quants.quantize`. The
weights are tests/fixtures/hf/ checkpoints, whose expected.npz holds the logits transformers
computed, so a float32 GGUF must reproduce those; a quantised one must reproduce the HF import of
the same quantise-dequantise round trip (quantisation blocks run along rows, so it commutes with
the row permutation). Tokenizers are tiny byte-level BPEs trained here with `tokenizers`.
"""

import json
import os
import re
import subprocess
import sys

import gguf
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ccf_jax.checkpoint import export as export_lib
from ccf_jax.interop import gguf as gguf_lib
from ccf_jax.interop import hf, hf_config
from ccf_jax.model import decoder as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, 'tests', 'fixtures', 'hf')
Q = gguf.GGMLQuantizationType
NAMES = {'model.embed_tokens.weight': 'token_embd.weight',
         'model.norm.weight': 'output_norm.weight', 'lm_head.weight': 'output.weight'}
LAYER = {'input_layernorm': 'attn_norm', 'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k',
         'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
         'post_attention_layernorm': 'ffn_norm', 'mlp.gate_proj': 'ffn_gate',
         'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down'}
# One file with every supported type, as llama.cpp mixes them (norms stay F32).
MIXED = {'token_embd': Q.Q8_0, 'attn_q': Q.Q4_0, 'attn_k': Q.Q4_0, 'attn_v': Q.Q4_1,
         'attn_output': Q.Q4_1, 'ffn_gate': Q.BF16, 'ffn_up': Q.F16, 'ffn_down': Q.Q8_0,
         'output': Q.Q4_1}
TEXTS = ["Hello world! It's 2024, and I've got 12345 apples.", "  leading spaces\n\n\ttabs  ",
         'café naïve 東京 — emoji 🙂', "don't WON'T they'll x1y22z333",
         '<|im_start|>user\nhi there<|im_end|>\n']


def permute(w, n_head, n_head_kv):
  """convert_hf_to_gguf.py's LlamaModel.permute (HF half-split rotary rows -> ggml pairs)."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def gguf_name(name):
  if name in NAMES:
    return NAMES[name]
  _, _, i, rest = name.split('.', 3)
  return f'blk.{i}.{LAYER[rest.rsplit(".", 1)[0]]}.weight'


def fixture_state(name):
  from safetensors import safe_open
  with safe_open(os.path.join(FIXTURES, name, 'model.safetensors'), framework='numpy') as fh:
    return {k: fh.get_tensor(k).astype(np.float32) for k in fh.keys()}


def fixture_config(name):
  return json.load(open(os.path.join(FIXTURES, name, 'config.json')))


def roundtrip(w, qtype):
  return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)


def vocab_of(tok):
  """(tokens by id, merges as 'a b', token types) of a `tokenizers` BPE."""
  model = json.loads(tok.to_str())['model']
  tokens = [t for t, _ in sorted(model['vocab'].items(), key=lambda kv: kv[1])]
  merges = [m if isinstance(m, str) else ' '.join(m) for m in model['merges']]
  special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
  return tokens, merges, [3 if t in special else 1 for t in tokens]


def write_gguf(path, state, cfg, types=None, vocab=None, pre='gpt2', special_ids=(0, 0, 0, 0),
               extra=()):
  """A llama GGUF as convert_hf_to_gguf.py writes one; `vocab`: (tokens, merges, types)."""
  w = gguf.GGUFWriter(str(path), 'llama')
  heads, kv = cfg['num_attention_heads'], cfg['num_key_value_heads']
  w.add_block_count(cfg['num_hidden_layers'])
  w.add_context_length(cfg['max_position_embeddings'])
  w.add_embedding_length(cfg['hidden_size'])
  w.add_feed_forward_length(cfg['intermediate_size'])
  w.add_head_count(heads)
  w.add_head_count_kv(kv)
  w.add_rope_freq_base(cfg.get('rope_parameters', cfg).get('rope_theta', 10000.0))
  w.add_layer_norm_rms_eps(cfg['rms_norm_eps'])
  w.add_rope_dimension_count(cfg['hidden_size'] // heads)
  if vocab is None:  # A placeholder vocabulary of the embedding's size.
    vocab = ([f'<t{i}>' for i in range(cfg['vocab_size'])], [], [3] + [1] * (cfg['vocab_size'] - 1))
  tokens, merges, token_types = vocab
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  w.add_token_types(token_types)
  for add, tid in zip((w.add_bos_token_id, w.add_eos_token_id, w.add_unk_token_id,
                       w.add_pad_token_id), special_ids):
    add(tid)
  for key, value in extra:
    w.add_string(key, value)
  for name, a in state.items():
    g = gguf_name(name)
    if g.endswith('attn_q.weight'):
      a = permute(a, heads, heads)
    elif g.endswith('attn_k.weight'):
      a = permute(a, heads, kv)
    kind = g.split('.')[-2] if g.startswith('blk.') else g.split('.')[0]
    qtype = Q.F32 if a.ndim == 1 else (types or {}).get(kind, Q.F32)
    w.add_tensor(g, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def logits_of(export_dir, tokens):
  params, config, _ = export_lib.load_export(export_dir)
  return np.asarray(model_lib.bind(ml_collections.ConfigDict(config).model, params)(tokens))


# ------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize('name', ['llama2_gqa_untied', 'llama2_gqa_tied'])
def test_float32_gguf_matches_transformers(name, tmp_path):
  cfg = fixture_config(name)
  path = write_gguf(tmp_path / 'm.gguf', fixture_state(name), cfg)
  out = gguf_lib.gguf_to_export(path, tmp_path / 'e')
  want = hf_config.hf_config_to_model_config(cfg)
  got = json.load(open(os.path.join(out, export_lib.CONFIG_JSON)))['model']
  assert {k: got[k] for k in want if k != 'max_position'} == {
      k: (dict(v) if k == 'rope_scaling' else v) for k, v in want.items() if k != 'max_position'}
  exp = np.load(os.path.join(FIXTURES, name, 'expected.npz'))
  diff = float(np.abs(logits_of(out, exp['tokens']) - exp['logits']).max())
  print(f'{name}: max |logits - transformers| = {diff:.3g}')
  assert diff < 1e-4


def test_quantised_gguf_matches_its_dequantised_weights(tmp_path):
  """Every supported type in one file, against the HF import of the same round-tripped weights."""
  name = 'llama2_gqa_untied'
  cfg, state = fixture_config(name), fixture_state(name)
  exp = np.load(os.path.join(FIXTURES, name, 'expected.npz'))
  path = write_gguf(tmp_path / 'm.gguf', state, cfg, types=MIXED)
  got = logits_of(gguf_lib.gguf_to_export(path, tmp_path / 'e'), exp['tokens'])
  ref_dir = tmp_path / 'ref'
  ref_dir.mkdir()
  json.dump(cfg, open(ref_dir / 'config.json', 'w'))
  kind = lambda n: gguf_name(n).split('.')[-2] if n.startswith('model.layers') else gguf_name(
      n).split('.')[0]
  save_file({n: np.ascontiguousarray(roundtrip(a, MIXED.get(kind(n), Q.F32)) if a.ndim == 2
                                     else a) for n, a in state.items()},
            str(ref_dir / 'model.safetensors'), metadata={'format': 'pt'})
  want = logits_of(hf.hf_to_export(ref_dir, tmp_path / 'ref_export'), exp['tokens'])
  diff = float(np.abs(got - want).max())
  # Against transformers' float32 logits: moved by the 4-bit weights, but by a fraction of their
  # spread (a layout error gives a relative error near 1).
  drift = float(np.sqrt(np.mean((got - exp['logits'])**2) / np.var(exp['logits'])))
  print(f'max |gguf - dequantised HF| = {diff:.3g}; relative rms vs transformers = {drift:.3g}')
  assert diff < 1e-4
  assert 1e-3 < drift < 0.3


def test_unsupported_type_is_refused_in_one_line(tmp_path):
  name = 'llama2_gqa_tied'
  path = write_gguf(tmp_path / 'm.gguf', fixture_state(name), fixture_config(name),
                    types={'ffn_up': Q.Q5_0})
  with pytest.raises(hf_config.ConvertError) as e:
    gguf_lib.gguf_to_export(path, tmp_path / 'e')
  msg = str(e.value)
  assert '\n' not in msg and 'blk.0.ffn_up.weight is Q5_0' in msg and 'Fix:' in msg
  assert 'llama-quantize' in msg and '--from_hf' in msg
  assert not os.path.exists(tmp_path / 'e')


def test_cli_summary_line_and_existing_out_refused(tmp_path):
  name = 'llama2_gqa_tied'
  path = write_gguf(tmp_path / 'm.gguf', fixture_state(name), fixture_config(name),
                    types={'attn_q': Q.Q8_0})
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  proc = subprocess.run([sys.executable, '-m', 'ccf_jax.convert', f'--from_gguf={path}',
                         f'--out={tmp_path / "e"}'], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('converted ')]
  assert len(lines) == 1 and '2 layers, d=64, vocab 128, float32' in lines[0]
  assert re.search(r'; \d+ F32, 2 Q8_0 tensors\) in \d+\.\d s$', lines[0]), lines[0]
  info = json.load(open(tmp_path / 'e' / export_lib.INFO_JSON))
  assert info['source_format'] == 'gguf' and info['source'] == path
  with pytest.raises(hf_config.ConvertError, match='already exists. Fix: pass --overwrite'):
    gguf_lib.gguf_to_export(path, tmp_path / 'e')


def tensors_only(path, names):
  w = gguf.GGUFWriter(str(path), 'llama')
  for name in names:
    w.add_tensor(name, np.ones(32, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return gguf.GGUFReader(str(path))


def test_tensor_names_map_and_unknown_ones_are_refused(tmp_path):
  reader = tensors_only(tmp_path / 'a.gguf', ['blk.1.attn_k.weight', 'output.weight'])
  assert gguf_lib.hf_names(reader, 'a.gguf') == {
      'blk.1.attn_k.weight': 'model.layers.1.self_attn.k_proj.weight',
      'output.weight': 'lm_head.weight'}
  for name, match in (('rope_freqs.weight', r'rope_freqs.*Fix: convert the Hugging Face'),
                      ('blk.0.attn_q.bias', r'blk.0.attn_q.bias, which a Llama block does not')):
    with pytest.raises(hf_config.ConvertError, match=match):
      gguf_lib.hf_names(tensors_only(tmp_path / 'b.gguf', [name]), 'b.gguf')


def test_metadata_maps_to_an_hf_config(tmp_path):
  """float32 metadata comes back as the decimal the HF config held; rope scaling and key_length
  are carried over for hf_config_to_model_config to accept or refuse."""
  w = gguf.GGUFWriter(str(tmp_path / 'm.gguf'), 'llama')
  for add, value in ((w.add_block_count, 3), (w.add_embedding_length, 96),
                     (w.add_feed_forward_length, 160), (w.add_head_count, 4),
                     (w.add_head_count_kv, 1), (w.add_key_length, 32), (w.add_rope_freq_base, 5e5),
                     (w.add_layer_norm_rms_eps, 1e-5), (w.add_context_length, 2048),
                     (w.add_rope_scaling_type, gguf.RopeScalingType.LINEAR),
                     (w.add_rope_scaling_factor, 4.0), (w.add_rope_dimension_count, 32)):
    add(value)
  w.add_tensor('token_embd.weight', np.zeros((40, 96), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  cfg = gguf_lib.hf_config_dict(gguf.GGUFReader(str(tmp_path / 'm.gguf')), 'm.gguf')
  assert cfg['rms_norm_eps'] == 1e-5 and cfg['rope_theta'] == 5e5
  assert (cfg['vocab_size'], cfg['hidden_size'], cfg['head_dim'], cfg['num_key_value_heads'],
          cfg['num_hidden_layers'], cfg['max_position_embeddings']) == (40, 96, 32, 1, 3, 2048)
  assert cfg['tie_word_embeddings'] and cfg['rope_scaling'] == {'rope_type': 'linear',
                                                                'factor': 4.0}


# ----------------------------------------------------------------------------------- tokenizer
def train_bpe(pre_tokenizer):
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = decoders.ByteLevel()
  corpus = ['The quick brown fox jumps over the lazy dog 42 times.', "It's 3.14159, isn't it?",
            'Numbers 1234567890 and words, words, words.', 'café naïve 東京 🙂 über',
            '  \n\n\t x'] * 20
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=420, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  return tok


def test_rebuilt_tokenizer_encodes_like_the_source(tmp_path):
  """SmolLM2's pre-tokenizer (digits split, then GPT-2's byte-level regex), through a full
  import: tokenizer.json in the export, special ids in tokenizer_config.json."""
  src = train_bpe(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False)]))
  vocab = vocab_of(src)
  v, d, rng = 448, 32, np.random.default_rng(0)  # Embedding rows >= the tokenizer's ids.
  cfg = {'num_hidden_layers': 1, 'max_position_embeddings': 64, 'hidden_size': d,
         'intermediate_size': 64, 'num_attention_heads': 2, 'num_key_value_heads': 1,
         'rope_theta': 10000.0, 'rms_norm_eps': 1e-5, 'vocab_size': v}
  shapes = {'model.embed_tokens.weight': (v, d), 'model.norm.weight': (d,)}
  for hf_name, shape in (('input_layernorm', (d,)), ('self_attn.q_proj', (d, d)),
                         ('self_attn.k_proj', (16, d)), ('self_attn.v_proj', (16, d)),
                         ('self_attn.o_proj', (d, d)), ('post_attention_layernorm', (d,)),
                         ('mlp.gate_proj', (64, d)), ('mlp.up_proj', (64, d)),
                         ('mlp.down_proj', (d, 64))):
    shapes[f'model.layers.0.{hf_name}.weight'] = shape
  state = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
  path = write_gguf(tmp_path / 'm.gguf', state, cfg, vocab=vocab, pre='smollm',
                    special_ids=(1, 2, 0, 2),
                    extra=[('tokenizer.chat_template', '{{ messages }}')])
  out = gguf_lib.gguf_to_export(path, tmp_path / 'e')
  info = json.load(open(os.path.join(out, export_lib.INFO_JSON)))
  assert info['tokenizer']['file'] == 'hf/tokenizer.json'
  assert info['gguf_tokenizer'] == 'gpt2/smollm'
  rebuilt = Tokenizer.from_file(os.path.join(out, 'hf', 'tokenizer.json'))
  for text in TEXTS:
    assert rebuilt.encode(text).ids == src.encode(text).ids, text
    assert rebuilt.decode(rebuilt.encode(text).ids, skip_special_tokens=False) == text
  assert len(src.encode('The quick brown fox jumps').ids) < 10  # The merges do merge.
  ids = info['tokenizer']
  assert (ids['bos_id'], ids['eos_id'], ids['unk_id'], ids['pad_id']) == (1, 2, 0, 2)
  config = json.load(open(os.path.join(out, 'hf', 'tokenizer_config.json')))
  assert config['chat_template'] == '{{ messages }}' and config['eos_token'] == '<|im_end|>'


def metadata_only(path, **kv):
  w = gguf.GGUFWriter(str(path), 'llama')
  for key, value in kv.items():
    {str: w.add_string, list: w.add_array}[type(value)](key.replace('__', '.'), value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return gguf.GGUFReader(str(path))


def test_gpt2_pre_tokenizer_and_refusals(tmp_path):
  """GPT-2's regex as llama.cpp lists it equals tokenizers' built-in byte-level regex; a
  sentencepiece vocabulary and an unknown pre-tokenizer are refused with the fix."""
  src = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False))
  tokens, merges, _ = vocab_of(src)
  reader = metadata_only(tmp_path / 'g.gguf', tokenizer__ggml__model='gpt2',
                         tokenizer__ggml__pre='gpt2', tokenizer__ggml__tokens=tokens,
                         tokenizer__ggml__merges=merges)
  (tmp_path / 'tok').mkdir()
  assert gguf_lib.write_tokenizer(reader, 'g.gguf', str(tmp_path / 'tok'), 64) == 'gpt2/gpt2'
  rebuilt = Tokenizer.from_file(str(tmp_path / 'tok' / 'tokenizer.json'))
  for text in TEXTS[:4]:
    assert rebuilt.encode(text).ids == src.encode(text).ids, text
  for kv, match in (({'tokenizer__ggml__model': 'llama'}, r"model='llama'.*Fix: .*--from_hf"),
                    ({'tokenizer__ggml__model': 'gpt2', 'tokenizer__ggml__pre': 'qwen9'},
                     r"pre='qwen9'.*Fix: .*--from_hf")):
    reader = metadata_only(tmp_path / 'x.gguf', tokenizer__ggml__tokens=['a', 'b'], **kv)
    with pytest.raises(hf_config.ConvertError, match=match):
      gguf_lib.write_tokenizer(reader, 'x.gguf', str(tmp_path / 'tok'), 64)
