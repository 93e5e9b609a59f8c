"""launch/device_check.sh: the --smoke run (the device run's code on the CPU, tiny shapes) prints
one JSON report with every section, writes it to $OUT, and no item fails; the stage clock skips
what does not fit, with the reason; without an accelerator the device run is a one-line error."""

import json
import os
import subprocess
import sys

import pytest

from ccf_jax.bench import device_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**over):
  return dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS='cpu', XLA_FLAGS='', **over)


def _rows(section: dict) -> dict:
  return {k: v for k, v in section.items() if isinstance(v, dict)}


def test_smoke_run_prints_and_writes_the_whole_report(tmp_path):
  r = subprocess.run([os.path.join(ROOT, 'launch', 'device_check.sh'), '--smoke'], cwd=tmp_path,
                     env=_env(OUT=str(tmp_path)), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  rec = json.loads(r.stdout.strip().splitlines()[-1])
  with open(tmp_path / 'device_check.json') as f:
    assert json.load(f) == rec
  assert rec['bench'] == 'device_check' and rec['smoke'] is True
  assert rec['complete'] or 'interrupted' in rec  # The watchdog's report is a report too.
  dev = rec['device']
  assert dev['platform'] == 'cpu' and dev['versions']['jax'] and dev['device_count'] >= 1
  assert dev['peak_tflops_per_device'] is None and 'MFU is not reported' in dev['mfu_note']
  assert set(dev['api']) == {'dot_product_attention_local_window', 'memory_stats'}
  for key in ('attention', 'train', 'ccf_vs_full', 'inference', 'train_other_impls'):
    assert key in rec, key
  errors = [(s, k, v['error']) for s in ('attention', 'train', 'inference', 'train_other_impls')
            for k, v in _rows(rec[s]).items() if 'error' in v]
  assert not errors, errors
  att = rec['attention']
  assert att['ran'] and set(att['within_tolerance']) == set(att['ran'])
  first = att[f'{att["ran"][0]}/causal']  # The stage's first item always runs.
  assert set(first) >= {'out', 'dq', 'dk', 'dv', 'ok', 'worst_relative'} and first['ok']
  for section, keys in (('train', {'tokens_per_s', 'step_s', 'attention_impl', 'xla_peak_bytes',
                                   'device_peak_bytes_so_far', 'params'}),
                        ('inference', {'prefill_s', 'decode_ms_per_token', 'context'})):
    rows = _rows(rec[section])
    assert rows, section
    for name, row in rows.items():
      assert 'skipped' in row or keys <= set(row), (section, name, row)
      assert 'mfu' not in row  # CPU: no peak, no MFU.
  cvf = rec['ccf_vs_full']
  assert 'skipped' in cvf or {'ccf_over_full', 'full_tokens_per_s', 'ccf_tokens_per_s'} <= set(cvf)


def test_device_run_without_an_accelerator_is_one_line():
  r = subprocess.run([sys.executable, '-m', 'ccf_jax.bench', 'device_check'], cwd=ROOT,
                     env=_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and 'Traceback' not in r.stderr
  assert 'found no accelerator' in r.stderr and 'Fix:' in r.stderr and not r.stdout.strip()


def test_stage_skips_what_no_longer_fits_and_records_errors(tmp_path):
  path = str(tmp_path / 'report.json')
  report = device_check.Report(path, budget_s=100.0)
  try:
    stage = device_check.Stage(report, 'train')
    assert stage.run('a', lambda: {'x': 1}) == {'x': 1}
    assert stage.run('b', lambda: 1 / 0) == {'error': 'ZeroDivisionError: division by zero'}
    stage.deadline = stage.longest = 0.0  # The stage's time is spent.
    assert stage.run('c', lambda: {'x': 2}) is None
    with open(path) as f:
      rows = json.load(f)['train']
    assert rows['a']['x'] == 1 and 'wall_s' in rows['a'] and 'error' in rows['b']
    assert rows['c']['skipped'].startswith('out of time')
  finally:
    data = report.finish()
  assert data['complete'] and data['inference'] == {'skipped': 'not reached'}


@pytest.mark.parametrize('arch,length', [('decoder', 4096), ('ccf', 16384)])
def test_device_configs_validate(arch, length):
  """The device run's ~1B configs pass the config checks (a typo there would cost device time)."""
  from experiments import tiny
  from ccf_jax.core import config_lib
  s = device_check.DEVICE
  for impl in ('cudnn', 'blocked', 'xla', 'splash'):
    c = device_check.model_config(tiny.get_config(), s, arch, length, impl)
    config_lib.validate(c, 1)
    assert c.data.batch_size * length == max(s.step_tokens, length)
  if arch == 'ccf':
    assert c.ccf.segment_len // c.ccf.num_memory == 8 and c.ccf.num_segments == length // 512
