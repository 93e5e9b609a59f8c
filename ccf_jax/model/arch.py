"""Architectures as data: an `Arch` names a module, its trainable subset, loss and FLOPs.

The trainer never branches on the architecture: it asks the `Arch` for parameters, the loss sums
and the analytic FLOPs. This module defines the record, the plain decoder's `DECODER` and the
parameter split/merge every architecture shares; `ccf_jax/ccf/arch.py` defines the CCF ones and
`ccf_jax/registry.py` maps `model.arch` names to all of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ccf_jax.core import flops
from ccf_jax.model import decoder as model_lib
from ccf_jax.model import head_loss
from ccf_jax.core.config_lib import window_len


@dataclasses.dataclass(frozen=True)
class Arch:
  name: str
  module_cls: Any
  # loss(cfg, params, batch, rng) -> (loss_sum, weight_sum, aux: dict of sums). `params` is the
  # full pure-dict of parameters (trainable merged with frozen).
  loss: Callable
  # train_flops(cfg, local_batch) -> analytic FLOPs of one optimizer step on that batch size.
  train_flops: Callable
  # is_trainable(path_tuple_of_str) -> bool; the rest lives in TrainState.frozen.
  is_trainable: Callable = lambda cfg, path: True
  # module_config(cfg) -> the config `module_cls` is built from (CCF adds its `ccf` section).
  module_config: Callable = lambda cfg: cfg.model
  # from_base_params(cfg, decoder_params) -> params: maps a plain-decoder export (init.params_only,
  # init.from_hf) into this architecture's params; None = the export must match exactly.
  from_base_params: Callable | None = None
  # eval_loss(cfg, params, batch) -> like `loss`, for evaluation (no sampling); None = `loss`.
  eval_loss: Callable | None = None


def next_token(a):
  """a[..., i + 1] at position i along the last axis; the last position gets 0 (as a weight:
  it predicts nothing)."""
  return jnp.pad(a[..., 1:], [(0, 0)] * (a.ndim - 1) + [(0, 1)])


@jax.named_scope('loss')
def shifted_ce_sums(logits, targets, weights):
  """(loss_sum, weight_sum, correct) of logits [..., vocab] against targets already shifted by one
  token (next_token), weighted."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return (ce * weights).sum(), weights.sum(), (correct * weights).sum()


def token_ce_sums(logits, tokens, loss_mask):
  """Next-token cross-entropy sums: logits at position i predict tokens[i + 1], weighted by
  loss_mask[i + 1]. The targets and weights are shifted, not the logits: a slice of the
  [..., L, vocab] logits is a copy of them, and its gradient a pad of the same size."""
  return shifted_ce_sums(logits, next_token(tokens), next_token(loss_mask.astype(jnp.float32)))


def decoder_loss(cfg, params, batch, rng):
  """`token_ce_sums` of the plain LM; with `model.loss_chunk` the head and its cross-entropy run
  fused over chunks of positions (model/head_loss.py), the whole logits never built."""
  del rng
  module = model_lib.bind(cfg.model, params, model_lib.Decoder)
  tokens, chunk = batch['tokens'], cfg.model.get('loss_chunk', 0)
  if not chunk:
    loss_sum, n, correct = token_ce_sums(module(tokens), tokens, batch['loss_mask'])
    return loss_sum, n, {'correct': correct}
  weights = next_token(batch['loss_mask'].astype(jnp.float32))
  x = module.hidden(tokens)
  with jax.named_scope('logits'):
    loss_sum, correct = head_loss.head_ce_sums(*module.head_inputs(x), next_token(tokens),
                                               weights, chunk)
  return loss_sum, weights.sum(), {'correct': correct}


def decoder_train_flops(cfg, batch_size: int) -> float:
  return flops.decoder_train_flops(cfg, batch_size, window_len(cfg))


DECODER = Arch('decoder', model_lib.Decoder, decoder_loss, decoder_train_flops)


def split_params(cfg, arch: Arch, params: dict):
  """(trainable, frozen): two nested dicts holding disjoint leaves (empty branches pruned)."""
  def walk(tree, prefix, want):
    out = {}
    for k, v in tree.items():
      if isinstance(v, dict):
        sub = walk(v, prefix + (k,), want)
        if sub:
          out[k] = sub
      elif arch.is_trainable(cfg, prefix + (k,)) == want:
        out[k] = v
    return out
  return walk(params, (), True), walk(params, (), False)


def merge_params(trainable: dict, frozen: dict) -> dict:
  """Inverse of split_params (a deep dict union)."""
  out = dict(frozen)
  for k, v in trainable.items():
    out[k] = merge_params(v, frozen.get(k, {})) if isinstance(v, dict) else v
  return out
