"""Throughput of the input pipeline (wired into `python -m ccf_jax.bench data`).

Why: the pipeline must never be the bottleneck of training. A ~1M-parameter model trains at
~20k tokens/s on a 2-core CPU, so the pipeline should deliver at least an order of magnitude
more. `bench_data` builds the exact train iterator the trainer uses (same config, tokenizer and
caches), times the setup (corpus fetch, tokenizer, tokenisation: cold on first use, cached after),
then pulls batches for a fixed wall-clock budget and reports tokens/s. Only the iterator is timed:
no device transfer, no model.

  python -m ccf_jax.bench data --config=experiments/tiny.py
"""

from __future__ import annotations

import time

import numpy as np

from ccf_jax.bench import steps_flag
from ccf_jax.data import pipeline as pipeline_lib
from ccf_jax.data import tokenizer as tokenizer_lib
from ccf_jax.train import timing


def bench_data(config, seconds: float = 3.0, warmup_batches: int = 2, split: str = 'train',
               verbose: bool = True) -> dict:
  """Measures the pipeline of `config` for about `seconds`; returns and prints the numbers.

  Returns a dict: tokens_per_s (B*L tokens delivered per second), target_tokens_per_s (tokens with
  loss_mask 1, i.e. excluding padding), batches_per_s, batch_shape, setup_s (tokenizer + token
  cache + grain construction), first_batch_s, mode, and the pipeline's counts.
  """
  t0 = time.perf_counter()
  tok = tokenizer_lib.load_or_train_tokenizer(config)
  t1 = time.perf_counter()
  pipe = pipeline_lib.make_pipeline(config, split, tok=tok)
  it = iter(pipe.dataset)
  t2 = time.perf_counter()
  batch = next(it)
  t3 = time.perf_counter()
  for _ in range(warmup_batches):
    batch = next(it)
  n_batches = n_tokens = n_targets = 0
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    try:
      batch = next(it)
    except StopIteration:
      break
    n_batches += 1
    n_tokens += batch['tokens'].size
    n_targets += int(np.count_nonzero(batch['loss_mask'][:, 1:]))
  dt = max(time.perf_counter() - start, 1e-9)
  if hasattr(it, 'close'):
    it.close()  # Stops prefetch threads / worker processes now rather than at exit.
  info = pipe.info
  res = dict(
      mode=config.data.mode, split=split, batch_shape=tuple(batch['tokens'].shape),
      tokens_per_s=n_tokens / dt, target_tokens_per_s=n_targets / dt, batches_per_s=n_batches / dt,
      batches=n_batches, tokenizer_s=t1 - t0, setup_s=t2 - t0, first_batch_s=t3 - t2,
      examples=info['examples'], documents=info['documents'], tokens=info['tokens'],
      skipped_documents=info['skipped_documents'], skipped_tails=info['skipped_tails'],
      num_workers=int(config.data.num_workers), prefetch=int(config.data.prefetch))
  if verbose:
    print(f"data ({res['mode']}, batch {res['batch_shape']}, workers {res['num_workers']}): "
          f"{res['tokens_per_s']:,.0f} tokens/s ({res['target_tokens_per_s']:,.0f} targets/s, "
          f"{res['batches_per_s']:,.1f} batches/s); setup {res['setup_s']:.2f}s "
          f"(tokenizer {res['tokenizer_s']:.2f}s), first batch {res['first_batch_s'] * 1e3:.1f}ms; "
          f"{res['examples']} examples from {res['documents']} documents, "
          f"{res['skipped_documents']} short documents and {res['skipped_tails']} tails skipped")
  return res


def bench_train_step(config) -> dict:
  """`bench train`: the jitted train step's figures over `--steps` timed steps."""
  return timing.bench_train(config, steps_flag())


def bench_data_vs_train(config) -> list:
  """`bench data`: the pipeline's tokens/s next to the train step's."""
  return [bench_data(config), bench_train_step(config)]
