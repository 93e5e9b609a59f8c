"""Hugging Face Llama-family interop against fixtures that transformers itself wrote.

tests/fixtures/hf/<name>/ holds small random Llama, Mistral (sliding window) and Qwen2 (q/k/v
biases) checkpoints, with linear, YaRN and Llama-3 rope scaling, and the float32 logits
transformers computed for fixed tokens (tests/fixtures/make_hf_fixtures.py): a reference independent of
ccf_jax, and no torch is needed here. A live test re-runs transformers where torch is installed.
"""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from safetensors import safe_open

from ccf_jax.interop import adapter as adapter_lib
from ccf_jax.interop import hf, hf_config, hf_weights
from ccf_jax.checkpoint import export as export_lib
from ccf_jax.data import load_tokenizer
from ccf_jax.model import decoder as model_lib
from experiments import base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, 'tests', 'fixtures', 'hf')
NAMES = sorted(n for n in os.listdir(FIXTURES)
               if os.path.isfile(os.path.join(FIXTURES, n, 'config.json')))
ATOL = 1e-4  # Measured max |diff| is ~1e-5 on logits of std ~4 (float32 summation order).


def fixture(name):
  return os.path.join(FIXTURES, name)


def model_cfg(fields, param_dtype='float32'):
  cfg = base.get_config().model
  for k, v in fields.items():
    cfg[k] = ml_collections.ConfigDict(v) if k == 'rope_scaling' else v
  cfg.param_dtype = param_dtype
  return cfg


def hf_tensors(d):
  """{name: array} over every safetensors file of a directory."""
  out = {}
  for f in sorted(os.listdir(d)):
    if f.endswith('.safetensors'):
      with safe_open(os.path.join(d, f), framework='numpy') as fh:
        out.update({k: fh.get_tensor(k) for k in fh.keys()})
  return out


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
  root = tmp_path_factory.mktemp('exports')
  return {n: hf.hf_to_export(fixture(n), root / n) for n in NAMES}


def export_logits(export_dir, tokens):
  params, config, _ = export_lib.load_export(export_dir)
  cfg = ml_collections.ConfigDict(config).model
  cfg.dtype = 'float32'  # Compute in float32 from the stored (possibly bfloat16) weights.
  return np.asarray(model_lib.bind(cfg, params)(tokens))


# ------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize('name', NAMES)
def test_logits_match_transformers(name, exports):
  exp = np.load(os.path.join(fixture(name), 'expected.npz'))
  logits = export_logits(exports[name], exp['tokens'])
  diff = float(np.abs(logits - exp['logits']).max())
  print(f'{name}: max |logits - transformers| = {diff:.3g}')
  assert logits.shape == exp['logits'].shape
  assert diff < ATOL


@pytest.mark.parametrize('name,without', [
    ('mistral_window', dict(sliding_window=0)),
    ('llama_rope_linear', dict(rope_scaling={})),
    ('llama_rope_yarn_legacy', dict(rope_scaling={})),
    ('qwen2_bias_fp16', dict(qkv_bias=False)),
])
def test_each_feature_changes_the_logits(name, without):
  """Without the window, the rope scaling or the biases the logits move by O(1): the parity test
  checks each of them, not a model that ignores it. (The 24 test tokens exceed the window of 8;
  biases are dropped by zeroing them.)"""
  exp = np.load(os.path.join(fixture(name), 'expected.npz'))
  fields = hf_config.hf_config_to_model_config(hf_config.read_hf_config(fixture(name)))
  params = hf_weights.load_hf_params(fixture(name), dtype='float32')
  if 'qkv_bias' in without:
    params['layers']['attn'] = {k: v * 0 if k in ('bq', 'bk', 'bv') else v
                                for k, v in params['layers']['attn'].items()}
    without = {}
  logits = model_lib.bind(model_cfg(dict(fields, **without)), params)(exp['tokens'])
  assert np.abs(np.asarray(logits) - exp['logits']).max() > 0.5


def test_fixtures_are_sensitive_to_layout():
  """Rope scaling and the q/k layout change the logits by O(1): the parity test would notice."""
  name = 'llama3_rope_untied_sharded'
  exp = np.load(os.path.join(fixture(name), 'expected.npz'))
  fields = hf_config.hf_config_to_model_config(hf_config.read_hf_config(fixture(name)))
  params = hf_weights.load_hf_params(fixture(name), dtype='float32')
  unscaled = model_lib.bind(model_cfg(dict(fields, rope_scaling={})), params)(exp['tokens'])
  assert np.abs(np.asarray(unscaled) - exp['logits']).max() > 0.5
  hd = fields['head_dim']  # Interleaved (Meta-style) rotary pairs instead of rotate_half.
  perm = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])
  bad = jax.tree.map(np.array, params)
  for w in ('wq', 'wk'):
    bad['layers']['attn'][w] = bad['layers']['attn'][w][..., perm]
  wrong = model_lib.bind(model_cfg(fields), bad)(exp['tokens'])
  assert np.abs(np.asarray(wrong) - exp['logits']).max() > 0.5


@pytest.mark.parametrize('name', NAMES)
def test_roundtrip_to_hf_is_bitwise(name, exports, tmp_path):
  out = hf.export_to_hf(exports[name], tmp_path / 'hf')
  src, dst = hf_tensors(fixture(name)), hf_tensors(out)
  assert sorted(src) == sorted(dst)
  for k, a in src.items():
    assert a.dtype == dst[k].dtype and a.shape == dst[k].shape, k
    assert a.tobytes() == dst[k].tobytes(), k
  written = json.load(open(os.path.join(out, 'config.json')))
  assert written == hf_config.read_hf_config(fixture(name))
  for f in os.listdir(fixture(name)):
    if f.startswith('tokenizer') or f == 'generation_config.json':
      with open(os.path.join(out, f), 'rb') as a, open(os.path.join(fixture(name), f), 'rb') as b:
        assert a.read() == b.read(), f
  if name == 'llama2_gqa_untied':  # A sentencepiece model without a config gets a minimal one.
    tok_cfg = json.load(open(os.path.join(out, 'tokenizer_config.json')))
    assert [tok_cfg[f'{r}_token'] for r in ('bos', 'eos', 'unk')] == ['<s>', '</s>', '<unk>']
    assert tok_cfg['add_prefix_space'] is True  # This model has sentencepiece's dummy prefix.


def test_to_hf_shards_and_dtype(exports, tmp_path):
  out = hf.export_to_hf(exports['llama2_gqa_untied'], tmp_path / 'hf', dtype='bfloat16',
                             max_shard_bytes=40_000)
  index = json.load(open(os.path.join(out, hf_weights.INDEX)))
  assert len(set(index['weight_map'].values())) > 2
  back = hf_weights.load_hf_params(out)
  ref = hf_weights.load_hf_params(fixture('llama2_gqa_untied'), dtype='bfloat16')
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16)),
               back, ref)
  with pytest.raises(hf_config.ConvertError, match='already exists.*--overwrite'):
    hf.export_to_hf(exports['llama2_gqa_untied'], out)


# ------------------------------------------------------------------------ load_hf_params / init
def test_load_hf_params_against_model_config():
  d = fixture('llama2_gqa_tied')
  fields = hf_config.hf_config_to_model_config(hf_config.read_hf_config(d))
  assert fields == dict(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, mlp_dim=96, rope_theta=10000.0, rope_scaling={},
                        max_position=256, norm_eps=1e-5, tie_embeddings=True, sliding_window=0,
                        qkv_bias=False)
  tied = hf_weights.load_hf_params(d, model_cfg(fields))
  want = jax.tree.map(lambda a: (a.shape, a.dtype), model_lib.abstract_params(model_cfg(fields)))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), tied) == want
  untied = hf_weights.load_hf_params(d, model_cfg(dict(fields, tie_embeddings=False), 'bfloat16'))
  assert untied['lm_head'].dtype.name == 'bfloat16'
  np.testing.assert_array_equal(untied['lm_head'], tied['embed'].T.astype(untied['lm_head'].dtype))
  with pytest.raises(hf_config.ConvertError, match=r'model.d_model=32 but the checkpoint has 64'):
    hf_weights.load_hf_params(d, model_cfg(dict(fields, d_model=32)))
  with pytest.raises(hf_config.ConvertError, match='rope_theta'):
    hf_weights.load_hf_params(d, model_cfg(dict(fields, rope_theta=500000.0)))
  with pytest.raises(hf_config.ConvertError, match='tie_embeddings=True'):
    hf_weights.load_hf_params(fixture('llama2_gqa_untied'), model_cfg(fields))


def test_norm_eps_agrees_to_float32_rounding():
  """A config from a GGUF or a float32 export holds 1e-5 as 9.99999975e-06: the same model. A
  real mismatch is one ConvertError line naming the field and the fix."""
  d = fixture('llama2_gqa_tied')
  fields = hf_config.hf_config_to_model_config(hf_config.read_hf_config(d))
  hf_weights.load_hf_params(d, model_cfg(dict(fields, norm_eps=float(np.float32(1e-5)))))
  with pytest.raises(hf_config.ConvertError, match=r'model.norm_eps=1e-06 but the checkpoint '
                     r'has 1e-05.*Fix: set') as e:
    hf_weights.load_hf_params(d, model_cfg(dict(fields, norm_eps=1e-6)))
  assert '\n' not in str(e.value)
  mistral = model_cfg(dict(fields, sliding_window=0))
  with pytest.raises(hf_config.ConvertError, match='model.sliding_window=0 but the checkpoint '
                     'has 8'):
    hf_weights.load_hf_params(fixture('mistral_window'), mistral)
  mistral.arch = 'ccf'  # CCF has no window (config validation): its base loads without one.
  hf_weights.load_hf_params(fixture('mistral_window'), mistral)


@pytest.mark.parametrize('name,arch', [('mistral_window', 'MistralForCausalLM'),
                                       ('qwen2_bias_fp16', 'Qwen2ForCausalLM'),
                                       ('llama_rope_yarn_legacy', 'LlamaForCausalLM')])
def test_hf_config_written_without_a_source_reads_back(name, arch):
  """A model trained here (no original config.json to keep) is written as the simplest class
  that expresses it, and reading that config gives the same model.* fields."""
  fields = hf_config.hf_config_to_model_config(hf_config.read_hf_config(fixture(name)))
  written = hf_config.model_config_to_hf_config(model_cfg(fields))
  assert written['architectures'] == [arch]
  assert hf_config.hf_config_to_model_config(written) == fields


def test_llama3_rope_config_forms_agree():
  fields = lambda n: hf_config.hf_config_to_model_config(hf_config.read_hf_config(fixture(n)))
  new, old = fields('llama3_rope_untied_sharded'), fields('llama3_rope_tied_legacy')
  want = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 64}
  assert new['rope_scaling'] == old['rope_scaling'] == want
  assert new['rope_theta'] == old['rope_theta'] == 500000.0


def test_trainer_init_from_hf():
  from ccf_jax import registry as arch_lib
  from ccf_jax.train import trainer
  cfg = base.get_config()
  d = fixture('llama3_rope_tied_legacy')
  fields = hf_config.hf_config_to_model_config(hf_config.read_hf_config(d))
  cfg.model = model_cfg(fields, 'bfloat16')
  cfg.init.from_hf = d
  params = trainer.initial_params(cfg, arch_lib.get_arch(cfg))
  ref = hf_weights.load_hf_params(d)
  np.testing.assert_array_equal(params['layers']['attn']['wq'], ref['layers']['attn']['wq'])


# ---------------------------------------------------------------------------------- tokenizers
def test_tokenizers_are_recorded_and_load(exports):
  sp_export = exports['llama2_gqa_untied']
  info = json.load(open(os.path.join(sp_export, export_lib.INFO_JSON)))
  assert info['tokenizer']['kind'] == 'sentencepiece' and info['tokenizer']['eos_id'] == 2
  _, config, tok_path = export_lib.load_export(sp_export)
  assert config['data']['tokenizer'] == 'tokenizer.model' and tok_path.endswith('tokenizer.model')
  sp = load_tokenizer(tok_path)
  assert sp.vocab_size == 128 and sp.decode(sp.encode('a good fortune')) == 'a good fortune'

  hf_export = exports['llama3_rope_tied_legacy']
  info = json.load(open(os.path.join(hf_export, export_lib.INFO_JSON)))
  assert info['tokenizer']['kind'] == 'hf' and len(info['tokenizer']['sha256']) == 64
  _, config, tok_path = export_lib.load_export(hf_export)
  assert tok_path == os.path.join(hf_export, 'hf', 'tokenizer.json')
  assert config['data']['tokenizer'] == 'hf/tokenizer.json'
  tok = load_tokenizer(os.path.join(hf_export, 'hf', 'tokenizer.json'))
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.unk_id) == (128, 1, 2, 0)
  ids = tok.encode('a good fortune')
  assert tok.decode(ids) == 'a good fortune' and max(ids) < 128
  assert [list(x) for x in tok.encode_batch(['a good fortune'])] == [ids]
  assert not os.path.exists(os.path.join(hf_export, 'tokenizer.json'))  # Not an sp sidecar.


# -------------------------------------------------------------------------------------- errors
def copy_fixture(name, dst, edit_config=None, drop=()):
  os.makedirs(dst)
  for f in os.listdir(fixture(name)):
    if f not in drop:
      with open(os.path.join(fixture(name), f), 'rb') as a, open(os.path.join(dst, f), 'wb') as b:
        b.write(a.read())
  if edit_config:
    cfg = hf_config.read_hf_config(dst)
    edit_config(cfg)
    json.dump(cfg, open(os.path.join(dst, 'config.json'), 'w'))
  return str(dst)


@pytest.mark.parametrize('edit, drop, match', [
    (None, ('config.json',), 'config.json is missing'),
    (None, ('model-00002-of-00003.safetensors',), 'lists shards that are missing'),
    (None, ('model.safetensors.index.json', 'model-00003-of-00003.safetensors'),
     'lacks tensors.*lm_head.weight'),
    (lambda c: c.update(intermediate_size=128), (), r'mlp.gate_proj.weight has shape \[96, 64\], '
     r'but config.json implies \[128, 64\]'),
    (lambda c: c.update(architectures=['GemmaForCausalLM'], model_type='gemma'), (),
     "architecture 'GemmaForCausalLM' is not supported"),
    (lambda c: c.update(attention_bias=True), (), 'q/k/v and o_proj.*no biases'),
    (lambda c: c['rope_parameters'].update(rope_type='dynamic'), (),
     "'dynamic'.*running sequence length.*within 256 tokens, delete rope_scaling"),
    (lambda c: c['rope_parameters'].update(rope_type='longrope'), (), "rope scaling 'longrope'"),
    (lambda c: c.update(architectures=['Qwen2ForCausalLM'], model_type='qwen2',
                        use_sliding_window=True, sliding_window=8, max_window_layers=1), (),
     '1 of 2 layers a window of 8.*set use_sliding_window=false'),
])
def test_clear_errors(edit, drop, match, tmp_path):
  d = copy_fixture('llama3_rope_untied_sharded', tmp_path / 'm', edit, drop)
  with pytest.raises(hf_config.ConvertError, match=match):
    hf_weights.load_hf_params(d)


def test_bin_only_checkpoint_is_refused(tmp_path):
  d = copy_fixture('llama2_gqa_tied', tmp_path / 'm', drop=('model.safetensors',))
  open(os.path.join(d, 'pytorch_model.bin'), 'wb').close()
  with pytest.raises(hf_config.ConvertError, match=r'no \*.safetensors.*save_pretrained'):
    hf_weights.load_hf_params(d)


def test_cli_roundtrip_and_error(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  run = lambda *a: subprocess.run([sys.executable, '-m', 'ccf_jax.convert', *a], cwd=REPO,
                                  env=env, capture_output=True, text=True, timeout=300)
  proc = run(f'--from_hf={fixture("llama2_gqa_tied")}', f'--out={tmp_path / "e"}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '2 layers, d=64, vocab 128, float32' in proc.stdout
  infos = [l for l in proc.stderr.splitlines() if l.startswith('I')]
  assert not infos and 'exporting weights only' in proc.stderr  # No Orbax INFO; warnings stay.
  proc = run(f'--from_hf={tmp_path / "nope"}', f'--out={tmp_path / "e"}')  # Before any read.
  assert proc.returncode == 1 and 'e already exists. Fix: pass --overwrite' in proc.stderr
  proc = run(f'--to_hf={tmp_path / "hf"}', f'--from_export={tmp_path / "e"}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'wrote Hugging Face LlamaForCausalLM (float32)' in proc.stdout
  assert hf_tensors(tmp_path / 'hf').keys() == hf_tensors(fixture('llama2_gqa_tied')).keys()
  proc = run(f'--from_hf={tmp_path / "nope"}', f'--out={tmp_path / "e2"}')
  assert proc.returncode == 1 and 'convert failed:' in proc.stderr
  assert 'is not a directory' in proc.stderr
  assert 'Traceback' not in proc.stderr


# ------------------------------------------------------------------------------------- adapter
def ccf_config(d):
  from experiments import tiny_ccf_adapter
  cfg = tiny_ccf_adapter.get_config()
  cfg.model = model_cfg(hf_config.hf_config_to_model_config(hf_config.read_hf_config(d)))
  cfg.model.arch = 'ccf'
  cfg.ccf.segment_len, cfg.ccf.num_segments, cfg.ccf.num_memory = 16, 2, 4
  cfg.ccf.lora_rank, cfg.ccf.memory_init_token = 4, 2
  cfg.init.params_only, cfg.init.from_hf = '', d
  return cfg


def test_adapter_exports_alone_and_reattaches(tmp_path):
  from ccf_jax import registry as arch_lib
  d = fixture('llama2_gqa_untied')
  cfg = ccf_config(d)
  arch = arch_lib.get_arch(cfg)
  params = arch.from_base_params(cfg, hf_weights.load_hf_params(d, cfg.model))
  params['adapter'] = jax.tree.map(lambda a: np.asarray(a) + 0.5, params['adapter'])  # "Trained".
  out = adapter_lib.export_adapter(params, tmp_path / 'adapter', d, cfg)
  adapter, _, info = adapter_lib.read_adapter(out)
  assert list(adapter) == ['adapter'] and info['base_ref'] == d
  n_adapter = sum(np.size(x) for x in jax.tree.leaves(adapter))
  assert n_adapter < 0.2 * sum(np.size(x) for x in jax.tree.leaves(params))
  full, cfg2 = adapter_lib.load_adapter(out)  # The base comes from base_ref.
  assert cfg2.ccf.lora_rank == 4
  jax.tree.map(np.testing.assert_array_equal, full, jax.tree.map(np.asarray, params))
  other = hf_weights.load_hf_params(d, cfg.model)
  other['final_norm']['scale'] = other['final_norm']['scale'] + 0.25
  with pytest.raises(hf_config.ConvertError, match=r'different base.*decoder.final_norm.scale'):
    adapter_lib.load_adapter(out, base=other)
  with pytest.raises(hf_config.ConvertError, match='full export, not an adapter'):
    adapter_lib.read_adapter(hf.hf_to_export(d, tmp_path / 'full'))


# ---------------------------------------------------------------------------------------- live
def _have_torch():
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    return True
  except ImportError:
    return False


@pytest.mark.slow
@pytest.mark.skipif(not _have_torch(), reason='torch and transformers are not installed (the CI '
                    'venv has neither; the stored fixtures cover parity). Install torch==2.13.0 '
                    'and transformers to run transformers live.')
@pytest.mark.parametrize('name', NAMES)
def test_live_transformers(name, exports, tmp_path):
  import torch
  import transformers
  exp = np.load(os.path.join(fixture(name), 'expected.npz'))
  tokens = torch.as_tensor(exp['tokens'], dtype=torch.long)
  ours = export_logits(exports[name], exp['tokens'])
  for d in (fixture(name), hf.export_to_hf(exports[name], tmp_path / 'hf')):
    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                          attn_implementation='eager').eval()
    with torch.no_grad():
      ref = m(tokens).logits.float().numpy()
    assert np.abs(ref - exp['logits']).max() < ATOL
    assert np.abs(ref - ours).max() < ATOL
