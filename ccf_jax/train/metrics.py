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
    # The ETA's rate and the budget's clock count this process's training steps only: a resumed
    # run starts at its checkpoint's step, not at 0 (start_training).
    self.train_t0, self.start_step = self.t0, 0
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

  def start_training(self, step: int):
    """Marks where this process's training begins (its first step, after setup)."""
    self.train_t0, self.start_step = time.time(), step

  def console_line(self, step, s, prefix):
    elapsed = time.time() - self.train_t0
    parts = [f'[{prefix}] step {step:>6d}']
    if 'loss' in s:
      parts.append(f'loss {s["loss"]:.4f}')
    if 'ppl' in s and math.isfinite(s['ppl']):
      parts.append(f'ppl {s["ppl"]:.2f}')
    if 'tokens_per_s' in s:
      parts.append(f'{s["tokens_per_s"]:,.0f} tok/s')
    if 'tflops' in s:
      parts.append(f'{s["tflops"] * 1e3:.1f} GFLOP/s')
    if 'mfu' in s:
      parts.append(f'MFU {s["mfu"]:.1%}')
    if 'lr' in s:
      parts.append(f'lr {s["lr"]:.2e}')
    if prefix == 'train' and step > self.start_step:
      remaining = []
      if self.total_steps:
        remaining.append(elapsed / (step - self.start_step) * max(0, self.total_steps - step))
      if self.time_budget_s:
        remaining.append(max(0.0, self.time_budget_s - elapsed))
      if remaining:
        parts.append(f'ETA {_fmt_duration(min(remaining))}')
    return ' | '.join(parts)

  def drop_rows_after(self, step: int):
    """Removes the metrics.jsonl rows of steps after `step`: a resumed run re-runs the steps a
    killed run logged past its last checkpoint, and each step keeps one row per split."""
    if not self.enabled:
      return
    path = self._jsonl.name
    self._jsonl.close()
    with open(path, encoding='utf-8') as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        if int(json.loads(line)['step']) > step:
          continue
      except (ValueError, KeyError, TypeError):
        continue  # A line cut short by a kill.
      keep.append(line)
    if len(keep) != len(lines):
      logging.info('metrics.jsonl: dropped %d row(s) past the restored step %d.',
                   len(lines) - len(keep), step)
      tmp = path + '.tmp'
      with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(keep)
      os.replace(tmp, path)
    self._jsonl = open(path, 'a', encoding='utf-8')

  def close(self, quiet: bool = False):
    """`quiet` (while another error propagates, e.g. a full disk) logs a failing flush instead
    of raising it over that error."""
    try:
      if self._tb is not None:
        tb, self._tb = self._tb, None
        tb.close()
        self._jsonl.close()
    except OSError as e:
      if not quiet:
        raise
      logging.warning('closing the metric writers after an error: %s', e)
    logging.flush() if hasattr(logging, 'flush') else None
