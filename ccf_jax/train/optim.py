"""Optimizer: optax AdamW with warmup + cosine/linear decay, global-norm clipping, and a weight
decay mask that skips norms, biases and scalars (decaying a norm scale towards 0 fights the norm)."""

from __future__ import annotations

import jax
import optax


def schedule(train_cfg) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine/linear decay to `lr * end_lr_frac` at `steps` (optax)."""
  t = train_cfg
  end = t.lr * t.end_lr_frac
  decay_steps = max(1, t.steps - t.warmup_steps)
  if t.decay == 'cosine':
    after = optax.cosine_decay_schedule(t.lr, decay_steps, alpha=t.end_lr_frac)
  elif t.decay == 'linear':
    after = optax.linear_schedule(t.lr, end, decay_steps)
  else:
    after = optax.constant_schedule(t.lr)
  if t.warmup_steps == 0:
    return after
  warm = optax.linear_schedule(t.lr / max(1, t.warmup_steps), t.lr, t.warmup_steps)
  return optax.join_schedules([warm, after], [t.warmup_steps])


def decay_mask(params):
  """True for weights that get weight decay: matrices, not norm scales / biases / vectors."""
  def keep(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    return not (name in ('scale', 'bias') or name.endswith('_bias') or name.startswith('memory')
                or leaf.ndim < 2)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  t = train_cfg
  chain = []
  if t.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(t.clip_norm))
  chain.append(optax.adamw(schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                           mask=decay_mask))
  return optax.chain(*chain)
