#!/usr/bin/env bash
# One command installs everything quantkit and its tests need, on a fresh machine, from registry packages only.
#   bash scripts/install.sh
# - llama-cpp-python has no binary wheel on PyPI: pip compiles llama.cpp from its sdist (~7-10 min on 2 idle
#   cores; pip's wheel cache makes re-installs instant). CMAKE_ARGS skip llava/server/examples/tests and also
#   install llama.cpp's own tools (llama-quantize, llama-perplexity, ...) that benchmarks/ compare against.
# - torch is pinned to the 2.13.0 CPU build in pyproject.toml (an open range would pull a multi-GB CUDA build);
#   on a GPU box, install your CUDA torch first and it is kept.
# - Then llama.cpp's converter is unpacked from the same sdist version (quantkit setup), and vLLM gets its own
#   environment (scripts/install-vllm.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# GGML_NATIVE=OFF + AVX2: a portable build. -march=native compiled AMX code that traps ("Illegal instruction")
# on VMs whose CPUID reports AMX but whose kernel does not enable its tile state (seen here, Dec 2026).
PORTABLE="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $PORTABLE}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
"$PY" -m pip install --upgrade-strategy only-if-needed -e '.[dev]'
# pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS: a llama.cpp built natively before (AMX/AVX-512
# code paths) is rebuilt once with the portable flags above.
if "$PY" -c "import llama_cpp, sys; i = llama_cpp.llama_print_system_info().decode(); sys.exit('AMX' in i or 'AVX512 = 1' in i)"; then :; else
  echo "install.sh: rebuilding llama-cpp-python without native CPU extensions (portable AVX2 build)"
  LLAMA_VER=$("$PY" -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
  "$PY" -m pip install --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$LLAMA_VER"
fi
"$PY" -m quantkit.cli setup
bash scripts/install-vllm.sh
