"""`python -m ccf_jax.convert --from_hf=DIR --out=EXPORT` (or `--to_hf=DIR --from_export=EXPORT`):
Llama-family Hugging Face checkpoints to and from exports (the library is `ccf_jax/interop/`)."""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from ccf_jax import checkpoint as ckpt_lib
from ccf_jax.interop import hf, hf_config, hf_tokenizer, hf_weights

_FROM_HF = flags.DEFINE_string('from_hf', None, 'Hugging Face model directory to import.')
_OUT = flags.DEFINE_string('out', None, 'Export directory to create (with --from_hf).')
_TO_HF = flags.DEFINE_string('to_hf', None, 'Hugging Face directory to write (with --from_export).')
_FROM_EXPORT = flags.DEFINE_string('from_export', None, 'ccf_jax export to write as Hugging Face '
                                   '(--to_hf).')
_PARAM_DTYPE = flags.DEFINE_enum('param_dtype', 'auto', ('auto', 'float32', 'bfloat16'),
                                 '--from_hf storage dtype (auto: as stored; float16 becomes '
                                 'float32).')
_DTYPE = flags.DEFINE_enum('dtype', 'auto', ('auto',) + hf_weights.DTYPES,
                           '--to_hf tensor dtype (auto: as stored).')
_MAX_SHARD = flags.DEFINE_integer('max_shard_size_mb', 5120, '--to_hf: largest safetensors shard.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing output directory.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    if _FROM_HF.value and _OUT.value:
      out = hf.hf_to_export(_FROM_HF.value, _OUT.value, param_dtype=_PARAM_DTYPE.value,
                            overwrite=_OVERWRITE.value)
      m = json.load(open(os.path.join(out, hf_config.CONFIG)))['model']
      print(f'converted {_FROM_HF.value} -> {out} ({m["num_layers"]} layers, d={m["d_model"]}, '
            f'vocab {m["vocab_size"]}, {m["param_dtype"]})', flush=True)
    elif _TO_HF.value and _FROM_EXPORT.value:
      out = hf.export_to_hf(_FROM_EXPORT.value, _TO_HF.value, dtype=_DTYPE.value,
                            overwrite=_OVERWRITE.value, max_shard_bytes=_MAX_SHARD.value * 2**20)
      print(f'wrote Hugging Face LlamaForCausalLM {out}', flush=True)
    else:
      raise app.UsageError('use --from_hf=DIR --out=EXPORT, or --to_hf=DIR --from_export=EXPORT.')
  except (hf_config.ConvertError, hf_tokenizer.TokenizerError, ckpt_lib.CheckpointError) as e:
    sys.exit(f'convert failed: {e}')  # The message names the file and the fix; no traceback.


if __name__ == '__main__':
  app.run(main)
