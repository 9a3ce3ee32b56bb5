# Two commands on a fresh machine: `make run` (the service) and `make test` (the checks).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
ADMIN_DSN ?= postgresql://postgres@127.0.0.1:5432/postgres
# The database `make db` creates on the local Postgres.
LOCAL_DATABASE_URL := postgresql://postgres@127.0.0.1:5432/refundsync
# Every dependency, runtime and dev, at exact versions with hashes (`make lock` writes them).
DEV_LOCK := requirements/dev.txt
# The runtime part alone, at the same versions: what the Dockerfile installs.
MAIN_LOCK := requirements/main.txt
LOCK_OPTIONS := --quiet --universal --python-version 3.11 --generate-hashes \
  --custom-compile-command "make lock"

.PHONY: install lock run test lint format typecheck db

# The venv holds exactly the locked versions: it is made anew whenever the lock (or the
# project's metadata) changes, and pip installs nothing that the lock does not name with its
# hashes (refundsync itself is built with the locked setuptools, not a downloaded one).
$(BIN)/.installed: $(DEV_LOCK) pyproject.toml
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(DEV_LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/.installed

# Upgrades every locked dependency to the newest release the ranges in pyproject.toml allow;
# the only way versions change. Review the diff of requirements/ and run `make test`.
lock: install
	$(BIN)/uv pip compile $(LOCK_OPTIONS) --upgrade --extra dev \
	  pyproject.toml requirements/build.in -o $(DEV_LOCK)
	$(BIN)/uv pip compile $(LOCK_OPTIONS) --constraint $(DEV_LOCK) \
	  pyproject.toml requirements/build.in -o $(MAIN_LOCK)

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
	$(BIN)/lint-imports --no-cache --no-logo

typecheck: install
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Installs the Debian packages the tests use when one is missing (.ci/tools).
test: lint typecheck
	bash .ci/tools
	$(BIN)/pytest
