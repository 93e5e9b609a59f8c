#!/usr/bin/env bash
# Set up .venv (as launch/local.sh does) and run the whole pytest suite, slow tests included.
# Extra arguments pass through to pytest:  ./tests/run.sh -m "not slow"   (the fast loop)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/launch/_setup.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu
exec python -m pytest -q --durations=15 tests "$@"
