"""The architecture registry: `model.arch` name -> `Arch` (module, loss, FLOPs, trainable subset).

It sits above both the plain decoder (`model/arch.py`) and CCF (`ccf/arch.py`) and imports them
directly, so every name in `config_lib.ARCHS` resolves without a plugin import. A new model family
defines its `Arch` in its own package and adds it to `_ARCHS` here (and its name to
`config_lib.ARCHS`).
"""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from ccf_jax.ccf import arch as ccf_arch
from ccf_jax.core import config_lib
from ccf_jax.core import sharding
from ccf_jax.model import decoder as model_lib
from ccf_jax.model.arch import DECODER, Arch, merge_params, split_params

__all__ = ['Arch', 'get_arch', 'merge_params', 'param_specs', 'param_shardings', 'split_params']

_ARCHS: dict[str, Arch] = {a.name: a for a in (DECODER, *ccf_arch.ARCHS)}
assert set(_ARCHS) == set(config_lib.ARCHS), (sorted(_ARCHS), config_lib.ARCHS)


def get_arch(cfg) -> Arch:
  name = cfg.model.arch
  if name not in _ARCHS:
    raise config_lib.ConfigError(f'model.arch={name!r} is not available; choose one of '
                                 f'{sorted(_ARCHS)}.')
  return _ARCHS[name]


def param_specs(cfg) -> dict:
  """PartitionSpecs of the architecture's parameters: their logical axis names mapped through
  `cfg.mesh.rules` (the one rule table training, evaluation and inference share)."""
  arch = get_arch(cfg)
  logical = model_lib.logical_specs(arch.module_config(cfg), arch.module_cls)
  return jax.tree.map(lambda s: sharding.logical_to_spec(tuple(s), cfg.mesh.rules), logical,
                      is_leaf=lambda x: isinstance(x, P))


def param_shardings(cfg, mesh) -> dict:
  """NamedShardings of the parameters on `mesh` (what `jax.device_put` or an Orbax restore
  places them into). A dimension the mesh cannot split evenly is a ConfigError naming it."""
  arch = get_arch(cfg)
  shapes = model_lib.abstract_params(arch.module_config(cfg), arch.module_cls)

  def place(path, spec, shape):
    for dim, axes in zip(shape.shape, spec):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(mesh.shape[a] for a in axes)
      if dim % ways:
        name = '/'.join(str(getattr(k, 'key', k)) for k in path)
        raise config_lib.ConfigError(
            f'parameter {name} {tuple(shape.shape)} has a dimension of {dim} that the mesh axes '
            f'{axes} ({ways} devices) cannot split evenly. Fix: choose --config.mesh.* sizes '
            f'that divide {dim}, or map that logical axis to no mesh axis in config.mesh.rules.')
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(place, param_specs(cfg), shapes,
                                          is_leaf=lambda x: isinstance(x, P))
