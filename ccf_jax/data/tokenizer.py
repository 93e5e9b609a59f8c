"""Tokenizers: loading any kind (`load_tokenizer`), and sentencepiece's training, special ids,
exact round trip.

`load_tokenizer(path)` is the one loader: a sentencepiece `.model` gives `Tokenizer` (below), a
Hugging Face `tokenizer.json` gives `ccf_jax.data.hf_tokenizer.HFTokenizer`; both implement
`ccf_jax.data.tokenizer_base.TokenizerBase`.

Training options (see /work/shared/JAX_NOTES.md): with sentencepiece's defaults the round trip is
lossy (runs of spaces collapse, newlines vanish), which would make generated text and per-
character metrics subtly wrong. We train with identity normalisation, no whitespace cleanup,
`\\n` as a user-defined piece, whitespace-only pieces allowed, byte fallback (no <unk> for unseen
characters) and full character coverage, so `decode(encode(t)) == t` holds exactly for any
UTF-8 text (tested on the whole built-in corpus). `split_digits` gives numbers a regular
tokenisation. `add_dummy_prefix=False` keeps the encoding of a document compositional (no
invented leading space), so decoded windows concatenate back to the text.

Special ids of trained models: pad=0, unk=1, bos=2, eos=3. CCF initialises memory tokens from the
embedding of `</s>` (as the released CCF code does), so `memory_init_id = eos_id`. The ids are
recorded in a JSON sidecar next to the model (`x.model` -> `x.json`) so that other tools can read
them without sentencepiece. Any other sentencepiece model (e.g. a Llama-2 `tokenizer.model`) can be
used instead: its ids are read from the model, and a missing pad id falls back to unk (padding
is always masked out of the loss, so its id only needs to be valid).

`load_or_train_tokenizer(config)` trains on the TRAIN split of the configured corpora (never on
held-out text), caching the model under `$CCF_DATA/tokenizers/` keyed by corpus fingerprint,
vocabulary size and model type: ~1 s for the built-in corpus at 2k vocabulary.
"""

from __future__ import annotations

import io
import os
import time
from typing import Iterable, Optional, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm

from ccf_jax.data import cache
from ccf_jax.data import corpus as corpus_lib
from ccf_jax.data import hf_tokenizer
from ccf_jax.data.tokenizer_base import SENTENCEPIECE, TokenizerBase, TokenizerError

MODEL_TYPES = ('bpe', 'unigram')
SPECIAL_IDS = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3)
_TRAINER_VERSION = 2
_MAX_LINE_CHARS = 4096  # Longer lines are cut for training (sentencepiece skips long sentences).
# Training text is subsampled (whole lines, seeded) to these many characters. BPE trains on 7.6 MB
# of Shakespeare in ~0.7 s; unigram's EM is ~20x slower per character (21 s on all of it, 4.6 s on
# 2 MB, with ~1% more tokens), so it gets a smaller sample to keep training within seconds.
_CHAR_BUDGET = dict(bpe=64_000_000, unigram=2_000_000)
_TRAINER_OPTIONS = dict(
    normalization_rule_name='identity',
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    byte_fallback=True,
    character_coverage=1.0,
    user_defined_symbols=['\n'],
    allow_whitespace_only_pieces=True,
    split_digits=True,
    max_sentence_length=4 * _MAX_LINE_CHARS,
    minloglevel=2,
    **SPECIAL_IDS,
)


def sidecar_path(model_path: str) -> str:
  base = model_path[:-len('.model')] if model_path.endswith('.model') else model_path
  return base + '.json'


class Tokenizer(TokenizerBase):
  """A sentencepiece model plus the special ids the trainer needs."""

  kind = SENTENCEPIECE

  def __init__(self, model_path: str):
    self.model_path = os.path.abspath(model_path)
    try:
      self.sp = spm.SentencePieceProcessor(model_file=self.model_path)
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f'{model_path}: not a loadable sentencepiece model ({e}). Fix: give a '
                           'sentencepiece .model or a Hugging Face tokenizer.json.') from e
    self.vocab_size = int(self.sp.get_piece_size())
    self.unk_id = int(self.sp.unk_id())
    self.bos_id = int(self.sp.bos_id())  # -1 if the model has none.
    self.eos_id = int(self.sp.eos_id())
    pad = int(self.sp.pad_id())
    self.pad_id = pad if pad >= 0 else self.unk_id
    if self.eos_id < 0:
      raise TokenizerError(f'{model_path}: the model has no eos (</s>) id; ccf_jax needs one '
                           '(document separator and CCF memory initialisation). Fix: train one '
                           'with `python -m ccf_jax.tokenizer`.')
    self.memory_init_id = self.eos_id
    self.meta = {}
    side = sidecar_path(self.model_path)
    if os.path.exists(side):
      self.meta = cache.read_json(side)
      for k in ('pad_id', 'bos_id', 'eos_id', 'unk_id', 'memory_init_id'):
        if k in self.meta:
          setattr(self, k, int(self.meta[k]))
    self.chat_template = hf_tokenizer.chat_template_of(hf_tokenizer.read_config(
        os.path.join(os.path.dirname(self.model_path), hf_tokenizer.CONFIG_FILE)))

  def special_tokens(self) -> dict:
    return {self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id, self.pad_id)
            if i >= 0}

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def _decode(self, ids: list) -> str:
    return self.sp.decode(ids)  # Control symbols (bos, eos) decode to ''.

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[np.ndarray]:
    """int32 arrays of many texts, encoded in parallel by sentencepiece's thread pool."""
    if not texts:
      return []
    out = self.sp.encode(list(texts), num_threads=num_threads or min(8, os.cpu_count() or 1))
    return [np.asarray(ids, dtype=np.int32) for ids in out]

  def encode_masked(self, text: str, char_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encodes like `encode` and maps a per-character mask to a per-token one.

    The text is tokenised as a whole (identical ids to `encode`), then each token gets mask 1 if
    any character it covers is 1: sentencepiece reports byte offsets per piece, so the character
    mask is expanded to bytes first. Byte-fallback pieces of one character report an empty span
    at the character's start; they take that character's mask.
    """
    proto = self.sp.encode(text, return_type='proto')
    char_len = np.fromiter((len(c.encode('utf-8')) for c in text), np.int64, len(text))
    byte_mask = np.repeat(np.asarray(char_mask, np.uint8), char_len)
    ids = np.empty(len(proto.pieces), np.int32)
    mask = np.empty(len(proto.pieces), np.uint8)
    total = len(byte_mask)
    for j, p in enumerate(proto.pieces):
      ids[j] = p.id
      lo = min(p.begin, max(total - 1, 0))
      hi = max(p.end, lo + 1)
      mask[j] = byte_mask[lo:hi].max() if total else 0
    return ids, mask


def _sentences(texts: Iterable[str], budget: int) -> list[str]:
  """Training sentences: lines (cut to _MAX_LINE_CHARS), a seeded sample of `budget` chars."""
  lines = [line[i:i + _MAX_LINE_CHARS] for text in texts for line in text.split('\n')
           for i in range(0, len(line), _MAX_LINE_CHARS)]
  sizes = np.fromiter((len(x) for x in lines), np.int64, len(lines))
  if sizes.sum() <= budget:
    return lines
  order = np.random.default_rng(0).permutation(len(lines))
  keep = order[:int(np.searchsorted(np.cumsum(sizes[order]), budget)) + 1]
  return [lines[i] for i in np.sort(keep)]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str,
                    model_type: str = 'bpe', meta: Optional[dict] = None) -> Tokenizer:
  """Trains a sentencepiece model on `texts`; writes `out_path` (.model) and its .json sidecar."""
  if model_type not in MODEL_TYPES:
    raise TokenizerError(f'Tokenizer type {model_type!r} is not supported. Fix: use one of '
                         f'{MODEL_TYPES}.')
  if vocab_size < 256 + len(SPECIAL_IDS) + 1:
    raise TokenizerError(f'vocab_size={vocab_size} is too small: byte fallback alone needs 256 '
                         'byte pieces, plus 4 special ids and the newline piece. Fix: use a few '
                         'hundred more.')
  if not out_path.endswith('.model'):
    out_path += '.model'
  t0 = time.time()
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences(texts, _CHAR_BUDGET[model_type])), model_writer=buf,
        vocab_size=vocab_size, model_type=model_type, num_threads=min(16, os.cpu_count() or 1),
        **_TRAINER_OPTIONS)
  except RuntimeError as e:
    raise TokenizerError(f'sentencepiece training failed for vocab_size={vocab_size}, '
                         f'type={model_type}: {e}. Fix: a smaller vocabulary (the corpus may be '
                         'too small for this one) or a larger corpus.') from e
  cache.atomic_write_bytes(out_path, buf.getvalue())
  tok = Tokenizer(out_path)
  info = dict(tok.special_ids(), model_type=model_type, trainer_version=_TRAINER_VERSION,
              train_seconds=round(time.time() - t0, 3),
              options={k: v for k, v in _TRAINER_OPTIONS.items() if k != 'minloglevel'})
  info.update(meta or {})
  cache.atomic_write_json(sidecar_path(out_path), info)
  tok.meta = info
  return tok


# Where a directory keeps its tokenizer, in the order tried: a sentencepiece model, a Hugging Face
# tokenizer.json, an export's Hugging Face tokenizer (ccf_jax.checkpoint.export keeps it under hf/,
# because an export's top-level tokenizer.json is the sentencepiece model's sidecar of special ids).
DIR_CANDIDATES = ('tokenizer.model', 'tokenizer.json', os.path.join('hf', 'tokenizer.json'))
_FIX_PATH = ("Fix: give the path of a sentencepiece .model or a Hugging Face tokenizer.json, or "
             "'' to train one on the corpus.")


def _in_directory(path: str) -> str:
  for name in DIR_CANDIDATES:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  models = sorted(f for f in os.listdir(path) if f.endswith('.model'))
  if len(models) != 1:
    raise TokenizerError(f'data.tokenizer={path!r} is a directory without a tokenizer '
                         f'({", ".join(DIR_CANDIDATES[:2])} or a single .model; found '
                         f'{len(models)} .model files). {_FIX_PATH}')
  return os.path.join(path, models[0])


def load_tokenizer(path: str, vocab_size: Optional[int] = None) -> TokenizerBase:
  """The tokenizer at `path`: a sentencepiece .model, a Hugging Face tokenizer.json, or a directory
  holding one (see DIR_CANDIDATES). With `vocab_size`, checked against the model (`check_vocab`)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    path = _in_directory(path)
  if not os.path.exists(path):
    raise TokenizerError(f'data.tokenizer={path!r} does not exist. {_FIX_PATH}')
  if path.endswith('.json'):
    model = path[:-len('.json')] + '.model'
    try:
      tok = hf_tokenizer.HFTokenizer(path)
    except TokenizerError as e:
      if os.path.isfile(model):  # The special-ids sidecar of a sentencepiece model.
        raise TokenizerError(f'{path} is the special-ids sidecar of the sentencepiece model '
                             f'{model}, not a tokenizer. Fix: data.tokenizer={model}.') from e
      raise
  else:
    tok = Tokenizer(path)
  if vocab_size is not None:
    check_vocab(tok, vocab_size, f'data.tokenizer={path}')
  return tok


def check_vocab(tok: TokenizerBase, vocab_size: int, where: str, exact: Optional[bool] = None):
  """The model's embedding must hold every id of the tokenizer. With `exact` (the default for
  sentencepiece, whose trained size is model.vocab_size, so a difference is a mistake) the sizes
  must also be equal; a Hugging Face release may pad its embedding (e.g. to a multiple of 64), and
  a loaded model only needs its tokenizer to fit."""
  if tok.vocab_size > vocab_size:
    raise TokenizerError(
        f'{where}: the tokenizer has {tok.vocab_size} ids but model.vocab_size is {vocab_size}, so '
        f'some tokens could not be embedded. Fix: --config.model.vocab_size={tok.vocab_size}, or '
        'the tokenizer released with these weights.')
  if (tok.kind == SENTENCEPIECE if exact is None else exact) and tok.vocab_size != vocab_size:
    raise TokenizerError(f'{where}: tokenizer {tok.model_path} has vocab_size {tok.vocab_size} '
                         f'but config.model.vocab_size is {vocab_size}. Fix: '
                         f'--config.model.vocab_size={tok.vocab_size}.')


def tokenizer_cache_path(config) -> str:
  """Where `load_or_train_tokenizer` caches the model trained for this config."""
  d = config.data
  specs = corpus_lib.corpus_specs(config)
  key = cache.hash_strings([_TRAINER_VERSION, d.tokenizer_type, int(config.model.vocab_size)] +
                           [(s.name, corpus_lib.fingerprint(s, 'train', config)) for s in specs])
  name = '+'.join(cache.safe_name(s.name, 24) for s in specs)[:60]
  return os.path.join(cache.subdir('tokenizers'),
                      f'{name}-{d.tokenizer_type}{config.model.vocab_size}-{key}.model')


def load_or_train_tokenizer(config) -> TokenizerBase:
  """The tokenizer of a config: `data.tokenizer` if set, else one trained (and cached) on the
  train split of the configured corpora with `model.vocab_size` pieces."""
  vocab = int(config.model.vocab_size)
  if config.data.tokenizer:
    return load_tokenizer(config.data.tokenizer, vocab)
  path = tokenizer_cache_path(config)
  if os.path.exists(path) and os.path.exists(sidecar_path(path)):
    return load_tokenizer(path, vocab)
  t0 = time.time()
  specs = corpus_lib.corpus_specs(config)
  tok = train_tokenizer(corpus_lib.training_texts(config), vocab, path, config.data.tokenizer_type,
                        meta=dict(trained_on=[s.name for s in specs], split='train'))
  logging.info('Trained a %s tokenizer (vocab %d) on %s in %.1fs: %s', config.data.tokenizer_type,
               vocab, [s.name for s in specs], time.time() - t0, path)
  if tok.vocab_size != vocab:
    raise TokenizerError(f'The trained tokenizer has {tok.vocab_size} pieces, not {vocab}. Fix: a '
                         'smaller --config.model.vocab_size, or a larger corpus.')
  return tok
