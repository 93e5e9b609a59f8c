#!/usr/bin/env bash
# The figures of CCF on a real pretrained LM: exports the experiments/smollm2_ccf.py run and
# evaluates it next to its base (the SmolLM2-135M export), then writes one comparison report.
#   * held-out loss of the last segment given K tokens of context, K up to 16 segments (2,048
#     tokens): CCF memory on / off (off = each segment alone: segment_local, the base model exactly,
#     as the gate starts closed and LoRA only touches memory rows) and the base with full attention;
#   * passkey retrieval at 2,048 and 4,096 tokens (16 and 32 segments), key at 3 depths.
#
#   ./launch/recipes/smollm2_ccf_eval.sh [--workdir=runs/smollm2_ccf] [--base=runs/smollm2/export]
#                                       [--docs=4]
#
# Outputs: WORKDIR/export, WORKDIR/eval (results.json, report.md), BASE/eval, and
# WORKDIR/compare/report.md (python -m ccf_jax.eval.compare).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORKDIR=runs/smollm2_ccf
BASE=runs/smollm2/export
DOCS=4
while [ $# -gt 0 ]; do
  case "$1" in
    --workdir=*) WORKDIR="${1#*=}" ;;
    --base=*) BASE="${1#*=}" ;;
    --docs=*) DOCS="${1#*=}" ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)"; exit 2 ;;
  esac
  shift
done
source "$ROOT/launch/_setup.sh"
cd "$ROOT"
python -m ccf_jax.export --workdir="$WORKDIR" --out="$WORKDIR/export" --overwrite
python launch/recipes/smollm2_ccf_eval.py "$WORKDIR/export" "$WORKDIR/eval" "$DOCS"
python launch/recipes/smollm2_ccf_eval.py "$BASE" "$BASE/eval" "$DOCS"
python -m ccf_jax.eval.compare --runs="$WORKDIR/eval,$BASE/eval" --out="$WORKDIR/compare"
