"""The evaluation suite against direct computations: perplexity protocols, passkey scoring and
placement, ROUGE-L, and the quick report end to end on a freshly trained and exported tiny model.

References are written here independently: perplexities from `ccf.arch.lm_logits` (CCF, memory
off) or the plain decoder (full attention) on exactly the text each protocol defines, with a numpy
log-softmax; ROUGE-L from hand-worked pairs and a textbook LCS table.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccf_jax.eval import autoencode as eval_ae
from ccf_jax.eval import common as ec
from ccf_jax.eval import passkey as eval_passkey
from ccf_jax.eval import ppl as eval_ppl
from ccf_jax.eval import runner as evaluate
from ccf_jax import data as data_lib
from ccf_jax import registry as arch_lib
from ccf_jax.model import decoder as model_lib
from ccf_jax.ccf.arch import lm_logits
from ccf_jax.tasks import passkey
from tests import ccf_testing

L, VOCAB = 8, 61
FAST = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def small_cfg(arch='ccf', **ccf):
  c = ccf_testing.tiny_ccf_from_scratch()
  m = c.model
  m.arch, m.vocab_size, m.d_model, m.num_layers = arch, VOCAB, 32, 2
  m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 4, 2, 8, 48
  c.ccf.segment_len, c.ccf.num_segments, c.ccf.num_memory = L, 3, 4
  c.ccf.lora_rank, c.ccf.lora_alpha, c.ccf.memory_init_token = 4, 8.0, -1
  c.ccf.ae_mode = 'off'
  for k, v in ccf.items():
    c.ccf[k] = v
  return c


@pytest.fixture(autouse=True)
def fast_compile(monkeypatch):
  """Compile time dominates at these sizes: let XLA optimise less (same numbers)."""
  monkeypatch.setattr(ec, 'COMPILER_OPTIONS', FAST)


@functools.lru_cache(maxsize=None)
def _random_params(seed=0):
  """CCF params of small_cfg (perturbed so that LoRA and memory all matter). Segment length,
  ratios, positions and segment counts do not change parameter shapes, so every test shares them;
  the baselines use the CCF decoder."""
  cfg = small_cfg()
  arch = arch_lib.get_arch(cfg)

  @functools.partial(jax.jit, compiler_options=FAST)  # One program, not one per eager op.
  def init():
    params = model_lib.init_params(arch.module_config(cfg), seed, arch.module_cls)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape, a.dtype)
                                     for a, k in zip(leaves, keys)])

  return init()


def eval_model(cfg):
  params = _random_params()
  if cfg.model.arch != 'ccf':
    params = params['decoder']
  return ec.EvalModel('', cfg, params, None, {}, cfg.model.arch)


def docs_of(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(4, VOCAB, n).astype(np.int32) for n in lengths]


def ce(logits, targets):
  """Per-position cross-entropy in float64 numpy."""
  logits = np.asarray(logits, np.float64)
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, targets[..., None], -1)[..., 0]


_DIRECT = {}


def direct_logits(model, tokens, memory='on', ratio=None):
  """Logits of a window [n] straight from the model (full attention: the plain decoder)."""
  cfg = model.config
  key = (id(model), memory, ratio)
  if key in _DIRECT:
    return np.asarray(_DIRECT[key][1](model.params, tokens[None]))[0]

  @functools.partial(jax.jit, compiler_options=FAST)
  def fn(params, tokens):
    if model.arch == 'full_attention':
      return model_lib.bind(cfg.model, params, model_lib.Decoder)(tokens)
    batch = {'tokens': tokens, 'loss_mask': jnp.ones(tokens.shape, jnp.float32),
             'num_valid_segments': jnp.array([tokens.shape[1] // L], jnp.int32)}
    return lm_logits(cfg, params, batch, memory, ratio)

  _DIRECT[key] = (model, fn)  # Keeps the model alive, so its id is not reused.
  return np.asarray(fn(model.params, tokens[None]))[0]


# ------------------------------------------------------------------------------------------------
# Perplexity.


def test_last_n_given_k_equals_the_model_on_the_truncated_window():
  model = eval_model(small_cfg(ratios=(2, 4)))
  docs = docs_of([7 * L + 3, 8 * L])
  n_tail, ks = 2 * L, eval_ppl.k_sweep(L, 2 * L)
  assert ks == [0, L, 2 * L]
  cells = eval_ppl.last_n_given_k(model, docs, n_tail, ks, 2, 'on', doc_batch=2)
  coarse = eval_ppl.last_n_given_k(model, docs, n_tail, ks, 4, 'on', doc_batch=2)
  off = eval_ppl.last_n_given_k(model, docs, n_tail, ks, None, 'off', doc_batch=1)
  for k in ks:
    # The N - 1 predictions inside the final N tokens: positions k .. k+N-2 predict k+1 ...
    windows = [d[-(k + n_tail):] for d in docs]
    want = np.mean([ce(direct_logits(model, w, 'on', 2)[k:-1], w[k + 1:]).mean() for w in windows])
    assert cells[k]['tokens'] == off[k]['tokens'] == 2 * (n_tail - 1)
    np.testing.assert_allclose(cells[k]['loss'], want, rtol=2e-5)
  assert [off[k]['loss'] for k in ks] == [off[0]['loss']] * 3  # Memory off: the tail alone.
  want_off = [ce(direct_logits(model, d[-n_tail:], 'off')[:-1], d[-n_tail + 1:]).mean()
              for d in docs]
  np.testing.assert_allclose(off[0]['loss'], np.mean(want_off), rtol=2e-5)
  assert abs(cells[2 * L]['loss'] - cells[0]['loss']) > 1e-4  # The memory is used ...
  assert abs(coarse[2 * L]['loss'] - cells[2 * L]['loss']) > 1e-5  # ... at its ratio.
  assert 'beyond_trained' in cells[2 * L] and 'beyond_trained' not in cells[L]


def test_full_attention_is_scored_only_within_its_trained_positions():
  model = eval_model(small_cfg('full_attention'))
  docs = docs_of([8 * L])
  cells = eval_ppl.last_n_given_k(model, docs, L, [0, L, 2 * L, 4 * L], doc_batch=1)
  for k in (0, L, 2 * L):  # Trained window: 3 segments.
    window = docs[0][-(k + L):]
    want = ce(direct_logits(model, window)[k:-1], window[k + 1:]).mean()
    np.testing.assert_allclose(cells[k]['loss'], want, rtol=2e-5)
  assert ec.is_na(cells[4 * L]) and 'trained positions' in cells[4 * L][ec.NA]


def test_cut_prefixes_score_distinct_tails_of_each_document():
  docs = [np.arange(n) for n in (100, 40, 64)]
  cuts = eval_ppl.cut_prefixes(docs, min_tokens=40, n_tail=8, per_doc=4)
  # 100 tokens: ends 100, 80, 60, 40 (60 tokens of room in 3 steps); 40: itself; 64: 64, 56, 48, 40.
  assert [len(c) for c in cuts] == [100, 80, 60, 40, 40, 64, 56, 48, 40]
  for c in cuts:
    assert np.array_equal(c, np.arange(len(c)))  # A prefix of its document.
  assert [len(c) for c in eval_ppl.cut_prefixes(docs, 40, 8, 1)] == [100, 40, 64]


def test_gap_closed_against_a_hand_computation():
  from ccf_jax.eval import compare

  def run(name, arch, rows):
    return {'meta': {'name': name, 'arch': arch},
            'ppl': {'tail_ends': [50, 60, 70], 'last_n': [
                {'name': n, 'memory': m, 'cells': {str(k): {'loss': float(np.mean(v)),
                                                            'doc_losses': v}
                                                   for k, v in cells.items()}}
                for n, m, cells in rows]}}

  runs = [run('ccf', 'ccf', [('ccf 8x', 'on', {0: [3.0, 3.2, 3.4], 128: [2.9, 3.0, 3.2]}),
                            ('memory off', 'off', {0: [3.0, 3.2, 3.4], 128: [3.0, 3.2, 3.4]})]),
          run('local', 'segment_local', [('segment_local', 'off', {0: [3.1, 3.2, 3.3],
                                                                   128: [3.1, 3.2, 3.3]})]),
          run('full', 'full_attention', [('full_attention', 'off', {0: [3.1, 3.2, 3.3],
                                                                    128: [2.8, 3.0, 3.1]})])]
  rows = [r for r in compare.gap_rows(runs) if r.startswith('| ccf')]
  # gap 3.2 - 2.9667 = 0.2333; closed 3.2 - 3.0333 = 0.1667: 0.714. Paired local - ccf per tail
  # 0.2, 0.2, 0.1: mean 0.1667, SE 0.0333; ccf - full 0.1, 0.0, 0.1: 0.0667, SE 0.0333.
  assert rows == ['| ccf: ccf 8x | 128 | 0.714 | +0.1667 +- 0.0333 | +0.0667 +- 0.0333 |']
  runs[2]['ppl']['tail_ends'] = [50, 60, 71]  # Other tails: the fraction, but no paired figures.
  assert compare.gap_rows(runs)[-2] == '| ccf: ccf 8x | 128 | 0.714 | - | - |'


def test_streaming_equals_one_pass_over_the_document_and_stops_at_the_position_limit():
  cfg = small_cfg()
  cfg.model.max_position = 4 * 6 + L  # Memory of 6 earlier segments at most (c = 4): 7 segments.
  model = eval_model(cfg)
  docs = docs_of([9 * L + 5, 5 * L + 2])
  res = eval_ppl.streaming(model, docs, 64 * L, memory='on', doc_batch=2, scores_budget_bytes=1e4)
  t = 7
  assert res['scored_up_to'] == t * L and 'max_position' in res['limit']
  sums, counts = np.zeros(t), np.zeros(t)
  for d in docs:  # One pass of the model over the (zero-padded) first t segments.
    window = np.pad(d[:t * L], (0, max(0, t * L - len(d))))
    losses = ce(direct_logits(model, window), np.pad(d[1:t * L + 1], (0, t * L))[:t * L])
    for p in range(min(len(d) - 1, t * L)):  # Position p predicts token p + 1 of the document.
      sums[p // L] += losses[p]
      counts[p // L] += 1
  np.testing.assert_allclose(res['loss'], sums / counts, rtol=3e-5)
  assert res['tokens'] == counts.astype(int).tolist() and res['positions'][1] == L


# ------------------------------------------------------------------------------------------------
# Passkey.


def char_encode(text):
  return [3 + ord(ch) % (VOCAB - 3) for ch in text]


def test_passkey_scorer_on_crafted_predictions_and_key_placement():
  batch = passkey.make_batch(char_encode, 3, 4, 64, 0.5, seed=3, bos_id=2)
  answers = batch['tokens'][:, -5:]
  right = eval_passkey._score(answers.copy(), batch, 5)
  assert right == {'per_digit_accuracy': 1.0, 'exact_match': 1.0}
  wrong = answers.copy()
  wrong[0, 2] = (wrong[0, 2] + 1) % VOCAB  # One digit of example 0.
  wrong[1] = (wrong[1] + 1) % VOCAB  # All digits of example 1.
  got = eval_passkey._score(wrong, batch, 5)
  assert got['per_digit_accuracy'] == pytest.approx(9 / 15)
  assert got['exact_match'] == pytest.approx(1 / 3)
  statement = len(char_encode(passkey.STATEMENT.format(key='00000')))
  for depth in (0.0, 0.25, 1.0):
    b = passkey.make_batch(char_encode, 2, 4, 64, depth, seed=1, bos_id=2)
    num_fill = 256 - 1 - statement - len(char_encode(passkey.QUESTION)) - 5
    for row, key, at in zip(b['tokens'], b['keys'], b['key_start']):
      assert at == 1 + round(depth * num_fill)
      assert list(row[at:at + statement]) == char_encode(passkey.STATEMENT.format(key=key))


def test_greedy_fallback_matches_the_inference_engine():
  batch = passkey.make_batch(char_encode, 2, 3, 64, 0.0, seed=0)  # 3 segments of 64 tokens.
  cfg = small_cfg()
  cfg.ccf.segment_len = 64  # Ratio 16.
  model = eval_model(cfg)
  fn = eval_passkey._teacher_forced_fn(model, 'on', None)
  tf, greedy = (np.asarray(a) for a in fn(model.params, batch['tokens'], 5, True))
  engine = eval_passkey._engine(model, 'on', None)
  gen = engine.generate(list(batch['tokens'][:, :-5]), max_new_tokens=5, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(gen.tokens), greedy)
  np.testing.assert_array_equal(tf[:, 0], greedy[:, 0])  # The first digit sees the same prompt.


# ------------------------------------------------------------------------------------------------
# ROUGE-L.


def naive_lcs(a, b):
  t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      t[i + 1][j + 1] = t[i][j] + 1 if x == y else max(t[i][j + 1], t[i + 1][j])
  return t[-1][-1]


def test_rouge_l_and_bleu_on_hand_checked_pairs():
  r = eval_ae.rouge_l('the cat on the mat'.split(), 'the cat sat on the mat'.split())
  assert r['precision'] == 1.0 and r['recall'] == pytest.approx(5 / 6)
  assert r['f1'] == pytest.approx(10 / 11)
  r = eval_ae.rouge_l('ABCBDAB', 'BDCABA')  # CLRS: LCS 4 ("BCBA").
  assert eval_ae.lcs_length('ABCBDAB', 'BDCABA') == 4 and r['f1'] == pytest.approx(8 / 13)
  assert eval_ae.rouge_l([1, 2, 3], [1, 2, 3])['f1'] == 1.0
  assert eval_ae.rouge_l([1, 2], [3, 4])['f1'] == 0.0 and eval_ae.rouge_l([], [1])['f1'] == 0.0
  assert eval_ae.rouge_l([3, 2, 1], [1, 2, 3])['f1'] == pytest.approx(1 / 3)
  b = eval_ae.bleu4([[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 5, 6]])  # All n-grams right, one short.
  assert b['precisions'] == [1.0] * 4 and b['bleu4'] == pytest.approx(np.exp(1 - 6 / 5))
  assert eval_ae.bleu4([[7, 7, 7, 7]], [[7, 1, 2, 3]])['precisions'][0] == 0.25  # Clipped counts.
  assert eval_ae.bleu4([[7, 7, 7, 7]], [[7, 1, 2, 3]])['bleu4'] == 0.0
  b = eval_ae.bleu4([[1, 2, 3, 4, 9], [5, 6, 7, 8]], [[1, 2, 3, 4, 5], [5, 6, 7, 8]])
  assert b['precisions'] == [8 / 9, 6 / 7, 4 / 5, 2 / 3]  # Summed over the corpus, then divided.
  rng = np.random.default_rng(0)
  for _ in range(20):
    a, b = rng.integers(0, 4, rng.integers(0, 15)), rng.integers(0, 4, rng.integers(0, 15))
    assert eval_ae.lcs_length(a, b) == naive_lcs(list(a), list(b))


def test_greedy_reconstruction_is_a_fixed_point_of_teacher_forcing():
  """Each reconstructed token is the argmax given the repeat vector and the tokens before it."""
  from ccf_jax.ccf.model import CCFModel, decode_segments, module_config
  cfg = small_cfg()
  model = eval_model(cfg)
  segs = docs_of([L] * 3, seed=4)
  span = np.full((3,), 2, np.int32)
  ce_sum, n, ok, rec = eval_ae._fns(model)(model.params, np.stack(segs), span, np.ones(3, bool))
  assert float(n) == 3 * (L - 1) and 0 <= float(ok) <= float(n)

  @functools.partial(jax.jit, compiler_options=FAST)
  def teacher_forced_argmax(params, inputs):
    m = model_lib.bind(module_config(cfg), params, CCFModel)
    zero = jnp.zeros((3, 1), jnp.int32)
    mem = m.compress(jnp.stack(segs)[:, None], span, jnp.ones((3, 1), bool), segments=zero)
    logits = decode_segments(m.decoder, cfg.ccf, inputs[:, None], span, zero, zero + 1, mem,
                             first_input=m.adapter.repeat[...])
    return jnp.argmax(logits[:, 0], -1)

  rec = np.asarray(rec)
  inputs = np.concatenate([np.zeros((3, 1), np.int32), rec], 1)  # [repeat] + reconstruction.
  np.testing.assert_array_equal(np.asarray(teacher_forced_argmax(model.params, inputs))[:, :-1],
                                rec)


# ------------------------------------------------------------------------------------------------
# The quick report end to end.


def tiny_train_cfg():
  c = ccf_testing.tiny_ccf_from_scratch()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers = 512, 32, 1  # Compiling the train step dominates.
  m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 2, 1, 16, 64
  c.ccf.segment_len, c.ccf.num_segments, c.ccf.num_memory = 32, 2, 4
  c.ccf.lora_rank, c.ccf.lora_alpha, c.ccf.ae_mode = 4, 8.0, 'off'
  c.data.batch_size = 2
  c.train.steps, c.train.time_budget_s, c.train.warmup_steps = 2, 0.0, 1
  c.train.log_every, c.train.eval_batches = 1, 1
  c.checkpoint.every = 1000
  c.mesh.num_devices = 1
  return c


@pytest.mark.slow
def test_quick_report_end_to_end(tmp_path):
  from ccf_jax.checkpoint import export as export_lib
  from ccf_jax.train import trainer
  work, exp, out = (str(tmp_path / n) for n in ('work', 'export', 'eval'))
  trainer.train_and_evaluate(tiny_train_cfg(), work)
  export_lib.export(work, exp)
  small = {'efficiency': {'lengths': [128], 'decode_steps': 2},
           'passkey': {'length_segments': [4], 'depths': [0.0, 1.0], 'batch': 2},
           'ppl': {'docs': 2, 'k_max_segments': 4, 'stream_segments': 8}}
  res = evaluate.run(exp, out, preset='quick', overrides=small)
  with open(os.path.join(out, 'results.json')) as f:
    saved = json.load(f)
  meta = saved['meta']
  assert meta['checkpoint']['step'] == 2 and meta['arch'] == 'ccf'
  assert meta['config']['model']['d_model'] == 32 and meta['tokenizer']['vocab_size'] == 512
  assert {'jax', 'flax'} <= set(meta['versions']) and meta['machine']['cpus']
  assert set(evaluate.SECTIONS) <= set(saved)
  p = saved['ppl']
  assert p['ks'] == [0, 32, 64, 128] and [r['name'] for r in p['last_n']][0] == 'ccf 8x'
  assert 'beyond_trained' in p['last_n'][0]['cells']['64']  # Trained on windows of 2 segments.
  cells = saved['passkey']['rows'][0]['cells']
  assert 0.0 <= cells['128@0.0']['greedy']['per_digit_accuracy'] <= 1.0
  assert saved['passkey']['greedy_path'].startswith('ccf_jax.inference')
  assert saved['ae']['rows'][0]['greedy']['rouge_l_tokens'] >= 0.0
  assert 'ae_mode=off' in saved['ae']['note']
  assert saved['efficiency']['headline'][0]['cache_bytes'] < 1.0
  with open(os.path.join(out, 'report.md')) as f:
    report = f.read()
  for title in ('## Perplexity', 'Last N given K', '## Passkey', '## Auto-encoding',
                '## Efficiency', 'ppl_vs_context.png', 'passkey.png'):
    assert title in report, title
  for png in ('ppl_vs_context.png', 'ppl_vs_position.png', 'passkey.png',
              'efficiency_throughput.png', 'efficiency_memory.png'):
    assert os.path.getsize(os.path.join(out, png)) > 1000
  # --only re-runs one section and keeps the others.
  again = evaluate.run(exp, out, only=('ae',), preset='quick', overrides=small)
  dump = lambda x: json.dumps(x, sort_keys=True, default=str)
  assert dump(again['ppl']) == dump(res['ppl']) and 'ae' in again
  with open(os.path.join(out, 'results.json')) as f:
    assert set(evaluate.SECTIONS) <= set(json.load(f))
  # The long preset's passkey: corpus filler, greedy only, a memory-window row and the control.
  small = {'passkey': {'length_segments': [4], 'depths': [0.5], 'batch': 2,
                       'memory_windows': [None, 1]}}
  long = evaluate.run(exp, out + '_long', only=('passkey',), preset='long', overrides=small)
  p = long['passkey']
  assert [r['name'] for r in p['rows']] == ['ccf 8x', 'ccf 8x, memory_window=1',
                                            'ccf, memory off (control)']
  assert p['filler'] == 'corpus' and [r['memory_window'] for r in p['rows']] == [None, 1, None]
  for row in p['rows']:
    cell = row['cells']['128@0.5']
    assert 'teacher_forced' not in cell and 0.0 <= cell['greedy']['exact_match'] <= 1.0
  assert os.path.getsize(os.path.join(out + '_long', 'passkey.png')) > 1000
  # A plain decoder export (here the CCF export's decoder alone) scores the held-out batches of
  # its own pipeline with one causal pass each: the loss of a direct forward on the same batch.
  model = ec.load(exp)
  cfg = model.config.copy_and_resolve_references()
  cfg.model.arch = 'full_attention'
  decoder = ec.EvalModel(exp, cfg, model.params['decoder'], model.tokenizer, model.info, 'decoder')
  got = eval_ppl.heldout_windows(decoder, 1)
  cfg.model.arch = 'decoder'
  batch = next(iter(data_lib.make_train_iter(cfg, 'test', 0, 1)))
  decoder_module = model_lib.bind(cfg.model, model.params['decoder'], model_lib.Decoder)
  logits = np.asarray(decoder_module(jnp.asarray(batch['tokens'])), np.float64)[:, :-1]
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, batch['tokens'][:, 1:, None], -1)[..., 0]
  w = batch['loss_mask'][:, 1:]
  assert got['tokens'] == int(w.sum())
  np.testing.assert_allclose(got['loss'], (ce * w).sum() / w.sum(), rtol=1e-4)


def _numbers(tree):
  """Every float in a results tree, in a fixed order (for comparing two runs' results)."""
  if isinstance(tree, dict):
    return [x for k in sorted(tree) for x in _numbers(tree[k])]
  if isinstance(tree, (list, tuple)):
    return [x for v in tree for x in _numbers(v)]
  return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_sharded_evaluation_and_generation_equal_one_device(tmp_path):
  """`evaluate --mesh` / `generate --mesh`: the export restored straight into its training
  shardings on a (data 2, fsdp 2, tensor 2) mesh gives the one-device perplexities and greedy
  tokens."""
  from ccf_jax.checkpoint import export as export_lib
  from ccf_jax.inference.generator import Generator
  cfg = small_cfg()
  cfg.model.vocab_size = 320  # The fixture tokenizer's; divisible by the tensor axis.
  arch = arch_lib.get_arch(cfg)
  params = jax.device_get(jax.jit(lambda: model_lib.init_params(
      arch.module_config(cfg), 0, arch.module_cls), compiler_options=FAST)())
  tok = os.path.join(os.path.dirname(__file__), 'fixtures', 'tokenizers', 'sp_ccf',
                     'tokenizer.model')
  exp = str(tmp_path / 'export')
  export_lib.write_export(exp, params, cfg.to_dict(), files={'tokenizer.model': tok})
  one, sharded = ec.load(exp), ec.load(exp, mesh_sizes=(2, 2, 2))
  wq = sharded.params['decoder']['layers']['attn']['wq']
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
  p = evaluate.section_params('quick', 'ppl', L, {'ppl': dict(docs=1, k_max_segments=1,
                                                              stream_segments=2)})
  a, b = _numbers(eval_ppl.run(one, p)), _numbers(eval_ppl.run(sharded, p))
  assert len(a) > 10 and np.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
  prompts = ['To be, or not to be', 'Now is the winter']
  single = Generator.from_export(exp).generate(prompts, 4)
  on_mesh = Generator.from_export(exp, mesh_sizes=(2, 2, 2)).generate(prompts, 4)
  assert [c.tokens for c in on_mesh] == [c.tokens for c in single]
