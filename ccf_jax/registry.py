"""The architecture registry: `model.arch` name -> `Arch` (module, loss, FLOPs, trainable subset).

It sits above both the plain decoder (`model/arch.py`) and CCF (`ccf/arch.py`) and imports them
directly, so every name in `config_lib.ARCHS` resolves without a plugin import. A new model family
defines its `Arch` in its own package and adds it to `_ARCHS` here (and its name to
`config_lib.ARCHS`).
"""

from __future__ import annotations

from ccf_jax.ccf import arch as ccf_arch
from ccf_jax.core import config_lib
from ccf_jax.model.arch import DECODER, Arch, merge_params, split_params

__all__ = ['Arch', 'get_arch', 'merge_params', 'split_params']

_ARCHS: dict[str, Arch] = {a.name: a for a in (DECODER, *ccf_arch.ARCHS)}
assert set(_ARCHS) == set(config_lib.ARCHS), (sorted(_ARCHS), config_lib.ARCHS)


def get_arch(cfg) -> Arch:
  name = cfg.model.arch
  if name not in _ARCHS:
    raise config_lib.ConfigError(f'model.arch={name!r} is not available; choose one of '
                                 f'{sorted(_ARCHS)}.')
  return _ARCHS[name]
