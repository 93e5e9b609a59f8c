#!/usr/bin/env bash
# Long-context passkey (issue 24): train CCF on passkey windows of 4,096 tokens (keys at any
# depth, the corpus's text as filler; experiments/passkey_4k.py, or --config= another such as
# experiments/passkey_16k.py) after the stages it starts from (experiments/passkey_512.py: the
# same task at 512 tokens, from the base LM), export it, and evaluate it with the `long` preset:
# passkey at 4,096, 16,384, 32,768 and 65,536 tokens x 11 depths (greedy exact match and per-digit
# accuracy, the export's memory and a 31-segment memory window, memory off as the chance-level
# control), a depth x length heat-map (eval/passkey.png) and the tables in eval/report.md.
#
#   ./launch/recipes/passkey_long.sh [--config=experiments/passkey_4k.py] [--workdir=runs/X]
#                                    [--only=passkey] [-- TRAIN_FLAGS...]
#
# Every missing stage is trained first (launch/_base.sh: experiments/tiny.py's export
# runs/local/tiny/export, then runs/passkey_512/export). A finished training run is not repeated
# (the trainer resumes at its last step and stops).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CONFIG=experiments/passkey_4k.py
WORKDIR=""
ONLY=passkey
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --only=*) ONLY="${1#*=}" ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown option $1 (see --help)"; exit 2 ;;
  esac
  shift
done
source "$ROOT/launch/_setup.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu
WORKDIR="${WORKDIR:-runs/$(basename "$CONFIG" .py)}"
source "$ROOT/launch/_base.sh"
ensure_base "$CONFIG"
T0=$(date +%s)
python -m ccf_jax.train --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}"
T1=$(date +%s)
python -m ccf_jax.export --workdir="$WORKDIR" --out="$WORKDIR/export" --overwrite
python -m ccf_jax.evaluate --checkpoint="$WORKDIR/export" --preset=long --only="$ONLY" \
  --out="$WORKDIR/eval"
T2=$(date +%s)
echo "[passkey_long] train $((T1 - T0))s, export + evaluate $((T2 - T1))s; report: $WORKDIR/eval/report.md"
