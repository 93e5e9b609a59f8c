r"""Trains a sentencepiece tokenizer offline.

  python -m ccf_jax.tokenizer --corpus=shakespeare --vocab_size=2048 --out=/tmp/tok [--type=bpe]

`--corpus` is the built-in name, a path (directory of .txt / .jsonl / .array_record files, or one
such file), or a weighted mixture 'a:0.5,b:0.5' (weights are ignored: the union is used). The
model is trained on the TRAIN split only (held-out text never shapes the vocabulary), with the
exact round-trip options described in ccf_jax/data/tokenizer.py, and written to `<out>.model` with
its special ids in `<out>.json`. Afterwards it checks `decode(encode(t)) == t` on every training
document and prints the result. Point `--config.data.tokenizer=<out>.model` at it (and set
`--config.model.vocab_size` to the same size).
"""

import time

from absl import app
from absl import flags
import ml_collections

from ccf_jax.data import corpus as corpus_lib
from ccf_jax.data import tokenizer as tokenizer_lib
from ccf_jax.train import faults

_CORPUS = flags.DEFINE_string('corpus', 'shakespeare', 'Built-in corpus name, path, or mixture.')
_VOCAB = flags.DEFINE_integer('vocab_size', 2048, 'Vocabulary size (pieces, specials included).')
_OUT = flags.DEFINE_string('out', None, 'Output path; .model and .json are written.', required=True)
_TYPE = flags.DEFINE_enum('type', 'bpe', list(tokenizer_lib.MODEL_TYPES), 'Model type.')
_TEXT_FIELD = flags.DEFINE_string('text_field', 'text', 'JSONL field holding the text.')
_REPLACE = flags.DEFINE_bool('replace_invalid_utf8', False, 'Replace bad bytes (else error).')


def data_config(corpus: str, text_field: str = 'text', replace_invalid_utf8: bool = False):
  """The minimal config the corpus readers need."""
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  c.data.corpus = '' if ':' in corpus and ',' in corpus else corpus
  c.data.mixture = corpus if not c.data.corpus else ''
  if ',' in corpus and ':' not in corpus:  # A plain list: equal weights.
    c.data.corpus, c.data.mixture = '', ','.join(f'{x}:1' for x in corpus.split(','))
  c.data.text_field = text_field
  c.data.replace_invalid_utf8 = replace_invalid_utf8
  return c


def main(argv):
  del argv
  with faults.one_line_errors('tokenizer', (corpus_lib.DataError,)):
    _train(_OUT.value)


def _train(out: str):
  cfg = data_config(_CORPUS.value, _TEXT_FIELD.value, _REPLACE.value)
  t0 = time.time()
  docs = [d.text for s in corpus_lib.corpus_specs(cfg) for d in corpus_lib.read_split(s, 'train',
                                                                                        cfg)]
  t1 = time.time()
  tok = tokenizer_lib.train_tokenizer(docs, _VOCAB.value, out, _TYPE.value,
                                      meta=dict(trained_on=_CORPUS.value, split='train'))
  t2 = time.time()
  ids = tok.encode_batch(docs)
  bad = sum(tok.decode(i) != d for i, d in zip(ids, docs))
  n_tok, n_chr = sum(len(i) for i in ids), sum(len(d) for d in docs)
  print(f'read {len(docs)} train documents ({n_chr} chars) in {t1 - t0:.1f}s; trained '
        f'{_TYPE.value} vocab {tok.vocab_size} in {t2 - t1:.1f}s')
  print(f'wrote {tok.model_path} and {tokenizer_lib.sidecar_path(tok.model_path)}')
  print(f'special ids: {tok.special_ids()}')
  print(f'{n_tok} tokens ({n_chr / max(n_tok, 1):.2f} chars/token); exact round trip on '
        f'{len(docs) - bad}/{len(docs)} documents')
  if bad:
    raise SystemExit(f'{bad} documents did not round-trip exactly')


if __name__ == '__main__':
  app.run(main)
