"""`python -m ccf_jax.export --workdir=DIR --out=EXPORT [--step=N]`: a params-only export of a
training run (the library is `ccf_jax/checkpoint/export.py`)."""

from __future__ import annotations

import json

from absl import app, flags

from ccf_jax import checkpoint as ckpt_lib
from ccf_jax.data import DataError
from ccf_jax.checkpoint import export as export_lib
from ccf_jax.train import faults

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir, its checkpoints/ dir, or a step dir.')
_OUT = flags.DEFINE_string('out', None, 'Export directory to create.')
_STEP = flags.DEFINE_integer('step', None, 'Step to export (default: the latest good one).')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'Tokenizer to bundle: a sentencepiece .model or '
                                 'a Hugging Face tokenizer.json (default: the one recorded in the '
                                 'checkpoint).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out directory.')
_REQUIRE_TOKENIZER = flags.DEFINE_bool('require_tokenizer', True, 'Fail if no tokenizer is found '
                                       '(--norequire_tokenizer exports params and config only).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError('--workdir and --out are required: ' + export_lib.export_cmd())
  # The messages name the path and the fix: one line and an exit code, no traceback.
  with faults.one_line_errors('export', (ckpt_lib.CheckpointError, DataError),
                              prefix='export failed: '):
    out = export_lib.export(_WORKDIR.value, _OUT.value, _STEP.value, tokenizer=_TOKENIZER.value,
                 require_tokenizer=_REQUIRE_TOKENIZER.value, overwrite=_OVERWRITE.value)
  info = json.loads((out / export_lib.INFO_JSON).read_text())
  print(f'exported step {info["step"]} ({info["num_params"]:,} params) from {info["source"]} '
        f'to {out}', flush=True)


if __name__ == '__main__':
  app.run(main)
