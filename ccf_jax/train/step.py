"""Train state, its shardings, and the jitted train/eval steps.

Shardings for the whole state are computed from `jax.eval_shape` before anything is allocated:
parameters get their logical names mapped through `config.mesh.rules`; optimizer moments inherit the
sharding of the parameter they track (matched by tree path); scalars are replicated. The train step
is jitted with these as explicit in/out shardings and donates the state.

Gradient accumulation sums per-token losses and gradients over micro-batches (a `lax.scan`) and
divides once by the total number of target tokens, so a micro-batch with more padding weighs less
(the same estimate as one big batch). A non-finite loss, gradient or updated parameter, or an
update larger than `train.max_update_ratio` times the parameters' norm, leaves params and optimizer
state untouched and increments `nonfinite_count`; the loop decides whether to stop
(train.nonfinite).
"""

from __future__ import annotations

import gc
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ccf_jax import registry as arch_lib
from ccf_jax.model import decoder as model_lib
from ccf_jax.train import optim
from ccf_jax.core import host_memory, sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: dict  # Trainable parameters (pure nested dict).
  frozen: dict  # Frozen parameters (adapter mode's base); {} when everything trains.
  opt_state: Any  # optax state over `params` only.
  rng: jax.Array  # uint32[2] base key; per-step keys are fold_in(rng, step).
  nonfinite_count: jax.Array  # int32 scalar: skipped updates.


def _spec_for_path(path, params_specs):
  """Logical spec of the parameter at the end of an optimizer-state path (moments mirror params)."""
  node = params_specs
  keys = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
  # Optimizer states nest the params tree somewhere inside; find the longest suffix that resolves.
  for start in range(len(keys)):
    node = params_specs
    ok = True
    for k in keys[start:]:
      if isinstance(node, dict) and k in node:
        node = node[k]
      else:
        ok = False
        break
    if ok and isinstance(node, P):
      return node
  return None


def state_shardings(cfg, abstract_state: TrainState, mesh) -> TrainState:
  """NamedShardings for every leaf of the (abstract) train state."""
  arch_lib.param_shardings(cfg, mesh)  # Every parameter dimension divides its mesh axes.
  specs = arch_lib.param_specs(cfg)

  def leaf_sharding(path, leaf):
    spec = _spec_for_path(path, specs)
    if spec is None or len(spec) != len(leaf.shape):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def init_state_fn(cfg, tx):
  """A function (params=None) -> TrainState building everything from the config (to be jitted).

  Given `params` (a full parameter tree, e.g. pretrained weights), they are cast to the dtypes of
  a fresh init and split into trainable and frozen; otherwise parameters are initialised from
  `train.seed`."""
  arch = arch_lib.get_arch(cfg)

  def init(params=None):
    fresh = lambda: model_lib.init_params(arch.module_config(cfg), cfg.train.seed, arch.module_cls)
    if params is None:
      params = fresh()
    else:
      dtypes = jax.eval_shape(fresh)
      params = jax.tree.map(lambda p, a: jnp.asarray(p, a.dtype), params, dtypes)
    trainable, frozen = arch_lib.split_params(cfg, arch, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen,
                      opt_state=tx.init(trainable), rng=jax.random.key_data(jax.random.key(cfg.train.seed)),
                      nonfinite_count=jnp.zeros((), jnp.int32))
  return init


def jit_init_state(cfg, tx, state_sh):
  """The jitted init from a parameter tree, `(params) -> TrainState`, with `params` sharded like
  the state and donated (the state reuses their buffers)."""
  params_sh = arch_lib.merge_params(state_sh.params, state_sh.frozen)
  return jax.jit(init_state_fn(cfg, tx), in_shardings=(params_sh,), out_shardings=state_sh,
                 donate_argnums=(0,))


def init_state(cfg, tx, state_sh, params=None) -> TrainState:
  """The initial TrainState, allocated directly in `state_sh`.

  Pretrained `params` (host arrays) are first placed into their shardings with `jax.device_put`
  and then passed to the jitted init as arguments: closed over, they would become constants of the
  compiled program, whose size (and compile time) would grow with the weights; at 7B it could not
  compile at all.

  The init runs once, yet its executable keeps its transient buffers (random draws, casts: 0.69 GB
  for a 135M model) resident for as long as it lives, and a reference cycle keeps it alive until
  the collector runs; the train step's own buffers would then stack on top of them. So, once the
  state is computed, the executable is collected before returning (WORKSPACE "Peak memory")."""
  if params is None:
    state = jax.jit(init_state_fn(cfg, tx), out_shardings=state_sh)()
  else:
    params = jax.device_put(params, arch_lib.merge_params(state_sh.params, state_sh.frozen))
    state = jit_init_state(cfg, tx, state_sh)(params)
  jax.block_until_ready(state)  # The executable is busy until then.
  gc.collect()
  host_memory.release_freed()
  return state


def abstract_state_and_shardings(cfg, tx, mesh):
  """(abstract state with .sharding set, shardings) computed without allocating."""
  abstract = jax.eval_shape(init_state_fn(cfg, tx))
  shardings = state_shardings(cfg, abstract, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def batch_shardings(cfg, mesh, batch_like: dict) -> dict:
  """Batch arrays are sharded on their leading (batch) axis; the rest replicated."""
  spec = sharding.logical_to_spec(('batch',), cfg.mesh.rules)
  return {k: NamedSharding(mesh, P(spec[0], *([None] * (len(v.shape) - 1)))) for k, v in batch_like.items()}


def make_train_step(cfg, tx):
  """train_step(state, batch) -> (state, metrics); pure, to be jitted with shardings."""
  arch = arch_lib.get_arch(cfg)
  accum = cfg.train.grad_accum
  lr_fn = optim.schedule(cfg.train)

  def loss_on(trainable, frozen, mb, rng):
    loss_sum, n, aux = arch.loss(cfg, arch_lib.merge_params(trainable, frozen), mb, rng)
    # One microbatch: differentiate the mean (n counts targets, not a function of the parameters),
    # so the gradients need no division pass of their own over every parameter afterwards.
    scaled = loss_sum / jnp.maximum(jax.lax.stop_gradient(n), 1.0) if accum == 1 else loss_sum
    return scaled, (loss_sum, n, aux)

  grad_fn = jax.value_and_grad(loss_on, has_aux=True)

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def one(carry, inp):
      mb, i = inp
      (_, (ls, n, aux)), g = grad_fn(state.params, state.frozen, mb, jax.random.fold_in(rng, i))
      g_acc, ls_acc, n_acc, aux_acc = carry
      return (jax.tree.map(jnp.add, g_acc, g), ls_acc + ls, n_acc + n,
              jax.tree.map(jnp.add, aux_acc, aux)), None

    zero_aux = jax.eval_shape(lambda: loss_on(state.params, state.frozen,
                                              jax.tree.map(lambda x: x[0], micro), rng)[1][2])
    init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), zero_aux))
    (g, loss_sum, n, aux), _ = jax.lax.scan(one, init, (micro, jnp.arange(accum)))
    denom = jnp.maximum(n, 1.0)
    grads = g if accum == 1 else jax.tree.map(lambda x: x / denom, g)
    loss = loss_sum / denom
    with jax.named_scope('optimizer'):
      updates, new_opt = tx.update(grads, state.opt_state, state.params)
      new_params = optax.apply_updates(state.params, updates)
    # Finite loss and gradients can still give non-finite parameters (an infinite or huge
    # learning rate): the update is checked too, so such a state is never kept. Norms decide
    # (one element inf or NaN makes its tree's norm so), which the metrics and the ratio below
    # need anyway, rather than an isfinite pass over every gradient and parameter; updated
    # parameters are finite when the kept ones and the update are (an element past 1e19 already
    # overflows its norm and is refused as well).
    grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    # A finite update can still explode the state (lr 1e6 gives huge finite parameters, and the
    # loss shows it only a step later, after a checkpoint may have been written). AdamW moves each
    # parameter by about lr per step, so a sane run changes the parameters by a small fraction of
    # their norm; an update larger than max_update_ratio times that norm is rejected like a
    # non-finite one, before it enters the state. Parameters of norm 0 give no scale: ratio 0.
    p_norm = optax.tree.norm(state.params)
    update_ratio = jnp.where(p_norm > 0, update_norm / p_norm, 0.0)
    max_ratio = cfg.train.max_update_ratio
    ok = finite & ((update_ratio <= max_ratio) if max_ratio > 0 else True)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32))
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': lr_fn(state.step),
               **({'lr_adapter': lr_fn(state.step) * cfg.train.adapter_lr_mult}
                  if cfg.train.get('adapter_lr_mult', 1.0) != 1.0 else {}),
               'tokens': n, 'finite': finite.astype(jnp.float32),
               'update_ok': ok.astype(jnp.float32), 'update_ratio': update_ratio,
               'accuracy': aux.get('correct', 0.0) / denom,
               'skipped_updates': new_state.nonfinite_count}
    for k, v in aux.items():
      if k != 'correct':
        metrics[k] = v / denom
    return new_state, metrics

  return train_step


def make_eval_step(cfg):
  arch = arch_lib.get_arch(cfg)

  def eval_step(state: TrainState, batch: dict):
    params = arch_lib.merge_params(state.params, state.frozen)
    if arch.eval_loss is not None:
      loss_sum, n, aux = arch.eval_loss(cfg, params, batch)
    else:
      loss_sum, n, aux = arch.loss(cfg, params, batch, jax.random.key(0))
    return {'loss_sum': loss_sum, 'tokens': n, **aux}

  return eval_step


def jit_train_step(cfg, tx, mesh, state_sh, batch_sh):
  rep = NamedSharding(mesh, P())
  return jax.jit(make_train_step(cfg, tx), in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, rep), donate_argnums=(0,))


def fresh_state_and_step(cfg, mesh, batch_like: dict):
  """(state, step, batch_sh): a freshly initialised train state, allocated sharded, and the jitted
  train step for batches shaped like `batch_like`. Call under `sharding.use_mesh`. What benchmarks
  and tests need; the trainer does more (initialisation sources, resume, eval step)."""
  tx = optim.make_optimizer(cfg.train)
  _, state_sh = abstract_state_and_shardings(cfg, tx, mesh)
  state = init_state(cfg, tx, state_sh)
  batch_sh = batch_shardings(cfg, mesh, batch_like)
  return state, jit_train_step(cfg, tx, mesh, state_sh, batch_sh), batch_sh


def jit_eval_step(cfg, mesh, state_sh, batch_sh):
  return jax.jit(make_eval_step(cfg), in_shardings=(state_sh, batch_sh),
                 out_shardings=NamedSharding(mesh, P()))
