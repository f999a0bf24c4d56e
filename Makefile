# The two commands a newcomer needs: `make demo` and `make test`.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
VENV := .venv/bin

.PHONY: setup demo test test-fast test-compat test-vllm lint bench
setup:
	@scripts/setup

demo: setup
	$(VENV)/latentwatch demo

# everything: real models, servers, brokers (10-22 min on 2 cores); what CI (.ci/run) runs
test: setup lint
	$(VENV)/python -m pytest -q

# unit tests only (no real weights, servers, subprocesses or slow tests): ~45 s here; run it while editing
test-fast: setup
	$(VENV)/python -m pytest -q -m "not model and not integration and not slow"

# the tap tests on the lowest and the newest supported transformers, each in a throwaway clean venv
test-compat: setup
	scripts/test-compat

# the vLLM plugin's tests (tests/vllm/) against vLLM's CPU build, in a venv of their own (first run ~4 min to
# build it, then ~5 min)
test-vllm: setup
	scripts/test-vllm

lint: setup
	$(VENV)/ruff check .

bench: setup
	for b in bench/*.py; do $(VENV)/python $$b --quick || exit 1; done
