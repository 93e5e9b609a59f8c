"""tiny_ccf fine-tuned from a pretrained tiny.py decoder: CCF's own setting, at CPU scale.

The paper trains CCF on top of a pretrained LM (Llama-2-7B); tiny_ccf.py learns the language and
the memory at once, from scratch, and at this size that costs it LM quality: trained from scratch
it trails segment_local by about 0.015 nats on held-out segments t > 0 over 2,700 steps although
its memory is worth 0.05 (bench_signal.py's docstring). Here the export of a trained tiny.py (same
model fields) initialises the base of both encoder and decoder (`init.params_only`, as in
tiny_ccf_adapter.py), and then everything trains (`ccf.mode='pretrain'`, shared weights) on
windows, without the auto-encoding term, at a fine-tuning learning rate. segment_local fine-tuned
from the same export for the same steps is the baseline:
    ./launch/local.sh --config=experiments/tiny.py    # writes runs/local/tiny/export
    python -m ccf_jax.train --config=experiments/tiny_ccf_finetune.py --workdir=runs/tiny_ccf_ft
`python -m ccf_jax.bench signal --config=experiments/tiny_ccf_finetune.py --base_steps=2000`
pretrains its own base per seed (bench_signal.base_config: tiny.py's recipe) and compares.
Measured (stop 16, 3 seeds, a 2,000-step base each): on held-out segments t > 0 CCF 3.6393,
memory off 3.6745, segment_local 3.6643: CCF ahead by 0.0250 nats (paired SE 0.0010; per seed
0.0243 / 0.0238 / 0.0269), where from scratch tiny_ccf trails by about 0.015.
"""

from experiments import tiny_ccf


def get_config():
  c = tiny_ccf.get_config()
  c.name = 'tiny_ccf_finetune'
  c.init.params_only = 'runs/local/tiny/export'  # Written by ./launch/local.sh --config=experiments/tiny.py.
  c.ccf.ae_mode = 'off'  # The LM term alone (the auto-encoding term cost LM quality from scratch).
  c.train.steps = 1000  # About 0.33 s a step of 2 windows on 2 cores: 5.5 minutes.
  c.train.time_budget_s = 600.0  # A cap, above the steps' time on 2 cores.
  c.train.lr = 1e-3  # Fine-tuning: a third of the from-scratch peak.
  return c
