"""The CCF objectives and the architectures they define: 'ccf', 'segment_local', 'full_attention'.

All three read the same windowed batches ({tokens int32[B, T*l], loss_mask, num_valid_segments})
and score the same targets (`masks.scored_mask`: padded segments never, each segment's first token
only if `ccf.score_first_token`), so their losses are directly comparable:
  * ccf: segment t is decoded given the memory of segments < t (compressive LM);
  * segment_local: each segment alone, plain decoder params (= ccf with memory 'off');
  * full_attention: the plain decoder over the whole window.

`lm_loss(cfg, params, batch, memory='on'|'off')` is the shared helper the evaluation reuses; 'off'
decodes each segment with no memory rows, i.e. segment_local on the CCF model's own weights.

Training objective of 'ccf' (`ccf_loss`): the compressive LM loss plus, by `ccf.ae_mode`, the
auto-encoding loss (compress one segment, then reconstruct its first l-1 tokens after the learned
`repeat` vector, teacher forced, seeing only that segment's memory):
  * 'extra': on one random valid segment of every window, reusing the memory already computed,
    weighted by `ae_weight` (its tokens count `ae_weight` each in the normaliser);
  * 'alternate': each (micro-)step is an auto-encoding step with probability `ae_weight`, chosen
    from the step's key under `lax.cond`: one compiled program, only one branch runs, and the
    auto-encoding branch encodes just the one segment per window it needs.
The LM term is computed by `incremental.lm_sums`: the memory buffer once, then the decoder streamed
over chunks of segments (`lax.scan`), with the encoder gradient of `ccf.grad_mode` (full, truncated
or reservoir-sampled; the reservoir is drawn from the step's key). In the gated modes the
auto-encoded segment is encoded again with full gradient (the buffer's rows may be gated off).
With `ccf.ratios` the ratio is sampled per window from the step's key (`masks.spans`); evaluation
uses l / num_memory unless the batch carries `ratio` int32[B]. A batch may also fix the segment to
auto-encode (`ae_segment` int32[B]) and its targets (`ae_mask` float32[B, T*l], else loss_mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccf_jax.ccf import flops as ccf_flops, incremental, masks
from ccf_jax.core import config_lib
from ccf_jax.model import decoder as model_lib
from ccf_jax.model.arch import Arch, decoder_train_flops, token_ce_sums
from ccf_jax.ccf.model import (Adapter, CCFModel, decode_segments, memory_from_embedding,
                               module_config, separate_encoder)

ConfigError = config_lib.ConfigError


def _windows(cfg, batch):
  """(tokens int32[B, T, l], valid bool[B, T], scored float32[B, T*l]) of a windowed batch."""
  tokens = batch['tokens']
  b, w = tokens.shape
  l = cfg.ccf.segment_len
  nvs = batch['num_valid_segments']
  valid = jnp.arange(w // l)[None] < nvs[:, None]
  scored = masks.scored_mask(cfg.ccf, batch['loss_mask'], nvs)
  return tokens.reshape(b, w // l, l), valid, scored


def _bind(cfg, params):
  """(CCFModel or None, its Decoder): the decoder is the base for segment_local/full_attention."""
  if cfg.model.arch == 'ccf':
    model = model_lib.bind(module_config(cfg), params, CCFModel)
    return model, model.decoder
  return None, model_lib.bind(cfg.model, params, model_lib.Decoder)


def _lm_logits(cfg, model, decoder, tokens, valid, span, memory: bool):
  """(logits float32[B, T*l, vocab], Memory or None) of the compressive LM over whole windows."""
  b, t, l = tokens.shape
  if cfg.model.arch == 'full_attention':
    return decoder(tokens.reshape(b, t * l)), None
  mem = model.compress(tokens, span, valid) if memory and model is not None else None
  segments = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  lo, hi = masks.visible_range(cfg.ccf, segments, mem is not None)
  logits = decode_segments(decoder, cfg.ccf, tokens, span, lo, hi, mem)
  return logits.reshape(b, t * l, -1), mem


def lm_logits(cfg, params, batch, memory: str = 'on', ratio=None):
  """float32[B, T*l, vocab] next-token logits of windows under any of the three archs."""
  model, decoder = _bind(cfg, params)
  tokens, valid, _ = _windows(cfg, batch)
  span = masks.spans(cfg.ccf, tokens.shape[0], ratio=batch.get('ratio') if ratio is None else ratio)
  return _lm_logits(cfg, model, decoder, tokens, valid, span, memory == 'on')[0]


def lm_loss(cfg, params, batch, memory: str = 'on', ratio=None):
  """(loss_sum, target_count, {'correct'}) of the LM objective. Memory 'off' decodes every segment
  with no memory rows (the same as masking them all: segment_local on the same weights, at base
  positions). Ratio: `ratio`, else batch['ratio'], else l / c."""
  if memory not in ('on', 'off'):
    raise ValueError(f"memory={memory!r}; 'on' or 'off'.")
  tokens = batch['tokens']
  logits = lm_logits(cfg, params, batch, memory, ratio)
  loss_sum, n, correct = token_ce_sums(logits, tokens, _windows(cfg, batch)[2])
  return loss_sum, n, {'correct': correct}


def ae_sums(cfg, model, tokens, loss_mask, pick, valid, span, memory):
  """Auto-encoding CE sums: segment pick[b] of tokens [B, T, l] is reconstructed after the repeat
  vector from its own memory only. `memory` holds (at least) that segment's rows."""
  b, _, l = tokens.shape
  seg = jnp.take_along_axis(tokens, pick[:, None, None], axis=1)[:, 0]
  seg_mask = jnp.take_along_axis(loss_mask.reshape(tokens.shape), pick[:, None, None], axis=1)[:, 0]
  seg_mask = seg_mask * valid[:, None]
  inputs = jnp.concatenate([jnp.zeros((b, 1), seg.dtype), seg[:, :-1]], axis=1)
  weights = jnp.concatenate([jnp.zeros((b, 1), seg_mask.dtype), seg_mask[:, :-1]], axis=1)
  logits = decode_segments(model.decoder, cfg.ccf, inputs[:, None], span, pick[:, None],
                           pick[:, None] + 1, memory, first_input=model.adapter.repeat[...])
  return token_ce_sums(logits[:, 0], inputs, weights)


def ccf_loss(cfg, params, batch, rng):
  """The 'ccf' training objective: compressive LM (+ auto-encoding per `ccf.ae_mode`)."""
  x = cfg.ccf
  model, _ = _bind(cfg, params)
  tokens, valid, scored = _windows(cfg, batch)
  b, t, _ = tokens.shape
  k_ratio, k_pick, k_mode = jax.random.split(rng, 3)
  k_reservoir = jax.random.fold_in(rng, 3)  # Not a 4th split: the keys above stay as they were.
  span = masks.spans(x, b, k_ratio, batch.get('ratio'))
  nvs = batch['num_valid_segments']
  if 'ae_segment' in batch:  # Which segment to auto-encode, given (evaluation, tests).
    pick = batch['ae_segment'].astype(jnp.int32)
  else:  # A uniformly random valid segment of each window.
    pick = jnp.minimum((jax.random.uniform(k_pick, (b,)) * jnp.maximum(nvs, 1)).astype(jnp.int32),
                       t - 1)
  pick_valid = pick < nvs
  ae_mask = batch.get('ae_mask', batch['loss_mask'])  # Own targets (passkey_ae_key), or the LM's.
  zero = jnp.zeros((), jnp.float32)

  def pick_memory():  # The picked segment alone, encoded with full gradient.
    seg = jnp.take_along_axis(tokens, pick[:, None, None], axis=1)
    return model.compress(seg, span, pick_valid[:, None], segments=pick[:, None])

  def lm_step():
    lm, mem = incremental.lm_sums(cfg, params, tokens, valid, scored, span, k_reservoir)
    ae = (ae_sums(cfg, model, tokens, ae_mask, pick, pick_valid, span,
                  pick_memory() if mem is None else mem)
          if x.ae_mode == 'extra' else (zero, zero, zero))
    return lm, ae

  def ae_step():
    return (zero, zero, zero), ae_sums(cfg, model, tokens, ae_mask, pick, pick_valid,
                                       span, pick_memory())

  if x.ae_mode == 'alternate':
    is_ae = jax.random.bernoulli(k_mode, x.ae_weight)
    (lm_sum, lm_n, lm_ok), (ae_sum, ae_n, ae_ok) = jax.lax.cond(is_ae, ae_step, lm_step)
    w = 1.0
  else:
    (lm_sum, lm_n, lm_ok), (ae_sum, ae_n, ae_ok) = lm_step()
    w = float(x.ae_weight)
  aux = {'correct': lm_ok + w * ae_ok}
  if x.ae_mode != 'off':
    aux.update(ae_ce=ae_sum, ae_tokens=ae_n)
  return lm_sum + w * ae_sum, lm_n + w * ae_n, aux


def eval_loss(cfg, params, batch):
  """Held-out loss: the LM objective with memory on at the evaluation ratio, nothing sampled."""
  return lm_loss(cfg, params, batch, 'on')


def baseline_loss(cfg, params, batch, rng):
  del rng
  return lm_loss(cfg, params, batch, 'off')


# ------------------------------------------------------------------------------------------------
# Parameters: trainable subset, import of a plain-decoder export.


def is_trainable(cfg, path) -> bool:
  """Adapter mode trains only the adapter (LoRAs, memory and repeat vectors)."""
  return cfg.ccf.mode != 'adapter' or path[0] == 'adapter'


def from_base_params(cfg, base: dict) -> dict:
  """A plain-decoder export -> CCF params: the base for encoder and decoder, a fresh adapter.

  A CCF export (decoder + adapter) is taken whole: a trained CCF model continues under another
  window (e.g. passkey at 4k tokens, then at 16k), its shapes checked against this config's."""
  if 'adapter' in base:
    want = jax.tree.map(lambda a: tuple(a.shape),
                        model_lib.abstract_params(module_config(cfg), CCFModel))
    got = jax.tree.map(lambda a: tuple(a.shape), base)
    if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
      raise ConfigError(f'the CCF export does not match model.* and ccf.* of config {cfg.name!r} '
                        '(memory tokens, LoRA rank, shared or separate encoder). Fix: use the '
                        'fields of the run that produced it (the window length may differ).')
    return base
  want = jax.tree.map(lambda a: tuple(a.shape), model_lib.abstract_params(cfg.model))
  got = jax.tree.map(lambda a: tuple(a.shape), base)
  if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
    raise ConfigError(f'the base parameters do not match model.* of config {cfg.name!r}. Fix: use '
                      'the model fields of the run that produced the export (only arch and ccf.* '
                      'may differ).')
  adapter = model_lib.init_params(module_config(cfg), cfg.train.seed, Adapter)
  if cfg.ccf.memory_init_token >= 0:
    adapter['memory'] = memory_from_embedding(adapter['memory'], base['embed'],
                                              cfg.ccf.memory_init_token)
  params = {'decoder': base, 'adapter': adapter}
  if separate_encoder(cfg.ccf):
    params['encoder'] = {'layers': jax.tree.map(lambda a: a.copy(), base['layers'])}
  return params


# ------------------------------------------------------------------------------------------------
# The architectures (ccf_jax/registry.py maps their names).

ARCHS = (
    Arch('ccf', CCFModel, ccf_loss, ccf_flops.ccf_train_flops, is_trainable=is_trainable,
         module_config=module_config, from_base_params=from_base_params, eval_loss=eval_loss),
    Arch('segment_local', model_lib.Decoder, baseline_loss, ccf_flops.segment_local_train_flops,
         eval_loss=lambda cfg, params, batch: lm_loss(cfg, params, batch, 'off')),
    Arch('full_attention', model_lib.Decoder, baseline_loss, decoder_train_flops,
         eval_loss=lambda cfg, params, batch: lm_loss(cfg, params, batch, 'off')),
)
