#!/usr/bin/env bash
# One command installs everything quantkit and its tests need, on a fresh machine, from registry packages only.
#   bash scripts/install.sh
# - llama-cpp-python has no binary wheel on PyPI: pip compiles llama.cpp from its sdist (~7-10 min on 2 idle
#   cores; pip's wheel cache makes re-installs instant). CMAKE_ARGS skip llava/server/examples/tests and also
#   install llama.cpp's own tools (llama-quantize, llama-perplexity, ...) that benchmarks/ compare against.
# - torch is pinned to the 2.13.0 CPU build in pyproject.toml (an open range would pull a multi-GB CUDA build);
#   on a GPU box, install your CUDA torch first and it is kept.
# - Then llama.cpp's converter is unpacked from the same sdist version (quantkit setup).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
"$PY" -m pip install --upgrade-strategy only-if-needed -e '.[dev]'
"$PY" -m quantkit.cli setup
