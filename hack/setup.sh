#!/usr/bin/env bash
# Create .venv and install the project with every extra. Idempotent: a stamp keyed by the hash of
# pyproject.toml and the constraints skips the install when nothing changed (well under a second).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.ling-setup-stamp"
want="$(cat pyproject.toml hack/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "error: Python >= 3.11 is required (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
echo "[setup] creating $VENV and installing dependencies (the first time downloads torch: several GB) ..."
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip uv
# uv keeps a hard-linked cache under ~/.cache/uv, so a fresh clone re-installs in seconds.
"$VENV/bin/uv" pip install --python "$VENV/bin/python" -c hack/constraints.txt -e ".[dev]"
echo "$want" > "$STAMP"
echo "[setup] done"
