#!/usr/bin/env bash
# Build .venv with the pinned, tested set (constraints.txt) on first use; a no-op afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.bootstrapped
if [ -f "$stamp" ] && [ "$stamp" -nt constraints.txt ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
echo "[bootstrap] creating .venv with the pinned set (constraints.txt); about a minute on first use" >&2
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
touch "$stamp"
echo "[bootstrap] done" >&2
