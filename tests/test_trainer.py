"""End-to-end trainer checks on the real Shakespeare corpus: learning, non-finite stop, budget,
and exact resume after SIGKILL / SIGTERM of a real training process."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ccf_jax.core import config_lib
from ccf_jax.train import trainer
from tests.ccf_testing import override, set_fields
from experiments import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(**over):
  c = set_fields(tiny.get_config(), 'model', d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, mlp_dim=128, vocab_size=512)
  set_fields(c, 'data', seq_len=64, batch_size=8)
  set_fields(c, 'train', warmup_steps=10, time_budget_s=0.0, log_every=10, eval_batches=2)
  c.checkpoint.every, c.mesh.num_devices = 1000, 1
  return override(c, **over)


def read_losses(workdir):
  """{step: loss} from metrics.jsonl; a resumed run's later lines overwrite the killed run's."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      rec = json.loads(line)
      if rec['split'] == 'train':
        out[rec['step']] = rec['loss']
  return out


def test_tiny_model_learns_real_text(tmp_path):
  c = small(train__steps=100)
  c.train.log_every = 5
  c.train.profile_start, c.train.profile_steps = 20, 2  # The profiler window runs too.
  summary = trainer.train_and_evaluate(c, str(tmp_path))
  losses = read_losses(tmp_path)
  first, last = losses[5], losses[100]
  # From ~log(512)=6.2 at init the loss must fall well below it on real text.
  assert first > 5.5 and last < first - 1.0, (first, last)
  assert summary['eval']['loss'] < first - 0.8
  assert summary['final_step'] == 100
  assert [f for f in (tmp_path / 'tb').iterdir() if f.name.startswith('events.out.tfevents')]
  assert list((tmp_path / 'profile').rglob('*.xplane.pb')), 'no profiler trace written'


def test_nonfinite_stop_raises_and_saves_nothing(tmp_path):
  c = small(train__steps=5, train__nonfinite='stop', train__lr=1e30, train__warmup_steps=0)
  c.train.clip_norm = 0.0
  c.train.decay = 'constant'
  with pytest.raises(trainer.NonFiniteError, match='non-finite'):
    trainer.train_and_evaluate(c, str(tmp_path))
  ckpts = tmp_path / 'checkpoints'
  assert not ckpts.exists() or not [p for p in ckpts.iterdir() if p.name.isdigit()]


def test_time_budget_stops_with_checkpoint(tmp_path, monkeypatch):
  c = small(train__steps=100000, train__time_budget_s=3.0)
  c.checkpoint.every = 5
  monkeypatch.chdir(tmp_path)  # A relative workdir must work (Orbax itself wants absolute paths).
  summary = trainer.train_and_evaluate(c, 'relative_workdir')
  tmp_path = tmp_path / 'relative_workdir'
  assert 'time budget' in summary['stop_reason']
  steps = [int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]
  assert max(steps) == summary['final_step'] < 100000


def test_initialisation_priority(tmp_path):
  """resume > init.from_checkpoint > init.params_only > fresh, through the trainer.

  Each lower-priority source is set to a path that does not exist, so using it would fail. A
  constant schedule keeps the compiled step independent of train.steps, so the first three runs
  share one program (the session's compilation cache, see conftest)."""
  from ccf_jax import checkpoint
  from ccf_jax.checkpoint import export
  missing = str(tmp_path / 'does_not_exist')
  a = str(tmp_path / 'a')
  trainer.train_and_evaluate(small(train__steps=3, train__warmup_steps=1,
                                   train__decay='constant'), a)
  exp = export.export(a, tmp_path / 'a_export')
  params_a = checkpoint.restore_params(os.path.join(a, 'checkpoints', '3'))[0]

  # init.from_checkpoint beats params_only and continues the step count.
  b = str(tmp_path / 'b')
  c = small(train__steps=5, train__warmup_steps=1, train__decay='constant',
            init__from_checkpoint=os.path.join(a, 'checkpoints', '3'),
            init__params_only=missing)
  c.train.log_every = 1
  trainer.train_and_evaluate(c, b)
  assert sorted(read_losses(b)) == [4, 5]

  # Resume from the workdir beats init.from_checkpoint (here a missing path).
  c = small(train__steps=6, train__warmup_steps=1, train__decay='constant',
            init__from_checkpoint=missing)
  c.train.log_every = 1
  assert trainer.train_and_evaluate(c, b)['final_step'] == 6
  assert sorted(read_losses(b)) == [4, 5, 6]

  # init.params_only: a learning rate of 1e-30 (0 is rejected by validate) keeps the exported
  # params to within 1e-20. With init.from_hf set as well, the run would be ambiguous: an error.
  d = str(tmp_path / 'd')
  c = small(train__steps=1, train__warmup_steps=0, train__lr=1e-30, init__params_only=str(exp),
            init__from_hf=missing)
  with pytest.raises(config_lib.ConfigError, match='both set.*--config.init.params_only='):
    trainer.train_and_evaluate(c, d)
  c.init.from_hf = ''
  # Another tokenizer than the export's is refused before any step.
  c.data.tokenizer = os.path.join(ROOT, 'tests', 'fixtures', 'tokenizers', 'bpe', 'tokenizer.json')
  with pytest.raises(trainer.data_lib.TokenizerError, match='is not the tokenizer of '
                     'init.params_only=.*Fix: --config.data.tokenizer='):
    trainer.train_and_evaluate(c, d)
  assert not os.path.exists(os.path.join(d, 'metrics.jsonl'))
  c.data.tokenizer = ''  # The export's (recorded in its export_info.json) is used.
  trainer.train_and_evaluate(c, d)
  params_d = checkpoint.restore_params(os.path.join(d, 'checkpoints', '1'))[0]
  for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_d)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-20)
  recorded = json.load(open(os.path.join(exp, 'export_info.json')))['tokenizer']
  assert recorded['kind'] == 'sentencepiece' and recorded['vocab_size'] == 512
  used = checkpoint.read_json_item(os.path.join(d, 'checkpoints', '1'), checkpoint.CONFIG)
  assert used['data']['tokenizer'] == os.path.join(str(exp), 'tokenizer.model')


# ---------------------------------------------------------------------------------- resume
RESUME_FLAGS = ['--config.model.d_model=64', '--config.model.num_layers=2',
                '--config.model.head_dim=16', '--config.model.mlp_dim=128',
                '--config.model.vocab_size=512', '--config.data.seq_len=64',
                '--config.train.steps=60', '--config.train.warmup_steps=5',
                '--config.train.log_every=1', '--config.train.time_budget_s=0',
                '--config.train.eval_batches=1', '--config.checkpoint.every=20',
                '--config.checkpoint.keep_last=10', '--config.mesh.num_devices=1']


def launch(workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  env['XLA_FLAGS'] = ''
  return subprocess.Popen([sys.executable, '-m', 'ccf_jax.train', '--config=experiments/tiny.py',
                           f'--workdir={workdir}', *RESUME_FLAGS], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def final_params(workdir):
  from ccf_jax import checkpoint
  return checkpoint.restore_params(os.path.join(workdir, 'checkpoints', '60'))[0]


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp('straight')
  p = launch(wd)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  return wd


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM])
def test_resume_is_bitwise_exact(straight_run, tmp_path, sig):
  p = launch(tmp_path)
  first_ckpt = tmp_path / 'checkpoints' / '20'
  deadline = time.time() + 300
  while not first_ckpt.exists():
    assert p.poll() is None, p.communicate()[0]
    assert time.time() < deadline
    time.sleep(0.01)
  p.send_signal(sig)
  out, _ = p.communicate(timeout=300)
  done = sorted(int(x.name) for x in (tmp_path / 'checkpoints').iterdir() if x.name.isdigit())
  assert 60 not in done, 'the run finished before the signal; make steps slower'
  if sig == signal.SIGTERM:
    assert p.returncode == 75 and 'SIGTERM' in out, out  # Resumable exit after a final save.
    assert done[-1] > 20
  else:
    assert p.returncode == -signal.SIGKILL
  p = launch(tmp_path)  # Resume.
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  assert f'start step {done[-1]}' in out
  ref, got = read_losses(straight_run), read_losses(tmp_path)
  assert sorted(got) == list(range(1, 61))
  for step in range(1, 61):
    assert got[step] == ref[step], (step, got[step], ref[step])  # Bitwise equal floats.
  a, b = final_params(straight_run), final_params(tmp_path)
  import jax
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('source', [None, 'def get_config(:\n'], ids=['missing', 'broken'])
def test_a_config_file_that_does_not_load_is_one_line(tmp_path, source):
  """ml_collections defers a failed config load to the first field read, which raised a chained
  traceback from inside main; config_lib.parse_flags reports it as one line naming the file."""
  path = tmp_path / 'exp.py'
  if source is not None:
    path.write_text(source)
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  r = subprocess.run([sys.executable, '-m', 'ccf_jax.train', f'--config={path}',
                      f'--workdir={tmp_path / "w"}'], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-2000:]
  line, = [l for l in r.stderr.splitlines() if l.startswith('error: could not load --config')]
  assert 'exp.py' in line and 'Fix:' in line
  assert not (tmp_path / 'w').exists()  # Nothing written.
