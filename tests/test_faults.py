"""Fault injection: faults never cost good work.

The workdir lock, divergence that keeps the good checkpoints, a workdir of only corrupt
checkpoints, storage faults (a workdir that cannot be written, a full disk: a tiny tmpfs when
running as root, an injected free-space figure otherwise), a validation split that does not exist,
config messages, metrics rows after a resume, and one line plus an exit code from every entry
point. Exact resume after SIGKILL / SIGTERM (exit code 75) is tests/test_trainer.py's
test_resume_is_bitwise_exact.
"""

import glob
import json
import logging
import math
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ccf_jax import checkpoint as ckpt_lib
from ccf_jax.core import config_lib
from ccf_jax.data import DataError
from ccf_jax.train import faults
from ccf_jax.train import metrics as metrics_lib
from ccf_jax.train import trainer
from experiments import tiny, tiny_ccf
from tests.ccf_testing import override, set_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(**over):
  """tests/test_trainer.py's small model (its programs are in the session's compilation cache)."""
  c = set_fields(tiny.get_config(), 'model', d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, mlp_dim=128, vocab_size=512)
  c.data.seq_len, c.data.batch_size = 64, 8
  c.train.warmup_steps, c.train.time_budget_s, c.train.log_every = 1, 0.0, 1
  c.train.eval_batches, c.train.decay = 0, 'constant'  # No evaluation step to compile.
  c.checkpoint.every, c.checkpoint.async_save = 2, False
  c.mesh.num_devices = 1
  return override(c, **over)


def steps_on_disk(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(p) for p in os.listdir(d) if p.isdigit()) if os.path.isdir(d) else []


def metric_steps(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['split'], r['step']) for r in map(json.loads, f)]


# ------------------------------------------------------------------------------------ config
def test_config_messages_name_the_real_fault():
  c = small(train__steps=0, train__warmup_steps=0)
  with pytest.raises(config_lib.ConfigError, match=r'train.steps must be > 0'):
    config_lib.validate(c)
  for lr in (math.inf, math.nan, 0.0, -1e-3):
    with pytest.raises(config_lib.ConfigError, match=r'train.lr=.*finite and > 0'):
      config_lib.validate(small(train__lr=lr))
    with pytest.raises(config_lib.ConfigError, match=r'train.adapter_lr_mult=.*finite and > 0'):
      config_lib.validate(small(train__adapter_lr_mult=lr))
  with pytest.raises(config_lib.ConfigError, match=r"adapter_lr_mult=10.0 .*model.arch='decoder'"):
    config_lib.validate(small(train__adapter_lr_mult=10.0))  # No CCF parameters to scale.
  c = tiny_ccf.get_config()
  c.ccf.segment_len, c.ccf.num_memory = 100, 16
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  suggested = [int(x) for x in
               __import__('re').findall(r'--config.ccf.num_memory=(\d+)', str(e.value))]
  assert suggested == [10, 20], str(e.value)  # The divisors of 100 next to 16.


# -------------------------------------------------------------------------------------- lock
def test_workdir_lock_refuses_a_second_owner_and_takes_over_a_dead_ones(tmp_path, caplog):
  lock = faults.WorkdirLock(tmp_path).acquire()
  owner = json.loads((tmp_path / faults.LOCK_FILE).read_text())
  assert owner['pid'] == os.getpid() and owner['host'] and owner['started']
  with pytest.raises(faults.WorkdirLockedError, match=f'pid {os.getpid()} on host') as e:
    faults.WorkdirLock(tmp_path).acquire()
  assert 'Fix:' in str(e.value) and e.value.exit_code == faults.EXIT_LOCKED
  # The trainer refuses before writing anything (no metrics, no checkpoints).
  with pytest.raises(faults.WorkdirLockedError):
    trainer.train_and_evaluate(small(train__steps=2), str(tmp_path))
  assert os.listdir(tmp_path) == ['.lock']
  lock.release()
  assert not (tmp_path / faults.LOCK_FILE).exists()

  # A lock file left by a process that died (killed runs cannot remove theirs).
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  (tmp_path / faults.LOCK_FILE).write_text(json.dumps(
      {'host': __import__('socket').gethostname(), 'pid': dead.pid, 'started': 'then'}))
  with caplog.at_level(logging.WARNING):
    lock = faults.WorkdirLock(tmp_path).acquire()
  stale = [r.getMessage() for r in caplog.records if 'taking over' in r.getMessage()]
  assert len(stale) == 1 and f'pid {dead.pid}' in stale[0] and 'no longer running' in stale[0]
  assert json.loads((tmp_path / faults.LOCK_FILE).read_text())['pid'] == os.getpid()
  lock.release()


# --------------------------------------------------------------------- divergence, corruption
def test_divergence_keeps_good_checkpoints_and_all_corrupt_is_an_error(tmp_path):
  wd = str(tmp_path)
  trainer.train_and_evaluate(small(train__steps=4), wd)
  assert steps_on_disk(wd) == [2, 4]
  good = ckpt_lib.restore_params(os.path.join(wd, 'checkpoints', '4'))[0]
  with open(os.path.join(wd, 'metrics.jsonl'), 'a') as f:  # Rows of a run killed after step 4.
    for s in (5, 6):
      f.write(json.dumps({'step': s, 'split': 'train', 'loss': 1.0}) + '\n')

  # lr=1e39 is finite in the config but inf in float32: the first update makes every parameter
  # non-finite while loss and gradients are finite. The run stops; nothing of it is saved.
  with pytest.raises(trainer.NonFiniteError, match='non-finite') as e:
    trainer.train_and_evaluate(small(train__steps=12, train__lr=1e39), wd)
  assert e.value.exit_code == faults.EXIT_DIVERGED
  assert steps_on_disk(wd) == [2, 4]
  after = ckpt_lib.restore_params(os.path.join(wd, 'checkpoints', '4'))[0]
  for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  assert ('train', 5) not in metric_steps(wd)  # The killed run's rows past step 4 are gone.
  assert not (tmp_path / faults.LOCK_FILE).exists()  # Released on the error path too.

  # Every checkpoint corrupt: an error naming them and the flag, nothing trained over them.
  for s in ('2', '4'):
    files = [f for f in glob.glob(f'{wd}/checkpoints/{s}/state/**/*', recursive=True)
             if os.path.isfile(f)]
    with open(max(files, key=os.path.getsize), 'r+b') as f:
      f.seek(100)
      data = f.read(8)
      f.seek(100)
      f.write(bytes(b ^ 0xFF for b in data))
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match='every checkpoint') as e:
    trainer.train_and_evaluate(small(train__steps=4), wd)
  assert '--allow_fresh_start' in str(e.value) and '4.corrupt' in str(e.value)
  assert steps_on_disk(wd) == []


def test_metrics_rows_past_the_restored_step_are_dropped(tmp_path):
  w = metrics_lib.MetricWriter(str(tmp_path))
  for s in range(1, 7):
    w.write(s, {'loss': float(s)}, console=False)
  w.write(4, {'loss': 0.5}, 'eval', console=False)
  w.drop_rows_after(4)
  w.write(5, {'loss': 5.5}, console=False)
  w.close()
  assert metric_steps(tmp_path) == [('train', 1), ('train', 2), ('train', 3), ('train', 4),
                                    ('eval', 4), ('train', 5)]


def test_eta_of_a_resumed_run_counts_its_own_steps(tmp_path):
  """Resumed at step 50 of 100 and 10 steps on in 100 s: 40 steps at 10 s each remain (not
  100 s / 60 steps x 40), and a time budget counts from the same start."""
  w = metrics_lib.MetricWriter(str(tmp_path), enabled=False, total_steps=100)
  w.start_training(50)
  w.train_t0 -= 100.0
  assert 'ETA 0:06:4' in w.console_line(60, {'loss': 1.0}, 'train')
  w.time_budget_s = 160.5
  assert 'ETA 0:01:00' in w.console_line(60, {'loss': 1.0}, 'train')


# ------------------------------------------------------------------------------------ storage
def test_unwritable_workdir_fails_before_the_data_pipeline(tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(faults.StorageError, match='is not a directory') as e:
    trainer.train_and_evaluate(small(train__steps=2), str(tmp_path / 'file' / 'w'))
  assert e.value.exit_code == faults.EXIT_STORAGE
  wd = tmp_path / 'w'
  wd.mkdir()
  (wd / 'checkpoints').write_text('x')  # The checkpoint directory cannot be created.
  with pytest.raises(faults.StorageError, match='checkpoints'):
    trainer.train_and_evaluate(small(train__steps=2), str(wd))
  assert sorted(os.listdir(wd)) == ['checkpoints']  # No lock, metrics or tb written.


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
  """A 4 MB tmpfs when running as root (mount works), else a directory whose free space reads as
  4 MB minus what is in it (an injected figure)."""
  mnt = tmp_path / 'disk'
  mnt.mkdir()
  mounted = os.geteuid() == 0 and subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', str(mnt)], capture_output=True
  ).returncode == 0
  if not mounted:
    real = ckpt_lib.manager.shutil.disk_usage

    def disk_usage(path):
      used = sum(os.path.getsize(f) for f in glob.glob(f'{mnt}/**/*', recursive=True)
                 if os.path.isfile(f))
      u = real(path)
      return type(u)(u.total, u.used, max(0, 4 * 2**20 - used))
    monkeypatch.setattr(ckpt_lib.manager.shutil, 'disk_usage', disk_usage)
  yield mnt
  if mounted:
    subprocess.run(['umount', '-l', str(mnt)], check=False)


def test_disk_full_during_training_is_one_error_and_keeps_earlier_checkpoints(small_disk):
  wd = str(small_disk / 'w')
  c = small(train__steps=20)
  c.checkpoint.every, c.checkpoint.keep_last, c.checkpoint.async_save = 1, 10, True
  t0 = time.time()
  with pytest.raises(faults.StorageError, match='bytes needed') as e:
    trainer.train_and_evaluate(c, wd)
  assert time.time() - t0 < 120  # No wait for a background save's timeout.
  msg = str(e.value)
  assert 'no space left' in msg and 'free' in msg and 'checkpoints' in msg, msg
  assert e.value.exit_code == faults.EXIT_STORAGE
  done = steps_on_disk(wd)
  assert done and done[-1] < 20
  params, _ = ckpt_lib.restore_params(os.path.join(wd, 'checkpoints', str(done[-1])))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------- data
def test_missing_validation_split_fails_before_the_first_step(tmp_path):
  corpus = tmp_path / 'one_file'
  corpus.mkdir()
  rng = np.random.default_rng(0)
  words = ['alpha', 'beta', 'gamma', 'delta', 'kappa', 'omega', 'sigma', 'theta']
  (corpus / 'all.txt').write_text(' '.join(rng.choice(words, 3000)) + '\n')
  c = small(train__steps=2, data__corpus=str(corpus), model__vocab_size=300,
            train__eval_batches=1)
  wd = tmp_path / 'w'
  with pytest.raises(DataError, match='validation') as e:
    trainer.train_and_evaluate(c, str(wd))
  assert '1 document' in str(e.value) and 'Fix:' in str(e.value)
  assert steps_on_disk(str(wd)) == [] and not (wd / 'metrics.jsonl').exists()


# ------------------------------------------------------------------------------- entry points
def test_every_entry_point_reports_its_errors_as_one_line_and_an_exit_code(tmp_path):
  """Each entry point gets an input it cannot use; all run at once (start-up dominates)."""
  (tmp_path / 'one.txt').write_text('hello world\n')
  (tmp_path / 'prompt.txt').write_text('hi\n')
  (tmp_path / 'file').write_text('x')
  (tmp_path / 'locked').mkdir()
  nope = str(tmp_path / 'nope')
  train = [sys.executable, '-m', 'ccf_jax.train', '--config=experiments/tiny.py']
  cases = {  # name: (argv, exit code, text the line must hold)
      'train_locked': (train + [f'--workdir={tmp_path / "locked"}'], 73, 'is in use by pid'),
      'train_storage': (train + [f'--workdir={tmp_path / "file" / "w"}'], 74, 'not a directory'),
      'export': ([sys.executable, '-m', 'ccf_jax.export', f'--workdir={nope}',
                  f'--out={tmp_path / "e"}'], 1, 'does not exist'),
      'evaluate': ([sys.executable, '-m', 'ccf_jax.evaluate', f'--checkpoint={nope}'], 1,
                   'does not exist'),
      'generate': ([sys.executable, '-m', 'ccf_jax.generate', f'--checkpoint={nope}',
                    f'--prompt_file={tmp_path / "prompt.txt"}'], 1, 'does not exist'),
      'tokenizer': ([sys.executable, '-m', 'ccf_jax.tokenizer', f'--corpus={tmp_path / "one.txt"}',
                     '--vocab_size=0', f'--out={tmp_path / "tok"}'], 1, 'vocab_size=0'),
      'convert': ([sys.executable, '-m', 'ccf_jax.convert', f'--from_hf={nope}',
                   f'--out={tmp_path / "c"}'], 1, 'not a directory'),
      'plan': ([sys.executable, '-m', 'ccf_jax.plan', '--config=experiments/tiny.py',
                '--config.train.steps=0', '--compile=no'], 1, 'train.steps must be > 0'),
      'bench': ([sys.executable, '-m', 'ccf_jax.bench', 'data', '--config=experiments/tiny.py',
                 f'--config.data.corpus={nope}'], 1, 'does not exist'),
  }
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  with faults.WorkdirLock(tmp_path / 'locked'):
    procs = {k: subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
             for k, (argv, _, _) in cases.items()}
    results = {k: (p.communicate(timeout=300), p.returncode) for k, p in procs.items()}
  for name, ((out, err), rc) in results.items():
    _, code, text = cases[name]
    lines = [l for l in err.splitlines()  # absl's INFO and WARNING log lines aside.
             if l.strip() and not (l[:1] in ('I', 'W') and l[1:5].isdigit())]
    assert rc == code and 'Traceback' not in err, (name, rc, err[-3000:])
    assert len(lines) == 1 and text in lines[0], (name, lines)
