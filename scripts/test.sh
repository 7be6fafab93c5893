#!/usr/bin/env bash
# The tests, on a fresh machine, in one command (what .ci/run calls):
#   bash scripts/test.sh [pytest arguments]
# installs what is missing (scripts/install-if-needed.sh), then runs pytest (the default, non-slow set).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install-if-needed.sh
exec "$PY" -m pytest "$@"
