# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both set up .venv first (idempotent, seconds when nothing changed).
SHELL := /bin/bash
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: setup demo test lint models models-base clean-models bench bench-quick bench-targets bench-intake bench-wire predict-gpu

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m vllm_tslt.cli demo

# Triton kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1 must be set before
# Triton is imported), in their own pytest run so no vLLM process inherits the interpreter.
test: setup
	$(PY) -m ruff check .
	TRITON_INTERPRET=1 $(PY) -m pytest tests/kernels || { rc=$$?; [ $$rc -eq 5 ] && echo "pytest collected no kernel tests: failing" >&2; exit 1; }
	$(PY) -m pytest --ignore=tests/kernels || { rc=$$?; [ $$rc -eq 5 ] && echo "pytest collected no tests: failing" >&2; exit 1; }

lint: setup
	$(PY) -m ruff check .

models: setup
	$(PY) -m vllm_tslt.cli build-models --pair tiny

models-base: setup
	$(PY) -m vllm_tslt.cli build-models --pair base

# The capacity benchmark: target-only, co-located draft_model and the TSLT edge with a device farm,
# side by side (docs/benchmarks/capacity/report.md); within 45 minutes here.
bench: setup models
	$(PY) scripts/bench_capacity.py

# The same in a small grid (within 10 minutes here); writes bench-quick/capacity/.
bench-quick: setup models
	$(PY) scripts/bench_capacity.py --quick

# Issue 14's targets on the base pair: every server up side by side, the one-device cells in three
# interleaved rounds, 16 devices, adaptive γ over the link sweep (docs/benchmarks/capacity-targets-base/).
bench-targets: setup models-base
	$(PY) scripts/bench_capacity.py --targets --pair base

# Issue 14's intake A/B on the base pair: one device at RTT 0.5 and 2 × step, target-only beside the
# edge alone, intake adaptive (γ = 4 and auto) and intake wait, 3 interleaved rounds (~15 min);
# devices modelled at the targets run's 1.95 ms per draft token (docs/benchmarks/capacity-intake-base/).
bench-intake: setup models-base
	$(PY) scripts/bench_capacity.py --intake --pair base --device-draft-ms-per-token 1.95

# Wire formats and links on the base pair: TSLT vs DSD vs TK-SLT (docs/benchmarks/e2e/report.md).
bench-wire: setup models-base
	$(PY) scripts/bench.py

# The round model against the committed base-pair capacity runs, and its GPU-edge prediction
# (seconds; no server): docs/benchmarks/gpu-prediction/.
predict-gpu: setup
	$(PY) scripts/predict_gpu.py
