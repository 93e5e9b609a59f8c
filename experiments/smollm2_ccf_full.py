"""CCF 8x on SmolLM2-135M with every weight trained (experiments/smollm2_ccf.py trains the adapter).

Encoder and decoder share the pretrained weights (`ccf.mode='pretrain'`, shared), so the model
learns to compress and to read memory while remaining one LM; the memory gate keeps the start
identical to segment_local. A full fine-tune moves 135M weights with AdamW (f32 masters and
moments: about 1.6 GB of state), so the base's learning rate is a tenth of the adapter's, while
the CCF parameters (memory vectors, gate, LoRAs, transfer head) keep the adapter recipe's 1e-3
(`train.adapter_lr_mult`): Adam moves a parameter by about lr a step, so at 1e-4 the gate, which
starts closed, stays near 0 for the whole run and the memory is never read.
    python -m ccf_jax.train --config=experiments/smollm2_ccf_full.py --workdir=runs/smollm2_full
"""

from experiments import smollm2_ccf


def get_config():
  c = smollm2_ccf.get_config()
  c.name = 'smollm2_ccf_full'
  c.ccf.mode = 'pretrain'  # Everything trains; encoder and decoder share the base weights.
  c.ccf.shared_weights = True
  c.train.lr = 1e-4  # Full fine-tuning of a pretrained LM.
  c.train.adapter_lr_mult = 10.0  # CCF's own parameters at 1e-3, as in the adapter recipe.
  return c
