# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test check lint typecheck alerts install migrate serve worker bench screenshots clean

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

check: lint typecheck alerts

## make alerts: promtool (Debian package `prometheus`) checks and unit-tests the alert rules;
## without promtool they are skipped with a notice, except in CI (CI=true), where that fails
alerts:
	@if command -v promtool >/dev/null 2>&1; then \
	  promtool check rules deploy/prometheus/alerts.yml && \
	  cd deploy/prometheus && promtool test rules alerts.test.yml; \
	elif [ -n "$$CI" ]; then \
	  echo "promtool is missing (apt-get install prometheus): alert rules cannot be tested in CI" >&2; exit 1; \
	else \
	  echo "promtool not installed (apt-get install prometheus): alert rules NOT checked"; \
	fi

lint: install
	$(BIN)/ruff check src tests bench api
	$(BIN)/ruff format --check src tests bench api

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/run.py

## make screenshots: the operator console's views, in Debian's headless Chromium, into docs/screenshots/
screenshots: install
	$(BIN)/python tests/admin/screenshots.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
