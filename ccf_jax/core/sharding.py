"""Device mesh and logical-axis sharding: one rule table maps model axis names to mesh axes.

Model code never names mesh axes. Parameters carry logical names in their `out_sharding` metadata
(`batch`, `segment`, `length`, `memory`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`,
`layers`) and activations are annotated with `constrain(x, names)`. The table in
`config.mesh.rules` decides where each goes on the (data, fsdp, tensor) mesh, so a new parallelism
layout is a config change, not a model change. A mesh axis is used at most once per array: the first
logical axis that claims it wins (so `batch -> (data, fsdp)` and `embed -> fsdp` can coexist on an
activation of shape [batch, length, embed]: embed is then replicated there).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

_RULES: list[Sequence[tuple[str, Any]]] = []


class MeshError(ValueError):
  """A mesh that does not fit the devices or the model."""


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Mesh (data, fsdp, tensor) sizes with at most one -1 filled in; raises MeshError on mismatch."""
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  if sizes.count(-1) > 1:
    raise MeshError(f'mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.')
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f'mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise MeshError(
          f'mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {known}, which does not '
          f'divide the {num_devices} selected devices. Fix: choose --config.mesh.* sizes whose '
          f'product divides {num_devices}, or set --config.mesh.num_devices.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise MeshError(
        f'mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but {num_devices} are '
        f'selected. Fix: make --config.mesh.data*fsdp*tensor equal {num_devices} (one may be -1), '
        f'or set --config.mesh.num_devices={math.prod(sizes)}.')
  return tuple(sizes)  # type: ignore[return-value]


def parse_mesh_flag(text: str) -> tuple[int, int, int] | None:
  """`--mesh=DATA,FSDP,TENSOR` (one may be -1: the rest of the devices) -> sizes; '' -> None."""
  if not text:
    return None
  try:
    sizes = tuple(int(x) for x in text.split(','))
  except ValueError:
    sizes = ()
  if len(sizes) != 3:
    raise MeshError(f'--mesh={text}: expected three sizes DATA,FSDP,TENSOR (e.g. --mesh=1,-1,1 '
                    'shards the parameters FSDP over every device).')
  return sizes  # type: ignore[return-value]


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the (data, fsdp, tensor) mesh with Auto axis types (GSPMD propagation)."""
  all_devices = list(devices if devices is not None else jax.devices())
  n = int(mesh_cfg.num_devices) or len(all_devices)
  if n > len(all_devices):
    raise MeshError(f'mesh.num_devices={n} but only {len(all_devices)} devices are visible.')
  shape = resolve_mesh_shape(mesh_cfg, n)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=all_devices[:n])


def logical_to_spec(names: Sequence[str | None] | None, rules) -> P:
  """Maps a tuple of logical axis names to a PartitionSpec of mesh axes under `rules`."""
  if names is None:
    return P()
  table = {k: v for k, v in rules}
  used: set[str] = set()
  out = []
  for name in names:
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise KeyError(f'logical axis {name!r} has no rule in config.mesh.rules')
    if target is None:
      out.append(None)
      continue
    axes = (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(axes if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


def mesh_axis_size(mesh: jax.sharding.Mesh, spec_entry) -> int:
  """Number of shards along one PartitionSpec entry."""
  if spec_entry is None:
    return 1
  axes = (spec_entry,) if isinstance(spec_entry, str) else spec_entry
  return math.prod(mesh.shape[a] for a in axes)


@contextlib.contextmanager
def use_rules(rules):
  """Activates a logical rule table for `constrain` (nestable)."""
  _RULES.append(tuple(tuple(r) for r in rules))
  try:
    yield
  finally:
    _RULES.pop()


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules):
  """Sets the mesh (jax.set_mesh) and the logical rules together."""
  with jax.set_mesh(mesh), use_rules(rules):
    yield


def active_rules():
  """The rule table `constrain` uses now (None outside `use_rules` / `use_mesh`)."""
  return _RULES[-1] if _RULES else None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `use_mesh` (unit tests, eager code)."""
  if not _RULES:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, _RULES[-1]))


def tree_shardings(logical_specs, mesh: jax.sharding.Mesh, rules):
  """NamedShardings for a pytree of logical PartitionSpecs (e.g. nnx.get_partition_spec output)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_spec(tuple(s), rules)),
                      logical_specs, is_leaf=lambda s: isinstance(s, P))


def batch_spec(rules, names=('batch', 'length')) -> P:
  return logical_to_spec(names, rules)
