"""The streaming inference engine against the training forward pass and the base decoder.

References are independent of the engine's cache logic: `ccf.arch.lm_logits` (the training forward,
all segments at once with a block mask, itself checked against naive loops in test_ccf_model.py)
and the plain `Decoder` on the raw tokens. Models are tiny (d=32, l=16, c=4, T=4) with every
parameter perturbed so that LoRA B, norms and memory all matter.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from ccf_jax import registry as arch_lib
from ccf_jax.inference import engine as inference
from ccf_jax.inference import sampling
from ccf_jax.model import decoder as model_lib
from ccf_jax.ccf import arch as ccf_arch
from ccf_jax.inference.checks import InferenceError
from tests import ccf_testing

L, C, T, VOCAB = 16, 4, 4, 61
FAST = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
jit = functools.partial(jax.jit, compiler_options=FAST)  # Compile time dominates at these sizes.


def small_cfg(arch='ccf', vocab=VOCAB, **ccf):
  c = ccf_testing.tiny_ccf_from_scratch()
  m = c.model
  m.arch, m.vocab_size, m.d_model, m.num_layers = arch, vocab, 32, 2
  m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 4, 2, 8, 48
  c.ccf.segment_len, c.ccf.num_segments, c.ccf.num_memory = L, T, C
  c.ccf.lora_rank, c.ccf.lora_alpha = 4, 8.0
  c.ccf.distinct_memory_tokens, c.ccf.memory_init_token, c.ccf.ae_mode = False, -1, 'off'
  for k, v in ccf.items():
    c.ccf[k] = v
  return c


VARIANTS = {  # name -> (arch, ccf overrides, Engine options, lm_logits memory / ratio)
    # Prompts encoded 2 segments at a time; the gated memory read (memory rows of the cache get a
    # softmax of their own, apart from its raw rows).
    'ccf': ('ccf', dict(memory_gate='tanh'), dict(prefill_segments=2), 'on', None),
    # A ring of one segment's memory, text positions, 2 of the 4 memory slots (ratio 8 of 4, 8).
    'ccf_window_positions_ratio': ('ccf', dict(memory_window=1, memory_positions='segment',
                                               ratios=(4, 8)), dict(ratio=8), 'on', 8),
    'ccf_memory_off': ('ccf', {}, dict(memory=False), 'off', None),
    'full_attention': ('full_attention', {}, dict(prefill_chunk=L), 'on', None),  # 16-token chunks.
}


@functools.lru_cache(maxsize=None)
def _params(cfg_json):
  """Random params of every leaf (numpy: jitting the initialisers costs seconds of compilation):
  weights ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2), so LoRA B, norms and memory all matter."""
  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  arch = arch_lib.get_arch(cfg)
  shapes = model_lib.abstract_params(arch.module_config(cfg), arch.module_cls)
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: ((path[-1].key == 'scale') + 0.1 * rng.standard_normal(s.shape)).astype(
          s.dtype), shapes)


def params_of(cfg):
  return _params(cfg.to_json())


def new_engine(variant, cfg, params):
  """A variant's engine with no compiled programs yet."""
  return inference.Engine(cfg, params, compiler_options=FAST, **VARIANTS[variant][2])


@functools.lru_cache(maxsize=None)
def setup(variant):
  """(cfg, params, engine) shared by the tests of a variant (compiled programs are reused)."""
  arch, ccf, _, _, _ = VARIANTS[variant]
  cfg = small_cfg(arch, **ccf)
  params = params_of(cfg)
  return cfg, params, new_engine(variant, cfg, params)


@functools.lru_cache(maxsize=None)
def _training_fn(variant):
  cfg, _, _ = setup(variant)
  _, _, _, memory, ratio = VARIANTS[variant]
  return jit(lambda p, b: ccf_arch.lm_logits(cfg, p, b, memory, ratio))


def training_logits(variant, docs):
  """The training forward pass over windows of T*l tokens (two per call), per document."""
  _, params, _ = setup(variant)
  out = []
  for i in range(0, len(docs), 2):
    pair = list(docs[i:i + 2]) + [docs[i]] * (2 - len(docs[i:i + 2]))
    tokens = np.zeros((2, T * L), np.int32)
    for j, d in enumerate(pair):
      tokens[j, :len(d)] = d
    nvs = np.array([-(-len(d) // L) for d in pair], np.int32)
    batch = {'tokens': tokens, 'loss_mask': np.ones_like(tokens, np.float32),
             'num_valid_segments': nvs}
    logits = np.asarray(_training_fn(variant)(params, batch))
    out += [logits[j, :len(d)] for j, d in enumerate(pair)][:len(docs[i:i + 2])]
  return out


DOC = np.random.default_rng(0).integers(0, VOCAB, (2, T * L)).astype(np.int32)
TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_teacher_forced_streaming_equals_training_forward(variant):
  """Segment by segment (compress-as-you-read), a full document and one ending mid-segment."""
  docs = [DOC[0], DOC[1, :41]]
  got = setup(variant)[2].logits(docs)
  for g, r in zip(got, training_logits(variant, docs)):
    np.testing.assert_allclose(g, r, **TOL)
  lp = setup(variant)[2].token_logprobs(docs)[1]
  ref = jax.nn.log_softmax(got[1][:-1], -1)[np.arange(40), docs[1][1:]]
  np.testing.assert_allclose(lp, ref, **TOL)


def test_prefill_of_prompts_of_every_length_in_one_batch():
  """Prompts ending inside, at and just after segment boundaries, batched together: the last
  logits equal the training forward, and the cache holds n // l memory segments + n % l raw."""
  cfg, _, engine = setup('ccf')
  lengths = [1, 7, 15, 16, 17, 32, 33, 50, 64]
  state, last = engine.prefill([DOC[0, :n] for n in lengths])
  ref = training_logits('ccf', [DOC[0]])[0]
  np.testing.assert_allclose(np.asarray(last), ref[np.array(lengths) - 1], **TOL)
  used = engine.cache_bytes(state)
  assert used['memory_rows'] == sum(n // L * C for n in lengths)
  assert used['raw_rows'] == sum(n % L for n in lengths)
  np.testing.assert_array_equal(state.cache.segment, np.array(lengths) // L)


def test_token_by_token_decoding_equals_recomputation():
  """Teacher-forced decode steps across three compressions give the logits of the training
  forward over the same prefix; the decode step compiles once per memory bucket (counted on an
  engine of its own, so the count holds in any test order)."""
  engine = new_engine('ccf', *setup('ccf')[:2])
  ref = training_logits('ccf', list(DOC))
  starts = [3, 14]
  state, _ = engine.prefill([DOC[0, :3], DOC[1, :14]])
  buckets = set()
  for step in range(T * L - 1 - max(starts)):
    buckets.add(state.cache.mem_segment.shape[1])
    state, _, logits = engine.decode(state, [DOC[b, s + step] for b, s in enumerate(starts)])
    for b, s in enumerate(starts):
      np.testing.assert_allclose(np.asarray(logits[b]), ref[b][s + step], **TOL,
                                 err_msg=f'element {b} at position {s + step}')
  assert sorted(buckets) == [0, C, 2 * C, 4 * C]  # 0, 1, 2, then 3 -> 4 segments of memory.
  assert engine.compile_counts['decode'] == len(buckets)
  before = dict(engine.compile_counts)
  state, _ = engine.prefill([DOC[0, :3], DOC[1, :14]])
  for step in range(T * L - 1 - max(starts)):
    state, _, _ = engine.decode(state, [DOC[b, s + step] for b, s in enumerate(starts)])
  assert dict(engine.compile_counts) == before  # The same buckets: nothing recompiles.


def test_short_prompt_is_the_base_decoder():
  """Shorter than one segment, CCF is exactly its base decoder: logits and greedy tokens."""
  cfg, params, engine = setup('ccf')
  prompt = DOC[0, :9]
  base = jit(lambda p, t: model_lib.bind(cfg.model, p)(t))
  out = engine.generate([prompt, prompt], 6)
  seq = np.concatenate([prompt, out.tokens[0]])
  ref = np.asarray(base(params['decoder'], seq[None]))[0]
  assert out.tokens == [[int(t) for t in ref[len(prompt) - 1:-1].argmax(-1)]] * 2
  np.testing.assert_allclose(engine.logits([seq, seq])[0], ref, **TOL)
  assert out.finish_reason == ['length'] * 2 and out.stats['memory_rows'] == 0


def test_batched_generation_crossing_segments_and_stop_tokens():
  """Greedy batch of different lengths: every token is the argmax of the training forward over
  the sequence so far, so compressions mid-generation are right (here into a ring of one
  segment's memory). A stop token ends one element (excluded from its output) while the others
  run to max_new_tokens."""
  variant = 'ccf_window_positions_ratio'
  engine = setup(variant)[2]
  prompts = [DOC[0, :5], DOC[1, :20], DOC[0, :33]]
  out = engine.generate(prompts, 24)
  seqs = [np.concatenate([p, t]).astype(np.int32) for p, t in zip(prompts, out.tokens)]
  for p, seq, ref in zip(prompts, seqs, training_logits(variant, seqs)):
    np.testing.assert_array_equal(seq[len(p):], ref[len(p) - 1:-1].argmax(-1))
  assert out.stats['memory_rows'] == 3 * C  # Each element keeps its last segment's rows only.
  stop = out.tokens[1][3]
  first = {b: t.index(stop) for b, t in enumerate(out.tokens) if stop in t}
  again = engine.generate(prompts, 24, stop_tokens=[stop])
  for b in range(3):
    n = first.get(b, 24)
    assert again.tokens[b] == out.tokens[b][:n]
    assert again.finish_reason[b] == ('stop' if b in first else 'length')


@pytest.mark.parametrize('variant', ['ccf', 'full_attention'])
def test_engine_on_a_mesh_equals_one_device(variant):
  """Parameters placed on a (data 2, fsdp 2, tensor 2) mesh with the training rules: streamed
  logits and greedy generation equal the single-device engine's, and the weights really are
  sharded."""
  from ccf_jax.core import config_lib, sharding
  arch, ccf, opts, _, _ = VARIANTS[variant]
  cfg = small_cfg(arch, **ccf)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  mesh = sharding.make_mesh(cfg.mesh)
  with pytest.raises(config_lib.ConfigError, match=r'embed.* \(61, 32\) .*61'):
    inference.Engine(cfg, params_of(cfg), mesh=mesh)  # 61 rows cannot split across tensor=2.
  cfg = small_cfg(arch, vocab=64, **ccf)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  params = params_of(cfg)
  single = inference.Engine(cfg, params, compiler_options=FAST, **opts)
  engine = inference.Engine(cfg, params, compiler_options=FAST, mesh=mesh, **opts)
  wq = engine.params['decoder' if variant == 'ccf' else 'layers']
  wq = (wq['layers'] if variant == 'ccf' else wq)['attn']['wq']
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
  docs = [DOC[0], DOC[1, :41]]  # Token ids < 61 <= 64.
  for g, r in zip(engine.logits(docs), single.logits(docs)):
    np.testing.assert_allclose(g, r, **TOL)
  prompts = [DOC[0, :5], DOC[1, :20]]
  assert engine.generate(prompts, 12).tokens == single.generate(prompts, 12).tokens


def test_sampling_rules():
  logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]], np.float32))
  draw = jax.jit(jax.vmap(sampling.sample_tokens, in_axes=(None, 0, None, None, None)))
  keys = jax.random.split(jax.random.key(0), 2000)
  seen = lambda t, k, p: [set(np.unique(col)) for col in np.asarray(draw(logits, keys, t, k, p)).T]
  assert seen(0.0, 0, 1.0) == [{0}, {3}]  # Greedy.
  assert seen(1.0, 1, 1.0) == [{0}, {3}]  # top_k=1 is greedy at any temperature.
  assert seen(1.0, 2, 1.0) == [{0, 1}, {2, 3}]
  assert seen(1.0, 0, 0.5) == [{0, 1}, {2, 3}]  # 0.4 < 0.5: the token crossing top_p is kept.
  assert seen(1.0, 3, 0.05) == [{0}, {3}]
  counts = np.bincount(np.asarray(draw(logits, keys, 1.0, 0, 1.0))[:, 0], minlength=4) / 2000
  np.testing.assert_allclose(counts, [0.4, 0.3, 0.2, 0.1], atol=0.04)
  hot = np.bincount(np.asarray(draw(logits, keys, 0.25, 0, 1.0))[:, 0], minlength=4) / 2000
  assert hot[0] > 0.6  # Low temperature sharpens.


def test_bad_inputs_give_clear_errors():
  cfg, params, engine = setup('ccf')
  cases = [([], 'no prompts'), ([[]], 'prompt 0 is empty'), ([[1, VOCAB]], f'token id {VOCAB}'),
           ([[3], [-1]], 'prompt 1 has token id -1'), ([np.zeros((2, 2), int)], '1-D')]
  for prompts, msg in cases:
    with pytest.raises(InferenceError, match=msg):
      engine.prefill(prompts)
  for kw, msg in [(dict(max_new_tokens=0), 'max_new_tokens'), (dict(top_p=0.0), 'top_p'),
                  (dict(temperature=-1.0), 'temperature'), (dict(top_k=1.5), 'top_k'),
                  (dict(stop_tokens=[VOCAB]), 'stop tokens')]:
    with pytest.raises(InferenceError, match=msg):
      engine.generate([[1, 2]], **{'max_new_tokens': 3, **kw})
  short = small_cfg()
  short.model.max_position = 40  # (40 - 16) / 4 + 1 = 7 segments of sequential positions.
  with pytest.raises(InferenceError, match=r'ccf.memory_window=6'):
    inference.Engine(short, params).generate([DOC[0]], 64)
  assert inference.Engine(short, params, memory_window=6).max_tokens() is None
  full = small_cfg('full_attention')
  full.model.max_position = 40
  with pytest.raises(InferenceError, match='model.max_position=40'):
    inference.Engine(full, params['decoder']).prefill([DOC[0, :41]])
  with pytest.raises(InferenceError, match='ratio=3'):
    inference.Engine(cfg, params, ratio=3)
  with pytest.raises(InferenceError, match="no inference path"):
    bad = small_cfg()
    bad.model.arch = 'mystery'
    inference.Engine(bad, params)


def test_generator_and_cli_from_an_export(tmp_path):
  """Text in, text out from an export (random CCF model, a tiny trained tokenizer), in Python
  and through `python -m ccf_jax.generate`."""
  from ccf_jax.checkpoint import export as export_lib
  from ccf_jax.data import tokenizer as tok_lib
  from ccf_jax.inference.generator import Generator, read_prompts
  text = 'To be, or not to be, that is the question.\nWhether tis nobler in the mind to suffer.\n'
  tok = tok_lib.train_tokenizer([text * 20], 300, str(tmp_path / 'tok'))
  cfg = small_cfg(vocab=tok.vocab_size)
  export_lib.write_export(tmp_path / 'export', params_of(cfg), cfg.to_dict(),
                          files={'tokenizer.model': tok.model_path})
  gen = Generator.from_export(str(tmp_path / 'export'), compiler_options=FAST)
  a = gen.generate('To be', 8, stop=['\n'])
  assert gen.encode('To be')[0] == tok.bos_id and a.finish_reason in ('stop', 'length')
  assert a.text == tok.decode(a.tokens) and gen.last_stats['prompt_tokens'] == [3]
  with pytest.raises(InferenceError, match='only single-token stops'):
    gen.generate('To be', stop=['be, or'])
  (tmp_path / 'p.jsonl').write_text('"To be"\n\n{"prompt": "or not"}\n')
  assert read_prompts(str(tmp_path / 'p.jsonl')) == ['To be', 'or not']
  with pytest.raises(InferenceError, match='does not exist'):
    read_prompts(str(tmp_path / 'missing.txt'))
  (tmp_path / 'p.txt').write_text('To be')
  done = subprocess.run(
      [sys.executable, '-m', 'ccf_jax.generate', f'--checkpoint={tmp_path / "export"}',
       f'--prompt_file={tmp_path / "p.txt"}', '--max_new_tokens=8', '--stop=\\n',
       f'--output={tmp_path / "out.jsonl"}'], capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(  # FAST, as flags.
          f'--{k}={str(v).lower()}' for k, v in FAST.items())))
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads((tmp_path / 'out.jsonl').read_text())['text'] == a.text


def test_sliding_window_decoder_streams_like_its_forward():
  """A plain decoder with model.sliding_window=5: prefill in chunks of 16 (keys of earlier chunks
  leave the window) and token-by-token decoding give the logits of the Decoder's forward over the
  whole sequence (itself checked against a naive windowed reference in test_model.py); a CCF
  model with a window is refused."""
  cfg = small_cfg('decoder')
  cfg.model.sliding_window = 5
  params = params_of(cfg)
  engine = inference.Engine(cfg, params, prefill_chunk=16, compiler_options=FAST)
  doc = DOC[0, :40]
  forward = lambda c: np.asarray(jit(lambda p, t: model_lib.bind(c.model, p)(t))(params, doc[None]))
  ref = forward(cfg)[0]
  full = cfg.copy_and_resolve_references()
  full.model.sliding_window = 0
  assert np.abs(forward(full)[0, 5:] - ref[5:]).max() > 0.01  # The window matters.
  np.testing.assert_allclose(engine.logits([doc])[0], ref, **TOL)
  state, _ = engine.prefill([doc[:20]])
  for s in range(20, 28):
    state, _, logits = engine.decode(state, [doc[s]])
    np.testing.assert_allclose(np.asarray(logits[0]), ref[s], **TOL, err_msg=f'position {s}')
  ccf = small_cfg('ccf')
  ccf.model.sliding_window = 5
  with pytest.raises(InferenceError, match='sliding_window=5 is implemented for the plain'):
    inference.Engine(ccf, {})


def test_generator_from_an_export_with_a_tokenizer_json(tmp_path):
  """An export whose tokenizer is a Hugging Face tokenizer.json (hf/ with its tokenizer_config.json)
  loads for generation: its special ids, plain encoding, stops, eos kept when decoding."""
  from ccf_jax import data
  from ccf_jax.checkpoint import export as export_lib
  from ccf_jax.inference.generator import Generator
  src = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'tokenizers', 'bpe')
  tok = data.load_tokenizer(src)
  cfg = small_cfg(vocab=tok.vocab_size)
  export_lib.write_export(tmp_path / 'export', params_of(cfg), cfg.to_dict(),
                          files=export_lib.tokenizer_files(tok))
  gen = Generator.from_export(str(tmp_path / 'export'), compiler_options=FAST)
  assert gen.tokenizer.kind == 'hf' and gen.tokenizer.chat_template
  assert gen.encode('To be') == tok.encode('To be')  # No bos token in this vocabulary.
  assert gen.stop_ids(['\n']) == [tok.eos_id, *tok.encode('\n')]
  assert gen.tokenizer.decode([*tok.encode('To be'), tok.eos_id]) == 'To be<|endoftext|>'
