"""An attention kernel run on each device's own batch rows and heads (`shard_map`).

Why: some kernels cannot be left to XLA's SPMD partitioner. A Mosaic kernel (splash.py) is a custom
call XLA cannot partition at all; the rows kernel (causal_rows.py) maps over (batch row, kv head)
pairs with `lax.map`, and a scan over a sharded axis makes the partitioner all-gather it (every
device would then hold, and compute, the whole batch). Under `shard_map` each device runs the
kernel on its own shard, with no communication: attention is independent per batch row and head.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from ccf_jax.core import sharding
from ccf_jax.model.spans import Spans


def per_device(fn, q, k, v, mask):
  """fn(q, k, v, mask) on each device's shard under `shard_map` when a mesh of several devices
  is in scope (`sharding.use_mesh`), else fn itself. The batch axis takes the mesh axes of the
  logical 'batch' axis and heads those of 'heads' / 'kv_heads' (both split alike, so every query
  head finds its key/value head on its device), each only where it divides the dimension;
  lengths, head_dim and the mask's per-query and per-key axes stay whole."""
  mesh, rules = jax.sharding.get_abstract_mesh(), sharding.active_rules()
  if mesh is None or mesh.empty or mesh.size == 1 or rules is None:
    return fn(q, k, v, mask)

  def spec(names, shape):
    axes = sharding.logical_to_spec(names, rules)
    return P(*(e if e is not None and d % sharding.mesh_axis_size(mesh, e) == 0 else None
               for e, d in zip(axes, shape)))

  qs = spec(('batch', None, 'heads', None), q.shape)
  ks = spec(('batch', None, 'kv_heads', None), k.shape)
  if (qs[2] is None) != (ks[2] is None):  # Split heads only where both kinds split.
    qs, ks = P(qs[0], None, None, None), P(ks[0], None, None, None)
  batch = qs[0] if qs[0] == ks[0] else None
  qs, ks = P(batch, *qs[1:]), P(batch, *ks[1:])
  # Spans' arrays all lead with [B|1]; a boolean mask does when it is [B|1, Lq, Lk].
  lead = 1 if isinstance(mask, Spans) else 3
  ms = jax.tree.map(lambda a: P(batch if a.ndim >= lead and a.shape[0] == q.shape[0] else None,
                                *([None] * (a.ndim - 1))), mask)
  return jax.shard_map(fn, mesh=mesh, in_specs=(qs, ks, ks, ms), out_specs=qs,
                       check_vma=False)(q, k, v, mask)
