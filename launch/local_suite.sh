#!/usr/bin/env bash
# The comparison suite on this machine's CPU (outside the 10-minute budget of local.sh: about an
# hour on 2 cores): train the four tiny CPU models with the same data and the same number of steps,
# from the same pretrained base, evaluate each with --preset=full, and write one comparison report.
#
#   ./launch/local_suite.sh                          # 1000 steps each (tiny_ccf.py's train.steps)
#   ./launch/local_suite.sh --steps=20 --preset=quick --workdir=runs/suite_smoke   # a smoke run
#   ./launch/local_suite.sh --skip_train             # re-evaluate the existing exports
#   ./launch/local_suite.sh --preset=long --only=ppl # perplexity vs K up to 16,384 tokens
#
# Models (experiments/): tiny_ccf (CCF 8x), tiny_ccf_32x (CCF 32x), tiny_segment_local and
# tiny_full_attention (the same decoder without memory / with raw attention over the window).
# Training has no time budget here (--config.train.time_budget_s=0), so every model runs exactly
# --steps steps on the same data order (same data.shuffle_seed). The CCF models are evaluated with
# every section; the baselines with ppl, passkey and ae (efficiency already compares CCF with full
# attention of the same size). The base they all fine-tune (experiments/tiny.py, their
# init.params_only) is trained first into <workdir>/base (launch/_base.sh), with --steps too when
# given, so a smoke run never touches runs/local/tiny.
# Outputs: <workdir>/<model>/{checkpoints,export,eval/report.md}, <workdir>/comparison.md.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORKDIR="runs/suite"
STEPS=""
PRESET="full"
SKIP_TRAIN=0
ONLY=""
MODELS="tiny_ccf tiny_ccf_32x tiny_segment_local tiny_full_attention"
while [ $# -gt 0 ]; do
  case "$1" in
    --workdir=*) WORKDIR="${1#*=}" ;;
    --steps=*) STEPS="${1#*=}" ;;
    --preset=*) PRESET="${1#*=}" ;;
    --models=*) MODELS="${1#*=}"; MODELS="${MODELS//,/ }" ;;
    --skip_train) SKIP_TRAIN=1 ;;
    --only=*) ONLY="${1#*=}" ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)"; exit 2 ;;
  esac
  shift
done
source "$ROOT/launch/_setup.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu
source "$ROOT/launch/_base.sh"
T0=$(date +%s)
EVALS=()
for NAME in $MODELS; do
  W="$WORKDIR/$NAME"
  if [ "$SKIP_TRAIN" = 0 ]; then
    # A --steps smoke run shortens the base too, with a warmup that fits (tiny.py's is 100).
    ensure_base "experiments/$NAME.py" "$WORKDIR/base" --config.train.time_budget_s=0 \
      ${STEPS:+--config.train.steps=$STEPS --config.train.warmup_steps=$((STEPS / 10))}
    echo "[suite] training $NAME -> $W"
    python -m ccf_jax.train --config="experiments/$NAME.py" --workdir="$W" \
      --config.train.time_budget_s=0 ${STEPS:+--config.train.steps=$STEPS} \
      ${BASE_EXPORT:+--config.init.params_only=$BASE_EXPORT}
    python -m ccf_jax.export --workdir="$W" --out="$W/export" --overwrite
  fi
  SECTIONS="${ONLY:-ppl,passkey,ae,efficiency}"
  case "$NAME" in *segment_local*|*full_attention*) SECTIONS="${SECTIONS//,efficiency/}" ;; esac
  echo "[suite] evaluating $NAME (--preset=$PRESET --only=$SECTIONS)"
  python -m ccf_jax.evaluate --checkpoint="$W/export" --preset="$PRESET" --only="$SECTIONS" \
    --out="$W/eval"
  EVALS+=("$W/eval")
done
python -m ccf_jax.eval.compare --runs="$(IFS=,; echo "${EVALS[*]}")" --out="$WORKDIR" \
  --title="CCF vs baselines on the tiny CPU models (${STEPS:-1000} steps, preset $PRESET)"
echo "[suite] wall time $(( $(date +%s) - T0 ))s"
echo "[suite] report: $WORKDIR/comparison.md"
