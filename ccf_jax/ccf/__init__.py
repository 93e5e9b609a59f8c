"""CCF: context compression by a segment encoder with memory tokens and a per-layer KV memory.

  masks.py   where every token sits and what it sees (encoder nested mask, decoder block mask,
             rotary positions, scored targets, the position range a config needs);
  model.py   `CCFModel` (base decoder + optional separate encoder + adapter: memory vectors,
             repeat vector, LoRAs), `CCFModel.compress` (encode + project memory K/V) and
             `decode_segments` (decode given memory K/V);
  arch.py    the objectives (`lm_loss`, auto-encoding, `ccf_loss`), the 'ccf', 'segment_local' and
             'full_attention' architectures registered with ccf_jax.arch, and the config checks.
See /work/shared/CCF_METHOD.md (the method) and experiments/base.py's `ccf` section (the options).
"""
