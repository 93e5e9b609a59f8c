"""Corpora: the built-in one, user files (.txt / JSONL / ArrayRecord), splits and mixtures.

A corpus is named by `data.corpus`: the built-in name `shakespeare`, or a path to
  * a directory (searched recursively) of `.txt` files (one document per file), `.jsonl` files
    and/or ArrayRecord files (`*.array_record`, also sharded `*.array_record-00000-of-00004`);
  * a single `.jsonl` or ArrayRecord file.
`data.mixture = 'a:0.7,b:0.3'` names several corpora with sampling weights (training draws
examples from them in those proportions, evaluation concatenates them).

Documents keep their boundaries: CCF trains on windows cut from whole long documents, so a
document is never split or merged here. JSONL lines (and JSON ArrayRecord records) hold a text
in `data.text_field`, optionally with `loss_mask` (a list of 0/1 per character of the text:
train only on characters marked 1), or instead `prompt` and `answer` fields: the document is
`prompt + answer` (concatenated as is; include any separator yourself) and only the answer is a
target (answers-only loss). Plain ArrayRecord records are UTF-8 text.

Splits. The built-in corpus is split by play (see shakespeare.py). A user directory that contains
entries named `train`, `validation` and/or `test` (subdirectories, or files like `train.jsonl`)
is split by those entries. Otherwise the documents are ranked by a hash of their file name and
position and about 5% go to validation and 5% to test (at least one each when there are 3 or
more documents) - deterministic, and stable for a document as long as its file/line is stable.

Bad input raises `DataError` naming the file (and line or record) and the fix: a missing path, an
empty corpus, invalid JSON, a missing field, or non-UTF-8 bytes (set `data.replace_invalid_utf8`
to decode them as U+FFFD instead).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional

from array_record.python.array_record_module import ArrayRecordReader
import numpy as np

from ccf_jax.data import cache
from ccf_jax.data import shakespeare
from ccf_jax.data.cache import DataError

SPLIT_NAMES = ('train', 'validation', 'test')
BUILTIN = (shakespeare.NAME,)
_HELD_OUT_FRACTION = 0.05  # Per held-out split, for user corpora without explicit splits.
_SPLIT_VERSION = 1
_UTF8_FIX = ('Fix: re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or set '
             '--config.data.replace_invalid_utf8=True to replace bad bytes with U+FFFD.')


@dataclasses.dataclass
class Document:
  """One document. `mask` (uint8 per character, or None = all 1) marks trainable characters."""
  text: str
  source: str  # Where it came from ('file.jsonl:12'), for error messages.
  mask: Optional[np.ndarray] = None


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  """One component of the data: a built-in name or a path, with its mixture weight."""
  name: str
  weight: float = 1.0

  @property
  def builtin(self) -> bool:
    return self.name in BUILTIN


def corpus_specs(config) -> list[CorpusSpec]:
  """The corpora named by `data.mixture` (if set) or `data.corpus`."""
  d = config.data
  mixture = d.get('mixture', '') or ''
  if not mixture.strip():
    if not d.corpus:
      raise DataError('data.corpus is empty: set it to "shakespeare" or a path.')
    return [CorpusSpec(_normalize_name(d.corpus), 1.0)]
  specs = []
  for item in mixture.split(','):
    item = item.strip()
    if not item:
      continue
    name, sep, w = item.rpartition(':')
    try:
      weight = float(w) if sep else float('nan')
    except ValueError:
      weight = float('nan')
    if not sep or not name or not weight > 0 or weight == float('inf'):
      raise DataError(f'data.mixture={mixture!r}: cannot parse {item!r}; expected '
                      "'name_or_path:weight,...' with positive weights, e.g. 'shakespeare:0.5,"
                      "/data/books:0.5'.")
    specs.append(CorpusSpec(_normalize_name(name), weight))
  if not specs:
    raise DataError(f'data.mixture={mixture!r} names no corpus.')
  return specs


def _normalize_name(name: str) -> str:
  name = name.strip()
  return name if name in BUILTIN else os.path.abspath(os.path.expanduser(name))


# ---------------------------------------------------------------- files and splits

def _kind(path: str) -> Optional[str]:
  base = os.path.basename(path)
  if base.startswith('.'):
    return None
  if base.endswith('.txt'):
    return 'txt'
  if base.endswith('.jsonl'):
    return 'jsonl'
  if '.array_record' in base:
    return 'array_record'
  return None


def _walk(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path] if _kind(path) else []
  out = []
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    out.extend(os.path.join(root, f) for f in sorted(files) if _kind(f))
  return out


def _explicit_splits(path: str) -> Optional[dict[str, list[str]]]:
  """{split: files} if the directory has train/validation/test entries, else None."""
  if not os.path.isdir(path):
    return None
  entries = {}
  for e in sorted(os.listdir(path)):
    stem = e.split('.', 1)[0]
    if stem in SPLIT_NAMES and (os.path.isdir(os.path.join(path, e)) or _kind(e)):
      entries.setdefault(stem, []).extend(_walk(os.path.join(path, e)))
  return entries or None


def corpus_files(spec: CorpusSpec) -> list[str]:
  """All data files of a user corpus (errors for a missing path or no files)."""
  path = spec.name
  if not os.path.exists(path):
    raise DataError(f'Corpus path {path!r} does not exist. Fix: set data.corpus (or a data.mixture '
                    f'entry) to the built-in name {BUILTIN[0]!r} or to an existing directory of '
                    '.txt files, a .jsonl file or an .array_record file.')
  files = _walk(path)
  if not files:
    raise DataError(f'Corpus {path!r} is empty: no .txt, .jsonl or .array_record files found. '
                    'Fix: point data.corpus at a directory that contains such files.')
  return files


def fingerprint(spec: CorpusSpec, split: str, config) -> str:
  """Cache key for a split of a corpus; cheap (file metadata only for user corpora)."""
  if split not in SPLIT_NAMES:
    raise DataError(f'Unknown split {split!r}; expected one of {SPLIT_NAMES}.')
  if spec.builtin:
    return shakespeare.fingerprint(split)
  d = config.data
  return cache.hash_strings([_SPLIT_VERSION, spec.name, split, cache.file_fingerprint(
      corpus_files(spec)), d.text_field, bool(d.replace_invalid_utf8)])


def read_split(spec: CorpusSpec, split: str, config) -> list[Document]:
  """The documents of one split of one corpus, in a deterministic order."""
  if split not in SPLIT_NAMES:
    raise DataError(f'Unknown split {split!r}; expected one of {SPLIT_NAMES}.')
  if spec.builtin:
    return [Document(text, f'{shakespeare.NAME}:{stem}') for stem, text in
            shakespeare.documents(split)]
  d = config.data
  opts = dict(text_field=d.text_field, replace=bool(d.replace_invalid_utf8))
  files = corpus_files(spec)
  explicit = _explicit_splits(spec.name)
  if explicit is not None:
    docs = [doc for f in explicit.get(split, []) for doc in read_file(f, **opts)]
    if not docs:
      raise DataError(f'Corpus {spec.name!r} has no documents for split {split!r} (it has explicit '
                      f'split entries {sorted(explicit)}). Fix: add {spec.name}/{split}/ (a '
                      f'directory) or {spec.name}/{split}.jsonl.')
    return docs
  docs = [doc for f in files for doc in read_file(f, **opts)]
  if not docs:
    raise DataError(f'Corpus {spec.name!r} is empty: its files hold no documents.')
  if all(not doc.text for doc in docs):
    raise DataError(f'Corpus {spec.name!r} holds only empty documents.')
  chosen = [docs[i] for i in _hash_split(docs, spec.name)[split]]
  if not chosen:
    raise DataError(
        f'Corpus {spec.name!r} has {len(docs)} document(s): too few to hold out a {split!r} split '
        '(need 3 or more). Fix: add documents, or make explicit splits: put files under '
        f'{spec.name}/train/ and {spec.name}/{split}/ (or train.jsonl and {split}.jsonl).')
  return chosen


def _hash_split(docs: list[Document], root: str) -> dict[str, list[int]]:
  """Ranks documents by a hash of (relative file, position); first ~5% validation, next test."""
  def key(i):
    src = docs[i].source  # 'path' or 'path:line': keyed relative to the corpus root.
    rel = src[len(root):] if src.startswith(root) else src
    return hashlib.sha256(rel.encode('utf-8')).digest()
  n = len(docs)
  order = sorted(range(n), key=key)
  k = 0 if n < 3 else max(1, int(round(n * _HELD_OUT_FRACTION)))
  return {'validation': sorted(order[:k]), 'test': sorted(order[k:2 * k]),
          'train': sorted(order[2 * k:])}


# ---------------------------------------------------------------- readers

def _decode(raw: bytes, where: str, replace: bool) -> str:
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    if replace:
      return raw.decode('utf-8', errors='replace')
    raise DataError(f'{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}). '
                    f'{_UTF8_FIX}') from None


def read_file(path: str, text_field: str = 'text', replace: bool = False) -> list[Document]:
  """Documents of one file (.txt: one; .jsonl: one per non-blank line; ArrayRecord: per record)."""
  kind = _kind(path)
  try:
    if kind == 'txt':
      with open(path, 'rb') as f:
        raw = f.read()
      return [Document(_decode(raw, path, replace).replace('\r\n', '\n'), path)]
    if kind == 'jsonl':
      with open(path, 'rb') as f:
        lines = f.read().split(b'\n')
      docs = []
      for i, line in enumerate(lines):
        if line.strip():
          where = f'{path}:{i + 1}'
          docs.append(_json_document(_decode(line, where, replace), where, text_field))
      return docs
    if kind == 'array_record':
      reader = ArrayRecordReader(path, 'readahead_buffer_size:0')
      try:
        records = reader.read_all()
      finally:
        reader.close()
      docs = []
      for i, rec in enumerate(records):
        where = f'{path}:record {i}'
        text = _decode(rec, where, replace)
        obj = _maybe_json(text)
        docs.append(_json_document(obj, where, text_field) if obj is not None else
                    Document(text, where))
      return docs
  except OSError as e:
    raise DataError(f'Cannot read corpus file {path!r}: {e}') from e
  raise DataError(f'{path}: unsupported file type (expected .txt, .jsonl or .array_record).')


def _maybe_json(text: str) -> Optional[dict]:
  if not text.lstrip().startswith('{'):
    return None
  try:
    obj = json.loads(text)
  except ValueError:
    return None
  return obj if isinstance(obj, dict) else None


def _json_document(line: Any, where: str, text_field: str) -> Document:
  """A Document from a JSON object (or its source text): text, or prompt/answer, plus a mask."""
  if isinstance(line, str):
    try:
      obj = json.loads(line)
    except ValueError as e:
      raise DataError(f'{where}: invalid JSON ({e}). Fix: one JSON object per line.') from None
  else:
    obj = line
  if not isinstance(obj, dict):
    raise DataError(f'{where}: expected a JSON object, got {type(obj).__name__}.')
  if text_field in obj:
    text = obj[text_field]
    if not isinstance(text, str):
      raise DataError(f'{where}: field {text_field!r} must be a string, got '
                      f'{type(text).__name__}.')
    mask = obj.get('loss_mask')
    if mask is not None:
      if not isinstance(mask, list) or len(mask) != len(text):
        raise DataError(f'{where}: "loss_mask" must be a list with one 0/1 per character of the '
                        f'text ({len(text)}), got {type(mask).__name__} of length '
                        f'{len(mask) if isinstance(mask, list) else "-"}.')
      mask = (np.asarray(mask, dtype=np.float64) > 0).astype(np.uint8)
    return Document(text, where, mask)
  if 'prompt' in obj and 'answer' in obj:
    prompt, answer = obj['prompt'], obj['answer']
    if not isinstance(prompt, str) or not isinstance(answer, str):
      raise DataError(f'{where}: "prompt" and "answer" must be strings.')
    mask = np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(answer), np.uint8)])
    return Document(prompt + answer, where, mask)
  raise DataError(f'{where}: no {text_field!r} field (and no "prompt"/"answer" pair); fields are '
                  f'{sorted(obj)[:10]}. Fix: set --config.data.text_field to the field holding the '
                  'text.')


# ---------------------------------------------------------------- public helpers

def load_documents(config, split: str) -> list[str]:
  """The texts of a split, all corpora of the config concatenated (for evaluation)."""
  return [doc.text for spec in corpus_specs(config) for doc in read_split(spec, split, config)]


def training_texts(config):
  """Yields the train-split texts of every corpus of the config (for tokenizer training)."""
  for spec in corpus_specs(config):
    for doc in read_split(spec, 'train', config):
      yield doc.text
