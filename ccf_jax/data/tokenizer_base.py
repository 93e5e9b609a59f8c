"""The one tokenizer interface every part of ccf_jax speaks, whatever file is behind it.

Two kinds implement it: `sentencepiece` (a `.model` file: the tokenizers ccf_jax trains, Llama-2,
Mistral) in `ccf_jax.data.tokenizer.Tokenizer`, and `hf` (a Hugging Face `tokenizers`
`tokenizer.json`: Llama-3, Qwen, SmolLM, byte-level BPE) in `ccf_jax.data.hf_tokenizer.HFTokenizer`.
`ccf_jax.data.tokenizer.load_tokenizer(path)` picks the kind from the file, so the data pipeline,
exports, evaluation, generation, the passkey task and the benchmarks never branch on it.

What a tokenizer offers (and why):
  * `vocab_size` and the special ids `pad_id, unk_id, bos_id, eos_id, memory_init_id` (-1: none).
    Documents end with eos, windowed documents start with bos, CCF's memory starts from eos.
  * `encode(text)` (plain text: no bos/eos added), `encode_batch`, `encode_masked` (a per-character
    mask carried to tokens, for answer-only losses), `decode(ids)`.
  * `record()`: kind, file name, sha256 and special ids, the identity an export writes into its
    export_info.json so that a run starting from it can refuse another tokenizer.
  * `decode` drops padding only when padding has an id of its own: a tokenizer without a pad token
    pads with eos (or unk), and dropping those would silently delete real end-of-text tokens.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

import numpy as np

from ccf_jax.data import cache
from ccf_jax.data.cache import DataError

SENTENCEPIECE, HF = 'sentencepiece', 'hf'
KINDS = (SENTENCEPIECE, HF)


class TokenizerError(DataError):
  """A tokenizer file that is missing, unreadable or inconsistent with the model or the run."""


class TokenizerBase:
  """Shared behaviour; subclasses set the attributes below and implement `_decode`, `encode`,
  `encode_batch`, `encode_masked` and `special_tokens` (special-token text -> id)."""

  kind: str
  model_path: str
  vocab_size: int
  pad_id: int
  unk_id: int
  bos_id: int
  eos_id: int
  memory_init_id: int
  _sha = None

  @property
  def sha256(self) -> str:
    if self._sha is None:
      self._sha = cache.file_sha256(self.model_path)
    return self._sha

  def special_ids(self) -> dict:
    return dict(vocab_size=self.vocab_size, pad_id=self.pad_id, unk_id=self.unk_id,
                bos_id=self.bos_id, eos_id=self.eos_id, memory_init_id=self.memory_init_id)

  def record(self) -> dict:
    """What identifies this tokenizer in an export's metadata."""
    return dict(kind=self.kind, file=os.path.basename(self.model_path), sha256=self.sha256,
                **self.special_ids())

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ids (lists, numpy or jax arrays); out-of-range ids and dedicated pad ids dropped."""
    ids = np.asarray(ids).reshape(-1).astype(np.int64)
    keep = (ids >= 0) & (ids < self.vocab_size)
    if self.pad_id >= 0 and self.pad_id not in (self.eos_id, self.bos_id, self.unk_id):
      keep &= ids != self.pad_id
    return self._decode(ids[keep].tolist())

  def _decode(self, ids: list) -> str:
    raise NotImplementedError

  def special_tokens(self) -> dict:
    raise NotImplementedError

  def encode_with_specials(self, text: str) -> list[int]:
    """Like `encode`, but the text of a special token (e.g. '</s>', '<|im_end|>' written by a chat
    template) becomes that token's id instead of being spelt out in ordinary pieces."""
    specials = self.special_tokens()
    if not specials:
      return list(self.encode(text))
    pattern = '(' + '|'.join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ')'
    out = []
    for part in re.split(pattern, text):
      if part in specials:
        out.append(specials[part])
      elif part:
        out.extend(self.encode(part))
    return out
