# aioqueue developer tasks. `make demo` and `make test` build .venv on their own.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
# The dashboard's browser test drives Debian's Chromium through Playwright: never download one.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1
CHROMIUM ?= /usr/bin/chromium

.PHONY: help install browser demo test test-cluster lint typecheck docs bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The demo needs aioqueue and its own dependencies only, not the test and lint tools.
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $(DEMO_STAMP)

install: $(STAMP) browser ## create .venv and install aioqueue with its dev tools

browser: ## Debian's chromium for the dashboard's browser test (apt-get, as root, when missing)
	@if [ ! -x "$(CHROMIUM)" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing Debian's chromium for the browser test"; \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
		else \
			echo "no $(CHROMIUM): the dashboard's browser test will skip (fail with CI=true);" \
				"install Debian's chromium package"; \
		fi; \
	fi

demo: $(DEMO_STAMP) ## run examples/quickstart.py (memory:// unless AIOQUEUE_BROKER_URL is set)
	$(BIN)/python examples/quickstart.py

test: $(STAMP) browser ## run the test suite against the real Redis and RabbitMQ (in CI also test-cluster)
	$(BIN)/python -m pytest
	@if [ "$$CI" = "true" ] || [ "$$CI" = "1" ]; then $(MAKE) test-cluster; fi

# A private three-node RabbitMQ cluster (own node names and ports, tests/rabbit_cluster.py):
# about 12 s to start here; the contract suite on it with quorum queues, and the failover test.
test-cluster: $(STAMP) ## the RabbitMQ cluster tests (quorum queues, a leader killed)
	AIOQUEUE_TEST_CLUSTER=1 $(BIN)/python -m pytest -k "cluster" \
		tests/test_contract.py tests/test_amqp_cluster.py

lint: $(STAMP) ## ruff
	$(BIN)/ruff check aioqueue tests examples benchmarks
	$(BIN)/ruff format --check aioqueue tests examples

typecheck: $(STAMP) ## mypy --strict on the package
	$(BIN)/mypy aioqueue

docs: $(STAMP) ## API reference (from the docstrings) and guides into site/; broken references fail
	$(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP) ## side-by-side benchmarks (QUICK=1 for a short run); the full run adds the workflow rows
	bash benchmarks/bench.sh $(if $(QUICK),--quick,)
	$(if $(QUICK),,$(BIN)/python benchmarks/workflows/run.py)

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache
