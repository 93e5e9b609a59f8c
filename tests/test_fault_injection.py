"""Fault injection against real training processes: faults never cost good work.

- SIGKILL at seeded random points, once between checkpoints and once while a checkpoint is being
  written: the resumed run ends bitwise identical to an uninterrupted one, with one metrics row
  per step.
- Storage faults in the middle of a run, on a real file system: the checkpoint directory turned
  read-only, the disk filled up (a small tmpfs mounted on it when running as root; otherwise the
  directory made read-only by its mode and the free space injected into the child's
  `shutil.disk_usage`). Each ends with one line and exit code 74, quickly, the earlier checkpoint
  intact.
- Divergence that stays finite (lr ramping to 10: losses of thousands, finite parameters): the
  loss check stops the run with exit code 3 and keeps the last good checkpoint although
  `keep_last=1` would have rotated it out; an update over `train.max_update_ratio` never enters
  the state; the check's baseline survives a resume.

Every trainer process runs the same flags but the workdir, so one compilation (the session's
cache, see conftest) serves them all.
"""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ccf_jax import checkpoint as ckpt_lib
from ccf_jax.core import config_lib
from ccf_jax.train import faults
from ccf_jax.train import trainer
from tests.test_faults import small, steps_on_disk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 16, 4
FLAGS = ['--config=experiments/tiny.py', '--config.model.d_model=64', '--config.model.num_layers=2',
         '--config.model.head_dim=16', '--config.model.mlp_dim=128',
         '--config.model.vocab_size=512', '--config.data.seq_len=64',
         f'--config.train.steps={STEPS}', '--config.train.warmup_steps=2',
         '--config.train.log_every=1', '--config.train.time_budget_s=0',
         '--config.train.eval_batches=0', f'--config.checkpoint.every={EVERY}',
         '--config.checkpoint.keep_last=10', '--config.mesh.num_devices=1']
# Without root, the child's free space reads as 0.3 MB once its first checkpoint is committed
# (an injected figure, `{ckpts}` its checkpoint directory).
SMALL_DISK = ("import os, runpy, shutil; real = shutil.disk_usage; shutil.disk_usage = lambda p: "
              "real(p)._replace(free=300000) if os.path.isdir('{ckpts}/4') else real(p); "
              "runpy.run_module('ccf_jax.train', run_name='__main__')")


def launch(workdir, code=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', XLA_FLAGS='', PYTHONFAULTHANDLER='1')
  head = [sys.executable, '-c', code] if code else [sys.executable, '-m', 'ccf_jax.train']
  return subprocess.Popen(head + [f'--workdir={workdir}', *FLAGS], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Output:
  """Drains a child's output in a thread (a full pipe would stall it) and keeps the text."""

  def __init__(self, proc):
    self.proc, self.text = proc, ''
    self._t = threading.Thread(target=self._read, daemon=True)
    self._t.start()

  def _read(self):
    for line in self.proc.stdout:
      self.text += line

  def wait(self, timeout=300):
    """The exit code; a child still running after `timeout` s is aborted (PYTHONFAULTHANDLER
    prints every thread's stack) and the test fails with its output."""
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.send_signal(signal.SIGABRT)
      self.proc.wait(timeout=30)
      self._t.join(timeout=10)
      raise AssertionError(f'hung for {timeout} s:\n{self.text[-6000:]}') from None
    self._t.join(timeout=10)
    return self.proc.returncode


def train_rows(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.endswith('\n')]


def wait_until(pred, proc, what, timeout=240):
  deadline = time.time() + timeout
  while not pred():
    assert proc.poll() is None, f'the run ended before {what}'
    assert time.time() < deadline, f'timed out waiting for {what}'
    time.sleep(0.001)


def params_at(workdir, step):
  return ckpt_lib.restore_params(os.path.join(workdir, 'checkpoints', str(step)))[0]


# ---------------------------------------------------------------------------- SIGKILL, resume
def test_sigkill_in_training_and_in_a_save_resumes_bitwise(tmp_path):
  rng = random.Random(25)
  straight, wd = tmp_path / 'straight', tmp_path / 'killed'
  p = launch(straight)
  out = Output(p)
  assert out.wait() == 0, out.text[-3000:]

  # 1. Between checkpoints, at a seeded step after the first checkpoint.
  kill_step = rng.randrange(EVERY + 1, 3 * EVERY)
  p = launch(wd)
  out = Output(p)
  wait_until(lambda: EVERY in steps_on_disk(wd) and
             any(r['step'] >= kill_step for r in train_rows(wd)), p, f'step {kill_step}')
  p.send_signal(signal.SIGKILL)
  assert out.wait() == -signal.SIGKILL
  assert STEPS not in steps_on_disk(wd)

  # 2. During a save: the first save of the resumed run whose step the seed picks, killed as soon
  # as its temporary directory appears (Orbax commits a save by renaming it).
  done = steps_on_disk(wd)
  target = rng.choice([s for s in range(EVERY, STEPS, EVERY) if s > done[-1]])
  tmp_prefix = f'{target}{ocp.step.TMP_DIR_SUFFIX}'
  ckpts = wd / 'checkpoints'
  p = launch(wd)
  out = Output(p)
  wait_until(lambda: any(n.startswith(tmp_prefix) for n in os.listdir(ckpts)), p,
             f'the save of step {target}')
  p.send_signal(signal.SIGKILL)
  assert out.wait() == -signal.SIGKILL
  assert target not in steps_on_disk(wd), 'the save was committed before the kill'

  # 3. Resume to the end (the interrupted save was never a checkpoint: Orbax removes it).
  done = steps_on_disk(wd)
  p = launch(wd)
  out = Output(p)
  assert out.wait() == 0, out.text[-3000:]
  assert f'start step {done[-1]}' in out.text
  assert not [n for n in os.listdir(ckpts) if ocp.step.TMP_DIR_SUFFIX in n]
  rows = [(r['split'], r['step']) for r in train_rows(wd)]
  assert rows == [('train', s) for s in range(1, STEPS + 1)]  # No duplicates from killed runs.
  ref = {r['step']: r['loss'] for r in train_rows(straight)}
  assert {r['step']: r['loss'] for r in train_rows(wd)} == ref  # Bitwise-equal losses.
  for a, b in zip(jax.tree.leaves(params_at(straight, STEPS)), jax.tree.leaves(params_at(wd, STEPS))):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- storage faults
@contextlib.contextmanager
def small_fs(path, size='16m'):
  """Mounts a tmpfs of `size` at `path` when running as root and mount works; yields whether."""
  path.mkdir(parents=True)
  mounted = os.geteuid() == 0 and subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
      capture_output=True).returncode == 0
  try:
    yield mounted
  finally:
    if mounted:
      subprocess.run(['umount', '-l', str(path)], check=False)
    else:
      os.chmod(path, 0o755)


def remount_read_only(path):
  """`mount -o remount,ro`, retried while the run holds a file there open for writing (the next
  save already under way: "mount point is busy"); that save or a later one then meets the fault."""
  t0 = time.time()
  while True:
    r = subprocess.run(['mount', '-o', 'remount,ro', str(path)], capture_output=True, text=True)
    if r.returncode == 0:
      return
    assert 'busy' in r.stderr and time.time() - t0 < 60, r.stderr
    time.sleep(0.01)


def fill(path, leave: int):
  """Writes a file into `path` until about `leave` bytes stay free there."""
  with open(os.path.join(path, 'filler'), 'wb', buffering=0) as f:
    chunk = b'\0' * 2**20
    while True:
      free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
      if free <= leave:
        break
      try:
        f.write(chunk[:min(len(chunk), free - leave)])
      except OSError:
        break


def error_lines(text):
  """The run's own error lines (Orbax logs the failures of its background threads as well, with
  their tracebacks, as absl ERROR records)."""
  return [l for l in text.splitlines() if l.startswith('train: error')]


def test_storage_faults_mid_run_are_one_line_and_keep_the_earlier_checkpoint(tmp_path):
  """The checkpoint directory turns read-only after the first checkpoint, or the disk fills up in
  the middle of the second save (TensorStore's writes fail in Orbax's background threads): both
  runs (concurrently) end within seconds with exit code 74 and one line naming the fault."""
  ro, full = tmp_path / 'ro', tmp_path / 'full'
  with small_fs(ro / 'checkpoints') as ro_mounted, small_fs(full / 'checkpoints') as full_mounted:
    small_disk = None if full_mounted else SMALL_DISK.format(ckpts=full / 'checkpoints')
    runs = {'ro': launch(ro), 'full': launch(full, small_disk)}
    outs = {k: Output(p) for k, p in runs.items()}
    pending, t0 = {'ro': ro, 'full': full} if full_mounted else {'ro': ro}, time.time()
    saving = f'{2 * EVERY}{ocp.step.TMP_DIR_SUFFIX}'
    while pending:  # Each fault as soon as that run reaches its point.
      for name, wd in list(pending.items()):
        assert runs[name].poll() is None, (name, outs[name].text[-3000:])
        names = os.listdir(wd / 'checkpoints')
        if name == 'ro' and str(EVERY) not in names:
          continue
        if name == 'full' and not any(n.startswith(saving) or n == str(2 * EVERY) for n in names):
          continue
        del pending[name]
        if name == 'ro' and ro_mounted:
          remount_read_only(ro / 'checkpoints')
        elif name == 'ro':
          os.chmod(ro / 'checkpoints', 0o555)
        elif full_mounted:
          fill(full / 'checkpoints', leave=0)
      assert time.time() - t0 < 240, 'no first checkpoint'
      time.sleep(0.001)
    codes = {k: o.wait(timeout=60) for k, o in outs.items()}
    if ro_mounted:
      subprocess.run(['mount', '-o', 'remount,rw', str(ro / 'checkpoints')], check=False)
    for name, text in (('ro', 'read-only file system'), ('full', 'no space left')):
      lines = error_lines(outs[name].text)
      assert codes[name] == faults.EXIT_STORAGE, (name, outs[name].text[-3000:])
      assert len(lines) == 1 and text in lines[0] and 'Fix:' in lines[0], (name, lines)
      assert outs[name].text.rstrip().endswith(lines[0])  # Nothing after it (no shutdown noise).
    assert 'bytes needed' in error_lines(outs['full'].text)[0]
    for wd in (ro, full):
      done = steps_on_disk(wd)
      assert done and done[-1] < STEPS
      params = params_at(wd, done[-1])  # Verified against its fingerprint.
      assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# ------------------------------------------------------------------------------- divergence
def ramp(**over):
  """An lr ramping linearly to 10 over 40 steps: fine at first, then huge finite losses."""
  c = small(**{'train__lr': 10.0, 'train__warmup_steps': 40, 'train__steps': 40, **over})
  c.checkpoint.every, c.checkpoint.keep_last = 1, 1
  return c


def test_finite_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  wd = str(tmp_path / 'ramp')
  with pytest.raises(trainer.DivergedError, match='divergence_factor') as e:
    trainer.train_and_evaluate(ramp(train__max_update_ratio=0.0), wd)
  assert e.value.exit_code == faults.EXIT_DIVERGED
  msg = str(e.value)
  t = int(msg.split('step ')[1].split(':')[0])  # The step whose loss (of state t-1) diverged.
  # Checkpoint t-1 was written before its loss was seen; t-2 is the last validated one, kept
  # although keep_last=1; the diverged step t itself was never written.
  assert steps_on_disk(wd) == [t - 2, t - 1], (t, msg)
  assert f'--config.init.from_checkpoint={wd}/checkpoints/{t - 2}' in msg and 'Fix:' in msg
  losses = {r['step']: r['loss'] for r in train_rows(wd)}
  assert max(losses[s] for s in range(1, t)) < 3 * max(min(losses.values()), 1.0) < \
      float(msg.split('loss ')[1].split(' ')[0])
  meta = ckpt_lib.read_json_item(os.path.join(wd, 'checkpoints', str(t - 1)), ckpt_lib.METADATA)
  assert meta['extra']['loss_watch']['best'] > 0

  # Resumed, the run restores the check's baseline: the diverged state is caught at once.
  with pytest.raises(trainer.DivergedError, match=f'step {t}: loss'):
    trainer.train_and_evaluate(ramp(train__max_update_ratio=0.0), wd)
  assert steps_on_disk(wd) == [t - 2, t - 1]

  # With the update check on (the default), an update of 186x the parameters' norm (lr 10 from
  # the first step) is rejected before it enters the state, and nothing is saved.
  wd = str(tmp_path / 'jump')
  with pytest.raises(trainer.NonFiniteError, match='max_update_ratio=1') as e:
    trainer.train_and_evaluate(ramp(train__warmup_steps=0), wd)
  assert e.value.exit_code == faults.EXIT_DIVERGED and 'step 1:' in str(e.value)
  assert steps_on_disk(wd) == []


def test_loss_watch_last_good_policy_and_config_checks():
  w = faults.LossWatch(3.0)
  for loss in [6.0, 5.0, 0.5, 4.0, 4.5]:  # One easy batch (0.5) is no new baseline.
    assert w.check(loss) is None
  assert 'divergence_factor=3' in w.check(40.0)
  near_zero = faults.LossWatch(3.0, state={'ema': 0.01, 'best': 0.01})
  assert near_zero.check(0.05) is None and near_zero.check(3.5) is not None  # The 1-nat floor.
  assert faults.LossWatch(0.0).check(1e30) is None
  for field, bad in (('divergence_factor', 1.0), ('divergence_factor', float('inf')),
                     ('max_update_ratio', -1.0), ('max_update_ratio', float('nan'))):
    with pytest.raises(config_lib.ConfigError, match=f'train.{field}=.*Fix:'):
      config_lib.validate(small(**{f'train__{field}': bad}))

  infos = [type('I', (), {'step': s}) for s in (2, 4, 6, 8)]
  policy = ckpt_lib.manager.LastGood()
  assert policy.should_preserve(infos, context=None) == [False] * 4
  policy.good_step = 7
  assert policy.should_preserve(infos, context=None) == [False, False, True, False]
