"""CCF in adapter mode over a trained tiny.py: frozen base, LoRA (rank 8, alpha 32) + memory train.

The base is an export of experiments/tiny.py; the first command writes it to runs/local/tiny/export:
    ./launch/local.sh --config=experiments/tiny.py
    python -m ccf_jax.train --config=experiments/tiny_ccf_adapter.py --workdir=runs/tiny_ccf_adapter
Its params map into both the encoder and the decoder (arch `from_base_params`); only the adapter
(28,800 parameters, 2.2% here; 2.0% at 7B) is trained and lives in the optimizer state. With
memory off the model is exactly the exported base.
"""

from experiments import tiny_ccf


def get_config():
  c = tiny_ccf.get_config()
  c.name = 'tiny_ccf_adapter'
  # Written by ./launch/local.sh --config=experiments/tiny.py.
  c.init.params_only = 'runs/local/tiny/export'
  c.ccf.mode = 'adapter'
  c.ccf.lora_rank = 8
  c.ccf.lora_alpha = 32.0
  c.train.lr = 1e-3
  return c
