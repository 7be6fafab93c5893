#!/usr/bin/env bash
# Runs scripts/install.sh only when something it installs is missing: the quantkit-llm distribution (with its
# test extras), llama-cpp-python, llama.cpp's converter (quantkit setup), or vLLM's environment. Used by scripts/demo.sh and
# scripts/test.sh so that each works on a fresh machine and costs nothing on a set-up one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if "$PY" - <<'PYEOF' >/dev/null 2>&1; then
import importlib.metadata as md
import pytest, xdist, llama_cpp  # noqa: F401  (test extras, llama.cpp)
info = llama_cpp.llama_print_system_info().decode()
assert "AMX" not in info and "AVX512 = 1" not in info  # a native build: install.sh rebuilds it portably
import ruff, lm_eval, peft, ray, tenacity  # noqa: F401  (lint, tasks + lm-eval api, cluster: dev extra; LoRA)
md.version("quantkit-llm")
from quantkit import llamacpp
assert (llamacpp.sources_dir() / "convert_hf_to_gguf.py").is_file()
PYEOF
  bash scripts/install-vllm.sh  # its own environment: checks itself, installs only when missing
  exit 0
fi
echo "installing what is missing (scripts/install.sh; compiling llama.cpp takes ~10 min the first time)..." >&2
bash scripts/install.sh
