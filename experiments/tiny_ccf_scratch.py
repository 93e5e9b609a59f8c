"""tiny_ccf.py's model trained from scratch with the paper's recipe (kept as the measured ablation).

Encoder and decoder share weights and learn the language and the memory at once, with the
auto-encoding loss on one segment per window as an extra signal (weight 0.25), at the from-scratch
peak learning rate. At this size that costs LM quality: `python -m ccf_jax.bench signal
--config=experiments/tiny_ccf_scratch.py` measures CCF behind segment_local on held-out segments
t > 0 (figures in WORKSPACE.md), although the memory itself is worth more than that gap: CCF's
weights pay for their memory in LM quality.
tiny_ccf.py therefore starts from a pretrained tiny.py decoder, as the paper starts from Llama-2.
"""

from experiments import tiny_ccf


def get_config():
  c = tiny_ccf.get_config()
  c.name = 'tiny_ccf_scratch'
  c.init.params_only = ''  # From scratch.
  c.ccf.ae_mode = 'extra'  # The auto-encoding loss on one random segment of each window ...
  c.ccf.ae_weight = 0.25  # ... at a quarter of the LM loss's weight.
  c.train.steps = 540  # About 0.65 s per step of 2 windows on a slow 2-core CPU ...
  c.train.time_budget_s = 360.0  # ... so about 6 minutes; the schedule decays within the budget.
  c.train.lr = 3e-3  # The from-scratch peak (tiny.py's).
  return c
