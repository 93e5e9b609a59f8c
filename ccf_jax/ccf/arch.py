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

from ccf_jax import arch as arch_lib, config_lib, flops, model as model_lib
from ccf_jax.arch import token_ce_sums
from ccf_jax.ccf import incremental, masks
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
  """A plain-decoder export -> CCF params: the base for encoder and decoder, a fresh adapter."""
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
    params['encoder'] = {'layers': jax.tree.map(jnp.array, base['layers'])}
  return params


# ------------------------------------------------------------------------------------------------
# Analytic FLOPs (flops.py conventions: matmuls only, full attention rectangles, train = 3x).


def ccf_forward_flops(cfg, batch_size: int) -> dict:
  """Forward FLOPs of one step by part: 'encoder' (its computed blocks with their q/v LoRA),
  'project' (memory K/V with the transfer LoRA), 'decoder', 'ae' (auto-encoding, ae_mode 'extra')."""
  m, x = cfg.model, cfg.ccf
  l, c, t = x.segment_len, x.num_memory, x.num_segments
  n = batch_size * t
  kv = m.num_kv_heads * m.head_dim  # Each LoRA costs 2 * rank * (d + out) per token.
  lora = 2 * n * m.num_layers * x.lora_rank
  # The encoder runs latent_blocks(L) whole blocks: L - 1 from L = 3 on (the last one's latent is
  # only its input norm).
  encoder = (flops.forward_flops(m, n * (l + c), l + c, l + c, with_head=False)
             + lora * (l + c) * (2 * m.d_model + m.num_heads * m.head_dim + kv))
  encoder *= model_lib.latent_blocks(m.num_layers) / m.num_layers
  project = 2 * n * c * m.num_layers * m.d_model * 2 * kv + lora * c * 2 * (m.d_model + kv)
  decoder = flops.forward_flops(m, n * l, l, t * c + l)
  ae = flops.forward_flops(m, batch_size * l, l, t * c + l) if x.ae_mode == 'extra' else 0.0
  return {'encoder': encoder, 'project': project, 'decoder': decoder, 'ae': ae}


def encoder_backward_passes(ccf_cfg) -> float:
  """Forward-equivalents of the encoder's backward pass: 2 (activation and weight gradients), or 1
  under ccf.encoder_trains_base=False, where the base weights are constants and only activation
  gradients flow (to the memory vectors and the LoRAs, whose weight gradients are negligible)."""
  return 2.0 if ccf_cfg.encoder_trains_base else 1.0


def ccf_train_flops(cfg, batch_size: int) -> float:
  """Model FLOPs of the objective (full back-propagation, no recomputation); what a step executes
  under grad_mode and remat is incremental.train_flops."""
  f = ccf_forward_flops(cfg, batch_size)
  return 3.0 * sum(f.values()) - (2.0 - encoder_backward_passes(cfg.ccf)) * f['encoder']


def segment_local_train_flops(cfg, batch_size: int) -> float:
  x = cfg.ccf
  n = batch_size * x.num_segments * x.segment_len
  return 3.0 * flops.forward_flops(cfg.model, n, x.segment_len, x.segment_len)


# ------------------------------------------------------------------------------------------------
# Config checks (called from config_lib.validate for the three archs).


def check_config(cfg):
  """Raises ConfigError on CCF settings that cannot work, naming the field and the fix."""
  m, x = cfg.model, cfg.ccf
  l, c, t = x.segment_len, x.num_memory, x.num_segments

  def require(cond, msg):
    if not cond:
      raise ConfigError(msg)

  require(cfg.data.mode == 'windows', f"model.arch={m.arch!r} reads whole-document windows. Fix: "
          f"--config.data.mode=windows (data.mode={cfg.data.mode!r}).")
  require(t >= 1, f'ccf.num_segments={t} must be at least 1.')
  for name, options in (('mode', ('pretrain', 'adapter')), ('mask', ('nested', 'plain')),
                        ('memory_positions', ('sequential', 'segment')),
                        ('memory_gate', ('none', 'tanh')),
                        ('ae_mode', ('off', 'extra', 'alternate')),
                        ('grad_mode', incremental.GRAD_MODES),
                        ('reservoir_semantics', incremental.SEMANTICS),
                        ('encoder_remat', ('model', *model_lib.REMAT_POLICIES)),
                        ('decoder_remat', tuple(model_lib.REMAT_POLICIES))):
    require(x[name] in options, f'ccf.{name}={x[name]!r}; choose one of {options}.')
  require(x.encoder_trains_base or (x.mode == 'pretrain' and x.shared_weights),
          'ccf.encoder_trains_base=False cuts the encoder\'s gradient into the weights it shares '
          f'with the decoder; it needs ccf.mode=pretrain and ccf.shared_weights=True (got mode='
          f'{x.mode!r}, shared_weights={x.shared_weights}). Fix: --config.ccf.encoder_trains_base'
          '=True.')
  require(x.memory_gate == 'tanh' or x.memory_gate_init == 0.0,
          f'ccf.memory_gate_init={x.memory_gate_init} initialises the gated read, but '
          f"ccf.memory_gate={x.memory_gate!r}. Fix: --config.ccf.memory_gate=tanh.")
  require(x.lora_rank >= 1, f'ccf.lora_rank={x.lora_rank} must be at least 1.')
  require(x.reservoir_size >= 1, f'ccf.reservoir_size={x.reservoir_size} must be at least 1.')
  for name in ('decoder_segment_chunk', 'encoder_map_batch'):
    require(x[name] >= 0 and (x[name] == 0 or t % x[name] == 0),
            f'ccf.{name}={x[name]} must divide ccf.num_segments={t}. Fix: a divisor of {t} '
            f'(1 = one segment at a time) or 0 (all {t} at once).')
  require(x.memory_attention_block >= 0, f'ccf.memory_attention_block={x.memory_attention_block} '
          'must be >= 0 (key rows per block; 0 = dense attention).')
  require(x.memory_window >= 0, f'ccf.memory_window={x.memory_window} must be >= 0 (0 = all).')
  require(x.ae_weight >= 0 and (x.ae_mode != 'alternate' or x.ae_weight <= 1),
          f'ccf.ae_weight={x.ae_weight} must be >= 0 (and <= 1 with ae_mode=alternate).')
  require(-1 <= x.memory_init_token < m.vocab_size,
          f'ccf.memory_init_token={x.memory_init_token} is not -1 or a token id < {m.vocab_size}.')
  ratios = tuple(x.ratios)
  if ratios:
    require(all(r > 0 and l % r == 0 for r in ratios),
            f'ccf.ratios={ratios}: every ratio must divide ccf.segment_len={l}.')
    require(l // min(ratios) == c, f'ccf.ratios={ratios} needs ccf.num_memory = segment_len / '
            f'min(ratios) = {l // min(ratios)} memory slots (got {c}). Fix: '
            f'--config.ccf.num_memory={l // min(ratios)}.')
  if m.arch == 'ccf':
    need = masks.max_relative_position(x, t)
    fit = ((m.max_position - l) // c if x.memory_positions == 'sequential'
           else m.max_position // l - 1)
    require(need <= m.max_position,
            f'windows of {t} segments need rotary positions up to {need} (memory_positions='
            f'{x.memory_positions!r}, memory_window={x.memory_window}) but model.max_position='
            f'{m.max_position}. Fix: --config.ccf.memory_window={max(fit, 1)} (the most segments '
            'whose memory fits), fewer segments, or a larger model.max_position.')
  else:
    require(l <= m.max_position,
            f'ccf.segment_len={l} exceeds model.max_position={m.max_position}.')


# ------------------------------------------------------------------------------------------------
# Registration.

arch_lib.register(arch_lib.Arch(
    'ccf', CCFModel, ccf_loss, ccf_train_flops, is_trainable=is_trainable,
    module_config=module_config, from_base_params=from_base_params, eval_loss=eval_loss))
arch_lib.register(arch_lib.Arch(
    'segment_local', model_lib.Decoder, baseline_loss, segment_local_train_flops,
    eval_loss=lambda cfg, params, batch: lm_loss(cfg, params, batch, 'off')))
arch_lib.register(arch_lib.Arch(
    'full_attention', model_lib.Decoder, baseline_loss, arch_lib.decoder_train_flops,
    eval_loss=lambda cfg, params, batch: lm_loss(cfg, params, batch, 'off')))
