# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test check lint typecheck install migrate serve worker bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## make run: install, migrate, and serve on 0.0.0.0:$${PORT:-8000} (SQLite at data/kamiyo.db unless DATABASE_URL)
run: install migrate
	$(BIN)/kamiyo serve

migrate: install
	$(BIN)/kamiyo db upgrade

worker: install
	$(BIN)/kamiyo worker

## make test: lint, type check, then every test (SQLite and PostgreSQL)
test: check
	$(BIN)/pytest $(PYTEST_ARGS)

check: lint typecheck

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
