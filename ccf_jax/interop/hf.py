"""Llama-family Hugging Face checkpoint directories <-> ccf_jax exports, whole.

    python -m ccf_jax.convert --from_hf=DIR --out=EXPORT [--param_dtype=auto|float32|bfloat16]
    python -m ccf_jax.convert --to_hf=DIR --from_export=EXPORT [--dtype=auto|bfloat16|...]

The config mapping is `hf_config` and the tensors are `hf_weights`; this module assembles whole
directories around them. An export made here is an ordinary ccf_jax export
(`ccf_jax.checkpoint.export.write_export`): `params/`, `config.json` (a full training config whose
model.* fields come from the HF config), the tokenizer (see `ccf_jax.interop.hf_tokenizer`), and
`hf/` with the original config.json and side files so `--to_hf` can reproduce them. Both
directions write through a temporary directory, so a failed conversion leaves no partial output.
"""

from __future__ import annotations

import json
import os
import shutil

from absl import logging
import numpy as np

from ccf_jax.core import config_lib
from ccf_jax.checkpoint import export as export_lib
from ccf_jax.data import tokenizer as tokenizer_lib
from ccf_jax.interop import hf_tokenizer
from ccf_jax.interop.hf_config import (CONFIG, ConvertError, hf_config_to_model_config,
                                       model_config_to_hf_config, read_hf_config)
from ccf_jax.interop.hf_weights import (load_hf_params, np_dtype, params_to_hf_state,
                                        stored_dtype, write_shards)


def hf_to_export(hf_dir, out, *, param_dtype: str = 'auto', overwrite: bool = False,
                 name: str | None = None, source_info: dict | None = None) -> str:
  """Converts a Hugging Face Llama-family directory into a ccf_jax export at `out`.

  Its config.json is a full training config (experiments/base.py) with the checkpoint's model.*
  fields and `param_dtype = dtype =` the stored dtype (float32 or bfloat16). `name` (the config's
  name) and `source_info` (export_info.json entries) describe a directory another importer
  rebuilt, such as `interop.gguf`'s. float16 weights are stored as float32; export_info.json's
  `source_dtype` keeps float16 for `export_to_hf`. An existing `out` is refused before any weight
  is read."""
  import ml_collections
  from experiments import base
  hf_dir = os.path.abspath(os.fspath(hf_dir))
  if os.path.exists(os.fspath(out)) and not overwrite:
    raise ConvertError(f'{os.fspath(out)} already exists. Fix: pass --overwrite, or choose '
                       'another --out.')
  hf = read_hf_config(hf_dir)
  fields = hf_config_to_model_config(hf, os.path.join(hf_dir, CONFIG))
  params = load_hf_params(hf_dir, dtype=None if param_dtype == 'auto' else param_dtype)
  cfg = base.get_config()
  cfg.name = name or f'hf_{os.path.basename(hf_dir.rstrip("/"))}'
  for k, v in fields.items():
    cfg.model[k] = ml_collections.ConfigDict(v) if k == 'rope_scaling' else v
  cfg.model.param_dtype = cfg.model.dtype = np.dtype(params['embed'].dtype).name
  # The context the model was pretrained on (what evaluation treats as its trained range).
  cfg.data.seq_len = fields['max_position']
  files = {f'{hf_tokenizer.EXPORT_HF_DIR}/{CONFIG}': os.path.join(hf_dir, CONFIG)}
  for name in hf_tokenizer.AUX_FILES + (hf_tokenizer.HF_FILE,):
    if os.path.isfile(os.path.join(hf_dir, name)):
      files[f'{hf_tokenizer.EXPORT_HF_DIR}/{name}'] = os.path.join(hf_dir, name)
  kind, tok_path = hf_tokenizer.find(hf_dir)
  tok_info = {'kind': kind}
  if kind is None:
    logging.warning('%s has neither tokenizer.model nor tokenizer.json: exporting weights only.',
                    hf_dir)
    cfg.data.tokenizer = ''
  else:
    tok = tokenizer_lib.load_tokenizer(tok_path)  # A file `find` saw: it exists.
    # A tokenizer may have fewer ids than the embedding (padded vocabularies), never more.
    tokenizer_lib.check_vocab(tok, fields['vocab_size'], tok_path, exact=False)
    name = (hf_tokenizer.SP_FILE if kind == hf_tokenizer.SENTENCEPIECE
            else f'{hf_tokenizer.EXPORT_HF_DIR}/{hf_tokenizer.HF_FILE}')
    files[name] = tok_path
    cfg.data.tokenizer = name  # Relative to the export directory.
    tok_info.update(tok.record(), file=name)
  try:
    config_lib.validate(cfg, training=False)  # A stored model: bfloat16 weights are fine.
  except config_lib.ConfigError as e:
    raise ConvertError(f'{hf_dir}: the converted config is not valid: {e}') from e
  info = {'source': hf_dir, 'source_format': 'huggingface',
          'architecture': (hf.get('architectures') or [hf.get('model_type')])[0],
          'hf_dtype': hf.get('dtype', hf.get('torch_dtype')), 'tokenizer': tok_info,
          'source_dtype': stored_dtype(hf_dir),
          **(source_info or {})}
  params = export_lib.move_to_cpu_device(params)  # Emptied: the weights are held once.
  export_lib.write_export(out, params, json.loads(cfg.to_json_best_effort()), files=files,
                          info=info, overwrite=overwrite)
  return os.path.abspath(os.fspath(out))


def export_to_hf(export_dir, out, *, dtype: str = 'auto', max_shard_bytes: int = 5 * 2**30,
                 overwrite: bool = False) -> str:
  """Writes a ccf_jax export as a Hugging Face directory at `out` (LlamaForCausalLM,
  MistralForCausalLM or Qwen2ForCausalLM: `hf_config.model_config_to_hf_config`). dtype 'auto'
  writes the dtype the export was imported from (export_info.json's `source_dtype`: a float16
  checkpoint comes back float16), else the stored one."""
  import ml_collections
  export_dir, out = os.path.abspath(os.fspath(export_dir)), os.path.abspath(os.fspath(out))
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise ConvertError(f'{out} already exists. Fix: pass --overwrite, or choose another --to_hf.')
  params, config, tok_path = export_lib.load_export(export_dir)
  m = ml_collections.ConfigDict(config['model'])
  if 'embed' not in params and 'decoder' in params:
    logging.warning('%s is a %s export: writing its base decoder only (the adapter has no '
                    'Hugging Face Llama equivalent; use export_adapter for it).', export_dir,
                    m.arch)
    params = params['decoder']
  state = params_to_hf_state(params, m.tie_embeddings)
  stored = np.dtype(state['model.embed_tokens.weight'].dtype).name
  if dtype == 'auto':
    info_path = os.path.join(export_dir, export_lib.INFO_JSON)
    info = json.loads(open(info_path).read()) if os.path.isfile(info_path) else {}
    dtype = info.get('source_dtype') or stored
  if dtype != stored:
    state = {k: v.astype(np_dtype(dtype)) for k, v in state.items()}
  hf_dir = os.path.join(export_dir, hf_tokenizer.EXPORT_HF_DIR)  # Original side files, if any.
  base = read_hf_config(hf_dir) if os.path.isfile(os.path.join(hf_dir, CONFIG)) else None
  hf_cfg = model_config_to_hf_config(m, base, dtype)
  tmp = f'{out}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    write_shards(state, tmp, max_shard_bytes)
    with open(os.path.join(tmp, CONFIG), 'w') as f:
      json.dump(hf_cfg, f, indent=2, sort_keys=True)
    for name in hf_tokenizer.AUX_FILES + (hf_tokenizer.HF_FILE,):
      if os.path.isfile(os.path.join(hf_dir, name)):
        shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, name))
    if tok_path is not None and tok_path.endswith(hf_tokenizer.SP_FILE):  # A tokenizer.json is
      shutil.copyfile(tok_path, os.path.join(tmp, hf_tokenizer.SP_FILE))  # among hf/'s files.
      if not os.path.isfile(os.path.join(tmp, hf_tokenizer.AUX_FILES[0])):
        hf_tokenizer.write_hf_tokenizer_config(os.path.join(tmp, hf_tokenizer.AUX_FILES[0]),
                                               tok_path)
    if os.path.exists(out):
      shutil.rmtree(out)
    os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out
