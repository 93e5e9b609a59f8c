"""`python -m ccf_jax.bench`: the dispatcher parses every subcommand's flags and prints JSON.

Runs the real entry point in a subprocess (flag definitions only collide there: a DuplicateFlagError
once broke `bench` when two modules defined --config) on a shrunk tiny config, one timed step.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--config.model.d_model=32', '--config.model.num_layers=2', '--config.model.num_heads=4',
         '--config.model.num_kv_heads=2', '--config.model.head_dim=8', '--config.model.mlp_dim=64',
         '--config.model.vocab_size=64', '--config.data.seq_len=32', '--config.data.batch_size=2']


def _bench(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  return subprocess.run([sys.executable, '-m', 'ccf_jax.bench', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_bench_train_prints_json():
  r = _bench('train', '--config=experiments/tiny.py', '--steps=1', *SMALL)
  assert r.returncode == 0, r.stderr[-3000:]
  rec = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')][-1]
  assert rec['bench'] == 'train' and rec['batch'] == 2 and rec['length'] == 32
  assert rec['tokens_per_s'] > 0 and rec['temp_bytes'] > 0 and rec['params'] > 0


def test_bench_unknown_subcommand_is_a_usage_error():
  r = _bench('nope', '--config=experiments/tiny.py')
  assert r.returncode != 0
  assert 'usage: python -m ccf_jax.bench {train,data,memory,signal' in r.stderr


def test_bench_memory_rejects_zero_rounds_before_compiling():
  r = _bench('memory', '--memory_rounds=0')
  assert r.returncode != 0 and '--memory_rounds=0: 0 is not a positive integer' in r.stderr
  assert 'Traceback' not in r.stderr and not r.stdout.strip()


def test_every_subcommand_module_imports_with_the_dispatcher():
  # Importing a subcommand's module next to bench's own flags must not redefine any flag; its own
  # flags then parse (absl's --helpfull lists them, and exits 1 by design).
  for sub, own_flag in (('memory', 'steps'), ('signal', 'signal_seeds'),
                        ('passkey', 'passkey_train_baseline'), ('decode', 'steps'),
                        ('efficiency', 'steps'), ('prefill', 'prefill_lengths'),
                        ('profile', 'profile_shape'), ('convert', 'convert_layers')):
    r = _bench(sub, '--helpfull')
    assert 'Traceback' not in r.stderr and own_flag in r.stdout, (sub, r.stderr[-3000:])


def test_bench_memory_times_configurations_in_alternating_rounds():
  # In process, on the plain decoder (its step compiles in about a second; CCF steps take ~10 s).
  from experiments import tiny
  from ccf_jax.bench import memory as bench_memory
  c = tiny.get_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size = (
      32, 1, 4, 2, 8, 64, 64)
  c.model.arch, c.data.mode = 'full_attention', 'windows'
  c.ccf.segment_len, c.ccf.num_segments, c.ccf.num_memory, c.data.batch_size = 16, 2, 4, 8
  wide = bench_memory._configured(c, 2, 'full_attention', {'mlp_dim': 256}, {})
  rows = bench_memory._measure_together({'narrow': c, 'wide': wide}, steps=1, repeats=3)
  assert [r['mode'] for r in rows] == ['narrow', 'wide']
  for r in rows:  # One block per round; step_s is the fastest.
    assert r['window_tokens'] == 32 and len(r['block_s']) == 3
    assert r['step_s'] == min(r['block_s']) and r['temp_bytes'] > 0
  assert rows[1]['flops'] > rows[0]['flops']


def test_paired_ratio_is_the_median_of_per_round_ratios():
  from ccf_jax.bench import memory as bench_memory
  res = {'block_s': [1.0, 2.0, 6.0], 'step_s': 1.0}
  ref = {'block_s': [2.0, 2.0, 4.0], 'step_s': 2.0}
  assert bench_memory.paired_ratio(res, ref) == 1.0  # Ratios 0.5, 1.0, 1.5.
  assert bench_memory.paired_ratio({'step_s': 1.0}, ref) == 0.5  # Measured apart: fastest blocks.


def test_bench_profile_and_prefill_print_json():
  """Both on the shrunk config: the profile's kinds add up to the traced step, attention is
  found by its named scope, and prefill reports each requested length."""
  r = _bench('profile', '--config=experiments/tiny.py', '--steps=1', *SMALL)
  assert r.returncode == 0, r.stderr[-3000:]
  recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')]
  kinds = {x['kind']: x['share'] for x in recs if 'kind' in x and 'instruction' not in x}
  comps = {x['component']: x['ms_per_step'] for x in recs if 'component' in x
           and 'instruction' not in x}
  assert {'matmul', 'copy/transpose'} <= set(kinds) and abs(sum(kinds.values()) - 1) < 0.01
  # Every scope is found; the embedding gather may round to 0.0 ms at this size.
  assert {'attention_kernel', 'attention', 'mlp', 'norm', 'embed', 'logits', 'loss',
          'optimizer'} <= set(comps), comps
  assert min(comps[c] for c in ('attention_kernel', 'attention', 'mlp', 'logits')) > 0, comps
  buckets = {x['bucket']: x['ms_per_step'] for x in recs if 'bucket' in x}  # torch's split.
  assert buckets['attention_kernel'] == comps['attention_kernel'], buckets
  assert buckets['optimizer'] == comps['optimizer'], buckets
  assert sum(buckets.values()) == pytest.approx(sum(comps.values()), abs=0.1)
  r = _bench('prefill', '--config=experiments/tiny.py', '--prefill_lengths=16,32', *SMALL)
  assert r.returncode == 0, r.stderr[-3000:]
  recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')]
  assert [x['tokens'] for x in recs] == [16, 32] and all(x['tokens_per_s'] > 0 for x in recs)


def test_bench_profile_of_the_torch_peer():
  """--profile_system=torch traces bench peer's torch step where torch and transformers are
  installed (its phases and SDPA found, the buckets adding up to the traced ops); without them it
  stops with the install command (CI)."""
  import importlib.util
  r = _bench('profile', '--config=experiments/tiny.py', '--steps=1', '--profile_system=torch',
             *SMALL)
  if not (importlib.util.find_spec('torch') and importlib.util.find_spec('transformers')):
    assert r.returncode != 0 and 'pip install -r requirements-peer.txt' in r.stderr, r.stderr
    return
  assert r.returncode == 0, r.stderr[-3000:]
  recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')]
  phases = {x['phase'] for x in recs if 'phase' in x and 'instruction' not in x}
  buckets = {x['bucket']: x['share'] for x in recs if 'bucket' in x}
  assert {'forward', 'backward', 'clip', 'optimizer'} <= phases, phases
  assert buckets['attention_kernel'] > 0 and buckets['matmul'] > 0, buckets
  assert abs(sum(buckets.values()) - 1) < 0.01


def test_profile_self_times_subtract_nested_events():
  """Self time is duration minus nested children, per thread (a loop and its body ops)."""
  from ccf_jax.bench import profile
  ev = [dict(ph='X', name='while', ts=0, dur=100, pid=1, tid=1),
        dict(ph='X', name='dot', ts=10, dur=30, pid=1, tid=1),
        dict(ph='X', name='copy', ts=50, dur=20, pid=1, tid=1),
        dict(ph='X', name='dot', ts=5, dur=7, pid=1, tid=2),
        dict(ph='i', name='marker', ts=3, pid=1, tid=1)]
  assert profile.self_times(ev) == {'while': 50, 'dot': 37, 'copy': 20}


def test_profile_kinds_from_optimised_hlo():
  """Kinds read from a real compiled program: a matmul, a transpose copy, a broadcast."""
  import jax
  import jax.numpy as jnp
  from ccf_jax.bench import profile
  f = jax.jit(lambda a, b, c: (a @ b, a.T.copy() + 0 * c[0, 0], jnp.broadcast_to(c, (64, 8, 8))))
  args = (jnp.ones((64, 64)), jnp.ones((64, 64)), jnp.ones((8, 8)))
  instrs, comps = profile.parse_hlo(f.lower(*args).compile().as_text())
  kinds = {profile.kind_of(op, called, comps) for op, called, _ in instrs.values()}
  assert 'matmul' in kinds and 'broadcast' in kinds, kinds


def test_bench_convert_prints_peaks_and_the_slope():
  """Random models of 1 and 2 layers, then a fixture directory as the source: the rows carry
  each peak (a whole process, so above the model's bytes) and the slope between the models."""
  r = _bench('convert', '--convert_layers=1,2', '--convert_rounds=1')
  assert r.returncode == 0, r.stderr[-3000:]
  recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')]
  assert [x.get('layers') for x in recs[:2]] == [1, 2]
  assert all(x['peak_rss_bytes'] > x['model_bytes'] > 0 for x in recs[:2])
  assert recs[2]['bench'] == 'convert_slope' and 'peak_bytes_per_model_byte' in recs[2]
  src = os.path.join(ROOT, 'tests', 'fixtures', 'hf', 'llama2_gqa_tied')
  r = _bench('convert', f'--convert_source={src}', '--convert_rounds=1')
  assert r.returncode == 0, r.stderr[-3000:]
  (rec,) = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')]
  assert rec['peak_rss_bytes'] > rec['interpreter_rss_bytes'] > 0 and rec['model_bytes'] > 0
