"""The tokenizers of Hugging Face model directories: which kind, where it goes, how to load it.

Llama-family checkpoints ship one of two tokenizer formats:
  * `tokenizer.model`, a sentencepiece model (Llama-2, Mistral, most Llama-2 derivatives). This is
    what ccf_jax's data pipeline reads, so an export keeps it as its top-level `tokenizer.model`
    and training, evaluation and generation use it unchanged.
  * `tokenizer.json` only, a `tokenizers` (Rust) BPE (Llama-3 and later). It cannot be turned
    into a sentencepiece model, so an export keeps it verbatim under `hf/tokenizer.json`, and
    `load(path)` returns an `HFTokenizer` with the same small interface as
    `ccf_jax.data.tokenizer.Tokenizer` (vocab_size, special ids, encode, decode, encode_batch).
Why `hf/` and not `tokenizer.json` at the top: in an export, `tokenizer.json` already means the
sentencepiece model's JSON sidecar of special ids (ccf_jax.export); a Hugging Face tokenizer
there would be read as one. When a directory has both files, sentencepiece wins (it is the
pipeline's format and both encode the same vocabulary in Llama-2/Mistral releases).

The kind is recorded in the export's `export_info.json` (`tokenizer.kind`) and the file in its
config (`data.tokenizer`, relative to the export), so a loader never has to guess.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence

import numpy as np
from ccf_jax.data import tokenizer as tokenizer_lib

SENTENCEPIECE, HF_TOKENIZERS = 'sentencepiece', 'tokenizers'
SP_FILE, HF_FILE = 'tokenizer.model', 'tokenizer.json'
# Hugging Face side files kept next to the weights (copied verbatim into an export's hf/).
AUX_FILES = ('tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json')
EXPORT_HF_DIR = 'hf'


class TokenizerError(ValueError):
  """A tokenizer file that is missing, unreadable or inconsistent with the model."""


def find(model_dir: str) -> tuple[Optional[str], Optional[str]]:
  """(kind, path) of the tokenizer in a Hugging Face directory, or (None, None) if it has none."""
  sp = os.path.join(model_dir, SP_FILE)
  if os.path.isfile(sp):
    return SENTENCEPIECE, sp
  hf = os.path.join(model_dir, HF_FILE)
  if os.path.isfile(hf):
    return HF_TOKENIZERS, hf
  return None, None


def _special_tokens(config_path: str) -> dict:
  """{'bos': '<s>', ...} from a tokenizer_config.json (strings or AddedToken dicts)."""
  if not os.path.isfile(config_path):
    return {}
  with open(config_path) as f:
    cfg = json.load(f)
  out = {}
  for role in ('bos', 'eos', 'unk', 'pad'):
    tok = cfg.get(f'{role}_token')
    if isinstance(tok, dict):
      tok = tok.get('content')
    if isinstance(tok, str):
      out[role] = tok
  return out


class HFTokenizer:
  """A `tokenizers` tokenizer.json behind the interface of ccf_jax's sentencepiece Tokenizer."""

  # Special-token names tried when tokenizer_config.json does not name them (Llama-3, Llama-2).
  _DEFAULTS = {'bos': ('<|begin_of_text|>', '<s>'), 'eos': ('<|end_of_text|>', '</s>'),
               'unk': ('<|unk|>', '<unk>'), 'pad': ('<|finetune_right_pad_id|>', '<pad>')}

  def __init__(self, path: str):
    try:
      from tokenizers import Tokenizer as _Tokenizer
    except ImportError as e:  # pragma: no cover - tokenizers is in requirements.txt.
      raise TokenizerError('reading tokenizer.json needs the `tokenizers` package. Fix: '
                           'pip install -r requirements.txt.') from e
    self.model_path = os.path.abspath(path)
    try:
      self.tok = _Tokenizer.from_file(self.model_path)
    except Exception as e:  # pylint: disable=broad-except
      raise TokenizerError(f'{path}: not a loadable Hugging Face tokenizer.json ({e}).') from e
    self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
    named = _special_tokens(os.path.join(os.path.dirname(self.model_path), AUX_FILES[0]))
    ids = {}
    for role, defaults in self._DEFAULTS.items():
      for name in ((named[role],) if role in named else ()) + defaults:
        tid = self.tok.token_to_id(name)
        if tid is not None:
          ids[role] = int(tid)
          break
    self.bos_id, self.eos_id = ids.get('bos', -1), ids.get('eos', -1)
    self.unk_id = ids.get('unk', -1)
    self.pad_id = ids.get('pad', self.unk_id if self.unk_id >= 0 else self.eos_id)
    if self.eos_id < 0:
      raise TokenizerError(f'{path}: no end-of-text token found (tried tokenizer_config.json '
                           f'eos_token and {self._DEFAULTS["eos"]}). Fix: name it in '
                           'tokenizer_config.json next to tokenizer.json.')
    self.memory_init_id = self.eos_id

  def special_ids(self) -> dict:
    return dict(vocab_size=self.vocab_size, pad_id=self.pad_id, unk_id=self.unk_id,
                bos_id=self.bos_id, eos_id=self.eos_id, memory_init_id=self.memory_init_id)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    ids = np.asarray(ids).reshape(-1).astype(np.int64)
    ids = ids[(ids >= 0) & (ids < self.vocab_size) & (ids != self.pad_id)].tolist()
    return self.tok.decode(ids, skip_special_tokens=False)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[np.ndarray]:
    del num_threads  # tokenizers parallelises by itself.
    out = self.tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in out]


def load(path: str):
  """The tokenizer at `path`: a sentencepiece .model or a Hugging Face tokenizer.json."""
  if not os.path.isfile(path):
    raise TokenizerError(f'tokenizer file {path} does not exist.')
  if path.endswith('.json'):
    return HFTokenizer(path)
  return tokenizer_lib.Tokenizer(path)


def check_vocab(tokenizer, vocab_size: int, where: str):
  """A tokenizer may have fewer ids than the embedding (padded vocabularies), never more."""
  if tokenizer.vocab_size > vocab_size:
    raise TokenizerError(
        f'{where}: the tokenizer has {tokenizer.vocab_size} ids but the model only {vocab_size} '
        'embedding rows, so some tokens could not be embedded. Fix: use the tokenizer that was '
        'released with these weights.')


def write_hf_tokenizer_config(path: str, sp_model: str):
  """A minimal tokenizer_config.json for a sentencepiece model exported to Hugging Face, naming
  its special pieces (transformers reads the ids from the model itself)."""
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=sp_model)
  cfg = {'tokenizer_class': 'LlamaTokenizer', 'add_bos_token': False, 'add_eos_token': False}
  for role, tid in (('bos', sp.bos_id()), ('eos', sp.eos_id()), ('unk', sp.unk_id()),
                    ('pad', sp.pad_id())):
    if tid >= 0:
      cfg[f'{role}_token'] = sp.id_to_piece(tid)
  with open(path, 'w') as f:
    json.dump(cfg, f, indent=2)
