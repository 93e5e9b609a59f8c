# Sourced by launch/local.sh and tests/run.sh: create .venv if missing and install the pinned stack.
# Re-installs only when requirements.txt changed (a hash stamp in .venv), so warm runs cost ~0 s.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "[setup] creating $ROOT/.venv with $($PY --version)"
  "$PY" -m venv "$ROOT/.venv"
fi
STAMP="$ROOT/.venv/.requirements.sha"
WANT="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] installing requirements.txt into .venv"
  "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt" 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$ROOT/.venv/bin/python" -c "import jax, flax, optax, orbax.checkpoint, grain, sentencepiece" \
    || { echo "[setup] install failed: see pip's output above"; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export CCF_DATA="${CCF_DATA:-$HOME/.cache/ccf_jax}"
