#!/usr/bin/env bash
# The tests, on a fresh machine, in one command (what .ci/run calls):
#   bash scripts/test.sh [pytest arguments]
# installs what is missing (scripts/install-if-needed.sh); with no arguments it then runs the cheap checks first,
# which fail fast (ruff, configured in pyproject.toml; the unit tier: no model, no llama.cpp), then the default
# (non-slow) test set. With arguments, only `pytest ARGS`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install-if-needed.sh
if [ $# -eq 0 ]; then
  "$PY" -m ruff check .
  "$PY" -m pytest -m unit -q
fi
exec "$PY" -m pytest "$@"
