"""`python -m ccf_jax.evaluate --checkpoint=EXPORT [--only=...] [--preset=quick|full]`: held-out
evaluation of an export; writes results.json, report.md and plots (the library is `ccf_jax/eval/`)."""

from __future__ import annotations

import os

from absl import app, flags

from ccf_jax import checkpoint as ckpt_lib
from ccf_jax.core import config_lib, sharding
from ccf_jax.eval import report as eval_report
from ccf_jax.eval import runner
from ccf_jax.train import faults

_CKPT = flags.DEFINE_string('checkpoint', None, 'Export directory (python -m ccf_jax.export).')
_OUT = flags.DEFINE_string('out', None, 'Output directory (default: <checkpoint>/eval).')
_ONLY = flags.DEFINE_list('only', list(runner.SECTIONS), f'Sections to run, from {runner.SECTIONS}; merged into '
                          'an existing results.json of the same export in --out.')
_PRESET = flags.DEFINE_enum('preset', 'quick', list(runner.PRESETS), 'Evaluation size.')
_MESH = flags.DEFINE_string('mesh', '', 'Shard the export over every device as a DATA,FSDP,TENSOR mesh (one may be -1) with '
                            'the training rules, e.g. --mesh=1,-1,1 for FSDP; default: one device.')
_CORPUS = flags.DEFINE_string('corpus', None, 'Held-out text instead of the training corpus '
                              '(built-in name or path; its test split is used).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if not _CKPT.value:
    raise app.UsageError('--checkpoint=EXPORT is required (python -m ccf_jax.export makes one).')
  out = _OUT.value or os.path.join(_CKPT.value, 'eval')
  # Config, data, export and storage errors: one clear line and an exit code.
  with faults.one_line_errors('evaluate', (ValueError, ckpt_lib.CheckpointError)):
    res = runner.run(_CKPT.value, out, tuple(_ONLY.value), _PRESET.value, _CORPUS.value,
                     mesh_sizes=sharding.parse_mesh_flag(_MESH.value))
  print(eval_report.console_summary(res), flush=True)
  print(f'report: {os.path.join(out, "report.md")}', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
