"""CCF's analytic FLOPs (core/flops.py conventions: matmuls only, full attention rectangles,
train = 3x forward).

`ccf_train_flops` is the objective's model FLOPs (what MFU divides by); `train_flops` is what one
step executes under `ccf.grad_mode` and the remat settings (a recomputation counts as one more
forward), the figure that explains step times; `decoder_key_rows` counts the key rows the decoder's
attention actually computes when blocked attention skips key blocks no query may see.
"""

from __future__ import annotations

import numpy as np

from ccf_jax.core import flops
from ccf_jax.model import decoder as model_lib


def ccf_forward_flops(cfg, batch_size: int) -> dict:
  """Forward FLOPs of one step by part: 'encoder' (its computed blocks with their q/v LoRA),
  'project' (memory K/V with the transfer LoRA), 'decoder', 'ae' (auto-encoding, ae_mode
  'extra')."""
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
  under grad_mode and remat is train_flops."""
  f = ccf_forward_flops(cfg, batch_size)
  return 3.0 * sum(f.values()) - (2.0 - encoder_backward_passes(cfg.ccf)) * f['encoder']


def segment_local_train_flops(cfg, batch_size: int) -> float:
  x = cfg.ccf
  n = batch_size * x.num_segments * x.segment_len
  return 3.0 * flops.forward_flops(cfg.model, n, x.segment_len, x.segment_len)




def blocked_key_rows(visible: np.ndarray, block: int) -> float:
  """Key rows per query that the blocked kernel (model/blocked_attention.py) computes for the
  boolean mask visible [Lq, Lk] (the union over the batch): every (query block, key block) pair
  in which some query sees some key runs in full, the others are skipped."""
  lq, lk = visible.shape
  bq, bk = min(block, lq), min(block, lk)
  nq, nk = -(-lq // bq), -(-lk // bk)
  padded = np.zeros((nq * bq, nk * bk), bool)
  padded[:lq, :lk] = visible
  return float(padded.reshape(nq, bq, nk, bk).any((1, 3)).sum() * bq * bk / lq)


def decoder_key_rows(cfg) -> float:
  """Key rows a decoder query's attention computes, averaged over chunk steps: the buffer's T*c rows
  (or the W + k segments' rows a chunk slices under memory_window) and the segment's l tokens,
  or, with model.attention_impl='blocked' (or 'rows', which runs these masks blocked), the rows of
  the block pairs some query of the chunk may see (`blocked_key_rows`: at k=1 the memory of the
  chunk's own and later segments and the blocks above the causal diagonal are skipped). With
  memory_gate='tanh' memory and tokens are two attentions, blocked apart."""
  x, m = cfg.ccf, cfg.model
  t, c, l = x.num_segments, x.num_memory, x.segment_len
  k = x.decoder_segment_chunk or t
  w = x.memory_window
  sliced = w + k if w and w + k < t else 0
  rows = (sliced or t) * c
  if m.get('attention_impl', 'auto') not in ('blocked', 'rows'):
    return float(rows + l)
  block = m.attention_block
  tokens = np.tril(np.ones((l, l), bool))
  total = 0.0
  for first in range(0, t, k):
    start = min(max(first - w, 0), t - sliced) if sliced else 0  # First sliced segment.
    lo = max(first - w, 0) if w else 0
    segment = start + np.arange(rows) // c
    memory = np.broadcast_to((segment >= lo) & (segment < first + k - 1), (l, rows))
    if x.memory_gate == 'tanh':
      total += blocked_key_rows(memory, block) + blocked_key_rows(tokens, block)
    else:
      total += blocked_key_rows(np.concatenate([memory, tokens], 1), block)
  return total / (t // k)


def train_flops(cfg, batch_size: int) -> float:
  """FLOPs one train step executes under ccf.grad_mode and the remat settings (flops.py
  conventions; a recomputation counts as one more forward, whatever the policy saves). Unlike
  ccf_train_flops (the objective's model FLOPs) this is what explains step times."""
  x, m = cfg.ccf, cfg.model
  f = ccf_forward_flops(cfg, batch_size)
  t, size = x.num_segments, min(x.reservoir_size, x.num_segments)
  enc_policy = m.remat_policy if x.encoder_remat == 'model' else x.encoder_remat
  enc_train = 1.0 + encoder_backward_passes(x) + (enc_policy != 'none')
  per_pair = x.grad_mode == 'truncated' or (x.grad_mode == 'reservoir'
                                            and x.reservoir_semantics == 'streaming')
  if x.grad_mode == 'reservoir' and x.reservoir_semantics == 'final':
    # T - S segments through the no-residual pass, S live: one forward each, then S backwards.
    encoder = f['encoder'] * (1.0 + (enc_train - 1.0) * size / t)
  else:
    encoder = f['encoder'] * enc_train
  project = f['project'] * (4.0 if per_pair else 3.0)  # Two projections, each one backward path.
  single = (x.decoder_segment_chunk or t) == t
  dec_remat = x.decoder_remat != 'none'
  layer_remat = (dec_remat and single) or (m.remat_policy != 'none' and not (dec_remat and single))
  executed = flops.forward_flops(m, batch_size * t * x.segment_len, x.segment_len,
                                 decoder_key_rows(cfg))  # f['decoder']: all T*c + l rows.
  decoder = executed * (3.0 + (dec_remat and not single) + layer_remat)
  ae = 3.0 * f['ae']
  if f['ae'] and x.grad_mode != 'full':  # The auto-encoded segment is encoded again, live.
    ae += ((1.0 + encoder_backward_passes(x)) * f['encoder'] + 3.0 * f['project']) / t
  return encoder + project + decoder + ae
