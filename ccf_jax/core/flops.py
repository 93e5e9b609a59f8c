"""Analytic FLOP counts (XLA's cost_analysis counts a scanned body once, so it cannot be used on
scanned programs; tests check this count against cost_analysis of the *unrolled* model).

Convention: a multiply-add is 2 FLOPs; matmuls only (norms, softmax, rotary and elementwise ops
are ignored, they are <2% at these shapes); attention scores and the weighted sum are counted for
the full Lq x Lk rectangle *including* the masked half of a causal mask (what dense kernels
compute), i.e. 4 * Lq * Lk * heads * head_dim per layer forward. Training = 3x forward (backward
is twice the forward). This is PaLM's MFU convention (6N + 12 * layers * heads * head_dim * L FLOPs
per token), so a kernel that skips the masked half of a causal mask reports a higher MFU than the
work it does.

MFU divides these model FLOPs per second by the devices' dense bf16 peak (`PEAK_BF16_FLOPS`, or
`train.peak_flops_per_device`); recomputation under remat is overhead, not model FLOPs.
"""

from __future__ import annotations

import jax


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


# ------------------------------------------------------------------------------------------------
# Model FLOPs utilisation (MFU): model FLOPs per second over the devices' peak.

# Dense (no 2:4 sparsity) bf16 peak FLOP/s of one device, from the vendors' datasheets, keyed by
# jax's `device.device_kind`. NVIDIA's tables quote sparse figures: these are half of them.
PEAK_BF16_FLOPS = {
    'NVIDIA H100 80GB HBM3': 989e12,  # H100 SXM5.
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA H100 NVL': 835e12,
    'NVIDIA H200': 989e12,  # H200 SXM.
    'NVIDIA H200 NVL': 835e12,
    'NVIDIA A100-SXM4-40GB': 312e12,
    'NVIDIA A100-SXM4-80GB': 312e12,
    'NVIDIA A100-PCIE-40GB': 312e12,
    'NVIDIA A100 80GB PCIe': 312e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,  # v5e.
    'TPU v5e': 197e12,
    'TPU v5': 459e12,  # v5p.
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,  # v6e (Trillium).
    'TPU v6e': 918e12,
}


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of one device, '') or (0.0, why MFU cannot be reported). `override`
  (train.peak_flops_per_device) wins when > 0; otherwise the device kind must be in the table.
  An unknown kind (a CPU, a GPU not listed) gets no MFU rather than a guessed peak."""
  if override and override > 0:
    return float(override), ''
  peak = PEAK_BF16_FLOPS.get(device_kind.strip())
  if peak is None:
    peak = {k.casefold(): v for k, v in PEAK_BF16_FLOPS.items()}.get(device_kind.strip().casefold())
  if peak is None:
    return 0.0, (f'MFU is not reported: no peak FLOP/s is known for device kind {device_kind!r}. '
                 'Fix: --config.train.peak_flops_per_device=<dense bf16 FLOP/s of one device>.')
  return peak, ''


def local_peak_flops(override: float = 0.0) -> tuple[float, str]:
  """`peak_flops_per_device` for the kind of this process's first device."""
  return peak_flops_per_device(jax.devices()[0].device_kind, override)


def mfu(model_flops: float, step_s: float, num_devices: int, peak_per_device: float):
  """Model FLOPs utilisation of a step that did `model_flops` (the arch's analytic count, above)
  in `step_s` seconds on `num_devices` devices of `peak_per_device` FLOP/s; None without a peak."""
  if not peak_per_device or step_s <= 0:
    return None
  return model_flops / step_s / (num_devices * peak_per_device)
