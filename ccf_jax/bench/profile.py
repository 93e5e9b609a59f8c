"""`python -m ccf_jax.bench profile --config=experiments/tiny.py [--profile_shape=S2]
[--steps=N]`: where the train step's time goes, per operation, from a `jax.profiler` trace.

Why: a tokens/s figure says how fast, not why. This traces `--steps` steps of the real jitted
train step (`train/timing.py` TrainTimer: the step `bench train` and `bench peer` time), reads the
trace's per-operation events (XLA:CPU's thunk executor records one per HLO instruction it runs;
accelerators record theirs too), and sums each operation's *self* time (its duration minus that of
the operations nested inside it, e.g. a loop's body). Each instruction is then attributed twice,
from the optimised HLO of the same compiled step:
  * by kind: matmul (a dot, or a fusion containing one), copy/transpose (a copy, transpose or a
    fusion of nothing but data movement), broadcast, loop control (while/conditional/call), and
    elementwise/reduce (fusions of arithmetic, with whatever data movement XLA fused into them);
  * by component: the innermost `jax.named_scope` the code opens: attention_kernel (the softmax
    attention itself, model/attention.py), attention (the layer's q/k/v/o projections and rotary),
    mlp, norm, embed, logits (model/), loss, optimizer (train/step.py), or 'other' (outside
    every scope: residual adds, layer-scan bookkeeping, gradient accumulation and checks).
The printed rows are ms per step and share of the traced step. `--profile_top` more rows list
the heaviest single instructions with their kind, component and JAX op name.

Shapes: `--profile_shape` takes bench peer's shape names (S1, S2, S3, CCF8x, CCF8x_4k, config),
so a profile and the peer comparison describe the same step.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

from absl import flags

from ccf_jax.bench import peer, steps_flag

_SHAPE = flags.DEFINE_string('profile_shape', 'config', 'bench profile: a bench peer shape '
                             f'({", ".join(peer.SHAPE_NAMES)}).')
_TOP = flags.DEFINE_integer('profile_top', 12, 'bench profile: heaviest instructions to list.')

# Innermost first: the attention kernel's scope sits inside the attention layer's.
COMPONENTS = ('attention_kernel', 'attention', 'mlp', 'norm', 'embed', 'logits', 'loss',
              'optimizer')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\((.*)$')
_COMP = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_MOVES = {'copy', 'transpose', 'bitcast', 'broadcast', 'reshape', 'slice', 'dynamic-slice',
          'dynamic-update-slice', 'concatenate', 'parameter', 'constant', 'pad', 'iota',
          'get-tuple-element', 'tuple', 'reverse', 'gather', 'convert'}


def parse_hlo(text: str) -> tuple[dict, dict]:
  """({instruction: (opcode, called computation or None, op_name)}, {computation: opcodes})."""
  instrs, comps, current = {}, collections.defaultdict(set), None
  for line in text.splitlines():
    m = _INSTR.match(line)
    if m:
      name, opcode, rest = m.groups()
      calls = re.search(r'calls=%?([\w.\-]+)', rest)
      op_name = re.search(r'op_name="([^"]*)"', rest)
      instrs[name] = (opcode, calls and calls.group(1), op_name.group(1) if op_name else '')
      if current:
        comps[current].add(opcode)
      continue
    m = _COMP.match(line)
    if m and '=' not in line:
      current = m.group(1)
  return instrs, comps


def kind_of(opcode: str, called: str | None, comps: dict) -> str:
  ops = comps.get(called, set()) if called else {opcode}
  if opcode in ('while', 'conditional', 'call'):
    return 'loop control'
  if ops & {'dot', 'convolution'}:
    return 'matmul'
  if opcode == 'broadcast' or (ops and ops <= {'broadcast', 'parameter', 'constant', 'bitcast'}):
    return 'broadcast'
  if ops and ops <= _MOVES:
    return 'copy/transpose'
  return 'elementwise/reduce'


def component_of(op_name: str) -> str:
  # Scopes appear as path parts, wrapped by transformations: 'mlp', 'jvp(mlp)', 'transpose(jvp(mlp))'.
  parts = [re.sub(r'^(?:[\w]+\()+|\)+$', '', p) for p in op_name.split('/')]
  for part in reversed(parts):
    if part in COMPONENTS:
      return part
  return 'other'


def self_times(events: list) -> collections.Counter:
  """{event name: summed self time in us} over complete ('X') events, nesting per thread."""
  out = collections.Counter()
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e:
      by_thread[e.get('pid'), e.get('tid')].append((float(e['ts']), float(e['dur']), e['name']))
  for evs in by_thread.values():
    evs.sort(key=lambda x: (x[0], -x[1]))
    stack = []  # [end, name, self time]
    for ts, dur, name in evs:
      while stack and stack[-1][0] <= ts:
        end, n, t = stack.pop()
        out[n] += t
      if stack:
        stack[-1][2] -= dur
      stack.append([ts + dur, name, dur])
    for end, n, t in stack:
      out[n] += t
  return out


def _trace_events(logdir: str) -> list:
  files = sorted(glob.glob(os.path.join(logdir, '**', '*.trace.json.gz'), recursive=True) +
                 glob.glob(os.path.join(logdir, '**', 'perfetto_trace.json.gz'), recursive=True))
  if not files:
    raise RuntimeError(f'jax.profiler wrote no trace under {logdir}.')
  data = json.load(gzip.open(files[-1]))
  return data['traceEvents'] if isinstance(data, dict) else data


def breakdown(times: collections.Counter, hlo_text: str, steps: int, top: int) -> list:
  """The JSON rows: totals by kind and by component, then the heaviest instructions."""
  instrs, comps = parse_hlo(hlo_text)
  by_kind, by_comp, known = collections.Counter(), collections.Counter(), []
  for name, us in times.items():
    if name not in instrs:
      continue
    opcode, called, op_name = instrs[name]
    kind, comp = kind_of(opcode, called, comps), component_of(op_name)
    by_kind[kind] += us
    by_comp[comp] += us
    known.append((us, name, kind, comp, op_name))
  total = sum(by_kind.values()) or 1.0
  row = lambda what, name, us: {'bench': 'profile', what: name,
                                'ms_per_step': round(us / 1e3 / steps, 2),
                                'share': round(us / total, 3)}
  rows = [row('kind', k, v) for k, v in by_kind.most_common()]
  rows += [row('component', k, v) for k, v in by_comp.most_common()]
  for us, name, kind, comp, op_name in sorted(known, reverse=True)[:top]:
    rows.append({**row('instruction', name, us), 'kind': kind, 'component': comp,
                 'op_name': op_name[-120:]})
  return rows


def bench_profile(config) -> list:
  import jax
  from ccf_jax.train import timing
  cfg = peer.shape_config(config, _SHAPE.value)
  steps = steps_flag(3)
  timer = timing.TrainTimer(cfg)  # Compiles and takes the warm-up step.
  wall = timer.block(steps)
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
    t = time.time()
    timer.block(steps)
    traced = (time.time() - t) / steps
    jax.profiler.stop_trace()
    events = _trace_events(logdir)
  rows = breakdown(self_times(events), timer.hlo_text(), steps, _TOP.value)
  return [{'bench': 'profile', 'shape': _SHAPE.value, 'config': cfg.name, 'steps': steps,
           'step_s': round(wall, 4), 'traced_step_s': round(traced, 4),
           'attention_impl': cfg.model.attention_impl}] + rows
