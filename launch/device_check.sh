#!/usr/bin/env bash
# One command for a machine with one GPU (or a TPU VM): prints one JSON report (device and versions,
# attention errors against dense f32 on the CCF masks, ~1B train steps with MFU and peak memory,
# CCF against full attention at 16k tokens, prefill and decode at 16k and 64k). Within 8 minutes
# on one H100: --budget_s (default 400), then a watchdog at the budget + 30 s. The logic is
# ccf_jax/bench/device_check.py (`python -m ccf_jax.bench device_check`); this only sets it up.
#
#   launch/device_check.sh                    # the device run
#   launch/device_check.sh --smoke            # the same code on the CPU, tiny shapes (< 1 minute)
#   launch/device_check.sh --budget_s=300     # a shorter run: later items are skipped, with why
#
# The report is the last line of stdout; with OUT set it is also written to $OUT/device_check.json
# (rewritten after every item, so even a killed run leaves one). PYTHON picks the interpreter
# (default python3: the one with the accelerator's JAX).
#
# Packages. The machine needs jax with its CUDA or TPU plugin, flax, optax, orbax-checkpoint,
# absl-py, numpy, pyyaml, etils, cloudpickle and protobuf, plus ccf_jax's grain and ml-collections
# (and their array-record and portpicker), which a GPU image may lack and an offline machine cannot
# fetch. When the folder WHEELS (default: wheels/ in the repository) holds wheels, they are
# installed from it first, offline, into $TMPDIR/ccf_jax_site (put first on PYTHONPATH). Prepare the
# folder on a machine with network, for the target's Python (3.12 on the lent GPU machines):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d wheels \
#     grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0
#
# and copy wheels/ next to the code (.gitignore keeps it out of commits). Only the packages the
# machine lacks belong there: two versions of one package, or one the machine has, shadow its own.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$ROOT/wheels}"
SMOKE=0
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
  esac
done
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE="${TMPDIR:-/tmp}/ccf_jax_site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl \
    || { echo "device_check: installing the wheels in $WHEELS failed (pip's message above). Fix: download them for this Python ($("$PY" --version 2>&1)) as this script's header shows." >&2; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import jax, flax, optax, grain, ml_collections" 2>/dev/null \
  || { echo "device_check: $PY cannot import jax, flax, optax, grain and ml_collections. Fix: put their wheels in $WHEELS (this script's header shows how) or set PYTHON to an interpreter that has them." >&2; exit 1; }
# A rerun on the same machine loads its compiled programs instead of compiling them again.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/ccf_jax_device_check_xla}"
export PYTHONUNBUFFERED=1
if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu
  # Tiny shapes: compilation is the cost, and XLA's cheapest backend settings halve it.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
else
  # The ~1B CCF step at 16k tokens needs more than JAX's default 75% of the GPU.
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
fi
cd "$ROOT"
exec "$PY" -m ccf_jax.bench device_check "$@"
