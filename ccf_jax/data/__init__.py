"""ccf_jax data: corpora, tokenizers (sentencepiece or Hugging Face tokenizer.json) and the grain
input pipeline.

Public interface (other modules call exactly these):
  make_train_iter(config, split, process_index=0, process_count=1) -> iterator of batches
      {'tokens': int32[B, L], 'loss_mask': float32[B, L], 'num_valid_segments': int32[B]},
      B = data.batch_size // process_count. 'train' repeats forever (reshuffled each epoch);
      'validation'/'test' are one deterministic pass (a fixed shuffled order) whose last batch
      is padded with loss_mask-0 rows (num_valid_segments 0). These three keys are BATCH_KEYS;
      passkey training with data.passkey_ae_key adds 'ae_segment' int32[B] and 'ae_mask'
      float32[B, L]. A grain DatasetIterator: checkpoint it with get_state()/set_state() or grain.checkpoint.CheckpointSave/Restore.
  load_or_train_tokenizer(config) -> TokenizerBase (data.tokenizer, or one trained on the corpus)
  load_tokenizer(path, vocab_size=None) -> TokenizerBase (a .model, a tokenizer.json, a directory)
  load_documents(config, split) -> list[str]
  split_tokens(config, split, tok) -> int32[N] (a split's documents tokenised, eos-separated)
  DataError (a ValueError)
Also: make_pipeline (the grain dataset plus counts such as skipped short documents),
train_tokenizer, check_vocab, Tokenizer (sentencepiece), HFTokenizer, TokenizerError.
"""

from ccf_jax.data.cache import DataError
from ccf_jax.data.cache import data_dir
from ccf_jax.data.corpus import load_documents
from ccf_jax.data.pipeline import BATCH_KEYS
from ccf_jax.data.pipeline import example_length
from ccf_jax.data.pipeline import make_pipeline
from ccf_jax.data.pipeline import make_train_iter
from ccf_jax.data.pipeline import Pipeline
from ccf_jax.data.pipeline import split_tokens
from ccf_jax.data.hf_tokenizer import HFTokenizer
from ccf_jax.data.tokenizer import check_vocab
from ccf_jax.data.tokenizer import load_or_train_tokenizer
from ccf_jax.data.tokenizer import load_tokenizer
from ccf_jax.data.tokenizer import Tokenizer
from ccf_jax.data.tokenizer import train_tokenizer
from ccf_jax.data.tokenizer_base import TokenizerBase
from ccf_jax.data.tokenizer_base import TokenizerError

__all__ = [
    'BATCH_KEYS', 'check_vocab', 'DataError', 'data_dir', 'example_length', 'HFTokenizer',
    'load_documents', 'load_or_train_tokenizer', 'load_tokenizer', 'make_pipeline',
    'make_train_iter', 'Pipeline', 'split_tokens', 'Tokenizer', 'TokenizerBase', 'TokenizerError',
    'train_tokenizer',
]
