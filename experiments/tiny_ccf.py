"""Tiny CCF model at 8x compression on the built-in corpus: the CPU default of ./launch/local.sh.

The model fields are tiny.py's: d=128, 4 layers, vocab 2048, about 1.3M parameters. Windows of T=8
segments of l=128 tokens (1,024 tokens), c=16 memory tokens per segment (ratio 8), encoder and
decoder sharing weights, distinct memory tokens (the prototype notes in issue 4: one repeated
vector left the memory weaker).

As in the paper, where CCF is trained on top of Llama-2, the model starts from a pretrained LM:
the export of experiments/tiny.py initialises the base of both encoder and decoder
(`init.params_only`), and then everything trains on windows (`ccf.mode='pretrain'`, LM loss
only) at a fine-tuning learning rate. ./launch/local.sh trains that base first when its export is
missing (a two-stage job: tiny.py, then this). Trained from scratch instead
(experiments/tiny_ccf_scratch.py), the same model trails segment_local: it has to learn the
language and the memory at once, and at this size its weights pay for the memory in LM quality.
The baselines (tiny_segment_local.py, tiny_full_attention.py) start from the same base.
    ./launch/local.sh                                   # base (if missing), this, export, eval
    python -m ccf_jax.bench signal --config=experiments/tiny_ccf.py --signal_seeds=3
Measured figures (CCF against segment_local and full attention over seeds): WORKSPACE.md.
"""

from experiments import tiny


def get_config():
  c = tiny.get_config()
  c.name = 'tiny_ccf'
  c.model.arch = 'ccf'
  c.init.params_only = 'runs/local/tiny/export'  # ./launch/local.sh trains tiny.py first if missing.
  c.data.mode = 'windows'
  c.data.batch_size = 2  # Windows per step: more, smaller steps learn faster in a CPU budget
  # (2,048 tokens a step, like tiny.py; ./launch/local.sh --devices=8 raises it to 8).
  c.ccf.segment_len = 128
  c.ccf.num_segments = 8
  c.ccf.num_memory = 16  # 8x.
  c.ccf.mode = 'pretrain'
  c.ccf.shared_weights = True
  c.ccf.lora_rank = 8
  c.ccf.lora_alpha = 32.0
  c.ccf.distinct_memory_tokens = True
  c.ccf.memory_init_token = 3  # eos of the tokenizers ccf_jax trains (pad 0, unk 1, bos 2, eos 3).
  c.ccf.ae_mode = 'off'  # The LM term alone (from scratch, auto-encoding cost LM quality).
  c.train.steps = 1000  # About 0.33 s per step of 2 windows on 2 cores: 5.5 minutes ...
  c.train.time_budget_s = 900.0  # ... a cap for slower 2-core machines.
  c.train.lr = 1e-3  # Fine-tuning: a third of tiny.py's from-scratch peak.
  c.train.warmup_steps = 20
  c.checkpoint.every = 250
  return c
