# Two commands on a fresh machine: `make run` (the service) and `make test` (the checks).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
ADMIN_DSN ?= postgresql://postgres@127.0.0.1:5432/postgres
# The database `make db` creates on the local Postgres.
LOCAL_DATABASE_URL := postgresql://postgres@127.0.0.1:5432/refundsync

.PHONY: install run test lint format typecheck db

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# Creates the `refundsync` database on the local Postgres.
db:
	psql "$(ADMIN_DSN)" -tAc "SELECT 1 FROM pg_database WHERE datname = 'refundsync'" | grep -q 1 \
	  || psql "$(ADMIN_DSN)" -qc "CREATE DATABASE refundsync"

# With neither DATABASE_URL nor REDIS_URL set, the service runs standalone on SQLite files
# (DATA_DIR, default the user data directory); without DR_WEBHOOK_SECRETS, with a printed
# development secret.
run: install
	@if [ "$$DATABASE_URL" = "$(LOCAL_DATABASE_URL)" ]; then $(MAKE) --no-print-directory db; fi
	$(BIN)/refundsync run --host $${HOST:-127.0.0.1} --port $${PORT:-8000} \
	  $${DATA_DIR:+--data-dir "$$DATA_DIR"} $(if $(DR_WEBHOOK_SECRETS),,--dev-secret)

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
