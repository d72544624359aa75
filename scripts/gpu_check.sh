#!/usr/bin/env bash
# GPU check for kernels/: kernel tests natively + microbenchmarks, JSON to $OUT (or ./out).
# Needs an NVIDIA GPU, torch and Triton; no vLLM, no network, no install. See docs/kernels.md.
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
