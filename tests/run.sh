#!/usr/bin/env bash
# Set up .venv (as launch/local.sh does) and run the whole pytest suite, slow tests included, on
# one pytest-xdist worker per CPU core (a file's tests stay on one worker, so its module-level
# compiled programs and fixtures are built once). Compilation, mostly single-threaded, dominates.
# Extra arguments pass through to pytest:  ./tests/run.sh -m "not slow"   (the fast loop)
#                                          ./tests/run.sh -n 0            (one process)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/launch/_setup.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu
exec python -m pytest -q -n auto --dist=loadfile --durations=25 tests "$@"
