"""tiny_ccf.py trained to reconstruct: the auto-encoding recipe of issue 24's reconstruction figure.

Same model and start (the tiny.py export, 8x: l=128, c=16), with half of the steps auto-encoding
steps (`ccf.ae_mode='alternate'`, `ae_weight=0.5`): one random segment per window is compressed
and rebuilt from its own memory alone (`ccf.arch.ae_sums`); the other half are the compressive LM
steps of tiny_ccf.py. More windows per step (8) give the auto-encoder 8 segments a step at the
cost of 4 in LM steps.
    python -m ccf_jax.train --config=experiments/tiny_ccf_ae.py --workdir=runs/tiny_ccf_ae
    python -m ccf_jax.export --workdir=runs/tiny_ccf_ae --out=runs/tiny_ccf_ae/export
    python -m ccf_jax.evaluate --checkpoint=runs/tiny_ccf_ae/export --only=ae --preset=full
"""

from experiments import tiny_ccf


def get_config():
  c = tiny_ccf.get_config()
  c.name = 'tiny_ccf_ae'
  c.ccf.ae_mode = 'alternate'  # A step is auto-encoding with probability ae_weight ...
  c.ccf.ae_weight = 0.5  # ... else compressive LM.
  c.data.batch_size = 8  # 8 segments reconstructed per auto-encoding step.
  c.train.steps = 1500
  c.train.time_budget_s = 2400.0
  c.checkpoint.every = 500
  return c
