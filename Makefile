# The targets read like the README: `make run`, `make test`, `make lint`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run worker migrate lint format test test-unit bench all clean

$(STAMP): pyproject.toml requirements.lock requirements-dev.lock
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "imgsvc needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the dev lock: what runs, the tests' and linters' tools, and imgsvc[local] (pgserver)
	$(PY) -m pip install --quiet -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: install  ## serve the API with an in-process worker on $PORT (default 5000)
	$(VENV)/bin/imgsvc serve --migrate

worker: install  ## a standalone worker
	$(VENV)/bin/imgsvc worker

migrate: install
	$(VENV)/bin/imgsvc migrate

lint: install
	$(VENV)/bin/ruff check imgsvc tests bench
	$(VENV)/bin/ruff format --check imgsvc tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile

format: install
	$(VENV)/bin/ruff format imgsvc tests bench
	$(VENV)/bin/ruff check --fix imgsvc tests bench

test: lint  ## lint, type check, then every test (they start their own PostgreSQL and S3)
	$(PY) -m pytest

test-unit: install
	$(PY) -m pytest tests/unit

all: test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

bench: install  ## end-to-end benchmark against the libvips ceiling; BENCH_ARGS="--images 400 --profile"
	$(PY) -m bench $(BENCH_ARGS)
