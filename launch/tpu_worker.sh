#!/usr/bin/env bash
# Runs ON each TPU VM worker (launch/tpu_pod.sh calls it through `gcloud ... ssh --worker=all`).
#   tpu_worker.sh setup JAX_SPEC [PYTHON]   make <repo>/.venv with Python >= 3.11 and install
#                                           requirements.txt + JAX_SPEC (e.g. 'jax[tpu]==0.10.2')
#   tpu_worker.sh run LOGDIR -- CMD...      run CMD detached from the ssh session (own process group,
#                                           immune to a dropped connection); worker 0 streams its log,
#                                           the others print the tail of theirs if CMD fails; exits
#                                           with CMD's status
#   tpu_worker.sh stop LOGDIR [GRACE_S]     SIGTERM the running CMD's process group (the trainer then
#                                           saves a checkpoint and exits), SIGKILL after GRACE_S (120)
# The repository root is this script's parent directory.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "tpu_worker.sh: error: $*" >&2; exit 2; }

worker_id() {  # The TPU VM worker index, as jax's GceTpuCluster reads it.
  if [[ -n "${TPU_WORKER_ID:-}" ]]; then echo "$TPU_WORKER_ID"; return; fi
  curl -sf -H 'Metadata-Flavor: Google' \
    'http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number' \
    || die "cannot read agent-worker-number from the metadata server (not a TPU VM?)"
}

cmd_setup() {
  local spec="${1:?setup needs the jax spec, e.g. jax[tpu]==0.10.2}" py="${2:-}"
  cd "$REPO"
  if [[ -z "$py" ]]; then
    for cand in python3.13 python3.12 python3.11 python3; do
      if command -v "$cand" >/dev/null &&
         "$cand" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        py="$(command -v "$cand")"; break
      fi
    done
  fi
  if [[ -z "$py" ]]; then
    # TPU VM images ship Ubuntu 22.04's Python 3.10; jax 0.10.2 needs >= 3.11. uv fetches a
    # standalone CPython without root.
    echo "worker $(worker_id): no Python >= 3.11 found; installing one with uv" >&2
    if ! command -v uv >/dev/null && [[ ! -x "$HOME/.local/bin/uv" ]]; then
      curl -LsSf https://astral.sh/uv/install.sh | sh >/dev/null
    fi
    local uv; uv="$(command -v uv || echo "$HOME/.local/bin/uv")"
    "$uv" python install 3.11 >/dev/null
    py="$("$uv" python find 3.11)"
  fi
  [[ -x .venv/bin/python ]] || "$py" -m venv .venv
  .venv/bin/python -m pip install -q -U pip
  .venv/bin/python -m pip install -q -r requirements.txt "$spec"
  echo "worker $(worker_id): $(.venv/bin/python -c 'import sys, jax; print("python", sys.version.split()[0], "jax", jax.__version__)')"
}

cmd_run() {
  local logdir="${1:?run needs LOGDIR}"; shift
  [[ "${1:-}" == "--" ]] && shift
  [[ $# -gt 0 ]] || die "run needs a command after --"
  local w; w="$(worker_id)"
  mkdir -p "$logdir"; logdir="$(cd "$logdir" && pwd)"
  local log="$logdir/worker_$w.log" pidf="$logdir/worker_$w.pid" rcf="$logdir/worker_$w.rc"
  if [[ -f "$pidf" ]] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
    die "worker $w: a run is already going (pid $(cat "$pidf")); stop it with: launch/tpu_pod.sh ... --stop"
  fi
  rm -f "$rcf"
  cd "$REPO"
  # setsid + nohup: survives the ssh session; pid == process group id, which `stop` signals.
  # Quoting: the command is passed as separate words and re-quoted with printf %q.
  local quoted; quoted="$(printf '%q ' "$@")"
  # The wrapper shell outlives a SIGTERM to the group (no-op trap; children get the default) so
  # that it records the command's exit status.
  setsid nohup bash -c "trap : TERM; $quoted; echo \$? > $(printf '%q' "$rcf")" >"$log" 2>&1 </dev/null &
  echo $! >"$pidf"
  if [[ "$w" == 0 ]]; then
    tail -n +1 -F --pid="$(cat "$pidf")" "$log" 2>/dev/null || true
  else
    while kill -0 "$(cat "$pidf")" 2>/dev/null; do sleep 5; done
  fi
  local rc; rc="$(cat "$rcf" 2>/dev/null || echo 1)"
  if [[ "$rc" != 0 && "$w" != 0 ]]; then
    echo "worker $w: exited with status $rc; last lines of $log:" >&2
    tail -n 30 "$log" | sed "s/^/[worker $w] /" >&2
  fi
  rm -f "$pidf"
  return "$rc"
}

cmd_stop() {
  local logdir="${1:?stop needs LOGDIR}" grace="${2:-120}" w pidf pid t
  w="$(worker_id)"; pidf="$logdir/worker_$w.pid"
  [[ -f "$pidf" ]] || { echo "worker $w: nothing running"; return 0; }
  pid="$(cat "$pidf")"
  kill -TERM -- "-$pid" 2>/dev/null || true
  for ((t = 0; t < grace; t++)); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "worker $w: still running after ${grace}s; SIGKILL" >&2
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidf"
  echo "worker $w: stopped"
}

case "${1:-}" in
  setup) shift; cmd_setup "$@" ;;
  run) shift; cmd_run "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  *) die "usage: tpu_worker.sh setup JAX_SPEC [PYTHON] | run LOGDIR -- CMD... | stop LOGDIR [GRACE_S]" ;;
esac
