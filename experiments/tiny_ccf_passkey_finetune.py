"""tiny_ccf_passkey.py started from a pretrained tiny.py decoder, as tiny_ccf_finetune.py is.

From scratch, the passkey model learns everything from the 10 digit targets of a window (the
answer and the key's auto-encoding) while reading filler: at tiny scale its loss sits at chance
(2.30) for the first ~900 steps. Started from a language model, the same model and data leave
chance within ~100 steps. The base of both encoder and decoder is the export of a trained tiny.py
(`init.params_only`); everything then trains at a fine-tuning learning rate.
    ./launch/local.sh --config=experiments/tiny.py    # writes runs/local/tiny/export
    python -m ccf_jax.train --config=experiments/tiny_ccf_passkey_finetune.py --workdir=runs/pk_ft
`python -m ccf_jax.bench passkey --config=experiments/tiny_ccf_passkey_finetune.py --base_steps=2000`
pretrains the base itself (about 7 minutes on 2 cores) and then trains and scores this model.
Measured (stop 16, seed 0; the base was tiny.py trained 2,000 steps in 424 s, passed as
init.params_only): per-digit accuracy 1.000 and exact match 1.000 on 64 held-out windows at T=8
with memory, 0.100 (chance) with memory off; 2,000 steps in 1,260 s, so base and fine-tuning took
28 minutes. The training loss left chance by step 130 and was 0.17 at step 880.
"""

from experiments import tiny_ccf_passkey


def get_config():
  c = tiny_ccf_passkey.get_config()
  c.name = 'tiny_ccf_passkey_finetune'
  c.init.params_only = 'runs/local/tiny/export'  # Written by ./launch/local.sh --config=experiments/tiny.py.
  c.train.lr = 1e-3  # Fine-tuning: half the from-scratch peak.
  c.train.steps = 2000  # About 0.6 s a step of 8 windows x 512 tokens on 2 cores: 20 minutes ...
  c.train.time_budget_s = 1380.0  # ... capped so that the 7-minute base and this fit 30 minutes.
  return c
