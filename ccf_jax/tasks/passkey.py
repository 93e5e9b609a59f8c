"""Passkey retrieval: a random key stated once at a chosen depth of filler, asked for at the end.

The classic long-context probe (Mohtashami & Jaggi 2023, used by the CCF/UIO papers): a document of
`length` tokens is filler text with one sentence stating a k-digit key somewhere in it, and ends
with a question whose answer, the key, is the document's last tokens:

    [bos] filler[:at] "The pass key is 12345. Remember it. 12345 is the pass key." filler[at:]
    "What is the pass key? The pass key is" "12345"

Only the answer tokens are scored (`loss_mask`), so training or evaluating a model on these
windows measures exactly whether the key survived the trip from its segment to the last one. For a
CCF model with the key in the first segment and the question in the last, the key can only arrive
through memory.

Why these choices:
  * Tokenizer-agnostic: the caller passes `encode: str -> list[int]` (a ccf_jax tokenizer's
    `encode`, or a toy character map in tests). The text around the key is encoded in pieces and
    the key is spelt one token per digit (`digit_ids`), so every answer token is one digit and
    `score` gives per-digit accuracy (chance 10%), the statement has the same length for every key,
    and the key's tokens sit at a known place. For digit-splitting tokenizers (the sentencepiece
    models ccf_jax trains, SmolLM's byte-level BPE) this is exactly how they encode the whole
    sentence; BPEs that merge digits (GPT-2's 'Ġ123', Llama-3's '123') would otherwise give keys of
    varying token counts, spaces glued to digits and answers that never occur in the statement.
  * The filler is the standard repeated sentences, or any token stream the caller provides (e.g.
    held-out text), cycled to the exact length needed.
  * Depth is the fraction of the filler placed before the key statement (0 = right after bos,
    1 = right before the question); a pair (lo, hi) draws it uniformly per example.
  * Everything is numpy and seeded, so the evaluation issue can regenerate identical grids.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

FILLER = ('The grass is green. The sky is blue. The sun is yellow. Here we go. There and back '
          'again. ')
STATEMENT = 'The pass key is {key}. Remember it. {key} is the pass key. '
QUESTION = 'What is the pass key? The pass key is'


def digit_ids(encode: Callable[[str], Sequence[int]]) -> list[int]:
  """The token id of each digit 0-9 as it reads inside a number.

  A tokenizer that splits digits encodes '0123456789' as ten tokens (after a leading space piece
  for sentencepiece models with a dummy prefix): those are the ids. Otherwise (BPEs that merge
  digit runs) each digit alone is one token of byte-level vocabularies: its last token is used."""
  ids = list(encode('0123456789'))
  digits = ids[-10:] if len(ids) >= 10 else [list(encode(str(d)))[-1] for d in range(10)]
  if len(set(digits)) != 10:
    raise ValueError(f'the tokenizer has no distinct token per digit (ids {digits}), so a passkey '
                     'cannot be spelt digit by digit.')
  return [int(t) for t in digits]


def key_tokens(encode: Callable[[str], Sequence[int]], key: str) -> list[int]:
  """The key's tokens: one per digit (`digit_ids`)."""
  digits = digit_ids(encode)
  return [digits[int(c)] for c in key]


def statement_tokens(encode: Callable[[str], Sequence[int]], key: str) -> tuple[list[int], int]:
  """(tokens of STATEMENT with `key`, index of the key's first token in them)."""
  before, middle, after = STATEMENT.split('{key}')
  k = key_tokens(encode, key)
  head = list(encode(before))
  return head + k + list(encode(middle)) + k + list(encode(after)), len(head)


@dataclasses.dataclass
class Example:
  """One passkey document."""
  tokens: np.ndarray  # int32[length].
  loss_mask: np.ndarray  # float32[length]: 1 on the answer tokens only.
  key: str  # The digits.
  key_start: int  # Index of the statement's first token.
  answer_start: int  # Index of the answer's first token (the answer runs to the end).
  key_tokens_start: int = -1  # Index of the first token of the key in the statement.


def make_example(encode: Callable[[str], Sequence[int]], length: int, depth: float,
                 rng: np.random.Generator, num_digits: int = 5, bos_id: int | None = None,
                 filler_tokens: Sequence[int] | None = None, filler_start: int = 0) -> Example:
  """A document of exactly `length` tokens with the key statement at `depth` of the filler.

  The filler is `filler_tokens` (default: FILLER's tokens) read cyclically from `filler_start`."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f'depth={depth} must lie in [0, 1].')
  key = ''.join(str(d) for d in rng.integers(0, 10, num_digits))
  prefix = [] if bos_id is None else [int(bos_id)]
  statement, key_at = statement_tokens(encode, key)
  question = list(encode(QUESTION))
  answer = key_tokens(encode, key)
  num_fill = length - len(prefix) - len(statement) - len(question) - len(answer)
  if num_fill < 0:
    raise ValueError(f'length={length} cannot hold the passkey statement, question and answer '
                     f'({length - num_fill} tokens). Fix: use a longer length.')
  filler = np.asarray(filler_tokens if filler_tokens is not None else encode(FILLER), np.int32)
  if not filler.size:
    raise ValueError('the filler is empty.')
  fill = filler[(int(filler_start) + np.arange(num_fill)) % filler.size]
  at = int(round(depth * num_fill))
  tokens = np.concatenate([np.asarray(prefix, np.int32), fill[:at], np.asarray(statement, np.int32),
                           fill[at:], np.asarray(question + answer, np.int32)])
  mask = np.zeros(length, np.float32)
  mask[length - len(answer):] = 1.0
  return Example(np.asarray(tokens, np.int32), mask, key, len(prefix) + at, length - len(answer),
                 len(prefix) + at + key_at)


def make_batch(encode: Callable[[str], Sequence[int]], batch_size: int, num_segments: int,
               segment_len: int, depth: float | tuple[float, float], seed: int = 0,
               num_digits: int = 5, bos_id: int | None = None,
               filler_tokens: Sequence[int] | None = None) -> dict:
  """Windowed batch {tokens int32[B, T*l], loss_mask, num_valid_segments, key_start, answer_start}
  of passkey documents filling T segments exactly, plus `keys` (list of str)."""
  rng = np.random.default_rng(seed)
  length = num_segments * segment_len
  examples = []
  for _ in range(batch_size):
    d = rng.uniform(*depth) if isinstance(depth, (tuple, list)) else depth
    start = int(rng.integers(len(filler_tokens))) if filler_tokens is not None else 0
    examples.append(make_example(encode, length, float(d), rng, num_digits, bos_id, filler_tokens,
                                 start))
  return {
      'tokens': np.stack([e.tokens for e in examples]),
      'loss_mask': np.stack([e.loss_mask for e in examples]),
      'num_valid_segments': np.full((batch_size,), num_segments, np.int32),
      'key_start': np.array([e.key_start for e in examples], np.int32),
      'answer_start': np.array([e.answer_start for e in examples], np.int32),
      'keys': [e.key for e in examples],
  }


def depth_range_in_segment(encode: Callable[[str], Sequence[int]], length: int, segment: int,
                           segment_len: int, num_digits: int = 5, bos: bool = True):
  """(lo, hi) depths that put the whole key statement inside segment `segment` (0-based).

  The statement's token count does not depend on the digits (they are spelt one token each).
  """
  statement = len(statement_tokens(encode, '0' * num_digits)[0])
  num_fill = length - int(bos) - statement - len(encode(QUESTION)) - num_digits
  first = max(0, segment * segment_len - int(bos))
  last = (segment + 1) * segment_len - int(bos) - statement
  if last < first or num_fill <= 0:
    raise ValueError(f'the key statement ({statement} tokens) does not fit in segment {segment}.')
  return first / num_fill, min(last, num_fill) / num_fill


def score(logits: np.ndarray, batch: dict) -> dict:
  """Teacher-forced answer accuracy from next-token logits [B, length, vocab] (position i predicts
  token i+1): per answer token (per digit with a digit-splitting tokenizer) and exact match."""
  logits = np.asarray(logits)
  tokens, mask = batch['tokens'], batch['loss_mask']
  pred = logits[:, :-1].argmax(-1)
  target_mask = mask[:, 1:] > 0
  hit = (pred == tokens[:, 1:]) & target_mask
  per_example = hit.sum(1) / np.maximum(target_mask.sum(1), 1)
  return {'per_digit_accuracy': float(hit.sum() / max(target_mask.sum(), 1)),
          'exact_match': float(np.mean(per_example == 1.0)),
          'chance': 0.1}


class PasskeySource:
  """grain random-access source of passkey training/evaluation windows (`data.task='passkey'`).

  Example k is a document of n * l tokens padded to the window's T * l (`num_valid_segments` = n),
  with the question ending segment n - 1. `depth='segment0'` puts the key statement inside
  segment 0, so the key can reach the answer only through memory (the most distant case);
  `depth='uniform'` draws its depth uniformly over the whole filler, so that a model learns to
  find a key in any segment of a long window (the depth x length grid evaluates every decile).
  `filler_tokens` (e.g. the corpus's own split, `data.passkey_filler='corpus'`) replaces the
  repeated FILLER sentences, read from a random offset per example: real text around the key, as
  long-context evaluations use. Only the answer tokens are scored. Each example is drawn
  from its own generator seeded by (seed, k): the stream is deterministic, needs no shuffling, and
  the iterator state stays a single position (exact resume).

  Curriculum: n grows linearly from `min_segments` to T over the first `curriculum_steps`
  optimizer steps (global example k belongs to step k // batch_size); n = T afterwards, and
  always n = T when curriculum_steps = 0. Reading a key one segment back is easier to discover
  than seven back, and what is learnt there carries over.

  `score_all` (training only, `data.passkey_score='all'`): every token of the window is scored, not
  only the answer. The answer alone is 5 targets a window, a sparse signal; scored filler and key
  statement (whose second copy of the key is predictable within segment 0) give the encoder and
  the auto-encoding loss, which honours the loss mask, something to learn from. Measured with
  tiny_ccf_passkey + ae_mode=extra in the 30-minute budget: 0.113 per-digit accuracy against 0.191
  with answer-only targets, so it stays off by default.
  """

  def __init__(self, encode, num_examples: int, num_segments: int, segment_len: int, seed: int,
               bos_id: int | None, pad_id: int, batch_size: int = 1, min_segments: int = 0,
               curriculum_steps: int = 0, num_digits: int = 5, score_all: bool = False,
               ae_key: bool = False, depth: str = 'segment0', filler_tokens=None):
    self.encode, self.n = encode, int(num_examples)
    self.T, self.l, self.seed = int(num_segments), int(segment_len), int(seed)
    self.bos_id, self.pad_id, self.num_digits = bos_id, int(pad_id), int(num_digits)
    self.batch_size, self.curriculum_steps = max(int(batch_size), 1), int(curriculum_steps)
    self.min_segments = int(min_segments) or self.T
    self.score_all, self.ae_key = bool(score_all), bool(ae_key)
    if depth not in ('segment0', 'uniform'):
      raise ValueError(f"passkey depth={depth!r}; choose 'segment0' or 'uniform'.")
    self.depth = depth
    self.filler = None if filler_tokens is None else np.asarray(filler_tokens, np.int32)
    if self.filler is not None and not self.filler.size:
      raise ValueError('the passkey filler text is empty (its corpus split has no tokens). Fix: '
                       "--config.data.passkey_filler=sentences, or a corpus with text in it.")
    if not 2 <= self.min_segments <= self.T:
      raise ValueError(f'passkey min_segments={min_segments} must be in [2, ccf.num_segments='
                       f'{self.T}]: the key sits in segment 0 and the question in the last one.')
    # 'segment0': the depths that keep the statement inside segment 0, per window length.
    self._depths = {n: depth_range_in_segment(encode, n * self.l, 0, self.l, self.num_digits,
                                              bos_id is not None)
                    for n in range(self.min_segments, self.T + 1)} if depth == 'segment0' else {}

  def __len__(self) -> int:
    return self.n

  def segments_at(self, k: int) -> int:
    """Valid segments of global example k (the curriculum)."""
    if self.curriculum_steps <= 0:
      return self.T
    frac = min((k // self.batch_size) / self.curriculum_steps, 1.0)
    return int(self.min_segments + round(frac * (self.T - self.min_segments)))

  def __getitem__(self, k: int) -> dict:
    k = int(k)
    n = self.segments_at(k)
    rng = np.random.default_rng([self.seed, k])
    lo, hi = self._depths.get(n, (0.0, 1.0))
    depth = float(rng.uniform(lo, hi))
    start = int(rng.integers(self.filler.size)) if self.filler is not None else 0
    ex = make_example(self.encode, n * self.l, depth, rng, self.num_digits, self.bos_id,
                      self.filler, start)
    tokens = np.full(self.T * self.l, self.pad_id, np.int32)
    mask = np.zeros(self.T * self.l, np.float32)
    tokens[:n * self.l], mask[:n * self.l] = ex.tokens, 1.0 if self.score_all else ex.loss_mask
    out = dict(tokens=tokens, loss_mask=mask, num_valid_segments=np.int32(n))
    if self.ae_key:
      out.update(ae_segment=np.int32(ex.key_tokens_start // self.l),
                 ae_mask=key_digits_mask(ex, self.T * self.l))
    return out


def key_digits_mask(ex: Example, length: int) -> np.ndarray:
  """float32[length]: 1 on the tokens of the key's first statement (the digits the answer, the
  document's last tokens, repeats)."""
  n = len(ex.tokens) - ex.answer_start
  mask = np.zeros(length, np.float32)
  mask[ex.key_tokens_start:ex.key_tokens_start + n] = 1.0
  return mask
