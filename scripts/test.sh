#!/usr/bin/env bash
# The tests, on a fresh machine, in one command (what .ci/run calls):
#   bash scripts/test.sh [pytest arguments]
# installs what is missing (scripts/install-if-needed.sh); with no arguments it then runs the cheap checks first,
# which fail fast (ruff, configured in pyproject.toml; the unit tier: no model, no llama.cpp), then the default
# (non-slow) test set less the unit tier just run, in QUANTKIT_TEST_WORKERS processes (default 2: pytest-xdist,
# one test file per process at a time, so a file's fixtures are built once; Ray and vLLM are each used by one file
# only, so one cluster and one vLLM server run at a time). With arguments, only `pytest ARGS`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install-if-needed.sh
if [ $# -eq 0 ]; then
  "$PY" -m ruff check .
  "$PY" -m pytest -m unit -q
  exec "$PY" -m pytest -m "not slow and not unit" -n "${QUANTKIT_TEST_WORKERS:-2}" --dist loadfile
fi
exec "$PY" -m pytest "$@"
