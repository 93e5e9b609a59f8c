"""Benchmarks, one module each, dispatched by `python -m ccf_jax.bench SUBCOMMAND`
(`__main__.py`)."""

from __future__ import annotations

from absl import flags


def steps_flag(default: int = 20) -> int:
  """The dispatcher's `--steps` (timed steps), or `default` when called from Python without
  parsed flags."""
  try:
    return int(flags.FLAGS.steps)
  except (AttributeError, flags.Error):
    return default
