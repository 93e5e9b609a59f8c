"""User corpora: .txt dirs, JSONL, ArrayRecord, splits, mixtures and clear errors."""

import json
import os
import sys

from array_record.python.array_record_module import ArrayRecordWriter
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ccf_jax import data  # pylint: disable=g-import-not-at-top
from ccf_jax.data import corpus as corpus_lib
from experiments import base


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('CCF_DATA', str(tmp_path / 'cache'))


def _config(corpus='', mixture='', **data_kw):
  c = base.get_config()
  c.data.corpus = corpus
  c.data.mixture = mixture
  for k, v in data_kw.items():
    setattr(c.data, k, v)
  return c


def _write_txt_dir(path, n, prefix='doc'):
  path.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    (path / f'{prefix}{i:03d}.txt').write_text(f'{prefix} {i}\n' + 'word ' * (i + 1), 'utf-8')
  return path


def test_txt_dir_hash_split(tmp_path):
  root = _write_txt_dir(tmp_path / 'c', 40)
  c = _config(str(root))
  splits = {s: data.load_documents(c, s) for s in ('train', 'validation', 'test')}
  assert [len(splits[s]) for s in ('train', 'validation', 'test')] == [36, 2, 2]
  all_docs = sum(splits.values(), [])
  assert len(set(all_docs)) == 40  # Disjoint and complete.
  assert data.load_documents(c, 'validation') == splits['validation']  # Deterministic.
  # One document more keeps the others where they were (assignment by per-document hash rank).
  (root / 'doc999.txt').write_text('new', 'utf-8')
  assert set(data.load_documents(c, 'validation')) <= set(splits['validation']) | {'new'}


def test_too_small_for_held_out_split(tmp_path):
  root = _write_txt_dir(tmp_path / 'c', 2)
  c = _config(str(root))
  assert len(data.load_documents(c, 'train')) == 2
  with pytest.raises(data.DataError, match=r"too few .*'validation'.*train/"):
    data.load_documents(c, 'validation')


def test_explicit_splits(tmp_path):
  root = tmp_path / 'c'
  _write_txt_dir(root / 'train', 3)
  (root / 'validation.jsonl').write_text(
      json.dumps({'text': 'held out'}) + '\n\n' + json.dumps({'text': 'two'}) + '\n', 'utf-8')
  c = _config(str(root))
  assert len(data.load_documents(c, 'train')) == 3
  assert data.load_documents(c, 'validation') == ['held out', 'two']
  with pytest.raises(data.DataError, match=r"no documents for split 'test'.*test/"):
    data.load_documents(c, 'test')


def test_jsonl_fields_and_masks(tmp_path):
  path = tmp_path / 'd.jsonl'
  lines = [{'body': 'plain'}, {'body': 'ab', 'loss_mask': [0, 1]},
           {'prompt': 'Q? ', 'answer': 'A.'}]
  path.write_text('\n'.join(json.dumps(x) for x in lines), 'utf-8')
  docs = corpus_lib.read_file(str(path), text_field='body')
  assert [d.text for d in docs] == ['plain', 'ab', 'Q? A.']
  assert docs[0].mask is None and docs[1].mask.tolist() == [0, 1]
  assert docs[2].mask.tolist() == [0, 0, 0, 1, 1]
  with pytest.raises(data.DataError, match=r"d.jsonl:1: no 'text' field.*data.text_field"):
    corpus_lib.read_file(str(path))
  path.write_text('{"text": "ok"}\n{"text": broken\n', 'utf-8')
  with pytest.raises(data.DataError, match=r'd.jsonl:2: invalid JSON'):
    corpus_lib.read_file(str(path))
  path.write_text('{"text": "abc", "loss_mask": [1]}\n', 'utf-8')
  with pytest.raises(data.DataError, match=r'd.jsonl:1: "loss_mask" must be a list'):
    corpus_lib.read_file(str(path))


def test_array_record_corpus(tmp_path):
  path = tmp_path / 'docs.array_record'
  w = ArrayRecordWriter(str(path), 'group_size:1')
  w.write('raw text document'.encode())
  w.write(json.dumps({'text': 'json document'}).encode())
  w.write(json.dumps({'prompt': 'p', 'answer': 'a'}).encode())
  w.write('{not json at all'.encode())
  w.close()
  docs = corpus_lib.read_file(str(path))
  assert [d.text for d in docs] == ['raw text document', 'json document', 'pa', '{not json at all']
  assert docs[2].mask.tolist() == [0, 1]


def test_missing_and_empty(tmp_path):
  with pytest.raises(data.DataError, match=r"'.*/nowhere' does not exist.*shakespeare"):
    data.load_documents(_config(str(tmp_path / 'nowhere')), 'train')
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'notes.md').write_text('ignored')
  with pytest.raises(data.DataError, match=r'empty.*no \.txt, \.jsonl or \.array_record'):
    data.load_documents(_config(str(tmp_path / 'empty')), 'train')
  (tmp_path / 'e.jsonl').write_text('\n\n')
  with pytest.raises(data.DataError, match=r'e.jsonl.* is empty'):
    data.load_documents(_config(str(tmp_path / 'e.jsonl')), 'train')


def test_non_utf8(tmp_path):
  root = _write_txt_dir(tmp_path / 'c', 5)
  (root / 'latin1.txt').write_bytes('caf\xe9 au lait'.encode('latin-1'))
  c = _config(str(root))
  with pytest.raises(data.DataError,
                     match=r'latin1.txt: not valid UTF-8 .*0xe9.*replace_invalid_utf8'):
    for s in ('train', 'validation', 'test'):
      data.load_documents(c, s)
  c.data.replace_invalid_utf8 = True
  docs = sum((data.load_documents(c, s) for s in ('train', 'validation', 'test')), [])
  assert 'caf\ufffd au lait' in docs
  bad = tmp_path / 'bad.jsonl'
  bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(data.DataError, match=r'bad.jsonl:2: not valid UTF-8'):
    corpus_lib.read_file(str(bad))


def test_mixture_parsing(tmp_path):
  a, b = _write_txt_dir(tmp_path / 'a', 10), _write_txt_dir(tmp_path / 'b', 10)
  specs = corpus_lib.corpus_specs(_config(mixture=f'{a}:0.25, {b}:0.75,shakespeare:1'))
  assert [(s.name, s.weight) for s in specs] == [(str(a), 0.25), (str(b), 0.75),
                                                 ('shakespeare', 1.0)]
  for bad in (f'{a}', f'{a}:0', f'{a}:x', f'{a}:-1', ','):
    with pytest.raises(data.DataError, match='data.mixture'):
      corpus_lib.corpus_specs(_config(mixture=bad))
  docs = data.load_documents(_config(mixture=f'{a}:1,{b}:3'), 'train')
  assert len(docs) == 16  # Evaluation helpers see every component (8 train documents each).


def test_fingerprint_tracks_edits(tmp_path):
  root = _write_txt_dir(tmp_path / 'c', 4)
  c = _config(str(root))
  spec = corpus_lib.corpus_specs(c)[0]
  f1 = corpus_lib.fingerprint(spec, 'train', c)
  assert corpus_lib.fingerprint(spec, 'train', c) == f1
  assert corpus_lib.fingerprint(spec, 'validation', c) != f1
  os.utime(root / 'doc000.txt', ns=(1, 1))
  assert corpus_lib.fingerprint(spec, 'train', c) != f1
  assert np.all(corpus_lib.corpus_files(spec) == sorted(corpus_lib.corpus_files(spec)))
