"""`python -m ccf_jax.bench`: the dispatcher parses every subcommand's flags and prints JSON.

Runs the real entry point in a subprocess (flag definitions only collide there: a DuplicateFlagError
once broke `bench` when two modules defined --config) on a shrunk tiny config, one timed step.
"""

import json
import os
import subprocess
import sys

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


def test_every_subcommand_module_imports_with_the_dispatcher():
  # Importing a subcommand's module next to bench's own flags must not redefine any flag; its own
  # flags then parse (absl's --helpfull lists them, and exits 1 by design).
  for sub, own_flag in (('memory', 'steps'), ('signal', 'signal_seeds'),
                        ('passkey', 'passkey_train_baseline'), ('decode', 'steps'),
                        ('efficiency', 'steps')):
    r = _bench(sub, '--helpfull')
    assert 'Traceback' not in r.stderr and own_flag in r.stdout, (sub, r.stderr[-3000:])
