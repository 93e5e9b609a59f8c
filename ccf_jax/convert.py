"""`python -m ccf_jax.convert --from_hf=DIR --out=EXPORT` (or `--to_hf=DIR --from_export=EXPORT`, or
`--from_gguf=FILE --out=EXPORT`): Llama-family Hugging Face checkpoints to and from exports, and
llama.cpp GGUF files to exports (the library is `ccf_jax/interop/`)."""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

from ccf_jax import checkpoint as ckpt_lib
from ccf_jax.data import TokenizerError
from ccf_jax.interop import gguf, hf, hf_config, hf_weights

_FROM_HF = flags.DEFINE_string('from_hf', None, 'Hugging Face model directory to import.')
_FROM_GGUF = flags.DEFINE_string('from_gguf', None, 'llama.cpp GGUF file to import (F32, F16, '
                                 'BF16, Q8_0, Q4_0, Q4_1 tensors).')
_OUT = flags.DEFINE_string('out', None, 'Export directory to create (with --from_hf/--from_gguf).')
_TO_HF = flags.DEFINE_string('to_hf', None, 'Hugging Face directory to write (with --from_export).')
_FROM_EXPORT = flags.DEFINE_string('from_export', None, 'ccf_jax export to write as Hugging Face '
                                   '(--to_hf).')
_PARAM_DTYPE = flags.DEFINE_enum('param_dtype', 'auto', ('auto', 'float32', 'bfloat16'),
                                 '--from_hf/--from_gguf storage dtype (auto: as stored; '
                                 'float16 and quantised tensors become float32).')
_DTYPE = flags.DEFINE_enum('dtype', 'auto', ('auto',) + hf_weights.DTYPES,
                           '--to_hf tensor dtype (auto: as stored).')
_MAX_SHARD = flags.DEFINE_integer('max_shard_size_mb', 5120, '--to_hf: largest safetensors shard.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing output directory.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # One summary line, not Orbax's INFO; warnings stay.
    logging.set_verbosity(logging.WARNING)
  try:
    t0 = time.perf_counter()
    if (_FROM_HF.value or _FROM_GGUF.value) and _OUT.value:
      src = _FROM_HF.value or _FROM_GGUF.value
      to_export = hf.hf_to_export if _FROM_HF.value else gguf.gguf_to_export
      out = to_export(src, _OUT.value, param_dtype=_PARAM_DTYPE.value, overwrite=_OVERWRITE.value)
      m = json.load(open(os.path.join(out, hf_config.CONFIG)))['model']
      types = json.load(open(os.path.join(out, 'export_info.json'))).get('gguf_tensor_types')
      types = (f'; {", ".join(f"{n} {k}" for k, n in sorted(types.items()))} tensors'
               if types else '')
      print(f'converted {src} -> {out} ({m["num_layers"]} layers, d={m["d_model"]}, '
            f'vocab {m["vocab_size"]}, {m["param_dtype"]}{types}) in '
            f'{time.perf_counter() - t0:.1f} s', flush=True)
    elif _TO_HF.value and _FROM_EXPORT.value:
      out = hf.export_to_hf(_FROM_EXPORT.value, _TO_HF.value, dtype=_DTYPE.value,
                            overwrite=_OVERWRITE.value, max_shard_bytes=_MAX_SHARD.value * 2**20)
      hf_cfg = json.load(open(os.path.join(out, hf_config.CONFIG)))
      print(f'wrote Hugging Face {hf_cfg["architectures"][0]} '
            f'({hf_cfg.get("dtype") or hf_cfg.get("torch_dtype")}) {out}', flush=True)
    else:
      raise app.UsageError('use --from_hf=DIR --out=EXPORT, --from_gguf=FILE --out=EXPORT, or '
                           '--to_hf=DIR --from_export=EXPORT.')
  except (hf_config.ConvertError, TokenizerError, ckpt_lib.CheckpointError) as e:
    sys.exit(f'convert failed: {e}')  # The message names the file and the fix; no traceback.


if __name__ == '__main__':
  app.run(main)
