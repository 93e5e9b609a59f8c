"""Analytic FLOP counts (XLA's cost_analysis counts a scanned body once, so it cannot be used on
scanned programs; tests check this count against cost_analysis of the *unrolled* model).

Convention: a multiply-add is 2 FLOPs; matmuls only (norms, softmax, rotary and elementwise ops
are ignored, they are <2% at these shapes); attention scores and the weighted sum are counted for
the full Lq x Lk rectangle *including* the masked half of a causal mask (what dense kernels
compute), i.e. 4 * Lq * Lk * heads * head_dim per layer forward. Training = 3x forward (backward
is twice the forward).
"""

from __future__ import annotations


def matmul_params_per_layer(m) -> int:
  attn = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
  mlp = 3 * m.d_model * m.mlp_dim
  return attn + mlp


def forward_flops(m, num_tokens: int, q_len: int, k_len: int, with_head: bool = True) -> float:
  """Forward FLOPs of `num_tokens` tokens arranged in rows of q_len queries over k_len keys."""
  dense = 2 * num_tokens * m.num_layers * matmul_params_per_layer(m)
  attn = 4 * num_tokens * k_len * m.num_layers * m.num_heads * m.head_dim
  head = 2 * num_tokens * m.d_model * m.vocab_size if with_head else 0
  return float(dense + attn + head)


def decoder_train_flops(cfg, batch: int, seq_len: int) -> float:
  """FLOPs of one training step of the plain decoder on [batch, seq_len] tokens."""
  return 3.0 * forward_flops(cfg.model, batch * seq_len, seq_len, seq_len)
