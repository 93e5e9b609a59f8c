"""Metric sinks: TensorBoard (tensorboardX), JSONL in the workdir, and a human console line.

Only process 0 writes. The trainer hands over host floats one step late (see trainer.py), so
nothing here ever blocks on the device.
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging


def _fmt_duration(s: float) -> str:
  s = int(max(0, s))
  return f'{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}'


class MetricWriter:
  """Writes scalars to TensorBoard + metrics.jsonl and prints progress (step, loss, tok/s, ETA)."""

  def __init__(self, workdir: str, enabled: bool = True, total_steps: int = 0,
               time_budget_s: float = 0.0):
    self.enabled = enabled
    self.total_steps = total_steps
    self.time_budget_s = time_budget_s
    self.t0 = time.time()
    self._tb = None
    self._jsonl = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')

  def write(self, step: int, scalars: dict, prefix: str = 'train', console: bool = True):
    if not self.enabled:
      return
    for k, v in scalars.items():
      self._tb.add_scalar(f'{prefix}/{k}', float(v), step)
    rec = {'step': int(step), 'split': prefix, 'time': round(time.time() - self.t0, 3)}
    rec.update({k: float(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(rec) + '\n')
    self._jsonl.flush()
    if console:
      print(self.console_line(step, scalars, prefix), flush=True)

  def console_line(self, step, s, prefix):
    elapsed = time.time() - self.t0
    parts = [f'[{prefix}] step {step:>6d}']
    if 'loss' in s:
      parts.append(f'loss {s["loss"]:.4f}')
    if 'ppl' in s and math.isfinite(s['ppl']):
      parts.append(f'ppl {s["ppl"]:.2f}')
    if 'tokens_per_s' in s:
      parts.append(f'{s["tokens_per_s"]:,.0f} tok/s')
    if 'tflops' in s:
      parts.append(f'{s["tflops"] * 1e3:.1f} GFLOP/s')
    if 'lr' in s:
      parts.append(f'lr {s["lr"]:.2e}')
    if prefix == 'train' and step > 0:
      remaining = []
      if self.total_steps:
        remaining.append(elapsed / step * max(0, self.total_steps - step))
      if self.time_budget_s:
        remaining.append(max(0.0, self.time_budget_s - elapsed))
      if remaining:
        parts.append(f'ETA {_fmt_duration(min(remaining))}')
    return ' | '.join(parts)

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._jsonl.close()
      self._tb = None
    logging.flush() if hasattr(logging, 'flush') else None
