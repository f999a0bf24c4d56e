# The two commands a newcomer needs: `make demo` and `make test`.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
VENV := .venv/bin

.PHONY: setup demo test lint bench
setup:
	@scripts/setup

demo: setup
	$(VENV)/latentwatch demo

test: setup lint
	$(VENV)/python -m pytest -q

lint: setup
	$(VENV)/ruff check .

bench: setup
	for b in bench/*.py; do $(VENV)/python $$b --quick || exit 1; done
