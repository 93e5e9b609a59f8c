"""Tokenizer: exact round trip on the built-in corpus, special ids, caching, CLI, errors; Hugging
Face tokenizer.json, ids against transformers both ways, passkey with a BPE, chat template, the
tokenizer of a run that starts from pretrained weights."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ccf_jax import data  # pylint: disable=g-import-not-at-top
from ccf_jax.data import tokenizer as tokenizer_lib
from experiments import base


@pytest.fixture(scope='module')
def tok():
  return data.load_or_train_tokenizer(base.get_config())


def test_round_trip_whole_corpus(tok):
  c = base.get_config()
  docs = [d for split in ('train', 'validation', 'test') for d in data.load_documents(c, split)]
  assert len(docs) == 77
  ids = tok.encode_batch(docs)
  for d, i in zip(docs, ids):
    assert tok.decode(i) == d
  odd = ['  two  spaces\n\n\ttab\r\n trailing  ', 'héllo wörld 日本語 🙂 12345', '', '\n',
         ' ']
  for t in odd:
    assert tok.decode(tok.encode(t)) == t, repr(t)
  assert tok.encode('2024') == [tok.sp.piece_to_id(ch) for ch in '2024']  # split_digits.
  assert tok.sp.piece_to_id('\n') > 3 and tok.encode('\n') == [tok.sp.piece_to_id('\n')]


def test_special_ids_and_sidecar(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.memory_init_id == tok.eos_id and tok.vocab_size == 2048
  assert tok.sp.id_to_piece(tok.eos_id) == '</s>'
  side = tokenizer_lib.sidecar_path(tok.model_path)
  with open(side) as f:
    meta = json.load(f)
  assert {k: meta[k] for k in ('pad_id', 'bos_id', 'eos_id', 'unk_id', 'memory_init_id',
                               'vocab_size')} == {**tok.special_ids()}
  assert meta['split'] == 'train' and meta['model_type'] == 'bpe'
  assert tok.decode([tok.bos_id, *tok.encode('Hi'), tok.eos_id, tok.pad_id]) == 'Hi'


def test_cached_and_explicit(tok):
  c = base.get_config()
  again = data.load_or_train_tokenizer(c)
  assert again.model_path == tok.model_path
  c.data.tokenizer = tok.model_path
  assert data.load_or_train_tokenizer(c).model_path == tok.model_path
  c.data.tokenizer = os.path.dirname(tok.model_path) + '/nope.model'
  with pytest.raises(data.DataError, match='does not exist'):
    data.load_or_train_tokenizer(c)
  c.data.tokenizer = tok.model_path
  c.model.vocab_size = 4096
  with pytest.raises(data.DataError, match=r'vocab_size 2048 .*vocab_size=2048'):
    data.load_or_train_tokenizer(c)


def test_encode_masked(tok):
  prompt, answer = 'Q: Who is Hamlet?\n', 'A: the Prince of Denmark, né in Elsinore 🙂.'
  text = prompt + answer
  cmask = np.array([0] * len(prompt) + [1] * len(answer), np.uint8)
  ids, mask = tok.encode_masked(text, cmask)
  assert ids.tolist() == tok.encode(text)
  assert tok.decode(ids) == text
  n_prompt = len(tok.encode(prompt))  # Prompt ends with '\n', a piece of its own.
  assert mask[:n_prompt].tolist() == [0] * n_prompt and mask[n_prompt:].all()
  ids, mask = tok.encode_masked('ab日c', np.array([0, 0, 1, 0], np.uint8))
  pieces = [tok.sp.id_to_piece(int(i)) for i in ids]
  on = [p for p, m in zip(pieces, mask) if m]
  assert on and all(p.startswith('<0x') for p in on)  # Byte-fallback pieces of '日'.


def test_cli_unigram(tmp_path, tok):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  docs = data.load_documents(base.get_config(), 'validation')
  for i, d in enumerate(docs):
    (corpus / f'{i}.txt').write_text(d, encoding='utf-8')
  out = tmp_path / 'tok' / 'uni'
  env = dict(os.environ, CCF_DATA=str(tmp_path / 'cache'))
  res = subprocess.run([sys.executable, '-m', 'ccf_jax.tokenizer', f'--corpus={corpus}',
                        '--vocab_size=512', f'--out={out}', '--type=unigram'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert 'exact round trip on' in res.stdout
  loaded = data.load_tokenizer(str(out) + '.model', 512)
  with open(str(out) + '.json') as f:
    meta = json.load(f)
  assert meta['model_type'] == 'unigram' and loaded.eos_id == 3
  held = docs[0][:20000]
  assert loaded.decode(loaded.encode(held)) == held
  # A directory holding one .model is accepted too (export directories).
  assert data.load_tokenizer(str(tmp_path / 'tok')).vocab_size == 512


# ------------------------------------------------- Hugging Face tokenizer.json and transformers
from tests.fixtures import make_tokenizer_fixtures as fx  # pylint: disable=g-import-not-at-top

FIX = fx.OUT


@pytest.fixture(scope='module')
def expected():
  with open(os.path.join(FIX, 'expected.json'), encoding='utf-8') as f:
    return json.load(f)


@pytest.fixture(scope='module')
def bpe():
  return data.load_tokenizer(os.path.join(FIX, 'bpe'))  # A directory: its tokenizer.json.


@pytest.mark.parametrize('name', ['sp_ccf', 'sp_llama2', 'bpe'])
def test_ids_match_transformers_both_ways(name, expected):
  """ccf_jax encodes and decodes as transformers does (ids recorded by make_tokenizer_fixtures.py):
  sentencepiece models through the tokenizer_config.json `convert --to_hf` writes, and a byte-level
  BPE tokenizer.json read here."""
  tok = data.load_tokenizer(os.path.join(FIX, name))
  want = expected[name]
  assert [tok.encode(t) for t in want['texts']] == want['ids']
  assert [tok.decode(i) for i in want['ids']] == want['decoded']
  if name != 'sp_llama2':  # Exact round trips (a dummy-prefix model drops a leading space).
    assert want['decoded'] == want['texts']
  if name.startswith('sp_'):  # The recorded config is what --to_hf writes today.
    from ccf_jax.interop import hf_tokenizer
    with open(os.path.join(FIX, name, 'tokenizer_config.json')) as f:
      assert json.load(f) == hf_tokenizer.hf_tokenizer_config(tok.model_path)
  if name == 'sp_ccf':  # No invented leading '▁': the 47-vs-46-ids mismatch.
    assert not tok.sp.id_to_piece(want['ids'][0][0]).startswith('\u2581')
  if name == 'bpe':  # End-of-text survives decoding although padding falls back to it.
    assert tok.pad_id == tok.eos_id == want['eos_id']
    assert [tok.decode(i) for i in want['with_eos']] == want['decoded_with_eos']
    assert want['decoded_with_eos'][0].endswith('<|endoftext|>')


def test_sentencepiece_fixture_is_reproducible(tmp_path):
  """The sp_ccf fixture is what ccf_jax's trainer makes from the script's text today."""
  import sentencepiece as spm
  fresh = fx.train_ccf_sp(str(tmp_path / 'tokenizer.model'))
  stored = spm.SentencePieceProcessor(model_file=os.path.join(FIX, 'sp_ccf', 'tokenizer.model'))
  assert [fresh.sp.id_to_piece(i) for i in range(fresh.vocab_size)] == [
      stored.id_to_piece(i) for i in range(stored.get_piece_size())]


def test_hf_tokenizer_interface(bpe, tmp_path):
  assert bpe.kind == 'hf' and bpe.model_path.endswith('tokenizer.json')
  assert (bpe.bos_id, bpe.eos_id, bpe.unk_id, bpe.pad_id) == (-1, 0, -1, 0)
  assert bpe.memory_init_id == bpe.eos_id and bpe.chat_template == fx.CHAT_TEMPLATE
  rec = bpe.record()
  assert rec['kind'] == 'hf' and rec['vocab_size'] == bpe.vocab_size and len(rec['sha256']) == 64
  texts = fx.TEXTS
  assert [list(x) for x in bpe.encode_batch(texts)] == [bpe.encode(t) for t in texts]
  for t in texts + ['  two  spaces\n\n\ttab\r\n', '']:
    assert bpe.decode(bpe.encode(t)) == t, repr(t)  # Byte level: exact round trip.
  assert bpe.decode([*bpe.encode('ab'), 10**6, -1]) == 'ab'  # Out-of-range ids dropped.
  assert bpe.encode_with_specials('a<|im_end|>b') == [*bpe.encode('a'), 2, *bpe.encode('b')]
  text = 'Q: 日本?\nA: 12345 ok'
  cmask = np.array([0] * text.index('A') + [1] * (len(text) - text.index('A')), np.uint8)
  ids, mask = bpe.encode_masked(text, cmask)
  assert ids.tolist() == bpe.encode(text)
  on = bpe.decode(ids[mask.astype(bool)])
  assert on.startswith('A') and on.endswith('12345 ok') and '日' not in on
  # The loader: a tokenizer.json, a sentencepiece sidecar named like one, sizes against the model.
  side = tmp_path / 'sp.json'
  (tmp_path / 'sp.model').write_bytes(open(os.path.join(FIX, 'sp_ccf', 'tokenizer.model'),
                                           'rb').read())
  side.write_text('{"eos_id": 3}')
  with pytest.raises(data.TokenizerError, match=r'sidecar .* Fix: data.tokenizer=.*sp.model'):
    data.load_tokenizer(str(side))
  data.check_vocab(bpe, bpe.vocab_size + 22, 'here')  # A padded embedding is fine for hf.
  with pytest.raises(data.DataError, match=r'has 378 ids but model.vocab_size is 300.*Fix'):
    data.load_tokenizer(os.path.join(FIX, 'bpe', 'tokenizer.json'), 300)


def test_passkey_with_a_byte_level_bpe(bpe):
  """A BPE that merges digits ('Ġ12345') still gets one token per key digit, a statement of one
  length for every key and the key's first occurrence where the auto-encoded key mask says."""
  from ccf_jax.tasks import passkey
  assert len(bpe.encode(' 12345')) == 1  # This vocabulary merges a spaced number into one token.
  assert len(bpe.encode('0123456789')) < 10
  digits = passkey.digit_ids(bpe.encode)
  assert [bpe.decode([d]) for d in digits] == list('0123456789')
  lengths = {len(passkey.statement_tokens(bpe.encode, k)[0]) for k in ('00000', '12345', '98765')}
  assert len(lengths) == 1
  src = passkey.PasskeySource(bpe.encode, 8, 4, 64, seed=1, bos_id=None, pad_id=bpe.pad_id,
                              ae_key=True)
  for k in range(4):
    ex = src[k]
    answer = ex['tokens'][ex['loss_mask'] > 0]
    key = bpe.decode(answer)
    assert len(answer) == 5 and key.isdigit()
    assert bpe.decode(ex['tokens'][ex['ae_mask'] > 0]) == key
    assert f'The pass key is {key}. Remember it. {key} is the pass key.' in bpe.decode(ex['tokens'])
    assert bpe.decode(ex['tokens']).endswith(f'{passkey.QUESTION}{key}')


def test_chat_template(bpe, expected):
  """generate --chat: the prompt as a user message in tokenizer_config.json's chat template."""
  from ccf_jax.inference.checks import InferenceError
  from ccf_jax.inference.generator import Generator
  gen = Generator(None, bpe, add_bos=False)
  try:
    import jinja2  # pylint: disable=unused-import
  except ImportError:
    with pytest.raises(InferenceError, match='jinja2.*Fix: pip install jinja2'):
      gen.encode(fx.CHAT_PROMPT, chat=True)
    return
  assert gen.encode(fx.CHAT_PROMPT, chat=True) == expected['bpe']['chat_ids']
  sp = Generator(None, data.load_tokenizer(os.path.join(FIX, 'sp_ccf')), add_bos=True)
  with pytest.raises(InferenceError, match='no chat template.*Fix: drop --chat'):
    sp.encode('hi', chat=True)


def test_run_from_pretrained_uses_its_tokenizer(tmp_path):
  """init.from_hf / init.params_only: data.tokenizer defaults to the source's tokenizer, and
  another one is an error naming both files and the fix."""
  from ccf_jax.train import trainer
  hf_dir = os.path.join(ROOT, 'tests', 'fixtures', 'hf', 'llama3_rope_tied_legacy')
  c = base.get_config()
  c.init.from_hf = hf_dir
  got = trainer.with_init_tokenizer(c)
  assert got.data.tokenizer == os.path.join(hf_dir, 'tokenizer.json') and c.data.tokenizer == ''
  assert data.load_tokenizer(got.data.tokenizer).kind == 'hf'
  c.data.tokenizer = os.path.join(hf_dir, 'tokenizer.json')
  assert trainer.with_init_tokenizer(c) is c  # The same file: fine.
  c.data.tokenizer = os.path.join(FIX, 'bpe', 'tokenizer.json')
  with pytest.raises(data.TokenizerError, match=r'is not the tokenizer of init.from_hf=.*Fix: '
                     r'--config.data.tokenizer= .*or --config.data.tokenizer=.*tokenizer.json'):
    trainer.with_init_tokenizer(c)
