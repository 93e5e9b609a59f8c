"""tiny_ccf.py continued on language modelling at 16,384 tokens (issue 24 item 3: perplexity
against context up to 16k tokens).

tiny_ccf.py trains on windows of T=8 segments (1,024 tokens): read through more memory than that,
its memory rows sit at rotary distances and in numbers it never saw, and the loss of a segment
rises again past K = 1,024 context tokens (README "Long context"). This config takes the tiny_ccf
export whole and trains it on windows of T=128 segments, with the reservoir (S=2 encoder graphs a
window) and a serial decoder (k=1, remat'd), so the trainer's peak RSS grows by a third over the
T=8 run's (1.36 GB against 1.02 GB) for a window 16 times longer; every segment's next-token loss is
scored, as in tiny_ccf.py.
    ./launch/local.sh --config=experiments/tiny_ccf_16k.py      # tiny_ccf first if missing
    python -m ccf_jax.evaluate --checkpoint=runs/local/tiny_ccf_16k/export --preset=long --only=ppl
"""

from experiments import tiny_ccf


def get_config():
  c = tiny_ccf.get_config()
  c.name = 'tiny_ccf_16k'
  c.init.params_only = 'runs/local/tiny_ccf/export'  # The T=8 model (a CCF export, taken whole).
  c.ccf.num_segments = 128  # T=128 segments of 128 tokens: 16,384 tokens.
  c.model.max_position = 16384  # Full attention over the same window (a baseline) fits too.
  c.data.batch_size = 1  # One 16,384-token window a step.
  c.ccf.grad_mode = 'reservoir'  # S encoder graphs a window: memory flat in T.
  c.ccf.reservoir_size = 2  # S.
  c.ccf.decoder_segment_chunk = 1  # Decode one segment per scan step ...
  c.ccf.decoder_remat = 'full'  # ... keeping only its inputs for the backward.
  c.train.steps = 150  # Continued training: 7-9 s a step on 2 shared cores, 23 minutes.
  c.train.time_budget_s = 3600.0
  c.train.lr = 5e-4
  c.train.warmup_steps = 10
  c.train.eval_every = 50
  c.checkpoint.every = 50
  return c
