#!/usr/bin/env bash
# N JAX processes on this machine (CPU, virtual devices, gloo collectives), joined by
# jax.distributed over localhost. See --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh [options] N [train flags...]

Starts N processes of `python -m ccf_jax.train [train flags...] --config.mesh.distributed=True`
on this machine, on CPU, each with K virtual devices (N*K global devices), joined by
jax.distributed over 127.0.0.1 with gloo cross-process collectives. A rehearsal of a multi-host
pod run: same code path (jax.distributed.initialize(), global mesh, per-process data, checkpoints
written by all processes), no cluster needed.

Options (before N):
  -k, --devices-per-process K  Virtual CPU devices per process (env LMP_DEVICES_PER_PROCESS;
                               default 8/N, which must then divide evenly).
  -p, --port PORT              Coordinator port on 127.0.0.1 (env LMP_PORT; default: a free port).
  --log-dir DIR                Where the per-process logs go (default: <workdir>/launch_logs when a
                               --workdir is among the train flags, else ./local_multiprocess_logs).
  --entry MODULE|SCRIPT.py     What each process runs (default ccf_jax.train). Anything other than
                               ccf_jax.train gets the flags verbatim, without
                               --config.mesh.distributed=True (e.g. launch/check_distributed.py).
  --kill-grace S               Seconds between SIGTERM and SIGKILL when stopping (default 10).
  -h, --help                   This text.

Output: process 0's stdout+stderr on the console; every process's in <log-dir>/process_<i>.log.
If any process exits non-zero (or the launcher gets Ctrl-C / SIGTERM), the others are stopped and
the launcher exits non-zero (the first failing process's status). Uses .venv/bin/python of the
repository if present, else $PYTHON, else python3.

Environment given to process i (what jax 0.10.2's argument-less jax.distributed.initialize() reads):
  JAX_PLATFORMS=cpu, XLA_FLAGS+=--xla_force_host_platform_device_count=K,
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo, JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT,
  SLURM_JOB_ID, SLURM_STEP_NODELIST=localhost, SLURM_NTASKS=N, SLURM_PROCID=i, SLURM_LOCALID=i
  (jax's own SlurmCluster auto-detection supplies num_processes/process_id from these: jax 0.10.2
  has no JAX_NUM_PROCESSES/JAX_PROCESS_ID variables), and JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i for
  code that passes them to initialize() explicitly.

Examples:
  launch/local_multiprocess.sh 2 --config=experiments/tiny.py --workdir=/tmp/mp \
      --config.mesh.data=8 --config.train.steps=20
  LMP_DEVICES_PER_PROCESS=2 launch/local_multiprocess.sh 4 --config=experiments/tiny.py --workdir=/tmp/mp4
  launch/local_multiprocess.sh --entry launch/check_distributed.py 2      # collectives smoke test
EOF
}

die() { echo "local_multiprocess.sh: error: $*" >&2; echo "Run with --help for usage." >&2; exit 2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if (( BASH_VERSINFO[0] < 4 )); then
  die "needs bash >= 4, this is $BASH_VERSION"
fi
K="${LMP_DEVICES_PER_PROCESS:-}"
PORT="${LMP_PORT:-}"
LOG_DIR=""
ENTRY="ccf_jax.train"
GRACE=10

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -k|--devices-per-process) [[ $# -ge 2 ]] || die "$1 needs a value"; K="$2"; shift 2 ;;
    --devices-per-process=*) K="${1#*=}"; shift ;;
    -p|--port) [[ $# -ge 2 ]] || die "$1 needs a value"; PORT="$2"; shift 2 ;;
    --port=*) PORT="${1#*=}"; shift ;;
    --log-dir) [[ $# -ge 2 ]] || die "$1 needs a value"; LOG_DIR="$2"; shift 2 ;;
    --log-dir=*) LOG_DIR="${1#*=}"; shift ;;
    --entry) [[ $# -ge 2 ]] || die "$1 needs a value"; ENTRY="$2"; shift 2 ;;
    --entry=*) ENTRY="${1#*=}"; shift ;;
    --kill-grace) [[ $# -ge 2 ]] || die "$1 needs a value"; GRACE="$2"; shift 2 ;;
    --kill-grace=*) GRACE="${1#*=}"; shift ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (launcher options go before N; train flags after it)" ;;
    *) break ;;
  esac
done

[[ $# -ge 1 ]] || die "missing N, the number of processes"
N="$1"; shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$N'"
if [[ -z "$K" ]]; then
  (( 8 % N == 0 )) || die "default devices per process is 8/N, but N=$N does not divide 8; pass -k K"
  K=$(( 8 / N ))
fi
[[ "$K" =~ ^[1-9][0-9]*$ ]] || die "devices per process must be a positive integer, got '$K'"
[[ "$GRACE" =~ ^[0-9]+$ ]] || die "--kill-grace must be a whole number of seconds, got '$GRACE'"

if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"
else PY="${PYTHON:-python3}"; fi
command -v "$PY" >/dev/null || die "python interpreter '$PY' not found"

# The train command (same for every process).
ARGS=("$@")
if [[ "$ENTRY" == *.py ]]; then CMD=("$PY" "$ENTRY")
else CMD=("$PY" -m "$ENTRY"); fi
if [[ "$ENTRY" == "ccf_jax.train" ]]; then
  for a in "${ARGS[@]}"; do
    [[ "$a" == --config.mesh.distributed=* ]] && die "do not pass --config.mesh.distributed; the launcher sets it"
  done
  ARGS+=("--config.mesh.distributed=True")
fi

# Logs next to the workdir's other outputs.
if [[ -z "$LOG_DIR" ]]; then
  WORKDIR=""
  for ((j = 0; j < ${#ARGS[@]}; j++)); do
    case "${ARGS[j]}" in
      --workdir=*) WORKDIR="${ARGS[j]#--workdir=}" ;;
      --workdir) (( j + 1 < ${#ARGS[@]} )) && WORKDIR="${ARGS[j+1]}" ;;
    esac
  done
  LOG_DIR="${WORKDIR:+$WORKDIR/launch_logs}"
  LOG_DIR="${LOG_DIR:-local_multiprocess_logs}"
fi
mkdir -p "$LOG_DIR"

if [[ -z "$PORT" ]]; then
  PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[[ "$PORT" =~ ^[0-9]+$ ]] || die "port must be a number, got '$PORT'"

# Common environment. Strip any earlier device-count flag so ours wins; keep other XLA flags.
XLA="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}" | xargs)"
export XLA_FLAGS="${XLA:+$XLA }--xla_force_host_platform_device_count=$K"
export JAX_PLATFORMS=cpu
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT"
export JAX_NUM_PROCESSES="$N"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# Local gRPC must not go through an HTTP proxy (that makes initialize() hang): exempt localhost.
if [[ -n "${http_proxy:-}${https_proxy:-}${HTTP_PROXY:-}${HTTPS_PROXY:-}${grpc_proxy:-}" ]]; then
  export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}" no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"
fi
# An enclosing MPI/SLURM job would otherwise win jax's cluster auto-detection.
unset OMPI_MCA_orte_hnp_uri PMIX_RANK JAX_LOCAL_DEVICE_IDS SLURM_STEP_NUM_NODES 2>/dev/null || true
export SLURM_JOB_ID="${SLURM_JOB_ID:-$PORT}" SLURM_STEP_NODELIST=localhost SLURM_NTASKS="$N"

echo "local_multiprocess: $N processes x $K CPU devices, coordinator 127.0.0.1:$PORT, logs in $LOG_DIR" >&2
echo "local_multiprocess: command: ${CMD[*]} ${ARGS[*]}" >&2

# setsid (util-linux) puts each process in its own group; without it, only the pid is signalled.
SETSID=""; command -v setsid >/dev/null && SETSID=setsid
PIDS=()
TAIL_PID=""
cleanup_done=0

stop_all() {  # SIGTERM every process group, then SIGKILL after the grace period.
  local pid alive t
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
  for ((t = 0; t < GRACE * 10; t++)); do
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; done
}

finish() {  # Stop everything that is left, reap it, stop the console tail.
  (( cleanup_done )) && return; cleanup_done=1
  stop_all
  wait "${PIDS[@]}" 2>/dev/null || true
  if [[ -n "$TAIL_PID" ]]; then  # tail ends by itself once process 0 is gone and its log is read.
    local t
    for ((t = 0; t < 30; t++)); do kill -0 "$TAIL_PID" 2>/dev/null || break; sleep 0.1; done
    kill "$TAIL_PID" 2>/dev/null || true; wait "$TAIL_PID" 2>/dev/null || true
  fi
}

# shellcheck disable=SC2329  # Invoked by the traps.
on_signal() {
  echo "local_multiprocess: caught $1, stopping all processes" >&2
  finish
  exit 130
}
trap 'on_signal SIGINT' INT
trap 'on_signal SIGTERM' TERM
trap 'finish' EXIT

for ((i = 0; i < N; i++)); do
  log="$LOG_DIR/process_$i.log"
  : >"$log"
  # setsid: each process leads its own process group, so stopping it also stops its children.
  SLURM_PROCID=$i SLURM_LOCALID=$i JAX_PROCESS_ID=$i \
    $SETSID "${CMD[@]}" "${ARGS[@]}" >"$log" 2>&1 </dev/null &
  PIDS+=("$!")
  if (( i == 0 )); then
    tail -n +1 -F -s 0.2 --pid="$!" "$log" 2>/dev/null &
    TAIL_PID=$!
  fi
done

# Wait for the processes as they end (polling: `wait -n` can return without a pid when several end
# together, which used to stop the survivors early); the first failure stops the rest.
status=0
declare -A RANK_OF
for ((i = 0; i < N; i++)); do RANK_OF[${PIDS[i]}]=$i; done
LEFT=("${PIDS[@]}")
while (( ${#LEFT[@]} > 0 && status == 0 )); do
  NEXT=()
  for pid in "${LEFT[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then NEXT+=("$pid"); continue; fi
    set +e; wait "$pid"; rc=$?; set -e
    if (( rc != 0 && status == 0 )); then
      r=${RANK_OF[$pid]}
      echo "local_multiprocess: process $r (pid $pid) exited with status $rc; stopping the" \
           "others. Its log: $LOG_DIR/process_$r.log" >&2
      if (( r != 0 )); then tail -n 20 "$LOG_DIR/process_$r.log" | sed "s/^/  [process $r] /" >&2 || true; fi
      status=$rc
    fi
  done
  LEFT=("${NEXT[@]+"${NEXT[@]}"}")
  (( ${#LEFT[@]} > 0 && status == 0 )) && sleep 0.2
done
finish
if (( status == 0 )); then
  echo "local_multiprocess: all $N processes finished" >&2
fi
exit "$status"
