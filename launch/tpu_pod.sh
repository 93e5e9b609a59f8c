#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single- or multi-host) with gcloud. See --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --project P --zone Z --accelerator-type T [options] -- [train flags...]

Creates (or reuses) the TPU VM slice NAME, copies this repository to every worker, installs
requirements.txt plus the TPU jax extra into <remote-dir>/.venv, then runs on ALL workers at once
  .venv/bin/python -m ccf_jax.train [train flags...] --config.mesh.distributed=True
Each worker's jax.distributed.initialize() finds the coordinator, process count and id by itself
(TPU metadata), so nothing else is passed. Worker 0's output is streamed here; every worker logs to
<remote-dir>/launch_logs/worker_<i>.log. Ctrl-C (or SIGTERM) stops the job on all workers: the
trainer gets SIGTERM, saves a checkpoint at the next step boundary and exits (SIGKILL after
--stop-grace seconds). Exit status: the run's (worker 0's, or the first failing worker's).

Required:
  --project P             Google Cloud project.
  --zone Z                Zone, e.g. us-west4-a (v5e), us-east5-a (v5p / v6e) - where you have quota.
  --accelerator-type T    e.g. v5litepod-16, v5litepod-256, v5p-128, v6e-64, v4-32.
Options:
  --name NAME             TPU VM name (default: ccf-<accelerator-type>).
  --runtime-version V     TPU software version (default from the type: v6e -> v2-alpha-tpuv6e,
                          v5p -> v2-alpha-tpuv5, v5litepod/v5e -> v2-alpha-tpuv5-lite,
                          v2/v3/v4 -> tpu-ubuntu2204-base). List: gcloud compute tpus tpu-vm versions list
  --spot                  Create a Spot TPU (cheaper, preemptible; the trainer checkpoints on SIGTERM).
  --remote-dir DIR        Code directory on the workers, relative to the home dir (default ccf_jax).
  --entry MODULE|FILE.py  What to run instead of ccf_jax.train (train flags then go verbatim, without
                          --config.mesh.distributed=True), e.g. launch/check_distributed.py.
  --env K=V               Export K=V on the workers for the run (repeatable), e.g. --env XLA_FLAGS=...
  --jax-spec SPEC         pip requirement for jax on TPU (default: jax[tpu]==<the requirements.txt pin>).
  --python PATH           Python >= 3.11 on the workers for the venv (default: first found, else uv
                          installs 3.11; TPU VM images ship 3.10).
  --no-create             Fail if the TPU does not exist instead of creating it.
  --no-sync               Do not copy the code.      --no-install   Do not pip install.
  --stop                  Only stop a run that is going on NAME (all workers), then exit.
  --delete                Delete the TPU VM when the run ends or is stopped (also with --stop).
  --stop-grace S          Seconds between SIGTERM and SIGKILL when stopping (default 120).
  --internal-ip           Reach the workers by internal IP (when running from a VM in the same VPC).
  --dry-run               Print every command (gcloud, tar) instead of running it.
  -h, --help              This text.

Workdir: every worker writes its shards of each checkpoint, so --workdir must be storage that all
workers share: a file system mounted on every worker (Filestore/NFS, or a gcsfuse mount of a bucket;
mounted before the run, e.g. by a startup script). Worker-local disks do not work. A corpus or
tokenizer given by path must exist on every worker (synced with the code, or on the shared mount).

Example:
  launch/tpu_pod.sh --project my-proj --zone us-west4-a --accelerator-type v5litepod-256 -- \
      --config=experiments/tiny.py --workdir=/mnt/shared/runs/tiny --config.mesh.fsdp=256
EOF
}

die() { echo "tpu_pod.sh: error: $*" >&2; echo "Run with --help for usage." >&2; exit 2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROJECT="" ZONE="" TYPE="" NAME="" RUNTIME="" SPOT=0 REMOTE_DIR="ccf_jax" ENTRY="ccf_jax.train"
JAX_SPEC="" REMOTE_PY="" CREATE=1 SYNC=1 INSTALL=1 STOP_ONLY=0 DELETE=0 GRACE=120 DRY=0
INTERNAL_IP=()
ENVS=()

need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --project) need "$@"; PROJECT="$2"; shift 2 ;;   --project=*) PROJECT="${1#*=}"; shift ;;
    --zone) need "$@"; ZONE="$2"; shift 2 ;;         --zone=*) ZONE="${1#*=}"; shift ;;
    --accelerator-type) need "$@"; TYPE="$2"; shift 2 ;;  --accelerator-type=*) TYPE="${1#*=}"; shift ;;
    --name) need "$@"; NAME="$2"; shift 2 ;;         --name=*) NAME="${1#*=}"; shift ;;
    --runtime-version) need "$@"; RUNTIME="$2"; shift 2 ;;  --runtime-version=*) RUNTIME="${1#*=}"; shift ;;
    --spot) SPOT=1; shift ;;
    --remote-dir) need "$@"; REMOTE_DIR="$2"; shift 2 ;;  --remote-dir=*) REMOTE_DIR="${1#*=}"; shift ;;
    --entry) need "$@"; ENTRY="$2"; shift 2 ;;       --entry=*) ENTRY="${1#*=}"; shift ;;
    --env) need "$@"; ENVS+=("$2"); shift 2 ;;       --env=*) ENVS+=("${1#*=}"); shift ;;
    --jax-spec) need "$@"; JAX_SPEC="$2"; shift 2 ;; --jax-spec=*) JAX_SPEC="${1#*=}"; shift ;;
    --python) need "$@"; REMOTE_PY="$2"; shift 2 ;;  --python=*) REMOTE_PY="${1#*=}"; shift ;;
    --no-create) CREATE=0; shift ;;
    --no-sync) SYNC=0; shift ;;
    --no-install) INSTALL=0; shift ;;
    --stop) STOP_ONLY=1; shift ;;
    --delete) DELETE=1; shift ;;
    --stop-grace) need "$@"; GRACE="$2"; shift 2 ;;  --stop-grace=*) GRACE="${1#*=}"; shift ;;
    --internal-ip) INTERNAL_IP=(--internal-ip); shift ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    *) die "unknown option '$1' (train flags go after --)" ;;
  esac
done
TRAIN_ARGS=("$@")

[[ -n "$PROJECT" ]] || die "missing --project"
[[ -n "$ZONE" ]] || die "missing --zone"
[[ -n "$TYPE" || $STOP_ONLY == 1 || -n "$NAME" ]] || die "missing --accelerator-type (e.g. v5litepod-256)"
[[ "$GRACE" =~ ^[0-9]+$ ]] || die "--stop-grace must be a whole number of seconds"
for e in "${ENVS[@]+"${ENVS[@]}"}"; do [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants K=V, got '$e'"; done
NAME="${NAME:-ccf-$TYPE}"
if [[ -z "$RUNTIME" && -n "$TYPE" ]]; then
  case "$TYPE" in
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v2-*|v3-*|v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    *) die "no default runtime version for accelerator type '$TYPE'; pass --runtime-version" ;;
  esac
fi
if [[ -z "$JAX_SPEC" ]]; then
  ver="$(awk -F'==' '$1 == "jax" { sub(/[ ;#].*/, "", $2); print $2; exit }' "$REPO/requirements.txt")"
  [[ -n "$ver" ]] || die "no 'jax==' pin in requirements.txt; pass --jax-spec"
  # libtpu is on PyPI for current jax ('jax[tpu]' pins it); no -f libtpu_releases.html needed.
  JAX_SPEC="jax[tpu]==$ver"
fi
if [[ $STOP_ONLY == 0 && "$ENTRY" == "ccf_jax.train" ]]; then
  [[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "missing train flags after -- (at least --config=... --workdir=...)"
  for a in "${TRAIN_ARGS[@]}"; do
    [[ "$a" == --config.mesh.distributed=* ]] && die "do not pass --config.mesh.distributed; the launcher sets it"
  done
  TRAIN_ARGS+=("--config.mesh.distributed=True")
fi

GC=(gcloud compute tpus tpu-vm)
WHERE=(--project="$PROJECT" --zone="$ZONE")
LOGDIR="$REMOTE_DIR/launch_logs"

shq() {  # POSIX shell quoting, readable: bare when safe, else '...'.
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
q() { local out=() w; for w in "$@"; do out+=("$(shq "$w")"); done; printf '%s' "${out[*]}"; }
show() { printf '+ %s\n' "$(q "$@")"; }
run() {  # Print in dry-run mode, else run.
  if (( DRY )); then show "$@"; else "$@"; fi
}
on_all() {  # Run a shell command on every worker.
  run "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all "${INTERNAL_IP[@]+"${INTERNAL_IP[@]}"}" --command="$1"
}

stop_remote() {
  echo "tpu_pod: stopping the run on all workers of $NAME" >&2
  on_all "$(q bash "$REMOTE_DIR/launch/tpu_worker.sh" stop "$LOGDIR" "$GRACE")" || true
}
delete_tpu() {
  echo "tpu_pod: deleting $NAME" >&2
  run "${GC[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

if (( STOP_ONLY )); then
  stop_remote
  (( DELETE )) && delete_tpu
  exit 0
fi

# 1. Create or reuse the slice.
ensure_tpu() {
  if (( DRY )); then
    show "${GC[@]}" describe "$NAME" "${WHERE[@]}" '--format=value(state,acceleratorType)'
    echo "# if $NAME does not exist:"
    local create=("${GC[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" --version="$RUNTIME")
    (( SPOT )) && create+=(--spot)
    show "${create[@]}"
    return
  fi
  local info state atype
  while true; do
    if info="$("${GC[@]}" describe "$NAME" "${WHERE[@]}" '--format=value(state,acceleratorType)' 2>/dev/null)"; then
      read -r state atype <<<"$info"
      atype="${atype##*/}"
      if [[ -n "$TYPE" && "$atype" != "$TYPE" ]]; then
        die "TPU $NAME exists with accelerator type $atype, not $TYPE. Pick another --name or delete it."
      fi
      case "$state" in
        READY) echo "tpu_pod: reusing $NAME ($atype, READY)" >&2; return ;;
        CREATING|STARTING|RESTARTING|REPAIRING)
          echo "tpu_pod: $NAME is $state; waiting" >&2; sleep 20 ;;
        *) die "TPU $NAME is $state. Delete it (launch/tpu_pod.sh --project $PROJECT --zone $ZONE --name $NAME --stop --delete) and rerun." ;;
      esac
    else
      (( CREATE )) || die "TPU $NAME does not exist in $PROJECT/$ZONE (and --no-create was given)"
      [[ -n "$TYPE" ]] || die "TPU $NAME does not exist; pass --accelerator-type to create it"
      echo "tpu_pod: creating $NAME ($TYPE, $RUNTIME)" >&2
      local create=("${GC[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" --version="$RUNTIME")
      (( SPOT )) && create+=(--spot)
      "${create[@]}"
    fi
  done
}
ensure_tpu

# 2. Copy the code: tracked + untracked-but-not-ignored files (so no .venv, workdirs, caches).
TGZ="${TMPDIR:-/tmp}/ccf_jax_code_$NAME.tgz"
if (( SYNC )); then
  if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    if (( DRY )); then
      echo "+ (cd $(shq "$REPO") && git ls-files -z -co --exclude-standard | tar --null -T - -czf $(shq "$TGZ"))"
    else
      (cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - -czf "$TGZ")
    fi
  else
    run tar -C "$REPO" --exclude=.venv --exclude=.git --exclude=__pycache__ --exclude=workdirs \
      --exclude=runs --exclude=exports --exclude=launch_logs -czf "$TGZ" .
  fi
  run "${GC[@]}" scp "$TGZ" "$NAME:ccf_jax_code.tgz" "${WHERE[@]}" --worker=all "${INTERNAL_IP[@]+"${INTERNAL_IP[@]}"}"
  on_all "mkdir -p $(q "$REMOTE_DIR") && tar -xzf ccf_jax_code.tgz -C $(q "$REMOTE_DIR") && rm -f ccf_jax_code.tgz"
fi

# 3. Install (idempotent: an existing .venv is reused, pip skips what is there).
if (( INSTALL )); then
  on_all "$(q bash "$REMOTE_DIR/launch/tpu_worker.sh" setup "$JAX_SPEC" ${REMOTE_PY:+"$REMOTE_PY"})"
fi

# 4. Run on all workers; stream worker 0; stop everything on Ctrl-C / SIGTERM.
if [[ "$ENTRY" == *.py ]]; then CMD=(.venv/bin/python "$ENTRY")
else CMD=(.venv/bin/python -m "$ENTRY"); fi
REMOTE_CMD="$(q bash "$REMOTE_DIR/launch/tpu_worker.sh" run "$LOGDIR" -- env PYTHONUNBUFFERED=1 \
  "${ENVS[@]+"${ENVS[@]}"}" "${CMD[@]}" "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")"

# shellcheck disable=SC2329  # Invoked by the trap.
on_signal() {
  trap - INT TERM
  stop_remote
  (( DELETE )) && delete_tpu
  exit 130
}
trap on_signal INT TERM

status=0
if (( DRY )); then
  on_all "$REMOTE_CMD"
  echo "# on Ctrl-C / SIGTERM:"
  stop_remote 2>/dev/null
else
  on_all "$REMOTE_CMD" || status=$?
fi
trap - INT TERM
if (( DELETE )); then delete_tpu; fi
(( DRY )) && { echo "tpu_pod: dry run, nothing was run" >&2; exit 0; }
(( status == 0 )) && echo "tpu_pod: run finished on $NAME" >&2 || echo "tpu_pod: run failed (status $status); logs: $LOGDIR/worker_*.log on the workers" >&2
exit "$status"
