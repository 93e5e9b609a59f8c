"""`python -m ccf_jax.generate --checkpoint=EXPORT --prompt_file=FILE`: streaming generation from an
export (the library, with the notebook API `Generator`, is `ccf_jax/inference/generator.py`)."""

from __future__ import annotations

import codecs
import dataclasses
import json
import sys

from absl import app, flags

from ccf_jax.checkpoint import CheckpointError
from ccf_jax.core import config_lib, sharding
from ccf_jax.data import DataError
from ccf_jax.inference.checks import InferenceError
from ccf_jax.inference.generator import Generator, read_prompts
from ccf_jax.train import faults

_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'Export directory (python -m ccf_jax.export).')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', None,
                                   'A text file (one prompt) or .jsonl (one per line).')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 128,
                                       'Tokens to generate per prompt at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'Sampling temperature; 0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens (0 = all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass (1 = off).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_STOP = flags.DEFINE_list('stop', [], 'Extra single-token stop strings (eos always stops).')
_MEMORY = flags.DEFINE_bool('memory', True, 'CCF: read earlier segments through memory '
                            '(--nomemory: each segment alone).')
_MEMORY_WINDOW = flags.DEFINE_integer('memory_window', None, 'CCF: attend to the memory of the '
                                      'last W segments (ccf.memory_window; bounds positions, so '
                                      'any length works).')
_RATIO = flags.DEFINE_integer('ratio', None,
                              'CCF: compression ratio, one of the model\'s ccf.ratios.')
_MAX_POSITION = flags.DEFINE_integer('max_position', None, 'Override model.max_position '
                                     '(positions beyond training: only if the model '
                                     'extrapolates).')
_CHAT = flags.DEFINE_bool('chat', False, 'Format each prompt as a user message with the chat '
                          "template of the export's tokenizer_config.json (needs jinja2).")
_MESH = flags.DEFINE_string('mesh', '', 'Shard the export over every device as a DATA,FSDP,TENSOR mesh (one may be -1) with '
                            'the training rules, e.g. --mesh=1,-1,1 for FSDP; default: one device.')
_OUTPUT = flags.DEFINE_string('output', None, 'Also write the completions as JSONL here.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if not _CHECKPOINT.value or not _PROMPT_FILE.value:
    raise app.UsageError('--checkpoint=EXPORT and --prompt_file=FILE are required.')
  with faults.one_line_errors('generate', (InferenceError, CheckpointError, DataError,
                                           config_lib.ConfigError, sharding.MeshError)):
    gen = Generator.from_export(_CHECKPOINT.value, sharding.parse_mesh_flag(_MESH.value),
                                memory=_MEMORY.value,
                                memory_window=_MEMORY_WINDOW.value, ratio=_RATIO.value,
                                max_position=_MAX_POSITION.value)
    stop = [codecs.decode(s, 'unicode_escape') for s in _STOP.value]  # Shell --stop='\n': newline.
    out = gen.generate(read_prompts(_PROMPT_FILE.value), _MAX_NEW_TOKENS.value,
                       temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                       stop=stop, seed=_SEED.value, chat=_CHAT.value)
  for i, c in enumerate(out):
    print(f'=== completion {i} ({c.finish_reason}, {len(c.tokens)} tokens) ===\n{c.text}')
  print(json.dumps({'stats': gen.last_stats}), file=sys.stderr, flush=True)
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w', encoding='utf-8') as fh:
      for c in out:
        fh.write(json.dumps(dataclasses.asdict(c)) + '\n')


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
