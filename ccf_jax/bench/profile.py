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

`--profile_system=torch` profiles bench peer's torch step instead (`peer_child.torch_step`, with
torch.profiler; needs requirements-peer.txt), in the same terms: each aten op's self time by kind
(matmul for mm/addmm/bmm, the fused attention for SDPA's kernels, copy/transpose, framework for
autograd and dispatch time outside every op) and by phase of the step (forward, backward, clip,
optimizer). Both systems also print `bucket` rows, one split that reads the same for each:
attention_kernel (ccf_jax's kernel scope; SDPA), optimizer (ccf_jax's optimizer scope; torch's
clip and AdamW), and the rest by kind. Set side by side, they say where one step's time exceeds
the other's. Torch on CPU runs its ops one after another from one thread, so its self times add
up to the step; XLA:CPU may run independent instructions at once, so ccf_jax's shares are of the
summed self time.
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
_SYSTEM = flags.DEFINE_enum('profile_system', 'ccf_jax', ['ccf_jax', 'torch'],
                            'bench profile: whose train step to trace (torch: bench peer\'s torch '
                            'step, with torch.profiler; needs requirements-peer.txt).')

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


def bucket_of(kind: str, component: str) -> str:
  """The split both systems' profiles print (ccf_jax's here, torch_bucket): the attention kernel
  and the optimizer by scope, the rest by kind."""
  return component if component in ('attention_kernel', 'optimizer') else kind


def torch_bucket(kind: str, phase: str) -> str:
  return ('attention_kernel' if kind == 'attention (fused)' else
          'optimizer' if phase in ('clip', 'optimizer') else kind)


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
  known = []
  for name, us in times.items():
    if name in instrs:
      opcode, called, op_name = instrs[name]
      known.append((us, name, kind_of(opcode, called, comps), component_of(op_name), op_name))
  return _rows(known, steps, top, 'component', bucket_of)


def _rows(known: list, steps: int, top: int, group: str, bucket) -> list:
  """Rows by kind, by `group` (ccf_jax's component, torch's phase) and by bucket(kind, group
  value), then the heaviest `top` entries of known: (self us, name, kind, group value, op name)."""
  totals = {what: collections.Counter() for what in ('kind', group, 'bucket')}
  for us, _, kind, part, _ in known:
    totals['kind'][kind] += us
    totals[group][part] += us
    totals['bucket'][bucket(kind, part)] += us
  total = sum(totals['kind'].values()) or 1.0
  row = lambda what, name, us: {'bench': 'profile', what: name,
                                'ms_per_step': round(us / 1e3 / steps, 2),
                                'share': round(us / total, 3)}
  rows = [row(what, k, v) for what, counter in totals.items() for k, v in counter.most_common()]
  for us, name, kind, part, op_name in sorted(known, reverse=True)[:top]:
    rows.append({**row('instruction', name, us), 'kind': kind, group: part,
                 'op_name': op_name[-120:]})
  return rows


_TORCH_MATMULS = {'aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm', 'aten::addbmm'}
_TORCH_MOVES = {'aten::copy_', 'aten::clone', 'aten::contiguous', 'aten::cat', 'aten::stack',
                'aten::index_select', 'aten::embedding_dense_backward'}
_TORCH_PHASES = ('forward', 'backward', 'clip', 'optimizer')


def torch_kind(name: str) -> str:
  """Kind of one torch.profiler event from its name (self time only, so a composite op such as
  aten::linear counts only what it does outside the aten::addmm inside it)."""
  if 'scaled_dot_product' in name or 'flash_attention' in name:
    return 'attention (fused)'
  if name in _TORCH_MATMULS:
    return 'matmul'
  if name in _TORCH_MOVES:
    return 'copy/transpose'
  if not name.startswith('aten::'):
    return 'framework'  # Autograd nodes, the phases' own Python time, optimizer bookkeeping.
  return 'elementwise/reduce'


def torch_rows(cfg, steps: int, top: int) -> list:
  """bench peer's torch step under torch.profiler: rows as breakdown's, by phase."""
  import torch as pt
  from ccf_jax.bench import peer_child
  step, _ = peer_child.torch_step(cfg, phase=pt.profiler.record_function)
  step().item()  # Warm-up.
  t = time.time()
  for _ in range(steps):
    loss = step()
  loss.item()
  wall = (time.time() - t) / steps
  with pt.profiler.profile(activities=[pt.profiler.ProfilerActivity.CPU]) as prof:
    t = time.time()
    for _ in range(steps):
      loss = step()
    loss.item()
    traced = (time.time() - t) / steps
  known = []
  for e in prof.events():
    top_event = e
    while top_event.cpu_parent is not None:
      top_event = top_event.cpu_parent
    part = top_event.name if top_event.name in _TORCH_PHASES else 'other'
    known.append((e.self_cpu_time_total, e.name, torch_kind(e.name), part, e.name))
  merged = collections.defaultdict(float)  # One entry per (op, kind, phase), summed over calls.
  for us, name, kind, part, _ in known:
    merged[name, kind, part] += us
  known = [(us, name, kind, part, name) for (name, kind, part), us in merged.items()]
  return [{'bench': 'profile', 'system': 'torch', 'shape': _SHAPE.value, 'config': cfg.name,
           'steps': steps, 'step_s': round(wall, 4), 'traced_step_s': round(traced, 4),
           'threads': pt.get_num_threads()}] + _rows(known, steps, top, 'phase', torch_bucket)


def bench_profile(config) -> list:
  cfg = peer.shape_config(config, _SHAPE.value)
  steps = steps_flag(3)
  if _SYSTEM.value == 'torch':
    if not peer.peer_available():
      raise SystemExit(f'bench profile --profile_system=torch needs torch and transformers: '
                       f'{peer.SKIP_HINT}')
    return torch_rows(cfg, steps, _TOP.value)
  import jax
  from ccf_jax.train import timing
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
  return [{'bench': 'profile', 'system': 'ccf_jax', 'shape': _SHAPE.value, 'config': cfg.name,
           'steps': steps, 'step_s': round(wall, 4), 'traced_step_s': round(traced, 4),
           'attention_impl': cfg.model.attention_impl}] + rows
