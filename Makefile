# aioqueue developer tasks. `make demo` and `make test` build .venv on their own.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install demo test lint typecheck bench clean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install aioqueue with its dev tools

demo: $(STAMP) ## run examples/quickstart.py (memory:// unless AIOQUEUE_BROKER_URL is set)
	$(BIN)/python examples/quickstart.py

test: $(STAMP) ## run the test suite against the real Redis and RabbitMQ
	$(BIN)/python -m pytest

lint: $(STAMP) ## ruff
	$(BIN)/ruff check aioqueue tests examples benchmarks
	$(BIN)/ruff format --check aioqueue tests examples

typecheck: $(STAMP) ## mypy --strict on the package
	$(BIN)/mypy aioqueue

bench: $(STAMP) ## side-by-side benchmarks (QUICK=1 for a short run)
	bash benchmarks/bench.sh $(if $(QUICK),--quick,)

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
