"""Passkey retrieval at 4,096 tokens through 8x memory, keys at any depth, real filler (issue 24).

tiny_ccf.py's model (d=128, 4 layers, l=128, c=16: 8x) on passkey windows of T=32 segments =
4,096 tokens: the key statement at a uniformly random depth (`data.passkey_depth='uniform'`)
inside held-out-free corpus text (`data.passkey_filler='corpus'`, the train split around the key),
the question at the end, only the answer's 5 digits scored. It starts from the export of
passkey_512.py (the same task at 512 tokens, where retrieval is learnt at an eighth of the price
of a step here), and a short curriculum grows windows from that stage's 4 segments to 32.

Why these choices:
  * grad_mode='reservoir' (S=2): the decoder and the memory read train on every window, while only
    two segments' encoder graphs are kept for the backward pass, so the step's memory does not
    grow with T (bench memory, README "Long context").
  * The key's segment is auto-encoded from its own memory with the key's digits as the only
    targets (`data.passkey_ae_key`): a gradient that reaches the encoder of exactly the segment
    holding the key, whichever the reservoir drew.
  * decoder_segment_chunk=1 with decoder_remat='full': a chunk with nothing scored is not decoded
    (incremental.decode_window), so only the question's segment pays the decoder, not all 32.
  * model.max_position=8448 covers the rotary positions of 64k-token windows (511 segments x 16
    memory rows + 128 raw tokens), so the same export is evaluated past its training length.
    launch/recipes/passkey_long.sh        # base, passkey_512, this; export, evaluate, tables
"""

from experiments import tiny_ccf


def get_config():
  c = tiny_ccf.get_config()
  c.name = 'passkey_4k'
  c.init.params_only = 'runs/passkey_512/export'  # Retrieval learnt at 512 tokens (a CCF export).
  c.model.max_position = 8448  # Rotary positions of 64k-token windows at 8x (evaluation).
  c.data.task = 'passkey'
  c.data.passkey_depth = 'uniform'  # The key anywhere in the window.
  c.data.passkey_filler = 'corpus'  # Real text around it.
  c.data.passkey_ae_key = True  # Auto-encode the key's segment, its digits the only targets.
  c.data.batch_size = 4  # Windows of 4,096 tokens per step.
  c.data.passkey_min_segments = 4  # Curriculum: passkey_512's 4 segments ...
  c.data.passkey_curriculum_steps = 200  # ... growing to T over these steps.
  c.ccf.num_segments = 32  # T=32 segments of 128 tokens: 4,096 tokens.
  c.ccf.grad_mode = 'reservoir'  # S encoder graphs a window, memory flat in T.
  c.ccf.reservoir_size = 2  # S.
  c.ccf.decoder_segment_chunk = 1  # Decode only chunks with targets (the question's segment) ...
  c.ccf.decoder_remat = 'full'  # ... which the decoder remat's cond skips.
  c.ccf.ae_mode = 'extra'  # The key segment's reconstruction ...
  c.ccf.ae_weight = 1.0  # ... weighing as much as the answer.
  c.train.steps = 2400
  c.train.time_budget_s = 3600.0  # 2,400 steps take about 32 minutes here (0.76 s a step, idle).
  c.train.lr = 1e-3
  c.train.warmup_steps = 50
  c.train.eval_batches = 4
  c.train.eval_every = 200
  c.checkpoint.every = 200
  return c
