"""tiny_ccf.py trained to reconstruct: the auto-encoding recipe of issue 24's reconstruction figure.

Same model and start (the tiny.py export, 8x: l=128, c=16). Every step is an auto-encoding step
(`ccf.ae_mode='alternate'` with `ae_weight=1.0`): each window's segment is compressed and rebuilt
from its own memory alone (`ccf.arch.ae_sums`), with the repeat vector first and teacher forcing.
Windows are one segment long, since an auto-encoding step reads one segment per window; 32 of them
a step. Measured alternative: half auto-encoding and half compressive LM steps
(`ae_weight=0.5`, 8 windows of 8 segments) reached teacher-forced token accuracy 0.28 in 780
steps, hardly above the LM's; here the accuracy jumps between steps 800 and 1,000 (as passkey
retrieval does) and keeps rising (README "Long context", reconstruction). The LM term is off,
so the export's held-out LM loss is ruined: it is a reconstruction model, not a compressive LM.
    python -m ccf_jax.train --config=experiments/tiny_ccf_ae.py --workdir=runs/tiny_ccf_ae
    python -m ccf_jax.export --workdir=runs/tiny_ccf_ae --out=runs/tiny_ccf_ae/export
    python -m ccf_jax.evaluate --checkpoint=runs/tiny_ccf_ae/export --only=ae --preset=full
"""

from experiments import tiny_ccf


def get_config():
  c = tiny_ccf.get_config()
  c.name = 'tiny_ccf_ae'
  c.ccf.ae_mode = 'alternate'  # A step is auto-encoding with probability ae_weight ...
  c.ccf.ae_weight = 1.0  # ... here every step.
  c.ccf.num_segments = 1  # Windows of one segment: all an auto-encoding step reads.
  c.data.batch_size = 32  # Segments reconstructed per step.
  c.train.lr = 2e-3
  c.train.steps = 5000  # About 1.6 s a step on 2 shared cores.
  c.train.time_budget_s = 9000.0
  c.train.eval_every = 1000  # The held-out LM loss (which this recipe does not train).
  c.checkpoint.every = 250
  return c
