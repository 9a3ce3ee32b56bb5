"""docker-compose.yml, checked without a Docker engine: every service's command is one the
installed CLI accepts and starts with only the variables its service gets, each secret
reaches only the services that use it, the start order is safe, and every container runs
with the least it needs (pinned images, memory limits, no capabilities, read-only roots)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import support

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
OURS = [name for name, spec in SERVICES.items() if spec.get("image") == "refundsync:latest"]
# What an operator sets before `docker compose up`.
OPERATOR_ENV = {
    "POSTGRES_PASSWORD": "pgpw0123",
    "REDIS_PASSWORD": "redispw0123",
    "DR_WEBHOOK_SECRETS": "whsec_a,whsec_b",
    "REFUNDSYNC_API_TOKEN": "token",
    "DR_API_KEY": "sk_test_key",
    "FLOWER_BASIC_AUTH": "op:pw",
    "REFUNDSYNC_CONSOLE_PASSWORD": "console-pw",
    "REFUNDSYNC_NOTIFY_URL": "https://shop.example.com/hooks/refundsync",
    "REFUNDSYNC_NOTIFY_SECRET": "whsec_c2hvcC1leGFtcGxlLXNlY3JldC0zMmJ5dGVzISE=",
}
# Compose refuses to start without these.
REQUIRED = ["POSTGRES_PASSWORD", "REDIS_PASSWORD", "DR_WEBHOOK_SECRETS", "FLOWER_BASIC_AUTH"]
# Each secret and the services that get it: those whose process reads it, no others.
SECRET_HOLDERS = {
    "POSTGRES_PASSWORD": {"postgres", "migrate", "ingest", "worker", "beat"},
    "REDIS_PASSWORD": {"redis", "ingest", "worker", "beat", "flower"},
    "DR_WEBHOOK_SECRETS": {"ingest"},
    "REFUNDSYNC_API_TOKEN": {"ingest"},
    # The worker runs the reconcile task; beat schedules it only when the key is set.
    "DR_API_KEY": {"worker", "beat"},
    "FLOWER_BASIC_AUTH": {"flower"},
    "REFUNDSYNC_CONSOLE_PASSWORD": {"ingest"},
    # The workers POST changes; beat's sweep runs on them too.
    "REFUNDSYNC_NOTIFY_SECRET": {"worker"},
}
DATABASE_URL = "postgresql://refundsync:pgpw0123@postgres:5432/refundsync"
REDIS_URL = "redis://:redispw0123@redis:6379/0"
# Inside the containers: the one place the refundsync services may write.
CONTAINER_TMP = "/tmp"  # noqa: S108


def _interpolate(value: str, operator_env: dict[str, str] = OPERATOR_ENV) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} against operator_env."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in operator_env:
            return operator_env[name]
        if op == ":?":
            raise AssertionError(f"{name} is required: {arg}")
        return arg or ""

    return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", one, value)


def _env(service: str) -> dict[str, str]:
    return {k: _interpolate(str(v)) for k, v in SERVICES[service].get("environment", {}).items()}


def _strings(node: object) -> list[str]:
    """Every string in a parsed compose document, keys and values."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [node] if isinstance(node, str) else []


def _process_env(service: str) -> dict[str, str]:
    """The service's environment and nothing of this machine's refundsync settings."""
    kept = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    if support.SCRATCH is not None:
        kept["TMPDIR"] = str(support.SCRATCH)  # removed at the session's end
    return {**kept, **_env(service)}


def _bytes(size: str) -> int:
    """A compose or Redis size such as 512m, 1g or 512mb, in bytes."""
    match = re.fullmatch(r"(\d+)([kmg]?)b?", str(size).lower())
    assert match, size
    unit = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2)]
    return int(match.group(1)) * unit


def _memory_limit(service: str) -> int:
    spec = SERVICES[service]
    limits = spec.get("deploy", {}).get("resources", {}).get("limits", {})
    limit = spec.get("mem_limit") or limits.get("memory")
    assert limit, f"{service} has no memory limit"
    return _bytes(limit)


# A service's command up to where it would connect or serve: the command line parsed, the
# settings it requires checked, and the app it would run imported, as in the container.
DRY_START = """
import importlib, sys
import celery.bin.celery, uvicorn
import models.migrate


def load_worker_app(argv, **_):
    importlib.import_module("worker.app").app.loader.import_default_modules()


def load_asgi_app(target, **_):
    # As uvicorn does: the module, then the app in it (built from the settings there).
    module, _, attribute = target.partition(":")
    getattr(importlib.import_module(module), attribute)


uvicorn.run = load_asgi_app
models.migrate.upgrade = lambda url: None
celery.bin.celery.celery.main = load_worker_app
# Imported once the stand-ins are in place: the CLI binds them when imported.
from worker.cli import main
main(sys.argv[1:], prog_name="refundsync")
"""


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
    result = subprocess.run(
        [executable, *command[1:], "--help"],
        env=_process_env(service),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("service", [s for s in OURS if SERVICES[s]["command"][0] == "refundsync"])
def test_each_command_starts_with_only_its_own_environment(service: str, tmp_path: Path) -> None:
    # Flower's command is covered by the --help run above: Celery imports the app for it.
    result = subprocess.run(
        [sys.executable, "-c", DRY_START, *SERVICES[service]["command"][1:]],
        env={**_process_env(service), "TMPDIR": str(tmp_path)},
        # No .env file of this checkout is read.
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("service", OURS)
def test_each_service_has_the_variables_it_needs(service: str) -> None:
    env = _env(service)
    needed = {
        "migrate": {"DATABASE_URL"},
        "ingest": {"DATABASE_URL", "REDIS_URL", "DR_WEBHOOK_SECRETS"},
        "worker": {"DATABASE_URL", "REDIS_URL"},
        "beat": {"DATABASE_URL", "REDIS_URL"},
        "flower": {"REDIS_URL", "FLOWER_BASIC_AUTH"},
    }[service]
    assert {name for name in needed if env.get(name)} == needed
    assert env.get("DATABASE_URL", DATABASE_URL) == DATABASE_URL
    assert env.get("REDIS_URL", REDIS_URL) == REDIS_URL


@pytest.mark.parametrize("secret", SECRET_HOLDERS)
def test_each_secret_reaches_only_the_services_that_use_it(secret: str) -> None:
    def references(service: str) -> set[str]:
        return set(re.findall(r"\$\{(\w+)", json.dumps(SERVICES[service])))

    assert {name for name in SERVICES if secret in references(name)} == SECRET_HOLDERS[secret]
    # An env_file would hand a service every variable in it.
    assert not [name for name, spec in SERVICES.items() if "env_file" in spec]


def test_flower_gets_the_queue_and_its_login_only() -> None:
    assert set(_env("flower")) == {"REDIS_URL", "FLOWER_BASIC_AUTH"}


@pytest.mark.parametrize("secret", REQUIRED)
def test_missing_secret_stops_compose_with_a_message(secret: str) -> None:
    everything = _strings(COMPOSE)
    without = {k: v for k, v in OPERATOR_ENV.items() if k != secret}
    with pytest.raises(AssertionError, match=secret):
        _interpolate("\n".join(everything), without)
    # Required wherever it is used: no default that would start without it.
    for value in everything:
        assert not re.search(rf"\$\{{{secret}(?!:\?)", value), value


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
    assert command[command.index("--appendfsync") + 1] == "everysec"


def test_redis_requires_the_password() -> None:
    command = [_interpolate(str(arg)) for arg in SERVICES["redis"]["command"]]
    assert command[0] == "redis-server"
    assert command[command.index("--requirepass") + 1] == OPERATOR_ENV["REDIS_PASSWORD"]


def test_redis_healthcheck_authenticates_without_the_password_in_its_arguments() -> None:
    probe = " ".join(SERVICES["redis"]["healthcheck"]["test"])
    assert "redis-cli" in probe
    # redis-cli exits 0 on NOAUTH: the probe must look for PONG.
    assert "PONG" in probe
    assert _env("redis")["REDISCLI_AUTH"] == OPERATOR_ENV["REDIS_PASSWORD"]
    assert "REDIS_PASSWORD" not in probe
    assert " -a " not in f" {probe} "
    assert OPERATOR_ENV["REDIS_PASSWORD"] not in _interpolate(probe)


def test_redis_refuses_writes_before_its_memory_limit_kills_it() -> None:
    command = SERVICES["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert _bytes(command[command.index("--maxmemory") + 1]) < _memory_limit("redis")


def test_flower_is_published_on_the_loopback_only() -> None:
    assert SERVICES["flower"]["ports"] == ["127.0.0.1:5555:5555"]


@pytest.mark.parametrize("service", list(SERVICES))
def test_only_the_ingest_is_published_on_every_interface(service: str) -> None:
    for port in SERVICES[service].get("ports", []):
        assert service == "ingest" or str(port).startswith("127.0.0.1:"), port


@pytest.mark.parametrize("service", [s for s in SERVICES if s not in OURS])
def test_third_party_images_name_one_release(service: str) -> None:
    image = SERVICES[service]["image"]
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return
    repository, _, tag = image.partition(":")
    # PostgreSQL numbers its releases major.minor since 10 (16.12 is one release, 16 moves
    # with each); the others major.minor.patch.
    release = {"postgres": r"\d+\.\d+"}.get(repository, r"\d+\.\d+\.\d+")
    assert re.fullmatch(rf"{release}(-[\w.]+)?", tag), image


@pytest.mark.parametrize("service", list(SERVICES))
def test_every_service_has_a_memory_limit(service: str) -> None:
    assert _memory_limit(service) >= 128 * 1024**2


@pytest.mark.parametrize("service", list(SERVICES))
def test_every_service_drops_all_capabilities_and_new_privileges(service: str) -> None:
    spec = SERVICES[service]
    assert spec["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in spec["security_opt"]
    # Only the official images' entrypoints need any, to own their data directory and
    # then switch to their own user.
    expected = {
        "postgres": {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"},
        "redis": {"CHOWN", "DAC_OVERRIDE", "SETGID", "SETUID"},
    }.get(service, set())
    assert set(spec.get("cap_add", [])) == expected


@pytest.mark.parametrize("service", OURS)
def test_refundsync_services_have_a_read_only_root_and_a_tmp_in_memory(service: str) -> None:
    spec = SERVICES[service]
    assert spec["read_only"] is True
    tmpfs = spec["tmpfs"] if isinstance(spec["tmpfs"], list) else [spec["tmpfs"]]
    assert CONTAINER_TMP in {entry.split(":")[0] for entry in tmpfs}
    command = spec["command"]
    if "--schedule" in command:
        assert command[command.index("--schedule") + 1].startswith(f"{CONTAINER_TMP}/")
    # Unset, the command makes a fresh metrics directory in /tmp; a directory named here
    # would not exist in the empty tmpfs, and prometheus_client does not create it.
    assert "PROMETHEUS_MULTIPROC_DIR" not in _env(service)


def test_dockerfile_installs_the_package_and_runs_unprivileged() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install" in dockerfile
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.MULTILINE)
    for path in ("models", "ingest", "worker", "pyproject.toml"):
        assert path in dockerfile


# The Sentinel overlay (docker-compose.sentinel.yml), merged over the services above as
# `docker compose -f docker-compose.yml -f docker-compose.sentinel.yml` does.
OVERLAY = yaml.safe_load((ROOT / "docker-compose.sentinel.yml").read_text())
OVERLAY_SERVICES: dict[str, Any] = OVERLAY["services"]


def _overlay_env(service: str) -> dict[str, str]:
    merged = {**SERVICES[service].get("environment", {})}
    merged.update(OVERLAY_SERVICES.get(service, {}).get("environment", {}))
    return {k: _interpolate(str(v)) for k, v in merged.items()}


def test_the_sentinel_overlay_adds_a_replica_and_three_sentinels() -> None:
    assert {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"} <= set(OVERLAY_SERVICES)
    replica = OVERLAY_SERVICES["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis", "6379"]
    # The old primary must follow the new one when it comes back.
    assert "--masterauth" in OVERLAY_SERVICES["redis"]["command"]


@pytest.mark.parametrize("service", [s for s in OURS if s != "migrate"])
def test_with_the_overlay_every_process_reaches_redis_through_the_sentinels(
    service: str,
) -> None:
    from models.brokers import redis_target

    env = _overlay_env(service)
    target = redis_target(env["REDIS_URL"], env["REDIS_SENTINEL_MASTER"])
    assert {host for host, _ in target.sentinels} == {"sentinel-1", "sentinel-2", "sentinel-3"}
    assert target.password == OPERATOR_ENV["REDIS_PASSWORD"]
    assert target.master == "refundsync"
    # The ingest acknowledges an event only once the replica has it.
    if service == "ingest":
        assert env["REFUNDSYNC_REDIS_MIN_REPLICAS"] == "1"


def test_the_overlays_sentinel_configuration_is_accepted_by_redis_sentinel(
    tmp_path: Path,
) -> None:
    # The Sentinel's own start script, run here with its hosts on loopback: a primary on a
    # free port stands in for `redis`, and redis-sentinel must start monitoring it.
    primary = support.RedisServer(password=OPERATOR_ENV["REDIS_PASSWORD"]).start()
    port = support.free_port()
    script = OVERLAY["x-sentinel"]["command"][2]
    script = script.replace("$$REDIS_PASSWORD", "$REDIS_PASSWORD")
    script = script.replace("'port 26379'", f"'port {port}' 'bind 127.0.0.1'")
    script = script.replace("dir /tmp", f"dir {tmp_path}")
    script = script.replace("/tmp/sentinel.conf", str(tmp_path / "s.conf"))  # noqa: S108
    script = script.replace("refundsync redis 6379 2", f"refundsync 127.0.0.1 {primary.port} 1")
    process = subprocess.Popen(
        ["sh", "-c", script],
        env={**os.environ, "REDIS_PASSWORD": OPERATOR_ENV["REDIS_PASSWORD"]},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def monitoring() -> bool:
            out = subprocess.run(
                [
                    *("redis-cli", "-p", str(port)),
                    *("SENTINEL", "get-master-addr-by-name", "refundsync"),
                ],
                capture_output=True,
                text=True,
                check=False,
                timeout=10,
            )
            return out.stdout.split() == ["127.0.0.1", str(primary.port)]

        support.wait_for(monitoring, timeout=30, what="redis-sentinel monitoring the primary")
        flags = subprocess.run(
            ["redis-cli", "-p", str(port), "SENTINEL", "master", "refundsync"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        ).stdout.split()
        # Authenticated: the Sentinel reached the primary with the password it was given.
        assert flags[flags.index("flags") + 1] == "master"
    finally:
        process.terminate()
        process.wait(timeout=30)
        primary.cleanup()
