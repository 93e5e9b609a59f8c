"""Tokenizer: exact round trip on the built-in corpus, special ids, caching, CLI, errors."""

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
