# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both set up .venv first (idempotent, seconds when nothing changed).
SHELL := /bin/bash
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: setup demo test lint models models-base clean-models bench bench-quick

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

# The side-by-side benchmark on the base pair (docs/benchmarks/e2e/report.md); ~15 minutes here.
bench: setup models-base
	$(PY) scripts/bench.py

# The same in a small grid (~4 minutes here); writes bench-quick/.
bench-quick: setup models-base
	$(PY) scripts/bench.py --quick
