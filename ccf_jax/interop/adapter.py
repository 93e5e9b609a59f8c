"""A CCF adapter exported on its own, with a checksummed reference to the base it was trained on.

The adapter (LoRA weights, memory and repeat vectors: whatever the architecture trains in adapter
mode) is small next to its base, and the base is usually a public checkpoint, so `export_adapter`
writes only the adapter and records where the base came from (`base_ref`) and a checksum of the
base arrays it was trained on. `load_adapter` rebuilds the full parameters from that base (a ccf_jax
export, or a Hugging Face directory through `hf_weights.load_hf_params`) and refuses a base whose
checksum differs: an adapter on another base computes something else without any error.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ccf_jax import checkpoint as ckpt_lib
from ccf_jax import registry as arch_lib
from ccf_jax.checkpoint import export as export_lib
from ccf_jax.interop.hf_config import ConvertError
from ccf_jax.interop.hf_weights import load_hf_params
from ccf_jax.model import layers


def _adapter_split(cfg, params):
  """(adapter, base) params: what the architecture trains in adapter mode, and the rest."""
  import ml_collections
  acfg = ml_collections.ConfigDict(cfg.to_dict())
  acfg.ccf.mode = 'adapter'
  arch = arch_lib.get_arch(acfg)
  adapter, base = arch_lib.split_params(acfg, arch, params)
  if not adapter or not base:
    raise ConvertError(f'model.arch={cfg.model.arch!r} has no separate adapter (adapter mode '
                       'trains everything or nothing). Fix: export the whole model with '
                       '`python -m ccf_jax.export`.')
  return adapter, base


def export_adapter(params, out, base_ref: str, cfg, *, overwrite: bool = False) -> str:
  """Writes only the adapter of full `params` (config `cfg`) as an export at `out`.

  `base_ref` names the base (a Hugging Face directory or a ccf_jax export); a checksum of the
  base arrays inside `params` is recorded so `load_adapter` can refuse a different base.
  """
  import jax
  adapter, base = _adapter_split(cfg, params)
  info = {'kind': 'ccf_adapter', 'base_ref': os.fspath(base_ref),
          'base_fingerprint': ckpt_lib.fingerprint(base)}
  export_lib.write_export(out, jax.device_get(adapter), json.loads(cfg.to_json_best_effort()),
                          info=info, overwrite=overwrite)
  return os.path.abspath(os.fspath(out))


def read_adapter(path) -> tuple[dict, dict, dict]:
  """(adapter params, config dict, export info) of an adapter export."""
  adapter, config, _ = export_lib.load_export(path)
  with open(os.path.join(os.fspath(path), export_lib.INFO_JSON)) as f:
    info = json.load(f)
  if info.get('kind') != 'ccf_adapter':
    raise ConvertError(f'{path} is a full export, not an adapter. Fix: load it with '
                       'ccf_jax.export.load_export, or pass an export_adapter directory.')
  return adapter, config, info


def load_adapter(path, base=None):
  """(full params, config) from an adapter export on its base.

  `base`: None (the recorded `base_ref`), a directory (HF or export), or plain decoder params.
  The base is mapped in with the architecture's `from_base_params` and must have the checksum
  recorded at export time.
  """
  import jax
  import ml_collections
  adapter, config, info = read_adapter(path)
  cfg = ml_collections.ConfigDict(config)
  ref = info['base_ref'] if base is None else base
  where = os.fspath(ref) if isinstance(ref, (str, os.PathLike)) else 'the given base params'
  if isinstance(ref, (str, os.PathLike)):
    if not os.path.isdir(ref):
      raise ConvertError(f'the base of adapter {path} ({ref}) does not exist. Fix: pass '
                         'base=PATH to the Hugging Face directory or export it was trained on.')
    ref = os.fspath(ref)  # An export (params/) or a Hugging Face directory.
    base = (export_lib.load_export(ref)[0] if os.path.isdir(os.path.join(ref, export_lib.PARAMS))
            else load_hf_params(ref, cfg.model))
  dt = layers.DTYPES[cfg.model.param_dtype]
  base = jax.tree.map(lambda a: np.asarray(a).astype(dt), base)
  arch = arch_lib.get_arch(cfg)
  full = arch.from_base_params(cfg, base) if arch.from_base_params else base
  _, frozen = _adapter_split(cfg, full)
  want, got = info['base_fingerprint'], ckpt_lib.fingerprint(frozen)
  bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
  if bad:
    raise ConvertError(f'adapter {path} was trained on a different base than {where}: '
                       f'{len(bad)} base array(s) differ ({", ".join(bad[:4])}). Fix: pass the '
                       f'base it was exported with (recorded base_ref: {info["base_ref"]}).')
  return arch_lib.merge_params(adapter, frozen), cfg
