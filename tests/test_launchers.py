"""The multi-host launchers in launch/: local multi-process runs, TPU pod and SLURM dry runs.

Fast tests run real processes where it is cheap: 2 JAX processes x 4 CPU devices joined by
jax.distributed with gloo collectives (launch/check_distributed.py), the failure path of
launch/local_multiprocess.sh, and the generated SLURM job script itself under a stand-in `srun`.
The slow tests train experiments/tiny.py for a few steps with 2 processes x 4 devices and with
1 process x 8 devices on the same mesh, compare the losses, and restore the 2-process checkpoint in
a 1-process run.
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
PY = os.path.join(REPO, '.venv', 'bin', 'python')
if not os.path.exists(PY):
  PY = sys.executable

# Losses of 2 processes x 4 devices vs 1 process x 8 devices. The mesh is the same, but the global
# batch rows arrive in a different order (the data pipeline interleaves examples over processes) and
# the cross-process all-reduce is gloo's, so float32 sums may round differently: a few ulp.
LOSS_RTOL = 1e-5


def _env(**extra):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # conftest's 8-device flag; each launch sets its own.
  env.update(JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _run(cmd, timeout=120, **kw):
  kw.setdefault('env', _env())
  return subprocess.run(cmd, cwd=kw.pop('cwd', REPO), capture_output=True, text=True,
                        timeout=timeout, **kw)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _checks(text: str) -> list:
  # gloo's C++ logging shares the log file and may leave its line unterminated ("[Gloo] Rank 0 is
  # connected to 1CHECK_DISTRIBUTED {...}", seen in CI), so the marker is found anywhere in a
  # line; raw_decode ignores anything appended after the JSON object.
  decoder, mark = json.JSONDecoder(), 'CHECK_DISTRIBUTED '
  return [decoder.raw_decode(line[line.index(mark) + len(mark):])[0] for line in text.splitlines()
          if mark in line]


# ------------------------------------------------------------------------ local_multiprocess.sh
def test_local_multiprocess_usage_errors():
  sh = os.path.join(LAUNCH, 'local_multiprocess.sh')
  r = _run([sh, '--help'])
  assert r.returncode == 0 and 'Usage: launch/local_multiprocess.sh' in r.stdout
  r = _run([sh])
  assert r.returncode == 2 and 'missing N' in r.stderr
  r = _run([sh, '3', '--config=experiments/tiny.py'])
  assert r.returncode == 2 and 'does not divide 8' in r.stderr
  r = _run([sh, 'two'])
  assert r.returncode == 2 and 'positive integer' in r.stderr
  r = _run([sh, '2', '--config.mesh.distributed=True'])
  assert r.returncode == 2 and 'launcher sets it' in r.stderr


@pytest.mark.parametrize('explicit', [False, True], ids=['bare_initialize', 'explicit_args'])
def test_gloo_two_processes_x_four_cpu_devices(tmp_path, explicit):
  """jax.distributed over localhost + gloo: psum and sharded matmuls over a global 8-device mesh.

  bare_initialize: jax.distributed.initialize() with no arguments, as ccf_jax/train.py calls it
  (process count and id reach jax through the SLURM variables its auto-detection reads).
  explicit_args: num_processes/process_id passed from JAX_NUM_PROCESSES/JAX_PROCESS_ID.
  """
  cmd = [os.path.join(LAUNCH, 'local_multiprocess.sh'), '--log-dir', str(tmp_path), '--entry',
         'launch/check_distributed.py', '2'] + (['--explicit'] if explicit else [])
  t0 = time.time()
  r = _run(cmd, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
  assert time.time() - t0 < 60
  results = sorted((c for i in range(2) for c in _checks((tmp_path / f'process_{i}.log').read_text())),
                   key=lambda c: c['process_index'])
  assert [c['process_index'] for c in results] == [0, 1]
  for c in results:
    assert c['process_count'] == 2 and c['local_devices'] == 4 and c['global_devices'] == 8
    assert c['platform'] == 'cpu'
    assert c['psum'] == 28.0 and c['ok_psum'] and c['ok_rows_matmul'] and c['ok_contraction_matmul']
  assert _checks(r.stdout), 'process 0 output should reach the console'


def test_local_multiprocess_stops_the_others_when_one_fails(tmp_path):
  script = tmp_path / 'fail_one.py'
  script.write_text(textwrap.dedent('''
      import os, sys, time
      import jax
      jax.distributed.initialize()
      open(os.path.join(sys.argv[1], f'pid_{jax.process_index()}'), 'w').write(str(os.getpid()))
      if jax.process_index() == 1:
        time.sleep(1)
        print('process 1 failing', flush=True)
        os._exit(3)
      time.sleep(600)  # Process 0 would wait for ever.
  '''))
  logs = tmp_path / 'logs'
  t0 = time.time()
  r = _run([os.path.join(LAUNCH, 'local_multiprocess.sh'), '--log-dir', str(logs), '--kill-grace',
            '2', '--entry', str(script), '2', str(tmp_path)], timeout=120)
  elapsed = time.time() - t0
  assert r.returncode == 3, r.stdout + r.stderr
  assert 'process 1 (pid' in r.stderr and 'exited with status 3' in r.stderr
  assert 'process 1 failing' in r.stderr  # The failing process's log tail is shown.
  assert elapsed < 40, elapsed
  pid0 = int((tmp_path / 'pid_0').read_text())
  with pytest.raises(ProcessLookupError):
    os.kill(pid0, 0)


def test_local_multiprocess_ctrl_c_stops_everything(tmp_path):
  script = tmp_path / 'sleep.py'
  script.write_text(textwrap.dedent('''
      import os, sys, time
      import jax
      jax.distributed.initialize()
      open(os.path.join(sys.argv[1], f'pid_{jax.process_index()}'), 'w').write(str(os.getpid()))
      time.sleep(600)
  '''))
  # Start the launcher as a shell would, with SIGINT at its default: an ignored SIGINT is inherited
  # across exec and bash cannot trap a signal ignored at entry, and something earlier in a pytest
  # worker can leave it ignored (the suite then timed out here; the test alone passed).
  inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    p = subprocess.Popen([os.path.join(LAUNCH, 'local_multiprocess.sh'), '--log-dir',
                          str(tmp_path / 'logs'), '--kill-grace', '2', '--entry', str(script), '2',
                          str(tmp_path)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  finally:
    signal.signal(signal.SIGINT, inherited)
  try:
    deadline = time.time() + 60
    while not all((tmp_path / f'pid_{i}').exists() for i in range(2)):
      assert time.time() < deadline and p.poll() is None, 'processes did not start'
      time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 130, err
  for i in range(2):
    with pytest.raises(ProcessLookupError):
      os.kill(int((tmp_path / f'pid_{i}').read_text()), 0)


# ------------------------------------------------------------------------ tpu_pod.sh
def _dry_commands(stdout: str) -> list:
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


def _remote(cmd: list) -> list:
  """The words of the remote command of a `gcloud ... ssh --command=...`."""
  (c,) = [a for a in cmd if a.startswith('--command=')]
  return shlex.split(c[len('--command='):])


def test_tpu_pod_dry_run_prints_every_command():
  train = ['--config=experiments/tiny.py', '--workdir=gs://bucket/runs/tiny',
           '--config.mesh.fsdp=256', "--config.name=it's tiny"]
  r = _run([os.path.join(LAUNCH, 'tpu_pod.sh'), '--project', 'my-proj', '--zone', 'us-west4-a',
            '--accelerator-type', 'v5litepod-256', '--spot', '--env', 'XLA_FLAGS=--a=1 --b=2',
            '--dry-run', '--'] + train)
  assert r.returncode == 0, r.stderr
  cmds = _dry_commands(r.stdout)
  gcloud = [c for c in cmds if c[0] == 'gcloud']
  assert gcloud, r.stdout
  for c in gcloud:
    assert c[:4] == ['gcloud', 'compute', 'tpus', 'tpu-vm']
    assert '--project=my-proj' in c and '--zone=us-west4-a' in c
    assert c[5] == 'ccf-v5litepod-256' or c[4] == 'scp'
  verbs = [c[4] for c in gcloud]
  assert verbs[:2] == ['describe', 'create']
  create = gcloud[1]
  assert '--accelerator-type=v5litepod-256' in create and '--version=v2-alpha-tpuv5-lite' in create
  assert '--spot' in create
  scp = [c for c in gcloud if c[4] == 'scp']
  assert len(scp) == 1 and '--worker=all' in scp[0] and scp[0][6] == 'ccf-v5litepod-256:ccf_jax_code.tgz'
  ssh = [c for c in gcloud if c[4] == 'ssh']
  assert all('--worker=all' in c for c in ssh)
  remote = [_remote(c) for c in ssh]
  assert any(w[:3] == ['mkdir', '-p', 'ccf_jax'] for w in remote)
  (setup,) = [w for w in remote if 'setup' in w]
  assert setup == ['bash', 'ccf_jax/launch/tpu_worker.sh', 'setup', 'jax[tpu]==0.10.2']
  (run,) = [w for w in remote if 'run' in w]
  assert run[:5] == ['bash', 'ccf_jax/launch/tpu_worker.sh', 'run', 'ccf_jax/launch_logs', '--']
  assert 'XLA_FLAGS=--a=1 --b=2' in run
  i = run.index('-m')
  assert run[i - 1] == '.venv/bin/python' and run[i + 1] == 'ccf_jax.train'
  assert run[i + 2:] == train + ['--config.mesh.distributed=True']
  (stop,) = [w for w in remote if 'stop' in w]
  assert stop == ['bash', 'ccf_jax/launch/tpu_worker.sh', 'stop', 'ccf_jax/launch_logs', '120']
  assert all(c[0] != 'gcloud' or c[4] != 'delete' for c in cmds)  # Only with --delete.
  assert 'nothing was run' in r.stderr


def test_tpu_pod_dry_run_options():
  sh = os.path.join(LAUNCH, 'tpu_pod.sh')
  r = _run([sh, '--project', 'p', '--zone', 'z', '--accelerator-type', 'v6e-64', '--name', 'mine',
            '--runtime-version', 'custom-rt', '--no-install', '--no-sync', '--delete', '--entry',
            'launch/check_distributed.py', '--dry-run'])
  assert r.returncode == 0, r.stderr
  cmds = [c for c in _dry_commands(r.stdout) if c[0] == 'gcloud']
  assert [c[4] for c in cmds] == ['describe', 'create', 'ssh', 'ssh', 'delete']
  assert '--version=custom-rt' in cmds[1] and '--accelerator-type=v6e-64' in cmds[1]
  assert all(c[5] == 'mine' for c in cmds)
  run = _remote(cmds[2])
  assert run[-2:] == ['.venv/bin/python', 'launch/check_distributed.py']  # No distributed flag.
  assert '--quiet' in cmds[4]
  # --stop: stop (and delete) only.
  r = _run([sh, '--project', 'p', '--zone', 'z', '--name', 'mine', '--stop', '--delete', '--dry-run'])
  assert r.returncode == 0, r.stderr
  cmds = _dry_commands(r.stdout)
  assert [c[4] for c in cmds] == ['ssh', 'delete'] and 'stop' in _remote(cmds[0])
  # Default runtime versions.
  for acc, rt in [('v5p-128', 'v2-alpha-tpuv5'), ('v4-32', 'tpu-ubuntu2204-base'),
                  ('v6e-8', 'v2-alpha-tpuv6e')]:
    r = _run([sh, '--project', 'p', '--zone', 'z', '--accelerator-type', acc, '--dry-run', '--',
              '--config=experiments/tiny.py', '--workdir=gs://b/w'])
    assert f'--version={rt}' in r.stdout, (acc, r.stdout)


def test_tpu_pod_argument_errors():
  sh = os.path.join(LAUNCH, 'tpu_pod.sh')
  r = _run([sh, '--help'])
  assert r.returncode == 0 and '--accelerator-type' in r.stdout and '--dry-run' in r.stdout
  for args, msg in [
      (['--zone', 'z', '--accelerator-type', 'v4-8', '--', 'x'], 'missing --project'),
      (['--project', 'p', '--accelerator-type', 'v4-8', '--', 'x'], 'missing --zone'),
      (['--project', 'p', '--zone', 'z', '--', 'x'], 'missing --accelerator-type'),
      (['--project', 'p', '--zone', 'z', '--accelerator-type', 'v4-8', '--dry-run'], 'missing train flags'),
      (['--project', 'p', '--zone', 'z', '--accelerator-type', 'x9-8', '--', 'x'], 'runtime'),
      (['--project', 'p', '--zone', 'z', '--accelerator-type', 'v4-8', '--bogus'], "unknown option '--bogus'"),
      (['--project', 'p', '--zone', 'z', '--accelerator-type', 'v4-8', '--env', 'novalue', '--', 'x'], 'K=V'),
  ]:
    r = _run([sh] + args)
    assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
  # tpu_worker.sh (the worker side) is valid bash.
  assert _run(['bash', '-n', os.path.join(LAUNCH, 'tpu_worker.sh')]).returncode == 0


def test_tpu_worker_run_and_stop(tmp_path):
  """The worker-side runner: exit status, log file, stop via the process group (as on a TPU VM)."""
  sh = os.path.join(LAUNCH, 'tpu_worker.sh')
  env = _env(TPU_WORKER_ID=0)
  r = _run(['bash', sh, 'run', str(tmp_path), '--', 'bash', '-c', 'echo "hi there"; exit 3'], env=env)
  assert r.returncode == 3 and 'hi there' in r.stdout
  assert 'hi there' in (tmp_path / 'worker_0.log').read_text()
  p = subprocess.Popen(['bash', sh, 'run', str(tmp_path), '--', 'bash', '-c',
                        'trap "echo saving; exit 0" TERM; echo started; while :; do sleep 0.1; done'],
                       env=env, stdout=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 20
    while 'started' not in (tmp_path / 'worker_0.log').read_text():
      assert time.time() < deadline
      time.sleep(0.1)
    r = _run(['bash', sh, 'stop', str(tmp_path), '10'], env=env)
    assert r.returncode == 0 and 'stopped' in r.stdout
    out, _ = p.communicate(timeout=20)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 0 and 'saving' in out


# ------------------------------------------------------------------------ slurm
def _generate(args, train) -> tuple:
  r = _run([os.path.join(LAUNCH, 'slurm_submit.sh')] + args + ['--dry-run', '--'] + train)
  assert r.returncode == 0, r.stderr
  body, _, submit = r.stdout.partition('# ---- submit command ----\n')
  script = body.split('\n', 1)[1]  # Drop the '# ---- generated job script' header.
  return script, submit.strip()


def test_slurm_submit_dry_run_generates_the_job_script(tmp_path):
  train = ['--config=experiments/tiny.py', '--workdir=/shared/runs/tiny', "--config.name=it's tiny"]
  script, submit = _generate(['--nodes', '4', '--gpus-per-node', '8', '--partition', 'h100',
                              '--time', '12:00:00', '--account', 'proj', '--sbatch-arg=--qos=high'],
                             train)
  lines = script.splitlines()
  assert lines[0] == '#!/usr/bin/env bash'
  sbatch = [l for l in lines if l.startswith('#SBATCH ')]
  for want in ['--nodes=4', '--ntasks-per-node=1', '--gpus-per-node=8', '--partition=h100',
               '--time=12:00:00', '--account=proj', '--qos=high', '--job-name=ccf_jax',
               '--output=/shared/runs/tiny/slurm/%x-%j.out', '--signal=TERM@120']:
    assert f'#SBATCH {want}' in sbatch, want
  assert len([l for l in sbatch if l.startswith('#SBATCH --nodes=')]) == 1
  # sbatch reads #SBATCH lines only before the first command.
  first_cmd = next(i for i, l in enumerate(lines) if l and not l.startswith('#'))
  assert max(i for i, l in enumerate(lines) if l.startswith('#SBATCH ')) < first_cmd
  assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
  assert 'export JAX_COORDINATOR_ADDRESS=' in script and 'export JAX_LOCAL_DEVICE_IDS' in script
  assert 'jax[cuda${CCF_CUDA}]==${JAX_VERSION}' in script and 'CCF_CUDA=12' in script
  for var in ['NCCL_DEBUG', 'NCCL_SOCKET_IFNAME', 'NCCL_IB_HCA', 'XLA_PYTHON_CLIENT_MEM_FRACTION']:
    assert var in script
  assert 'srun ' in script and '--ntasks-per-node=1' in script
  assert 'ccf_jax.train' in script and '--config.mesh.distributed=True' in script
  assert submit.startswith('+ sbatch /shared/runs/tiny/slurm/ccf_jax-') and submit.endswith('.sbatch')
  job = tmp_path / 'job.sbatch'
  job.write_text(script)
  assert _run(['bash', '-n', str(job)]).returncode == 0
  # The train flags survive the quoting.
  (args_line,) = [l for l in lines if l.startswith('CCF_TRAIN_ARGS=(')]
  r = _run(['bash', '-c', args_line + '; printf "%s\\0" "${CCF_TRAIN_ARGS[@]}"'])
  assert r.stdout.split('\0')[:-1] == train
  assert not os.path.exists('/shared/runs/tiny/slurm')  # Dry run writes nothing.


def test_slurm_submit_argument_errors():
  sh = os.path.join(LAUNCH, 'slurm_submit.sh')
  r = _run([sh, '--help'])
  assert r.returncode == 0 and '--gpus-per-node' in r.stdout
  for args, msg in [
      (['--', '--config=x'], 'missing --nodes'),
      (['--nodes', 'x', '--', 'a'], 'positive integer'),
      (['--nodes', '2', '--cuda', '11', '--', 'a'], '--cuda must be 12 or 13'),
      (['--nodes', '2', '--dry-run'], 'missing train flags'),
      (['--nodes', '2', '--', '--config.mesh.distributed=True'], 'the job adds it'),
      (['--nodes'], '--nodes needs a value'),
  ]:
    r = _run([sh] + args)
    assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)


FAKE_SRUN = r'''#!/usr/bin/env bash
# Stand-in for srun on one machine: --nodes copies of the command with srun's task variables.
n=1
while [[ $# -gt 0 && "$1" == -* ]]; do case "$1" in --nodes=*) n="${1#*=}";; esac; shift; done
pids=()
for ((i = 0; i < n; i++)); do
  SLURM_NTASKS=$n SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i SLURM_STEP_NODELIST=localhost \
    "$@" > "$FAKE_SRUN_LOGS/task_$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
'''
FAKE_SCONTROL = '#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && printf "localhost\\nnode2\\n"\n'


def test_slurm_job_script_runs_under_a_stand_in_srun(tmp_path):
  """The generated job script, executed for real on CPU: 2 'nodes' x 4 devices under a fake srun.

  Checks the coordinator from `scontrol show hostnames`, process count/id from SLURM's task
  variables (jax's own auto-detection), and that JAX_LOCAL_DEVICE_IDS gives each process all of its
  node's devices (jax's SLURM default would be the single device SLURM_LOCALID).
  """
  script, _ = _generate(['--nodes', '2', '--gpus-per-node', '4', '--entry',
                         'launch/check_distributed.py', '--venv', os.path.dirname(os.path.dirname(PY)),
                         '--skip-install'], [])
  job = tmp_path / 'job.sbatch'
  job.write_text(script)
  bindir = tmp_path / 'bin'
  bindir.mkdir()
  (bindir / 'srun').write_text(FAKE_SRUN)
  (bindir / 'scontrol').write_text(FAKE_SCONTROL)
  for f in bindir.iterdir():
    f.chmod(0o755)
  port = _free_port()
  env = _env(PATH=f'{bindir}:{os.environ["PATH"]}', FAKE_SRUN_LOGS=tmp_path, SLURM_JOB_ID=4242,
             SLURM_JOB_NODELIST='localhost,node2', SLURM_JOB_NUM_NODES=2, CCF_COORDINATOR_PORT=port,
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  r = _run(['bash', str(job)], env=env, cwd=str(tmp_path), timeout=120)
  logs = [(tmp_path / f'task_{i}.log').read_text() for i in range(2)]
  assert r.returncode == 0, r.stdout + r.stderr + ''.join(logs)
  assert f'coordinator localhost:{port}' in r.stdout
  results = sorted((c for text in logs for c in _checks(text)), key=lambda c: c['process_index'])
  assert [c['process_index'] for c in results] == [0, 1]
  for c in results:
    assert c['process_count'] == 2 and c['global_devices'] == 8 and c['local_devices'] == 4
    assert c['cuda_visible_devices'] == '0,1,2,3'
    assert c['ok_psum'] and c['ok_rows_matmul'] and c['ok_contraction_matmul']


# ------------------------------------------------------------------------ training (slow)
# tiny.py shrunk (the resume tests' model): what is checked is the distributed run, not the model.
TRAIN_FLAGS = ['--config=experiments/tiny.py', '--config.model.d_model=64',
               '--config.model.num_layers=2', '--config.model.head_dim=16',
               '--config.model.mlp_dim=128', '--config.model.vocab_size=512',
               '--config.data.seq_len=64', '--config.train.steps=6',
               '--config.train.warmup_steps=2', '--config.train.log_every=1',
               '--config.train.eval_batches=1', '--config.train.time_budget_s=0',
               '--config.mesh.data=8', '--config.mesh.fsdp=1', '--config.mesh.tensor=1']


def _train_one_process(workdir, *extra, timeout=600):
  r = _run([PY, '-m', 'ccf_jax.train', f'--workdir={workdir}'] + TRAIN_FLAGS + list(extra),
           env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'), timeout=timeout)
  assert r.returncode == 0, f'1-process run in {workdir} failed:\n' + r.stdout[-3000:] + r.stderr[-6000:]
  return r


def _metrics(workdir, split='train') -> dict:
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      rec = json.loads(line)
      if rec.get('split') == split:
        out[int(rec['step'])] = float(rec['loss'])
  return out


def _summary(workdir) -> dict:
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory):
  """(1 process x 8 devices workdir, 2 processes x 4 devices workdir), same config and mesh."""
  pytest.importorskip('ccf_jax.data', reason='ccf_jax.data (the data pipeline) is not importable')
  base = tmp_path_factory.mktemp('train')
  one, two = base / 'one_x8', base / 'two_x4'
  t0 = time.time()
  _train_one_process(one)  # First: also builds the tokenizer/token caches the 2 processes reuse.
  t1 = time.time()
  r = _run([os.path.join(LAUNCH, 'local_multiprocess.sh'), '2', f'--workdir={two}'] + TRAIN_FLAGS,
           timeout=900)
  assert r.returncode == 0, '2-process run failed:\n' + r.stdout[-3000:] + r.stderr[-6000:]
  print(f'\n1x8 run {t1 - t0:.1f}s, 2x4 run {time.time() - t1:.1f}s')
  return one, two


@pytest.mark.slow
def test_two_processes_match_one_process(two_runs):
  one, two = two_runs
  l1, l2 = _metrics(one), _metrics(two)
  assert sorted(l1) == sorted(l2) == list(range(1, 7))
  rel = {s: abs(l1[s] - l2[s]) / abs(l1[s]) for s in l1}
  bitwise = all(l1[s] == l2[s] for s in l1)
  print(f'\nlosses 1x8: {[l1[s] for s in sorted(l1)]}\nlosses 2x4: {[l2[s] for s in sorted(l2)]}\n'
        f'max relative difference {max(rel.values()):.2e}; bitwise equal: {bitwise}')
  assert max(rel.values()) <= LOSS_RTOL, rel
  e1, e2 = _summary(one)['eval']['loss'], _summary(two)['eval']['loss']
  assert abs(e1 - e2) <= LOSS_RTOL * abs(e1), (e1, e2)
  assert (two / 'launch_logs' / 'process_0.log').exists()
  assert (two / 'launch_logs' / 'process_1.log').exists()


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(two_runs, tmp_path):
  """The 2-process workdir, copied, resumed by 1 process: same parameters, so the same eval loss."""
  _, two = two_runs
  work = tmp_path / 'resumed'
  shutil.copytree(two / 'checkpoints', work / 'checkpoints')
  _train_one_process(work)  # train.steps=6 = the checkpoint's step: restore, no step, evaluate.
  steps = sorted(os.listdir(work / 'checkpoints'))
  assert not [s for s in steps if 'corrupt' in s], f'the 2-process checkpoint was rejected: {steps}'
  assert not _metrics(work), 'training restarted instead of resuming at step 6'
  e_two, e_resumed = _summary(two)['eval']['loss'], _summary(work)['eval']['loss']
  assert abs(e_two - e_resumed) <= LOSS_RTOL * abs(e_two), (e_two, e_resumed)


@pytest.mark.slow
def test_two_process_checkpoint_initialises_a_one_process_run(two_runs, tmp_path):
  """init.from_checkpoint=<2-process workdir> in a 1-process run that trains on to step 8."""
  one, two = two_runs
  work = tmp_path / 'from_ckpt'
  _train_one_process(work, f'--config.init.from_checkpoint={two}', '--config.train.steps=8')
  assert not [s for s in os.listdir(two / 'checkpoints') if 'corrupt' in s]
  losses = _metrics(work)
  assert losses and all(v == v for v in losses.values())  # Logged and finite.
  assert _summary(work)['final_step'] == 8
  # Started from the trained parameters, not from a fresh init: the first loss is well below the
  # fresh model's first loss (the same model and data at step 1).
  fresh, trained = _metrics(one)[1], _metrics(two)[6]
  first = losses[min(losses)]
  assert first < (fresh + trained) / 2, (first, fresh, trained)


# ------------------------------------------------------------------------ _base.sh
def test_ensure_base_follows_a_chain_of_stages(tmp_path):
  """launch/_base.sh on staged configs (passkey_4k.py starts from runs/passkey_512/export, the
  export of passkey_512.py, which starts from runs/local/tiny/export): an existing stage export is
  taken as it is; a missing one is trained only after its own start is ensured. Stand-in configs in
  a scratch directory, where the training command fails at once (the stand-ins are not
  experiments), which stops the chain right where it would train."""
  exp = tmp_path / 'experiments'
  exp.mkdir()
  for name, start in (('a', 'runs/b/export'), ('b', 'runs/local/c/export'), ('c', '')):
    (exp / f'{name}.py').write_text(textwrap.dedent(f"""\
        import ml_collections
        def get_config():
          return ml_collections.ConfigDict({{'init': {{'params_only': {start!r}}}}})
        """))
  (tmp_path / 'runs/local/c/export/params').mkdir(parents=True)
  env = _env(PATH=os.path.dirname(PY) + os.pathsep + os.environ['PATH'], PYTHONPATH='')
  script = (f'set -euo pipefail; source {LAUNCH}/_base.sh; ensure_base experiments/$0; '
            'echo "BASE=$BASE_EXPORT"')
  r = _run(['bash', '-c', script, 'b.py'], cwd=tmp_path, env=env)
  assert r.returncode == 0 and r.stdout.endswith('BASE=runs/local/c/export\n'), r.stdout + r.stderr
  r = _run(['bash', '-c', script, 'a.py'], cwd=tmp_path, env=env)
  lines = [x for x in r.stdout.splitlines() if x.startswith('[base]')]
  assert r.returncode != 0 and len(lines) == 2, r.stdout + r.stderr
  assert 'runs/b/export, which is missing: training experiments/b.py -> runs/b' in lines[0]
  assert 'experiments/b.py starts from runs/local/c/export (exists' in lines[1]
  (tmp_path / 'runs/b/export/params').mkdir(parents=True)
  r = _run(['bash', '-c', script, 'a.py'], cwd=tmp_path, env=env)
  assert r.returncode == 0 and r.stdout.endswith('BASE=runs/b/export\n'), r.stdout + r.stderr


# ------------------------------------------------------------------------ _base.sh (slow)
@pytest.mark.slow
def test_ensure_base_trains_a_missing_base_once(tmp_path):
  """launch/_base.sh: tiny_ccf.py names runs/local/tiny/export, so ensure_base trains and exports
  experiments/tiny.py (shrunk here by the flags it passes on) when that export is missing, reuses
  it when present, and runs nothing for a config from scratch."""
  base = tmp_path / 'base'
  flags = ' '.join(shlex.quote(f) for f in TRAIN_FLAGS[1:] if not f.startswith('--config.mesh'))
  env = _env(PATH=os.path.dirname(PY) + os.pathsep + os.environ['PATH'])

  def ensure(config):
    r = _run(['bash', '-c', f'set -euo pipefail; source launch/_base.sh; ensure_base '
              f'experiments/{config} {shlex.quote(str(base))} {flags}; echo "BASE=$BASE_EXPORT"'],
             env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout

  out = ensure('tiny_ccf.py')
  assert 'missing: training experiments/tiny.py' in out and f'BASE={base}/export\n' in out
  info = json.loads((base / 'export' / 'export_info.json').read_text())
  assert info['step'] == 6, info  # TRAIN_FLAGS' steps: the flags reached the base's training.
  out = ensure('tiny_segment_local.py')  # Same base, now present: nothing is trained.
  assert 'exists' in out and 'training' not in out and f'BASE={base}/export\n' in out
  out = ensure('tiny_ccf_scratch.py')
  assert '[base]' not in out and out.endswith('BASE=\n')
