"""The grain input pipeline: cached token arrays -> windows or packed sequences -> batches.

Stages, and why:
1. Token cache. Each split of each corpus is tokenised once and stored as an ArrayRecord file under
   `$CCF_DATA/tokens/` (one record per document: int32 ids, then a uint8 loss mask when the
   document has one), keyed by the corpus fingerprint and the tokenizer's SHA-256, plus an .npz
   index of document lengths. ArrayRecord gives O(1) random access to a document from any grain
   worker without loading the corpus into every process.
2. Example index. From the document lengths alone we compute every example as a [start, end)
   span of the split's token stream (numpy, milliseconds). The stream of a document is
   `[bos] + ids + [eos]` in 'windows' mode and `ids + [eos]` in 'packed' mode.
   * windows (CCF): windows of up to W = num_segments * segment_len tokens, starting every
     `data.stride` tokens (0 = W, non-overlapping), inside one document unless
     `data.cross_documents`. A window shorter than W is padded to W; its `num_valid_segments` is
     ceil(len / segment_len) and `loss_mask` is 0 on the padding. A document (or final tail)
     shorter than one segment is skipped and counted (`info['skipped_documents']`,
     `info['skipped_tails']`). Evaluation splits always use non-overlapping windows so that every
     token is scored once.
   * packed (plain decoder baseline): the documents, each followed by eos, concatenated in corpus
     order and cut into `data.seq_len`-token examples.
3. grain. A MapDataset over the example index: shuffled with `data.shuffle_seed` (reshuffled every
   epoch), repeated forever (train), mixed with `MapDataset.mix` for weighted mixtures, sliced per
   process, batched, then converted to an IterDataset with thread prefetch (`data.prefetch`) and
   optionally `data.num_workers` worker processes. Evaluation splits are one pass in a fixed
   shuffled order (so that evaluating only the first few batches still samples every held-out
   document), the last global batch completed with padding rows. Every stage before the iterator
   is index-based, so the iterator state is a single position: `get_state()`/`set_state()` (and
   Orbax via `grain.checkpoint.CheckpointSave/CheckpointRestore`) restore it exactly, in O(1).

Per-process sharding slices the GLOBAL example stream: process p of P takes elements p, p+P, ...,
so the union of the local batches at step k is the same global batch whatever P is (given the
same global batch size), and the processes' data are disjoint.

The model predicts tokens[:, 1:] from positions [:, :-1] and weights the loss with
loss_mask[:, 1:]; the mask is 0 on padding and on bos, 1 on real targets (and eos), and follows
a document's own loss mask (answers-only training) where it has one.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import time
from typing import Any, Optional

from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter
from absl import logging
import grain
import numpy as np

from ccf_jax.data import cache
from ccf_jax.data import corpus as corpus_lib
from ccf_jax.data import tokenizer as tokenizer_lib
from ccf_jax.data.cache import DataError
from ccf_jax.tasks import passkey

_TOKENS_VERSION = 1
_SPLITS = corpus_lib.SPLIT_NAMES


# ---------------------------------------------------------------- 1. token cache

@dataclasses.dataclass
class TokenStore:
  """A tokenised split of one corpus: ArrayRecord of documents + their lengths."""
  path: str
  lengths: np.ndarray  # int64[num_docs]: tokens per document (no specials).
  has_mask: np.ndarray  # bool[num_docs]: the record carries a per-token loss mask.

  @property
  def num_tokens(self) -> int:
    return int(self.lengths.sum())


def token_store(spec: corpus_lib.CorpusSpec, split: str, config,
                tok: tokenizer_lib.TokenizerBase) -> TokenStore:
  """Loads the cached token arrays of a split, tokenising the documents on first use."""
  key = cache.hash_strings([_TOKENS_VERSION, corpus_lib.fingerprint(spec, split, config),
                            tok.sha256])
  base = os.path.join(cache.subdir('tokens'), f'{cache.safe_name(spec.name)}-{split}-{key}')
  path, index = base + '.array_record', base + '.npz'
  if os.path.exists(index) and os.path.exists(path):
    with np.load(index) as z:
      return TokenStore(path, z['lengths'].astype(np.int64), z['has_mask'].astype(bool))
  t0 = time.time()
  docs = corpus_lib.read_split(spec, split, config)
  plain = [i for i, d in enumerate(docs) if d.mask is None]
  ids: list[Any] = [None] * len(docs)
  masks: list[Any] = [None] * len(docs)
  for i, arr in zip(plain, tok.encode_batch([docs[i].text for i in plain])):
    ids[i] = arr
  for i, d in enumerate(docs):
    if d.mask is not None:
      ids[i], masks[i] = tok.encode_masked(d.text, d.mask)
  with cache.atomic_path(path) as tmp:
    writer = ArrayRecordWriter(tmp, 'group_size:1,uncompressed')
    for t, m in zip(ids, masks):
      writer.write(t.astype('<i4').tobytes() + (m.astype(np.uint8).tobytes() if m is not None
                                                  else b''))
    writer.close()
  lengths = np.array([len(t) for t in ids], np.int64)
  has_mask = np.array([m is not None for m in masks], bool)
  buf = io.BytesIO()
  np.savez(buf, lengths=lengths, has_mask=has_mask)
  cache.atomic_write_bytes(index, buf.getvalue())
  logging.info('Tokenised %s/%s: %d documents, %d tokens in %.1fs -> %s', spec.name, split,
               len(docs), lengths.sum(), time.time() - t0, path)
  return TokenStore(path, lengths, has_mask)


# ---------------------------------------------------------------- 2. example index

def _window_starts(n: int, w: int, s: int) -> np.ndarray:
  """Starts of windows of width w, stride s over n tokens, until every token is covered."""
  k = 1 if n <= w else -(-(n - w) // s) + 1
  return np.arange(k, dtype=np.int64) * s


def example_spans(seq_lens: np.ndarray, mode: str, length: int, stride: int, segment_len: int,
                  cross_documents: bool, drop_partial: bool) -> tuple[np.ndarray, dict]:
  """[start, end) spans (int64[n, 2]) of examples over the concatenated document streams.

  `seq_lens` are per-document stream lengths (with bos/eos). Returns the spans and counts of what
  was skipped.
  """
  offsets = np.concatenate([[0], np.cumsum(seq_lens)]).astype(np.int64)
  stats = dict(skipped_documents=0, skipped_tails=0, skipped_tokens=0)
  if mode == 'packed':
    total = int(offsets[-1])
    n = total // length if drop_partial else -(-total // length)
    starts = np.arange(n, dtype=np.int64) * length
    ends = np.minimum(starts + length, total)
    keep = ends - starts >= 2  # An example needs a target.
    stats['skipped_tokens'] = int(total - (ends[keep] - starts[keep]).sum())
    return np.stack([starts[keep], ends[keep]], 1), stats
  groups = [(0, int(offsets[-1]))] if cross_documents else list(zip(offsets[:-1], offsets[1:]))
  spans = []
  for lo, hi in groups:
    n = int(hi - lo)
    if n < segment_len:
      stats['skipped_documents' if not cross_documents else 'skipped_tails'] += n > 0
      stats['skipped_tokens'] += n
      continue
    st = _window_starts(n, length, stride)
    en = np.minimum(st + length, n)
    if en[-1] - st[-1] < segment_len:
      stats['skipped_tails'] += 1
      stats['skipped_tokens'] += int(en[-1] - max(st[-1], en[-2] if len(en) > 1 else 0))
      st, en = st[:-1], en[:-1]
    spans.append(np.stack([st + lo, en + lo], 1))
  spans = np.concatenate(spans) if spans else np.zeros((0, 2), np.int64)
  return spans, stats


class ExampleSource:
  """Random-access examples (dicts of numpy arrays) of one tokenised split; a grain data source.

  Holds only the span index and the ArrayRecord path, so it pickles cheaply to grain workers;
  each process opens its own reader lazily.
  """

  def __init__(self, store: TokenStore, spans: np.ndarray, mode: str, length: int,
               segment_len: int, bos_id: int, eos_id: int, pad_id: int):
    self.path = store.path
    self.lengths = store.lengths
    self.has_mask = store.has_mask
    self.use_bos = mode == 'windows' and bos_id >= 0
    seq_lens = self.lengths + 1 + int(self.use_bos)
    self.offsets = np.concatenate([[0], np.cumsum(seq_lens)]).astype(np.int64)
    self.spans = spans
    self.mode, self.length, self.segment_len = mode, length, segment_len
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self._reader = None
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_reader'] = None
    state['_lock'] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.spans)

  def _record(self, doc: int) -> bytes:
    if self._reader is None:
      with self._lock:
        if self._reader is None:
          self._reader = grain.sources.ArrayRecordDataSource([self.path])
    return self._reader[doc]

  def _fill(self, doc: int, p: int, q: int, tokens: np.ndarray, mask: np.ndarray, at: int):
    """Writes positions [p, q) of document `doc`'s stream into tokens/mask starting at `at`."""
    n, off = int(self.lengths[doc]), int(self.use_bos)
    raw = self._record(doc)
    ids = np.frombuffer(raw, '<i4', count=n)
    dmask = np.frombuffer(raw, np.uint8, count=n, offset=4 * n) if self.has_mask[doc] else None
    if off and p == 0:
      tokens[at], mask[at] = self.bos_id, 0.0
    a, b = max(p, off), min(q, off + n)
    if b > a:
      tokens[at + a - p:at + b - p] = ids[a - off:b - off]
      mask[at + a - p:at + b - p] = 1.0 if dmask is None else dmask[a - off:b - off]
    if q == off + n + 1:  # The closing eos: a target unless the document masks its end.
      tokens[at + q - 1 - p] = self.eos_id
      mask[at + q - 1 - p] = 1.0 if dmask is None or n == 0 else float(dmask[-1])

  def __getitem__(self, k: int) -> dict:
    k = int(k)
    tokens = np.full(self.length, self.pad_id, np.int32)
    mask = np.zeros(self.length, np.float32)
    start, end = (int(x) for x in self.spans[k])
    doc = int(np.searchsorted(self.offsets, start, side='right')) - 1
    pos = start
    while pos < end:
      lo, hi = int(self.offsets[doc]), int(self.offsets[doc + 1])
      q = min(end, hi)
      self._fill(doc, pos - lo, q - lo, tokens, mask, pos - start)
      pos, doc = q, doc + 1
    if self.mode == 'windows':
      nvs = -(-(end - start) // self.segment_len)
    else:
      nvs = max(self.length // self.segment_len, 1)
    return dict(tokens=tokens, loss_mask=mask, num_valid_segments=np.int32(nvs))


# What every split's batches hold; a training stream may add keys of its own (data.passkey_ae_key:
# ae_segment, ae_mask), which evaluation steps neither need nor receive.
BATCH_KEYS = ('tokens', 'loss_mask', 'num_valid_segments')


class PaddingSource:
  """`n` empty examples (pad tokens, loss_mask 0, num_valid_segments 0) that complete the last
  evaluation batch, so that every process runs the same number of evaluation steps."""

  def __init__(self, n: int, length: int, pad_id: int):
    self.n, self.length, self.pad_id = n, length, pad_id

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, k: int) -> dict:
    del k
    return dict(tokens=np.full(self.length, self.pad_id, np.int32),
                loss_mask=np.zeros(self.length, np.float32), num_valid_segments=np.int32(0))


# ---------------------------------------------------------------- 3. grain

# Evaluation order: a fixed shuffle (independent of data.shuffle_seed), so that evaluating only
# the first few batches (train.eval_batches) samples every held-out document, not just the first.
EVAL_SHUFFLE_SEED = 1234

def _check_config(config, split: str, process_index: int, process_count: int) -> None:
  d = config.data
  if split not in _SPLITS:
    raise DataError(f'Unknown split {split!r}; expected one of {_SPLITS}.')
  if d.mode not in ('windows', 'packed'):
    raise DataError(f"data.mode={d.mode!r}: expected 'windows' (CCF) or 'packed' (plain decoder).")
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} is not in [0, {process_count}).')
  if d.batch_size <= 0 or d.batch_size % process_count:
    raise DataError(f'data.batch_size={d.batch_size} must be a positive multiple of the process '
                    f'count ({process_count}).')
  if not 0 <= d.shuffle_seed < 2**32:
    raise DataError(f'data.shuffle_seed={d.shuffle_seed} must be in [0, 2**32).')
  if config.ccf.segment_len <= 0:
    raise DataError(f'ccf.segment_len={config.ccf.segment_len} must be positive.')
  if d.mode == 'windows':
    w = config.ccf.num_segments * config.ccf.segment_len
    if w <= 0 or not 0 <= d.stride <= w:
      raise DataError(f'data.stride={d.stride} must be in [0, W={w}] (W = ccf.num_segments * '
                      'ccf.segment_len; 0 = non-overlapping).')
  elif d.seq_len < 2:
    raise DataError(f'data.seq_len={d.seq_len} must be >= 2.')


def example_length(config) -> int:
  """L: tokens per example (W = num_segments * segment_len in windows mode, else seq_len)."""
  if config.data.mode == 'windows':
    return int(config.ccf.num_segments * config.ccf.segment_len)
  return int(config.data.seq_len)


def build_sources(config, split: str, tok: Optional[tokenizer_lib.TokenizerBase] = None):
  """(ExampleSource per corpus, weights, info) for a split; no padding yet."""
  d, train = config.data, split == 'train'
  tok = tok or tokenizer_lib.load_or_train_tokenizer(config)
  length, seg = example_length(config), int(config.ccf.segment_len)
  stride = (d.stride or length) if (train and d.mode == 'windows') else length
  sources, weights, comps = [], [], []
  for spec in corpus_lib.corpus_specs(config):
    store = token_store(spec, split, config, tok)
    use_bos = d.mode == 'windows' and tok.bos_id >= 0
    seq_lens = store.lengths + 1 + int(use_bos)
    spans, stats = example_spans(seq_lens, d.mode, length, stride, seg, bool(d.cross_documents),
                                 drop_partial=train)
    if not len(spans):
      raise DataError(
          f'Corpus {spec.name!r} split {split!r} yields no examples: its {len(store.lengths)} '
          f'document(s) ({store.num_tokens} tokens) are all shorter than one segment '
          f'(ccf.segment_len={seg}) or one example. Fix: a smaller ccf.segment_len / data.seq_len, '
          'data.cross_documents=True, or longer documents.')
    sources.append(ExampleSource(store, spans, d.mode, length, seg, tok.bos_id, tok.eos_id,
                                 tok.pad_id))
    weights.append(spec.weight)
    comps.append(dict(corpus=spec.name, weight=spec.weight, documents=len(store.lengths),
                      tokens=store.num_tokens, examples=len(spans), token_cache=store.path,
                      **stats))
  info = dict(split=split, mode=d.mode, example_len=length, components=comps)
  for k in ('documents', 'tokens', 'examples', 'skipped_documents', 'skipped_tails',
            'skipped_tokens'):
    info[k] = sum(c[k] for c in comps)
  return sources, weights, info


def split_tokens(config, split: str, tok: tokenizer_lib.TokenizerBase) -> np.ndarray:
  """int32[N]: every document of the split's corpora, tokenised (cached), each closed by eos: the
  real-text filler of passkey windows (`data.passkey_filler='corpus'`)."""
  parts = []
  for spec in corpus_lib.corpus_specs(config):
    store = token_store(spec, split, config, tok)
    reader = grain.sources.ArrayRecordDataSource([store.path])
    for doc, n in enumerate(store.lengths):
      parts.append(np.frombuffer(reader[doc], '<i4', count=int(n)))
      parts.append(np.array([tok.eos_id], '<i4'))
  return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def passkey_sources(config, split: str, tok: tokenizer_lib.TokenizerBase):
  """`data.task='passkey'`: synthetic passkey windows (ccf_jax.tasks.passkey.PasskeySource)
  instead of corpus text; the corpus still trains the tokenizer. Train is an endless seeded
  stream with the curriculum; evaluation splits hold train.eval_batches batches of full windows
  from their own seeds."""
  d, train = config.data, split == 'train'
  n = 2**31 - 1 if train else int(config.train.eval_batches) * int(d.batch_size)
  seed = int(d.shuffle_seed) if train else 2**32 + _SPLITS.index(split)
  src = passkey.PasskeySource(
      tok.encode, n, config.ccf.num_segments, config.ccf.segment_len, seed,
      tok.bos_id if tok.bos_id >= 0 else None, tok.pad_id, batch_size=d.batch_size,
      min_segments=d.passkey_min_segments if train else 0,
      curriculum_steps=d.passkey_curriculum_steps if train else 0,
      score_all=train and d.passkey_score == 'all', ae_key=train and d.passkey_ae_key,
      depth=d.passkey_depth,
      filler_tokens=split_tokens(config, split, tok) if d.passkey_filler == 'corpus' else None)
  info = dict(split=split, mode=d.mode, task='passkey', example_len=example_length(config),
              examples=n, components=[])
  return [src], [1.0], info


@dataclasses.dataclass
class Pipeline:
  """A built pipeline: the grain dataset (iterate it for batches) and what went into it."""
  dataset: grain.IterDataset
  info: dict
  tokenizer: tokenizer_lib.TokenizerBase


def make_pipeline(config, split: str, process_index: int = 0, process_count: int = 1,
                  tok: Optional[tokenizer_lib.TokenizerBase] = None,
                  eval_shuffle: bool = True) -> Pipeline:
  """Builds the grain pipeline of a split for one process (see the module docstring).

  Evaluation splits are one pass in a fixed shuffled order (`eval_shuffle=False`: corpus order).
  """
  _check_config(config, split, process_index, process_count)
  d = config.data
  tok = tok or tokenizer_lib.load_or_train_tokenizer(config)
  global_batch, local_batch = int(d.batch_size), int(d.batch_size) // process_count
  if d.task == 'passkey':
    sources, weights, info = passkey_sources(config, split, tok)
  else:
    sources, weights, info = build_sources(config, split, tok)
  if split == 'train' and d.task == 'passkey':  # I.i.d. by construction: no shuffle needed.
    ds = grain.MapDataset.source(sources[0])
  elif split == 'train':
    comps = []
    for i, src in enumerate(sources):
      seed = (int(d.shuffle_seed) + 7919 * i) % 2**32
      comps.append(grain.MapDataset.source(src).shuffle(seed=seed).repeat())
    ds = comps[0] if len(comps) == 1 else grain.MapDataset.mix(comps, weights)
  else:
    n = sum(len(s) for s in sources)
    comps = [grain.MapDataset.source(s) for s in sources]
    ds = comps[0] if len(comps) == 1 else grain.MapDataset.concatenate(comps)
    if eval_shuffle:
      ds = ds.shuffle(seed=EVAL_SHUFFLE_SEED)
    num_pad = -n % global_batch  # Complete the last global batch with empty rows.
    if num_pad:
      pad = PaddingSource(num_pad, sources[0].length, tok.pad_id)
      ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source(pad)])
    info['batches'] = (n + num_pad) // global_batch
  ds = ds[process_index::process_count]
  ds = ds.batch(local_batch, drop_remainder=True)
  prefetch = max(int(d.prefetch), 0)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if prefetch else 0,
                                            prefetch_buffer_size=prefetch))
  if d.num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags; outside `app.run` (tests, notebooks) they are
      # unparsed and grain would fail in the worker. Use the defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(d.num_workers),
                                                     per_worker_buffer_size=max(prefetch, 1)))
  info.update(process_index=process_index, process_count=process_count, local_batch=local_batch,
              global_batch=global_batch)
  return Pipeline(ds, info, tok)


def make_train_iter(config, split: str = 'train', process_index: int = 0, process_count: int = 1):
  """Iterator of batches {tokens int32[B, L], loss_mask float32[B, L], num_valid_segments
  int32[B]} with B = data.batch_size // process_count: infinite and reshuffled each epoch for
  'train', one deterministic pass (last batch padded with loss_mask-0 rows) otherwise. It is a
  grain DatasetIterator: get_state()/set_state(), or grain.checkpoint with Orbax."""
  p = make_pipeline(config, split, process_index, process_count)
  logging.info('Data %s (process %d/%d): %s', split, process_index, process_count,
               {k: v for k, v in p.info.items() if k != 'components'})
  return iter(p.dataset)
