"""Optimizer: optax AdamW with warmup + cosine/linear decay, global-norm clipping, and a weight
decay mask that skips norms, biases and scalars (decaying a norm scale towards 0 fights the norm).

`train.adapter_lr_mult` gives CCF's own parameters (the `adapter` subtree: memory vectors, memory
gate, LoRAs and transfer head) a multiple of the schedule's learning rate. A full fine-tune of a
pretrained LM wants a small lr for the base, but Adam moves a parameter by about lr a step, so at
that lr a memory gate that starts closed (g = 0) cannot open within a short run."""

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


ADAPTER = 'adapter'  # The CCF parameters' top-level key (ccf/arch.py); the rest is the base LM.


def _adamw(t, lr_mult: float = 1.0) -> optax.GradientTransformation:
  sched = schedule(t)
  lr = sched if lr_mult == 1.0 else (lambda step: lr_mult * sched(step))
  return optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                     mask=decay_mask)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  t = train_cfg
  chain = []
  if t.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(t.clip_norm))
  mult = t.get('adapter_lr_mult', 1.0)  # Configs saved before the field existed: 1.
  if mult == 1.0:
    chain.append(_adamw(t))
  else:  # optax.multi_transform over {base, adapter} (its state differs: only when asked for).
    def labels(params):
      return {k: jax.tree.map(lambda _, k=k: 'adapter' if k == ADAPTER else 'base', v)
              for k, v in params.items()}
    chain.append(optax.multi_transform(
        {'base': _adamw(t), 'adapter': _adamw(t, mult)}, labels))
  return optax.chain(*chain)
