"""The grain pipeline: windows, packing, masks, mixtures, sharding and exact iterator restore.

Windows and packed examples are checked against an independent oracle built directly from the
tokenised documents. The Shakespeare tokenizer (trained once into the default $CCF_DATA) is reused
for the synthetic corpora, whose caches go to a per-test $CCF_DATA.
"""

import collections
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ccf_jax import data  # pylint: disable=g-import-not-at-top
from experiments import base

SEG, NSEG = 16, 4
W = SEG * NSEG


@pytest.fixture(scope='module')
def tok():
  return data.load_or_train_tokenizer(base.get_config())


@pytest.fixture(scope='module')
def source_text():
  return data.load_documents(base.get_config(), 'validation')[0]


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch, tok):
  del tok  # Trained (or loaded) under the default $CCF_DATA before switching.
  monkeypatch.setenv('CCF_DATA', str(tmp_path / 'cache'))
  return tmp_path


def _config(tok, corpus='', mode='windows', **data_kw):
  c = base.get_config()
  c.data.corpus = corpus
  c.data.tokenizer = tok.model_path
  c.data.mode = mode
  c.data.batch_size = 4
  c.data.seq_len = 48
  c.ccf.segment_len, c.ccf.num_segments = SEG, NSEG
  for k, v in data_kw.items():
    setattr(c.data, k, v)
  return c


# Character lengths: the first two are shorter than one segment once tokenised.
_LENGTHS = [3, 12, 150, 190, 400, 1111, 2500]


def _make_corpus(root, text, lengths=_LENGTHS, splits=('train', 'validation')):
  for split in splits:
    os.makedirs(root / split, exist_ok=True)
    for i, n in enumerate(lengths):
      start = 997 * i + (5000 if split == 'validation' else 0)
      (root / split / f'd{i:02d}.txt').write_text(text[start:start + n], 'utf-8')
  return str(root)


def _doc_seqs(tok, root, split, mode='windows'):
  docs = []
  for f in sorted(os.listdir(os.path.join(root, split))):
    with open(os.path.join(root, split, f), encoding='utf-8') as fh:
      docs.append(fh.read())
  pre = [tok.bos_id] if mode == 'windows' else []
  return [np.array(pre + tok.encode(d) + [tok.eos_id], np.int32) for d in docs]


def _oracle_windows(seqs, width, stride, seg):
  out, skipped_docs, skipped_tails = [], 0, 0
  for s in seqs:
    if len(s) < seg:
      skipped_docs += 1
      continue
    start = 0
    while True:
      w = s[start:start + width]
      if len(w) >= seg:
        out.append(w)
      else:
        skipped_tails += 1
      if start + width >= len(s):
        break
      start += stride
  return out, skipped_docs, skipped_tails


def _rows(it, limit=None):
  rows = []
  for b in it:
    for i in range(len(b['tokens'])):
      rows.append({k: v[i] for k, v in b.items()})
    if limit and len(rows) >= limit:
      break
  return rows


def _valid_len(row, pad_id):
  nz = np.nonzero(row['loss_mask'])[0]
  n = int(nz[-1]) + 1 if len(nz) else 0
  assert (row['tokens'][n:] == pad_id).all()
  return n


def test_windows_match_documents_and_pad_masked(tmp_cache, tok, source_text):
  root = _make_corpus(tmp_cache / 'c', source_text)
  c = _config(tok, root)
  pipe = data.make_pipeline(c, 'validation', eval_shuffle=False)
  rows = _rows(iter(pipe.dataset))
  want, skipped_docs, skipped_tails = _oracle_windows(_doc_seqs(tok, root, 'validation'), W, W,
                                                      SEG)
  assert skipped_docs == 2 and pipe.info['skipped_documents'] == 2  # Short docs: counted.
  assert pipe.info['skipped_tails'] == skipped_tails and pipe.info['examples'] == len(want)
  assert len(rows) == -(-len(want) // 4) * 4 == pipe.info['batches'] * 4
  for row, w in zip(rows, want):  # Same windows, same order: never across documents.
    n = len(w)
    assert _valid_len(row, tok.pad_id) == n
    np.testing.assert_array_equal(row['tokens'][:n], w)
    mask = row['loss_mask']
    assert mask.dtype == np.float32 and row['tokens'].dtype == np.int32
    np.testing.assert_array_equal(mask[:n], (w != tok.bos_id).astype(np.float32))  # bos: no loss.
    assert not mask[n:].any()  # Padding is masked out of the loss.
    assert row['num_valid_segments'] == -(-n // SEG)
    assert (row['tokens'][row['num_valid_segments'] * SEG:] == tok.pad_id).all()
  assert any(len(w) < W for w in want)  # Some windows are really padded.
  for row in rows[len(want):]:  # Padding rows completing the last batch.
    assert not row['loss_mask'].any() and row['num_valid_segments'] == 0
  shuffled = _rows(data.make_train_iter(c, 'validation'))  # Default: fixed shuffled order.
  key = lambda r: r['tokens'].tobytes()
  assert [key(r) for r in shuffled] != [key(r) for r in rows]
  assert sorted(map(key, shuffled[:len(want)])) == sorted(map(key, rows[:len(want)]))
  again = _rows(data.make_train_iter(c, 'validation'))
  assert [key(r) for r in shuffled] == [key(r) for r in again]  # Deterministic.


def test_windows_stride_epochs(tmp_cache, tok, source_text):
  root = _make_corpus(tmp_cache / 'c', source_text)
  c = _config(tok, root, stride=W // 2)
  want, _, _ = _oracle_windows(_doc_seqs(tok, root, 'train'), W, W // 2, SEG)
  n = len(want)
  rows = _rows(data.make_train_iter(c, 'train'), limit=2 * n)
  key = lambda r: r['tokens'].tobytes()
  epoch1, epoch2 = rows[:n], rows[n:2 * n]
  pad = lambda w: np.pad(w, (0, W - len(w)), constant_values=tok.pad_id).tobytes()
  assert sorted(map(key, epoch1)) == sorted(map(pad, want))
  assert sorted(map(key, epoch2)) == sorted(map(pad, want))
  assert [key(r) for r in epoch1] != [key(r) for r in epoch2]  # Reshuffled each epoch.
  assert [key(r) for r in epoch1] != [pad(w) for w in want]  # And shuffled at all.


def test_cross_documents(tmp_cache, tok, source_text):
  root = _make_corpus(tmp_cache / 'c', source_text)
  seqs = _doc_seqs(tok, root, 'validation')
  stream = np.concatenate(seqs)
  c = _config(tok, root, cross_documents=True)
  pipe = data.make_pipeline(c, 'validation', eval_shuffle=False)
  rows = _rows(iter(pipe.dataset))[:pipe.info['examples']]
  got = np.concatenate([r['tokens'][:_valid_len(r, tok.pad_id)] for r in rows])
  tail = len(stream) % W
  np.testing.assert_array_equal(got, stream[:len(stream) - (tail if tail < SEG else 0)])
  assert pipe.info['skipped_documents'] == 0  # Short documents are merged, not skipped.
  assert any((r['tokens'][1:] == tok.bos_id).any() for r in rows)  # Windows cross boundaries.


def test_packed(tmp_cache, tok, source_text):
  root = _make_corpus(tmp_cache / 'c', source_text)
  stream = np.concatenate(_doc_seqs(tok, root, 'validation', mode='packed'))
  c = _config(tok, root, mode='packed')
  rows = _rows(iter(data.make_pipeline(c, 'validation', eval_shuffle=False).dataset))
  L = c.data.seq_len
  real = [r for r in rows if r['loss_mask'].any()]
  assert len(real) == -(-len(stream) // L)  # Evaluation keeps the last partial example.
  got = np.concatenate([r['tokens'] for r in real])
  np.testing.assert_array_equal(got[:len(stream)], stream)
  assert (got[len(stream):] == tok.pad_id).all()
  assert not real[-1]['loss_mask'][len(stream) % L:].any()
  assert all(r['num_valid_segments'] == L // SEG for r in real)
  assert all(r['loss_mask'][:_valid_len(r, tok.pad_id)].all() for r in real[:-1])
  train = _rows(data.make_train_iter(c, 'train'), limit=40)
  assert all(r['loss_mask'].all() and r['tokens'].shape == (L,) for r in train)


def test_answers_only_loss(tmp_cache, tok):
  import json  # pylint: disable=g-import-not-at-top
  path = tmp_cache / 'qa.jsonl'
  qa = [('Question: who killed Polonius? ' * 3, 'Hamlet, behind the arras. ' * 4),
        ('Where is Elsinore? ' * 4, 'In Denmark, my lord. ' * 5)] * 20
  path.write_text('\n'.join(json.dumps({'prompt': p, 'answer': a}) for p, a in qa), 'utf-8')
  c = _config(tok, str(path), mode='windows')
  c.ccf.num_segments = 8
  rows = _rows(data.make_train_iter(c, 'validation'))
  real = [r for r in rows if r['num_valid_segments'] > 0]
  assert real
  for r in real:
    n = int(np.nonzero(r['tokens'] != tok.pad_id)[0][-1]) + 1
    p, a = next((p, a) for p, a in qa if tok.decode(r['tokens'][:n]) == p + a)
    ids = tok.encode(p + a)  # ASCII: every piece is whole characters.
    ends = np.cumsum([len(tok.sp.id_to_piece(i).replace('\u2581', ' ')) for i in ids])
    want = [0.0] + [float(e > len(p)) for e in ends] + [1.0]  # A token touching the answer trains.
    np.testing.assert_array_equal(r['loss_mask'][:n], want)  # bos, prompt: 0; answer, eos: 1.
    assert 0 < sum(want) < n - 1


def test_mixture_proportions(tmp_cache, tok):
  for name, word, n in (('a', 'alpha', 40), ('b', 'omega', 15)):
    os.makedirs(tmp_cache / name / 'train')
    for i in range(n):
      (tmp_cache / name / 'train' / f'{i}.txt').write_text(f'{word} {i} ' * 200, 'utf-8')
  c = _config(tok, mode='windows', mixture=f'{tmp_cache / "a"}:0.8,{tmp_cache / "b"}:0.2')
  rows = _rows(data.make_train_iter(c, 'train'), limit=1000)
  names = collections.Counter('alpha' if 'alpha' in tok.decode(r['tokens']) else 'omega'
                              for r in rows)
  assert abs(names['alpha'] / len(rows) - 0.8) < 0.03, names
  info = data.make_pipeline(c, 'train').info
  assert [x['weight'] for x in info['components']] == [0.8, 0.2]


def test_iterator_checkpoint_restore_exact(tmp_cache, tok):
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  c = base.get_config()  # The real corpus, packed, with thread prefetch.
  c.data.tokenizer = tok.model_path
  c.data.prefetch = 3
  it = data.make_train_iter(c, 'train')
  for _ in range(5):
    next(it)
  state = it.get_state()
  mngr = ocp.CheckpointManager(str(tmp_cache / 'ckpt'))
  mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = [next(it) for _ in range(4)]
  fresh = data.make_train_iter(c, 'train')
  mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for w in want:
    got = next(fresh)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])
  again = data.make_train_iter(c, 'train')
  again.set_state(state)
  np.testing.assert_array_equal(next(again)['tokens'], want[0]['tokens'])
  mngr.close()


def test_process_shards_disjoint_and_global_batch_invariant(tok):
  c = base.get_config()
  c.data.tokenizer = tok.model_path
  c.data.batch_size = 8
  steps = 30
  full = [next(it) for it in [data.make_train_iter(c, 'train')] for _ in range(steps)]
  shards = []
  for p in range(4):
    it = data.make_train_iter(c, 'train', process_index=p, process_count=4)
    shards.append([next(it) for _ in range(steps)])
    assert shards[-1][0]['tokens'].shape == (2, 256)
  seen = [set(row.tobytes() for b in s for row in b['tokens']) for s in shards]
  for i in range(4):
    for j in range(i + 1, 4):
      assert not seen[i] & seen[j]
  for k in range(steps):  # Same global batch whatever the process count.
    local = sorted(row.tobytes() for s in shards for row in s[k]['tokens'])
    assert local == sorted(row.tobytes() for row in full[k]['tokens'])
  c.data.batch_size = 6  # Evaluation: a full, disjoint, equal-length pass per process.
  whole = _rows(data.make_train_iter(c, 'validation'))
  parts = [_rows(data.make_train_iter(c, 'validation', p, 3)) for p in range(3)]
  assert len({len(p) for p in parts}) == 1
  key = lambda r: (r['tokens'].tobytes(), r['loss_mask'].tobytes())
  assert sorted(key(r) for p in parts for r in p) == sorted(map(key, whole))
  real = [set(key(r) for r in p if r['loss_mask'].any()) for p in parts]
  assert not (real[0] & real[1]) and not (real[0] & real[2]) and not (real[1] & real[2])


def test_errors(tmp_cache, tok, source_text):
  root = _make_corpus(tmp_cache / 'c', source_text, lengths=[3, 5, 8])
  with pytest.raises(data.DataError, match=r'yields no examples.*shorter than one segment'):
    data.make_train_iter(_config(tok, root), 'train')
  root = _make_corpus(tmp_cache / 'd', source_text)
  with pytest.raises(data.DataError, match='multiple of the process count'):
    data.make_train_iter(_config(tok, root), 'train', 0, 3)
  with pytest.raises(data.DataError, match='data.mode'):
    data.make_train_iter(_config(tok, root, mode='chunks'), 'train')
  with pytest.raises(data.DataError, match='data.stride'):
    data.make_train_iter(_config(tok, root, stride=W + 1), 'train')
  c = _config(tok, root)
  c.model.vocab_size = 1000
  with pytest.raises(data.DataError, match='vocab_size'):
    data.make_train_iter(c, 'train')


def test_worker_processes_same_batches_and_restore(tok):
  c = base.get_config()
  c.data.tokenizer = tok.model_path
  c.data.mode = 'windows'
  ref = data.make_train_iter(c, 'train')
  want = [next(ref)['tokens'] for _ in range(8)]
  c.data.num_workers = 2
  it = data.make_train_iter(c, 'train')
  for k in range(4):  # Index-based pipeline: workers change nothing but speed.
    np.testing.assert_array_equal(np.array(next(it)['tokens']), want[k])
  state = it.get_state()
  it.close()
  it = data.make_train_iter(c, 'train')
  it.set_state(state)
  for k in range(4, 8):
    np.testing.assert_array_equal(np.array(next(it)['tokens']), want[k])
  it.close()


def test_tokenizer_json_trains_windows_and_passkey(tmp_cache, source_text):
  """data.tokenizer=.../tokenizer.json (a byte-level BPE): the same windows as its own encoding of
  the documents, and passkey windows whose answers are the key's digits."""
  from tests.fixtures import make_tokenizer_fixtures as fx
  path = os.path.join(fx.OUT, 'bpe', 'tokenizer.json')
  bpe = data.load_tokenizer(path)
  root = _make_corpus(tmp_cache / 'c', source_text)
  c = _config(bpe, root)
  assert c.data.tokenizer == path and data.load_or_train_tokenizer(c).kind == 'hf'
  rows = _rows(iter(data.make_pipeline(c, 'validation', eval_shuffle=False).dataset))
  assert bpe.bos_id < 0
  seqs = [s[1:] for s in _doc_seqs(bpe, root, 'validation')]  # No bos token: ids + [eos].
  want, _, _ = _oracle_windows(seqs, W, W, SEG)
  assert len(want) > 4
  for row, w in zip(rows, want):
    np.testing.assert_array_equal(row['tokens'][:len(w)], w)
  c = _config(bpe, root, task='passkey')
  c.ccf.segment_len = 64  # This small BPE spends 50 tokens on the key statement.
  batch = next(data.make_train_iter(c, 'train'))
  for tokens, mask in zip(batch['tokens'], batch['loss_mask']):
    key = bpe.decode(tokens[mask > 0])
    assert len(key) == 5 and key.isdigit() and f'pass key is {key}.' in bpe.decode(tokens)
