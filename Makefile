# Two commands on a fresh machine: `make run` (the service) and `make test` (the checks).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
ADMIN_DSN ?= postgresql://postgres@127.0.0.1:5432/postgres

export DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/refundsync
export REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: install run test lint format typecheck db

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# Creates the `refundsync` database on the local Postgres when DATABASE_URL is left as is.
db:
	@if [ "$(DATABASE_URL)" = "postgresql://postgres@127.0.0.1:5432/refundsync" ]; then \
	  psql "$(ADMIN_DSN)" -tAc "SELECT 1 FROM pg_database WHERE datname = 'refundsync'" | grep -q 1 \
	  || psql "$(ADMIN_DSN)" -qc "CREATE DATABASE refundsync"; \
	fi

run: install db
	$(BIN)/refundsync run --host $${HOST:-127.0.0.1} --port $${PORT:-8000}

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint typecheck
	$(BIN)/pytest
