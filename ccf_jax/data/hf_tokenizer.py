"""Hugging Face `tokenizers` files (`tokenizer.json`) behind ccf_jax's tokenizer interface.

Most current models (Llama-3, Qwen, SmolLM, Mistral-Nemo) ship only a `tokenizer.json`, often a
byte-level BPE that no sentencepiece model can express, so it is read as it is, with the Rust
`tokenizers` library (a requirement of ccf_jax). Text is encoded without the post-processor's
special tokens (`add_special_tokens=False`): the data pipeline adds bos/eos itself, the same way for
every tokenizer kind.

Special ids come from the `tokenizer_config.json` next to the file (`bos_token`, `eos_token`, ...,
as strings or AddedToken dicts), which is what transformers reads; where it names none, the usual
names of Llama-3, GPT-2-style and Llama-2 vocabularies are tried. Without a pad token, padding uses
unk or eos (padding is masked out of every loss, so it only needs a valid id). The same file's
`chat_template` (a Jinja template) is kept for chat prompts in generation.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from ccf_jax.data.tokenizer_base import HF, TokenizerBase, TokenizerError

CONFIG_FILE = 'tokenizer_config.json'


def read_config(path: str) -> dict:
  """A tokenizer_config.json as a dict ({} when absent)."""
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      cfg = json.load(f)
  except ValueError as e:
    raise TokenizerError(f'{path} is not valid JSON ({e}). Fix: restore the file from the model '
                         'release, or delete it to use the default special tokens.') from e
  return cfg if isinstance(cfg, dict) else {}


def named_special_tokens(cfg: dict) -> dict:
  """{'bos': '<s>', ...} from a tokenizer_config.json dict (strings or AddedToken dicts)."""
  out = {}
  for role in ('bos', 'eos', 'unk', 'pad'):
    tok = cfg.get(f'{role}_token')
    if isinstance(tok, dict):
      tok = tok.get('content')
    if isinstance(tok, str):
      out[role] = tok
  return out


def chat_template_of(cfg: dict) -> Optional[str]:
  """The default chat template of a tokenizer_config.json dict, or None."""
  tpl = cfg.get('chat_template')
  if isinstance(tpl, list):  # [{'name': 'default', 'template': ...}, ...]
    named = {t.get('name'): t.get('template') for t in tpl if isinstance(t, dict)}
    tpl = named.get('default')
  return tpl if isinstance(tpl, str) and tpl else None


class HFTokenizer(TokenizerBase):
  """A `tokenizers` tokenizer.json plus the special ids of its tokenizer_config.json."""

  kind = HF
  # Special-token names tried when tokenizer_config.json does not name them (Llama-3, GPT-2/
  # SmolLM/Qwen, Llama-2).
  DEFAULTS = {'bos': ('<|begin_of_text|>', '<s>'),
              'eos': ('<|end_of_text|>', '<|endoftext|>', '</s>'),
              'unk': ('<|unk|>', '<unk>'), 'pad': ('<|finetune_right_pad_id|>', '<pad>')}

  def __init__(self, path: str):
    from tokenizers import Tokenizer as _Tokenizer
    self.model_path = os.path.abspath(path)
    try:
      self.tok = _Tokenizer.from_file(self.model_path)
    except Exception as e:  # pylint: disable=broad-except
      raise TokenizerError(f'{path}: not a loadable Hugging Face tokenizer.json ({e}). Fix: use '
                           'the tokenizer.json released with the model.') from e
    self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
    self.config = read_config(os.path.join(os.path.dirname(self.model_path), CONFIG_FILE))
    self.chat_template = chat_template_of(self.config)
    named = named_special_tokens(self.config)
    ids = {}
    for role, defaults in self.DEFAULTS.items():
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
                           f'eos_token and {self.DEFAULTS["eos"]}). Fix: put a '
                           f'tokenizer_config.json naming it ({{"eos_token": "..."}}) next to '
                           'tokenizer.json.')
    self.memory_init_id = self.eos_id

  def special_tokens(self) -> dict:
    out = {t.content: int(i) for i, t in self.tok.get_added_tokens_decoder().items()
           if t.special}
    for tid in (self.bos_id, self.eos_id, self.unk_id, self.pad_id):
      if tid >= 0:
        out.setdefault(self.tok.id_to_token(tid), tid)
    return out

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def _decode(self, ids: list) -> str:
    return self.tok.decode(ids, skip_special_tokens=False)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[np.ndarray]:
    del num_threads  # tokenizers parallelises by itself.
    out = self.tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in out]

  def encode_masked(self, text: str, char_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encodes like `encode`; a token's mask is 1 if any character it covers is 1. `tokenizers`
    reports character offsets, also for byte-level pieces of one character (each covers it)."""
    enc = self.tok.encode(text, add_special_tokens=False)
    char_mask = np.asarray(char_mask, np.uint8)
    n = len(char_mask)
    mask = np.zeros(len(enc.ids), np.uint8)
    for j, (lo, hi) in enumerate(enc.offsets):
      if n:
        lo = min(lo, n - 1)
        mask[j] = char_mask[lo:max(hi, lo + 1)].max()
    return np.asarray(enc.ids, np.int32), mask
