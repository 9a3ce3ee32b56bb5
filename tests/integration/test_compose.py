"""docker-compose.yml, checked without a Docker engine: every service's command is one the
installed CLI accepts, every variable it needs is set, and the start order is safe."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
OURS = [name for name, spec in SERVICES.items() if spec.get("image") == "refundsync:latest"]
# What an operator sets before `docker compose up`.
OPERATOR_ENV = {
    "DR_WEBHOOK_SECRETS": "whsec_a,whsec_b",
    "REFUNDSYNC_API_TOKEN": "token",
    "FLOWER_BASIC_AUTH": "op:pw",
}


def _interpolate(value: str) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} against OPERATOR_ENV."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in OPERATOR_ENV:
            return OPERATOR_ENV[name]
        if op == ":?":
            raise AssertionError(f"{name} is required: {arg}")
        return arg or ""

    return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", one, value)


def _env(service: str) -> dict[str, str]:
    return {k: _interpolate(str(v)) for k, v in SERVICES[service]["environment"].items()}


def test_the_services_a_deployment_needs_are_there() -> None:
    assert {"postgres", "redis", "migrate", "ingest", "worker", "beat", "flower"} <= set(SERVICES)
    assert set(OURS) == {"migrate", "ingest", "worker", "beat", "flower"}
    assert "container_name" not in SERVICES["worker"], "a fixed name would stop --scale worker=N"
    assert "ports" not in SERVICES["worker"]


@pytest.mark.parametrize("service", OURS)
def test_each_command_is_accepted_by_the_installed_cli(service: str) -> None:
    command = SERVICES[service]["command"]
    assert command[0] in {"refundsync", "celery"}
    executable = str(Path(sys.executable).parent / command[0])
    env = {
        **os.environ,
        **_env(service),
        "DATABASE_URL": "postgresql://u@127.0.0.1:1/x",
        "REDIS_URL": "redis://127.0.0.1:1/0",
    }
    result = subprocess.run(
        [executable, *command[1:], "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("service", OURS)
def test_each_service_has_the_variables_it_needs(service: str) -> None:
    env = _env(service)
    needed = {"DATABASE_URL", "REDIS_URL"}
    if service == "ingest":
        needed |= {"DR_WEBHOOK_SECRETS"}
    if service == "flower":
        needed |= {"FLOWER_BASIC_AUTH"}
    assert {name for name in needed if env.get(name)} == needed
    assert env["DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in env["DATABASE_URL"]
    assert env["REDIS_URL"] == "redis://redis:6379/0"


def test_missing_secret_stops_compose_with_a_message() -> None:
    value = SERVICES["ingest"]["environment"]["DR_WEBHOOK_SECRETS"]
    assert ":?" in value


@pytest.mark.parametrize("service", ["ingest", "worker", "beat"])
def test_processes_wait_for_a_healthy_database_and_a_finished_migration(service: str) -> None:
    depends = SERVICES[service]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert depends["redis"]["condition"] == "service_healthy"


def test_migrate_runs_once_after_postgres_is_healthy() -> None:
    migrate = SERVICES["migrate"]
    assert migrate["command"] == ["refundsync", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_postgres_has_a_healthcheck_and_redis_keeps_an_append_only_file() -> None:
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    assert SERVICES["redis"]["healthcheck"]["test"]
    command = SERVICES["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


def test_dockerfile_installs_the_package_and_runs_unprivileged() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install" in dockerfile
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.MULTILINE)
    for path in ("models", "ingest", "worker", "pyproject.toml"):
        assert path in dockerfile
