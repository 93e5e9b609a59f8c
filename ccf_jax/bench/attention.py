"""`python -m ccf_jax.bench attention --config=experiments/tiny.py [--attention_shapes=S1,S2,S3]
[--attention_impls=xla,blocked,rows] [--attention_blocks=128,256] [--steps=N]`: one layer's softmax
attention, forward and backward, per implementation of `model.attention_impl` (and per block size
of the blocked and rows kernels), at the attention shapes of bench peer's shapes.

Why: the kernel is a third of the S2 train step (bench profile), and a change to it moves the step
by a fraction of its own gain; timing the kernel alone, each implementation alternated with the
others in one process, sees a 10% change that the whole step's noise hides. It is also what
`attention.cpu_choice` (`auto` on CPU) is measured by.

For each shape: q [B, L, H, D], k and v [B, L, K, D] of the shape's model (batch, length, heads,
kv heads, head_dim), the causal mask as `Spans` (what the plain decoder passes), and the gradient
of sum(out * w) with respect to q, k and v, jitted. Each implementation is compiled, checked
against `attention.dense_attend` (max abs error of the loss and of the three gradients, relative
to the largest entry of each), then timed in `--attention_rounds` alternating rounds of `--steps`
calls; ms is the fastest round's mean. One JSON object per (shape, impl), with `speedup_vs_xla`
(xla's time over this one's).
"""

from __future__ import annotations

import time

import numpy as np
from absl import flags

from ccf_jax.bench import peer, steps_flag

_SHAPES = flags.DEFINE_list('attention_shapes', 'S1,S2,S3', 'bench attention: bench peer '
                            f'shapes whose attention to time ({", ".join(peer.SHAPE_NAMES)}).')
_IMPLS = flags.DEFINE_list('attention_impls', 'xla,blocked,rows', 'bench attention: '
                           'implementations (model.attention_impl values) to time.')
_BLOCKS = flags.DEFINE_list('attention_blocks', [], 'bench attention: model.attention_block '
                            'values to time the blocked and rows kernels at (default: the '
                            "config's).")
_ROUNDS = flags.DEFINE_integer('attention_rounds', 3, 'bench attention: alternating rounds.',
                               lower_bound=1)


def _case(cfg):
  """(q, k, v, w, mask) of a config's attention: float32 normal, the causal Spans."""
  import jax.numpy as jnp
  from ccf_jax.core import config_lib
  from ccf_jax.model import spans
  m, b, length = cfg.model, cfg.data.batch_size, config_lib.window_len(cfg)
  rng = np.random.default_rng(0)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return (arr(b, length, m.num_heads, m.head_dim), arr(b, length, m.num_kv_heads, m.head_dim),
          arr(b, length, m.num_kv_heads, m.head_dim), arr(b, length, m.num_heads, m.head_dim),
          spans.causal(length))


def bench_attention(config) -> list:
  import jax
  from ccf_jax.model import attention
  steps, out = steps_flag(5), []
  for shape in _SHAPES.value:
    cfg = peer.shape_config(config, shape)
    q, k, v, w, mask = _case(cfg)
    length = q.shape[1]

    def grad_fn(attend):
      loss = lambda q, k, v: (attend(q, k, v) * w).sum()
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    ref = grad_fn(lambda q, k, v: attention.dense_attend(q, k, v, mask.dense(length)))(q, k, v)
    fns, rows = {}, {}
    blocks = [int(b) for b in _BLOCKS.value] or [cfg.model.attention_block]
    if min(blocks) < 1:
      raise ValueError(f'--attention_blocks={",".join(_BLOCKS.value)}: block sizes must be >= 1.')
    sized = ('blocked', 'rows', 'splash')  # The kernels that take model.attention_block.
    for impl, block in [(i, b) for i in _IMPLS.value for b in (blocks if i in sized else [0])]:
      name = impl if len(blocks) == 1 or impl not in sized else f'{impl}@{block}'
      fn = grad_fn(lambda q, k, v, impl=impl, block=block: attention.attend(
          q, k, v, mask, impl=impl, block=block or cfg.model.attention_block))
      t = time.time()
      got = jax.block_until_ready(fn(q, k, v))
      err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
      fns[name] = fn
      rows[name] = {'bench': 'attention', 'shape': shape, 'impl': impl,
                    'q': list(q.shape), 'kv': list(k.shape),
                    'block': block or cfg.model.attention_block,
                    'max_rel_err_vs_dense': float(f'{err:.3g}'),
                    'compile_s': round(time.time() - t, 2),
                    'round_ms': []}
    for _ in range(_ROUNDS.value):
      for name, fn in fns.items():
        t = time.time()
        for _ in range(steps):
          r = fn(q, k, v)
        jax.block_until_ready(r)
        rows[name]['round_ms'].append(round((time.time() - t) / steps * 1e3, 2))
    for row in rows.values():
      row['ms'] = min(row['round_ms'])
      if 'xla' in rows:
        row['speedup_vs_xla'] = round(rows['xla']['ms'] / row['ms'], 3)
      out.append(row)
  return out
