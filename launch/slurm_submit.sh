#!/usr/bin/env bash
# Writes a job file from launch/slurm_gpu.sbatch with your resources and train flags, and sbatch-es it.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/slurm_submit.sh --nodes N [options] -- [train flags...]

Generates a self-contained SLURM job script from launch/slurm_gpu.sbatch (one task = one JAX process
per node, all GPUs of the node; coordinator = first node of the allocation; CUDA jax from PyPI) with
the #SBATCH resources below and the train flags baked in, saves it, and submits it with sbatch.

Options:
  --nodes N              Nodes (= JAX processes). Required.
  --gpus-per-node G      GPUs per node (default 8).
  --partition P          SLURM partition (default: the cluster's default).
  --time T               Time limit, e.g. 04:00:00 or 2-00:00:00 (default 04:00:00).
  --job-name NAME        (default ccf_jax)
  --account A            SLURM account to charge.
  --cpus-per-task C      CPUs per task (default 16; the data pipeline and the host side use them).
  --sbatch-arg ARG       Extra #SBATCH line, repeatable, e.g. --sbatch-arg=--qos=high
                         --sbatch-arg=--signal=TERM@120 --sbatch-arg=--constraint=h100
  --cuda 12|13           jax[cuda12] (NVIDIA driver >= 525, default) or jax[cuda13] (driver >= 580).
  --venv DIR             Virtualenv on the shared FS (default <repo>/.venv-cuda<12|13>); created and
                         filled on the first job, reused after.
  --python PY            Python >= 3.11 used to create the venv (default python3.11).
  --skip-install         Use the venv as it is.
  --entry MODULE|FILE.py Run this instead of ccf_jax.train (flags verbatim, no
                         --config.mesh.distributed=True), e.g. launch/check_distributed.py.
  --out-dir DIR          Where the job script and the SLURM log go (default <workdir>/slurm when a
                         --workdir is among the train flags, else ./slurm_jobs).
  --dry-run              Print the generated job script and the sbatch command; write/submit nothing.
  -h, --help             This text.

Example:
  launch/slurm_submit.sh --nodes 2 --gpus-per-node 8 --partition h100 --time 12:00:00 -- \
      --config=experiments/tiny.py --workdir=/shared/runs/tiny --config.mesh.fsdp=16
EOF
}

die() { echo "slurm_submit.sh: error: $*" >&2; echo "Run with --help for usage." >&2; exit 2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TEMPLATE="$REPO/launch/slurm_gpu.sbatch"
NODES="" GPUS=8 PARTITION="" TIME="04:00:00" JOB="ccf_jax" ACCOUNT="" CPUS=16 CUDA=12 VENV=""
PYTHON_BIN="" SKIP_INSTALL=0 ENTRY="ccf_jax.train" OUT_DIR="" DRY=0
EXTRA=()

need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nodes) need "$@"; NODES="$2"; shift 2 ;;            --nodes=*) NODES="${1#*=}"; shift ;;
    --gpus-per-node) need "$@"; GPUS="$2"; shift 2 ;;     --gpus-per-node=*) GPUS="${1#*=}"; shift ;;
    --partition) need "$@"; PARTITION="$2"; shift 2 ;;    --partition=*) PARTITION="${1#*=}"; shift ;;
    --time) need "$@"; TIME="$2"; shift 2 ;;              --time=*) TIME="${1#*=}"; shift ;;
    --job-name) need "$@"; JOB="$2"; shift 2 ;;           --job-name=*) JOB="${1#*=}"; shift ;;
    --account) need "$@"; ACCOUNT="$2"; shift 2 ;;        --account=*) ACCOUNT="${1#*=}"; shift ;;
    --cpus-per-task) need "$@"; CPUS="$2"; shift 2 ;;     --cpus-per-task=*) CPUS="${1#*=}"; shift ;;
    --sbatch-arg) need "$@"; EXTRA+=("$2"); shift 2 ;;    --sbatch-arg=*) EXTRA+=("${1#*=}"); shift ;;
    --cuda) need "$@"; CUDA="$2"; shift 2 ;;              --cuda=*) CUDA="${1#*=}"; shift ;;
    --venv) need "$@"; VENV="$2"; shift 2 ;;              --venv=*) VENV="${1#*=}"; shift ;;
    --python) need "$@"; PYTHON_BIN="$2"; shift 2 ;;      --python=*) PYTHON_BIN="${1#*=}"; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --entry) need "$@"; ENTRY="$2"; shift 2 ;;            --entry=*) ENTRY="${1#*=}"; shift ;;
    --out-dir) need "$@"; OUT_DIR="$2"; shift 2 ;;        --out-dir=*) OUT_DIR="${1#*=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    *) die "unknown option '$1' (train flags go after --)" ;;
  esac
done
TRAIN_ARGS=("$@")

[[ -n "$NODES" ]] || die "missing --nodes"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$GPUS'"
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-task must be a positive integer, got '$CPUS'"
[[ "$CUDA" == 12 || "$CUDA" == 13 ]] || die "--cuda must be 12 or 13, got '$CUDA'"
[[ -f "$TEMPLATE" ]] || die "template $TEMPLATE not found"
if [[ "$ENTRY" == ccf_jax.train ]]; then
  [[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "missing train flags after -- (at least --config=... --workdir=...)"
  for a in "${TRAIN_ARGS[@]}"; do
    [[ "$a" == --config.mesh.distributed=* ]] && die "do not pass --config.mesh.distributed; the job adds it"
  done
fi
WORKDIR=""
for ((j = 0; j < ${#TRAIN_ARGS[@]}; j++)); do
  case "${TRAIN_ARGS[j]}" in
    --workdir=*) WORKDIR="${TRAIN_ARGS[j]#--workdir=}" ;;
    --workdir) (( j + 1 < ${#TRAIN_ARGS[@]} )) && WORKDIR="${TRAIN_ARGS[j+1]}" ;;
  esac
done
if [[ -z "$OUT_DIR" ]]; then
  if [[ -n "$WORKDIR" ]]; then OUT_DIR="$WORKDIR/slurm"; else OUT_DIR="$PWD/slurm_jobs"; fi
fi
[[ "$OUT_DIR" == /* ]] || OUT_DIR="$PWD/$OUT_DIR"

shq() {  # POSIX shell quoting: bare when safe, else '...'.
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# The #SBATCH lines we own; the template's other #SBATCH lines (ntasks-per-node, exclusive) stay.
declare -A SB=(
  [job-name]="$JOB" [nodes]="$NODES" [gpus-per-node]="$GPUS" [cpus-per-task]="$CPUS"
  [time]="$TIME" [output]="$OUT_DIR/%x-%j.out"
)
generate() {
  local line key done_extra=0 seen_sbatch=0
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ "$line" =~ ^#SBATCH\ --([a-z-]+)(=|$) ]]; then
      seen_sbatch=1
      key="${BASH_REMATCH[1]}"
      if [[ -n "${SB[$key]+x}" ]]; then echo "#SBATCH --$key=${SB[$key]}"; else echo "$line"; fi
      continue
    fi
    if (( seen_sbatch && ! done_extra )); then
      done_extra=1
      [[ -n "$PARTITION" ]] && echo "#SBATCH --partition=$PARTITION"
      [[ -n "$ACCOUNT" ]] && echo "#SBATCH --account=$ACCOUNT"
      local e; for e in "${EXTRA[@]+"${EXTRA[@]}"}"; do echo "#SBATCH $e"; done
    fi
    echo "$line"
    if [[ "$line" == "set -euo pipefail" ]]; then
      echo ""
      echo "# ---- written by launch/slurm_submit.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
      echo "CCF_REPO=$(shq "$REPO")"
      echo "CCF_CUDA=$CUDA"
      [[ -n "$VENV" ]] && echo "CCF_VENV=$(shq "$VENV")"
      [[ -n "$PYTHON_BIN" ]] && echo "CCF_PYTHON=$(shq "$PYTHON_BIN")"
      (( SKIP_INSTALL )) && echo "CCF_SKIP_INSTALL=1"
      echo "CCF_ENTRY=$(shq "$ENTRY")"
      echo "CCF_GPUS_PER_NODE=$GPUS"
      local words=() a
      for a in "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"; do words+=("$(shq "$a")"); done
      echo "CCF_TRAIN_ARGS=(${words[*]+"${words[*]}"})"
      echo "CCF_TRAIN_ARGS_SET=1"
    fi
  done <"$TEMPLATE"
}

SCRIPT_TEXT="$(generate)"
JOB_FILE="$OUT_DIR/$JOB-$(date +%Y%m%d-%H%M%S).sbatch"
if (( DRY )); then
  echo "# ---- generated job script ($JOB_FILE) ----"
  printf '%s\n' "$SCRIPT_TEXT"
  echo "# ---- submit command ----"
  echo "+ sbatch $(shq "$JOB_FILE")"
  exit 0
fi
command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node (or use --dry-run)"
mkdir -p "$OUT_DIR"
printf '%s\n' "$SCRIPT_TEXT" >"$JOB_FILE"
chmod +x "$JOB_FILE"
echo "slurm_submit: wrote $JOB_FILE" >&2
jobid="$(sbatch --parsable "$JOB_FILE")"
jobid="${jobid%%;*}"
echo "slurm_submit: submitted job $jobid" >&2
echo "  follow:  tail -F $(shq "$OUT_DIR/$JOB-$jobid.out")" >&2
echo "  status:  squeue -j $jobid      stop (checkpoints on SIGTERM): scancel --signal=TERM $jobid" >&2
echo "$jobid"
