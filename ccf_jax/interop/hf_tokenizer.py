"""The tokenizers of Hugging Face model directories: which kind, where it goes in an export, and
what `--to_hf` writes so that transformers tokenises exactly as ccf_jax does.

Llama-family checkpoints ship one of two tokenizer formats:
  * `tokenizer.model`, a sentencepiece model (Llama-2, Mistral, most Llama-2 derivatives). An
    export keeps it as its top-level `tokenizer.model`.
  * `tokenizer.json` only, a `tokenizers` (Rust) BPE, often byte-level (Llama-3, Qwen, SmolLM). It
    cannot be turned into a sentencepiece model, so an export keeps it verbatim under
    `hf/tokenizer.json`, next to `hf/tokenizer_config.json` (its special tokens and chat template).
Why `hf/` and not `tokenizer.json` at the top: in an export, `tokenizer.json` already means the
sentencepiece model's JSON sidecar of special ids (ccf_jax.export). When a directory has both
files, sentencepiece wins (both encode the same vocabulary in Llama-2/Mistral releases).

Loading either kind is `ccf_jax.data.tokenizer.load_tokenizer`, the one
loader for the data pipeline, exports, evaluation and generation. The kind, file, sha256 and special
ids are recorded in the export's `export_info.json` (`tokenizer`), so a loader never has to guess.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from ccf_jax.data.tokenizer_base import HF, SENTENCEPIECE

SP_FILE, HF_FILE = 'tokenizer.model', 'tokenizer.json'
# Hugging Face side files kept next to the weights (copied verbatim into an export's hf/).
AUX_FILES = ('tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json')
EXPORT_HF_DIR = 'hf'


def find(model_dir: str) -> tuple[Optional[str], Optional[str]]:
  """(kind, path) of the tokenizer in a Hugging Face directory, or (None, None) if it has none."""
  sp = os.path.join(model_dir, SP_FILE)
  if os.path.isfile(sp):
    return SENTENCEPIECE, sp
  hf = os.path.join(model_dir, HF_FILE)
  if os.path.isfile(hf):
    return HF, hf
  return None, None


def hf_tokenizer_config(sp_model: str) -> dict:
  """The tokenizer_config.json that makes transformers' LlamaTokenizer encode like `sp_model`.

  transformers builds its tokenizer from the sentencepiece model but decides the leading space
  itself: unless told `add_prefix_space: false` it prepends '▁' to every text, which the models
  ccf_jax trains never saw (they use add_dummy_prefix=False). So the flag is written from what the
  model itself does, with `legacy: false` (no extra space after special tokens), no bos/eos added
  to encoded text (ccf_jax's data pipeline adds them itself) and the special pieces by name."""
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=sp_model)
  dummy_prefix = sp.encode('a', out_type=str)[0].startswith('\u2581')
  cfg = {'tokenizer_class': 'LlamaTokenizer', 'add_bos_token': False, 'add_eos_token': False,
         'add_prefix_space': dummy_prefix, 'legacy': False}
  for role, tid in (('bos', sp.bos_id()), ('eos', sp.eos_id()), ('unk', sp.unk_id()),
                    ('pad', sp.pad_id())):
    if tid >= 0:
      cfg[f'{role}_token'] = sp.id_to_piece(tid)
  return cfg


def write_hf_tokenizer_config(path: str, sp_model: str):
  """Writes `hf_tokenizer_config(sp_model)` to `path` (a sentencepiece model exported with
  --to_hf that came without a tokenizer_config.json of its own)."""
  with open(path, 'w') as f:
    json.dump(hf_tokenizer_config(sp_model), f, indent=2)
