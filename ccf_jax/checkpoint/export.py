"""Export a trained checkpoint as a self-contained directory for evaluation and generation.

    python -m ccf_jax.export --workdir=DIR --out=EXPORT [--step=N] [--tokenizer=PATH] [--overwrite]

An export directory holds:

  params/            params-only Orbax checkpoint of the nested parameter dict (no optimizer state:
                     a third of the size of a training checkpoint with Adam).
  config.json        the training config (from the checkpoint's `config` item), so a loader can
                     rebuild the model without the original experiment file.
  tokenizer.model    the sentencepiece model the run used (plus tokenizer.json if it had a sidecar),
                     so token ids in the export always mean what they meant in training;
  hf/tokenizer.json  or, for a run on a Hugging Face tokenizer, that file with its
                     tokenizer_config.json (special tokens, chat template) and
                     special_tokens_map.json.
  export_info.json   step, source checkpoint, versions, per-array checksums of params, and
                     `tokenizer`: kind ('sentencepiece' | 'hf'), file, sha256, vocab size and
                     special ids, so that a run starting from the export can refuse another one.

Why it is built this way:
  * Params are restored with Orbax partial restore to host numpy, so exporting needs neither the
    training mesh nor the model code, and never reads the optimizer moments.
  * The directory is assembled under a hidden temporary name next to `out` and renamed into place
    at the end, so a crash leaves no half-written export where a loader would find it.
  * `load_export` verifies the checksums recorded at export time (Orbax itself does not detect a
    flipped byte in array data) and, given abstract params with shardings, restores straight onto
    the target mesh.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from typing import Optional

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from ccf_jax import checkpoint as ckpt_lib
from ccf_jax.data import hf_tokenizer as hf_tok_lib
from ccf_jax.data import tokenizer as tok_lib

PARAMS, CONFIG_JSON, INFO_JSON = 'params', 'config.json', 'export_info.json'
TOKENIZER_MODEL, TOKENIZER_JSON = 'tokenizer.model', 'tokenizer.json'
HF_TOKENIZER = 'hf/tokenizer.json'  # Never top-level: tokenizer.json is the sidecar above.
HF_TOKENIZER_SIDE_FILES = (hf_tok_lib.CONFIG_FILE, 'special_tokens_map.json')
FORMAT_VERSION = 1


class ExportError(ckpt_lib.CheckpointError):
  """An export could not be written or read; the message names the path and the fix."""


def export_cmd(out='EXPORT_DIR', workdir='WORKDIR'):
  return f'python -m ccf_jax.export --workdir={workdir} --out={out}'


# ----------------------------------------------------------------------------------- tokenizer
def _tokenizer_candidates(config: dict, metadata: dict, override: Optional[str]) -> list:
  if override:
    return [override]
  extra = metadata.get('extra') or {}
  data = config.get('data') or {}
  return [p for p in (extra.get('tokenizer_path'), data.get('tokenizer')) if p]


def _sidecar(model_path: epath.Path) -> Optional[epath.Path]:
  for cand in (model_path.with_suffix('.json'), epath.Path(str(model_path) + '.json')):
    if cand.exists():
      return cand
  return None


def _resolve_tokenizer(config, metadata, override, step_dir) -> Optional[epath.Path]:
  candidates = _tokenizer_candidates(config, metadata, override)
  for p in candidates:
    path = epath.Path(os.path.expanduser(p))
    if path.is_file():
      return path
  if candidates:
    raise ExportError(
        f'The tokenizer recorded for {step_dir} does not exist: {", ".join(candidates)}. Fix: pass '
        '--tokenizer=PATH (the tokenizer.model or tokenizer.json the run trained with).')
  return None


def tokenizer_files(tok) -> dict:
  """{name inside an export: source file} for a loaded tokenizer (`tok_lib.load_tokenizer`)."""
  src = epath.Path(tok.model_path)
  if tok.kind == tok_lib.SENTENCEPIECE:
    files = {TOKENIZER_MODEL: src}
    side = _sidecar(src)
    if side is not None:
      files[TOKENIZER_JSON] = side
    return files
  files = {HF_TOKENIZER: src}
  for name in HF_TOKENIZER_SIDE_FILES:
    if (src.parent / name).exists():
      files[f'{epath.Path(HF_TOKENIZER).parent}/{name}'] = src.parent / name
  return files


def tokenizer_of(path) -> tuple[Optional[str], Optional[dict]]:
  """(tokenizer file, recorded identity) of an export, without reading its parameters.

  The identity is export_info.json's `tokenizer` entry (kind, file, sha256, vocab size, special
  ids); exports written before it was recorded give their file's identity, computed here."""
  path = _existing(path)
  info_path = path / INFO_JSON
  info = _read_json(info_path, 'export info', path) if info_path.exists() else {}
  rec = info.get('tokenizer') if isinstance(info.get('tokenizer'), dict) else None
  names = ([rec['file']] if rec and rec.get('file') else []) + [TOKENIZER_MODEL, HF_TOKENIZER]
  for name in names:
    if (path / name).is_file():
      file = str(path / name)
      if not rec or not rec.get('sha256'):
        tok = tok_lib.load_tokenizer(file)
        rec = dict(tok.record(), file=name)
      return file, rec
  return None, None


# -------------------------------------------------------------------------------------- export
def _params_fingerprint(params) -> dict:
  return ckpt_lib.fingerprint({PARAMS: params})


def move_to_cpu_device(params: dict) -> dict:
  """A nested dict of host numpy params (an importer's) as jax arrays on the CPU device, moved
  one leaf at a time and removed from `params` as they go, so the model is held once plus one
  leaf. Orbax copies numpy leaves whole into its serialisation buffers before writing any (the
  model's size again on top of an import's peak) but streams jax.Arrays. The CPU device, not the
  default one, so a converter running beside an accelerator never moves weights onto it."""
  try:
    cpu = jax.local_devices(backend='cpu')[0]
  except RuntimeError:  # JAX_PLATFORMS names no CPU: Orbax gets the numpy params as they are.
    return params
  out = {}
  for k in list(params):
    v = params.pop(k)
    out[k] = move_to_cpu_device(v) if isinstance(v, dict) else jax.device_put(v, cpu)
    if not isinstance(v, dict):
      out[k].block_until_ready()  # The copy is asynchronous: finish it before dropping `v`.
  return out


def _check_out(out_dir: epath.Path, overwrite: bool):
  if out_dir.exists() and not overwrite:
    raise ExportError(f'{out_dir} already exists. Fix: pass --overwrite, or choose another --out.')
  if out_dir.exists() and not (out_dir / INFO_JSON).exists() and any(out_dir.iterdir()):
    raise ExportError(f'{out_dir} exists and is not a ccf_jax export; refusing to replace it even '
                      'with --overwrite. Fix: choose another --out.')


def write_export(out_dir, params, config: dict, *, files: Optional[dict] = None,
                 info: Optional[dict] = None, overwrite: bool = False) -> epath.Path:
  """Writes an export directory from in-memory params (the one writer every exporter shares).

  `config` is the training-config dict for config.json; `files` maps names inside the export
  (e.g. 'tokenizer.model', 'hf/tokenizer.json') to source files copied verbatim; `info` entries
  are added to export_info.json next to the format, time, parameter count and checksums. The
  directory is assembled under a temporary name and renamed into place (see the module doc).
  """
  out_dir = ckpt_lib.abspath(out_dir)
  _check_out(out_dir, overwrite)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_dir.parent / f'.{out_dir.name}.tmp-{os.getpid()}-{time.time_ns()}'
  try:
    tmp.mkdir()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / PARAMS, params)
    ckptr.wait_until_finished()
    ckptr.close()
    (tmp / CONFIG_JSON).write_text(json.dumps(config, indent=2))
    for name, src in (files or {}).items():
      (tmp / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(src, tmp / name)
    info = {
        'format': FORMAT_VERSION, **(info or {}),
        'exported_at': datetime.datetime.now(datetime.timezone.utc).isoformat(),
        'num_params': int(sum(np.size(x) for x in jax.tree.leaves(params))),
        'fingerprint': _params_fingerprint(params)}
    (tmp / INFO_JSON).write_text(json.dumps(info, indent=2))
    if out_dir.exists():  # overwrite: swap in the new one, then drop the old.
      old = out_dir.parent / f'.{out_dir.name}.old-{time.time_ns()}'
      out_dir.rename(old)
      tmp.rename(out_dir)
      shutil.rmtree(old)
    else:
      tmp.rename(out_dir)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def export(src, out_dir, step: Optional[int] = None, *, tokenizer: Optional[str] = None,
           require_tokenizer: bool = True, overwrite: bool = False) -> epath.Path:
  """Writes an export of the latest good (or the given) checkpoint under `src` to `out_dir`.

  `src` is a training workdir, its checkpoints/ directory or one step directory. Without `step`,
  a corrupt latest checkpoint is skipped with a warning (as on resume). Returns `out_dir`.
  """
  out_dir = ckpt_lib.abspath(out_dir)
  _check_out(out_dir, overwrite)
  candidates = ckpt_lib.resolve_step_dirs(src, step)
  explicit = step is not None or len(candidates) == 1
  params = config = metadata = step_dir = None
  for i, (_, step_dir) in enumerate(candidates):
    try:
      params, metadata = ckpt_lib.restore_params(step_dir)
      config = ckpt_lib.read_json_item(step_dir, ckpt_lib.CONFIG)
      break
    except ckpt_lib.CorruptCheckpointError as e:
      if explicit or i == len(candidates) - 1:
        raise
      logging.warning('Checkpoint %s is corrupt (%s); exporting the previous one instead.',
                      step_dir, e)
  tok_path = _resolve_tokenizer(config, metadata, tokenizer, step_dir)
  if tok_path is None and require_tokenizer:
    raise ExportError(
        f'No tokenizer is recorded for {step_dir} (neither metadata extra["tokenizer_path"] nor '
        'config data.tokenizer). Fix: pass --tokenizer=PATH (the tokenizer.model or '
        'tokenizer.json the run trained with), or --norequire_tokenizer to export params and '
        'config only.')
  files, record = {}, None
  if tok_path is not None:
    tok = tok_lib.load_tokenizer(str(tok_path))
    vocab = (config.get('model') or {}).get('vocab_size')
    if vocab is not None:
      tok_lib.check_vocab(tok, int(vocab), f'the tokenizer {tok_path} of {step_dir}', exact=False)
    files = tokenizer_files(tok)
    record = dict(tok.record(), file=next(iter(files)))
  info = {'step': metadata.get('step'), 'source': str(step_dir),
          'tokens_seen': metadata.get('tokens_seen'),
          'tokenizer_source': str(tok_path) if tok_path is not None else None,
          'tokenizer': record, 'train_versions': metadata.get('versions')}
  write_export(out_dir, params, config, files=files, info=info, overwrite=overwrite)
  logging.info('Exported step %s of %s to %s (%d params).', info['step'], step_dir, out_dir,
               sum(np.size(x) for x in jax.tree.leaves(params)))
  return out_dir


# ---------------------------------------------------------------------------------------- load
def _read_json(path: epath.Path, what: str, export_dir) -> dict:
  if not path.exists():
    raise ExportError(f'{path} is missing: {export_dir} is incomplete. Fix: re-export with '
                      f'{export_cmd(export_dir)} --overwrite.')
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ExportError(f'{path} ({what}) is not valid JSON ({e}). Fix: re-export with '
                      f'{export_cmd(export_dir)} --overwrite.') from e


def _existing(path) -> epath.Path:
  path = ckpt_lib.abspath(path)
  if not path.exists():
    raise ExportError(f'Export directory {path} does not exist. Fix: create it from a training '
                      f'run with {export_cmd(path)}.')
  return path


def load_export(path, abstract_params=None):
  """(params, config_dict, tokenizer_path or None) from an export directory. The tokenizer is
  a sentencepiece .model or a Hugging Face tokenizer.json (`tokenizer_of`); load it with
  `ccf_jax.data.load_tokenizer`.

  Without `abstract_params` the params are host numpy arrays. With a pytree of ShapeDtypeStruct
  (with `.sharding`) they are restored directly with those shardings (and cast to those dtypes).
  """
  path = _existing(path)
  if not (path / PARAMS).exists():
    hint = ''
    if (path / ckpt_lib.CHECKPOINTS_SUBDIR).exists() or ckpt_lib.is_step_dir(path):
      hint = ' It looks like a training workdir or checkpoint, not an export.'
    raise ExportError(f'{path} has no {PARAMS}/ directory, so it is not a ccf_jax export.{hint} '
                      f'Fix: {export_cmd(workdir=path)}.')
  config = _read_json(path / CONFIG_JSON, 'training config', path)
  info = _read_json(path / INFO_JSON, 'export info', path)
  fix = f'rebuild the model with the config in {path / CONFIG_JSON}'
  try:
    saved = ckpt_lib.saved_arrays(path / PARAMS)
    if abstract_params is not None:
      ckpt_lib.check_compatible(path / PARAMS, saved, abstract_params, fix=fix)
      with ckpt_lib.quiet_failed_reads():
        params = ocp.StandardCheckpointer().restore(path / PARAMS, abstract_params)
    else:
      tree = ckpt_lib.tree_metadata(path / PARAMS)
      restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      with ckpt_lib.quiet_failed_reads():
        params = ocp.PyTreeCheckpointer().restore(path / PARAMS, args=ocp.args.PyTreeRestore(
            item=tree, restore_args=restore_args))
  except ckpt_lib.CheckpointMismatchError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(f'{path / PARAMS} is unreadable ({ckpt_lib.short_error(e)}). Fix: '
                      f're-export with {export_cmd(path)} --overwrite.') from e
  try:
    saved_dtypes = {f'{PARAMS}.{k}': v[1] for k, v in saved.items()}
    ckpt_lib.verify_fingerprint({PARAMS: params}, info.get('fingerprint') or {},
                                str(path / PARAMS), saved_dtypes)
  except ckpt_lib.CorruptCheckpointError as e:
    raise ExportError(f'{e} Fix: re-export with {export_cmd(path)} --overwrite.') from e
  return params, config, tokenizer_of(path)[0]


# ----------------------------------------------------------------------------------------- CLI


def load_export_sharded(path, mesh_sizes):
  """(params, config dict, tokenizer path, mesh): the export restored straight into the
  parameter shardings of a (data, fsdp, tensor) = `mesh_sizes` mesh over all devices, with the
  rule table the run trained with (config.mesh.rules), so an export larger than one device (or
  one host's memory) is read already split. The returned config dict records that mesh."""
  import ml_collections
  from ccf_jax import registry
  from ccf_jax.core import sharding
  from ccf_jax.model import decoder as model_lib
  path = _existing(path)
  config = ml_collections.ConfigDict(_read_json(path / CONFIG_JSON, 'training config', path))
  m = config.mesh
  m.data, m.fsdp, m.tensor = (int(x) for x in mesh_sizes)
  m.num_devices, m.distributed = 0, False
  mesh = sharding.make_mesh(m)
  arch = registry.get_arch(config)
  shapes = model_lib.abstract_params(arch.module_config(config), arch.module_cls)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, registry.param_shardings(config, mesh))
  params, _, tok = load_export(path, abstract)
  return params, config.to_dict(), tok, mesh
