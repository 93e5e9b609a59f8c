"""The passkey generator: exact lengths, placement at the requested depth, answer-only scoring."""

import numpy as np
import pytest

from ccf_jax.tasks import passkey

VOCAB = 97


def encode(text):
  """A toy character tokenizer (one token per character, so digits are single tokens)."""
  return [3 + ord(ch) % (VOCAB - 3) for ch in text]


@pytest.mark.parametrize('depth', [0.0, 0.3, 1.0])
def test_example_layout(depth):
  ex = passkey.make_example(encode, 600, depth, np.random.default_rng(0), bos_id=2)
  statement = encode(passkey.STATEMENT.format(key=ex.key))
  answer = encode(ex.key)
  assert ex.tokens.shape == (600,) and ex.tokens[0] == 2
  assert list(ex.tokens[ex.key_start:ex.key_start + len(statement)]) == statement
  assert list(ex.tokens[-len(answer):]) == answer and ex.answer_start == 600 - len(answer)
  question = encode(passkey.QUESTION)
  assert list(ex.tokens[ex.answer_start - len(question):ex.answer_start]) == question
  num_fill = 600 - 1 - len(statement) - len(question) - len(answer)
  assert ex.key_start == 1 + round(depth * num_fill)
  assert ex.loss_mask.sum() == len(answer) == 5 and ex.loss_mask[ex.answer_start:].all()


def test_batch_puts_the_key_in_the_requested_segment():
  lo, hi = passkey.depth_range_in_segment(encode, 8 * 128, 0, 128)
  batch = passkey.make_batch(encode, 16, 8, 128, (lo, hi), seed=1, bos_id=2)
  statement = len(encode(passkey.STATEMENT.format(key='00000')))
  assert batch['tokens'].shape == (16, 1024) and batch['loss_mask'].shape == (16, 1024)
  assert (batch['key_start'] >= 0).all() and (batch['key_start'] + statement <= 128).all()
  assert (batch['answer_start'] >= 7 * 128).all()  # Asked for in the last segment.
  assert len(set(batch['keys'])) > 1 and (batch['num_valid_segments'] == 8).all()
  with pytest.raises(ValueError, match='longer length'):
    passkey.make_example(encode, 40, 0.5, np.random.default_rng(0))


def test_score_on_crafted_logits():
  batch = passkey.make_batch(encode, 2, 2, 64, 0.5, seed=2)
  tokens = batch['tokens']
  logits = np.zeros((2, 128, VOCAB), np.float32)
  logits[np.arange(2)[:, None], np.arange(127)[None], tokens[:, 1:]] = 1.0  # Perfect predictions.
  assert passkey.score(logits, batch) == {'per_digit_accuracy': 1.0, 'exact_match': 1.0,
                                          'chance': 0.1}
  a = batch['answer_start'][0]
  logits[0, a - 1] = 0.0
  logits[0, a - 1, (tokens[0, a] + 1) % VOCAB] = 1.0  # One wrong digit in example 0.
  got = passkey.score(logits, batch)
  assert got['per_digit_accuracy'] == pytest.approx(9 / 10) and got['exact_match'] == 0.5


def test_passkey_source_curriculum_placement_and_determinism():
  """data.task='passkey': key inside segment 0, answer ending segment n-1, n from the curriculum."""
  l, T, bs = 128, 6, 4
  src = passkey.PasskeySource(encode, 1000, T, l, seed=3, bos_id=2, pad_id=0, batch_size=bs,
                              min_segments=2, curriculum_steps=8)
  statement = len(encode(passkey.STATEMENT.format(key='00000')))
  # Step s = k // bs: n grows linearly from 2 (step 0) to T (step >= 8).
  assert [src.segments_at(s * bs) for s in (0, 4, 8, 20)] == [2, 4, 6, 6]
  for k in (0, 1, 17, 35, 200):
    ex, n = src[k], src.segments_at(k)
    tokens, mask = ex['tokens'], ex['loss_mask']
    assert tokens.shape == (T * l,) and int(ex['num_valid_segments']) == n
    answer = np.flatnonzero(mask)
    assert len(answer) == 5 and answer[-1] == n * l - 1  # The last valid token ends the answer.
    assert (tokens[n * l:] == 0).all() and not mask[n * l:].any()  # Padded segments: no loss.
    text = tokens[:l].tolist()
    key_tokens = tokens[answer].tolist()
    # The statement "The pass key is K." lies entirely inside segment 0.
    first = encode('The pass key is ') + key_tokens
    starts = [i for i in range(l - len(first) + 1) if text[i:i + len(first)] == first]
    assert starts and starts[0] + statement <= l
    np.testing.assert_array_equal(tokens, src[k]['tokens'])  # Deterministic per index.
  assert len({tuple(src[k]['tokens'][:l]) for k in range(8)}) == 8  # Different keys/depths.
  # score_all: the same windows, every valid token scored, padding still not.
  dense = passkey.PasskeySource(encode, 1000, T, l, seed=3, bos_id=2, pad_id=0, batch_size=bs,
                                min_segments=2, curriculum_steps=8, score_all=True)
  for k in (0, 35):
    n = src.segments_at(k)
    np.testing.assert_array_equal(dense[k]['tokens'], src[k]['tokens'])
    assert dense[k]['loss_mask'][:n * l].all() and not dense[k]['loss_mask'][n * l:].any()
  with pytest.raises(ValueError, match='min_segments'):
    passkey.PasskeySource(encode, 10, T, l, seed=0, bos_id=2, pad_id=0, min_segments=1)


def test_passkey_source_ae_key_targets_the_first_statement_digits():
  """data.passkey_ae_key: auto-encode segment 0, scoring only the key's first statement."""
  l, T = 128, 4
  src = passkey.PasskeySource(encode, 100, T, l, seed=5, bos_id=2, pad_id=0, ae_key=True)
  plain = passkey.PasskeySource(encode, 100, T, l, seed=5, bos_id=2, pad_id=0)
  for k in (0, 7, 42):
    ex = src[k]
    np.testing.assert_array_equal(ex['tokens'], plain[k]['tokens'])  # Same windows.
    assert int(ex['ae_segment']) == 0 and ex['ae_mask'].shape == (T * l,)
    tokens = ex['tokens'].tolist()
    key = tokens[-5:]  # The answer ends the window.
    lead = encode('The pass key is ')
    at = next(i for i in range(l) if tokens[i:i + len(lead) + 5] == lead + key) + len(lead)
    assert np.flatnonzero(ex['ae_mask']).tolist() == list(range(at, at + 5))  # Inside segment 0.
    assert at + 5 <= l
  assert 'ae_mask' not in plain[0]


def test_passkey_source_uniform_depth_in_corpus_filler():
  """data.passkey_depth='uniform' with a corpus filler: keys spread over the window's segments,
  the text around them one contiguous run of the given stream, and the auto-encoded segment the
  one holding the key's first statement."""
  l, T, n_fill = 64, 8, 3000
  filler = 100 + np.arange(n_fill)  # Outside encode's ids, so filler tokens are recognisable.
  src = passkey.PasskeySource(encode, 100, T, l, seed=7, bos_id=2, pad_id=0, ae_key=True,
                              depth='uniform', filler_tokens=filler)
  segments = set()
  lead = encode('The pass key is ')
  for k in range(40):
    ex = src[k]
    tokens = ex['tokens'].tolist()
    key = tokens[-5:]
    at = next(i for i in range(T * l) if tokens[i:i + len(lead) + 5] == lead + key) + len(lead)
    segments.add(at // l)
    assert int(ex['ae_segment']) == at // l
    assert np.flatnonzero(ex['ae_mask']).tolist() == list(range(at, at + 5))
    fill = np.array([t for t in tokens if t >= 100]) - 100
    statement = len(encode(passkey.STATEMENT.format(key='00000')))
    assert len(fill) == T * l - 1 - statement - len(encode(passkey.QUESTION)) - 5
    np.testing.assert_array_equal(np.diff(fill) % n_fill, 1)  # One contiguous (cyclic) run.
  assert len(segments) >= 6, segments  # Not only segment 0: depth is uniform over the window.
  with pytest.raises(ValueError, match='depth'):
    passkey.PasskeySource(encode, 10, T, l, seed=0, bos_id=2, pad_id=0, depth='middle')
  with pytest.raises(ValueError, match='filler text is empty.*passkey_filler=sentences'):
    passkey.PasskeySource(encode, 10, T, l, seed=0, bos_id=2, pad_id=0, depth='uniform',
                          filler_tokens=np.zeros(0, np.int32))
  # Uniform depth needs no room for the statement inside segment 0: segments shorter than it work.
  short = passkey.PasskeySource(encode, 10, T, 32, seed=0, bos_id=2, pad_id=0, depth='uniform',
                                filler_tokens=filler)
  assert short[0]['tokens'].shape == (T * 32,)
  with pytest.raises(ValueError, match='does not fit in segment 0'):
    passkey.PasskeySource(encode, 10, T, 32, seed=0, bos_id=2, pad_id=0)
