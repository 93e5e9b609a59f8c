#!/usr/bin/env bash
# The main job on this machine's CPU: set up .venv, train the default experiment on the built-in
# Shakespeare corpus, export it, and run a quick evaluation. The default, tiny_ccf.py, fine-tunes
# the export of experiments/tiny.py (runs/local/tiny/export): when that is missing it is trained
# first (launch/_base.sh), so a fresh machine runs two stages, about 7 + 6 minutes on 2 cores.
#
#   ./launch/local.sh                      # 1 CPU device
#   ./launch/local.sh --devices=8          # the same job sharded over 8 virtual CPU devices (batch 8)
#   ./launch/local.sh --config=experiments/tiny.py --workdir=runs/x -- --config.train.steps=100
#
# Outputs: runs/local/<experiment>/ (checkpoints, metrics.jsonl, tb/), the export in .../export,
# the evaluation report in .../eval/report.md. Data and tokenizer caches go to $CCF_DATA.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CONFIG="experiments/tiny_ccf.py"
DEVICES=1
WORKDIR=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --devices=*) DEVICES="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown option $1 (see --help)"; exit 2 ;;
  esac
  shift
done
T0=$(date +%s)
source "$ROOT/launch/_setup.sh"
T1=$(date +%s)
cd "$ROOT"
NAME="$(basename "$CONFIG" .py)"
WORKDIR="${WORKDIR:-runs/local/$NAME}"
export JAX_PLATFORMS=cpu
if [ "$DEVICES" -gt 1 ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES"
  # The batch axis is split over the devices: at least one example per device (later flags win).
  EXTRA=("--config.data.batch_size=$DEVICES" "${EXTRA[@]}")
  echo "[local] $DEVICES devices: --config.data.batch_size=$DEVICES (one example per device)"
fi
source "$ROOT/launch/_base.sh"
case " ${EXTRA[*]:-} " in
  *" --config.init.params_only="*) ;;  # An explicit start: nothing to train first.
  *) ensure_base "$CONFIG" ;;
esac
TB=$(date +%s)
echo "[local] setup $((T1 - T0))s; training $CONFIG on $DEVICES CPU device(s) -> $WORKDIR"
python -m ccf_jax.train --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}"
T2=$(date +%s)
python -m ccf_jax.export --workdir="$WORKDIR" --out="$WORKDIR/export" --overwrite
T3=$(date +%s)
python -m ccf_jax.evaluate --checkpoint="$WORKDIR/export" --preset=quick --out="$WORKDIR/eval"
T4=$(date +%s)
echo "[local] wall time by phase: setup $((T1 - T0))s, base $((TB - T1))s, train (incl. data+tokenizer) $((T2 - TB))s, export $((T3 - T2))s, evaluate $((T4 - T3))s"
echo "[local] report: $WORKDIR/eval/report.md"
