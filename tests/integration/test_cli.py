"""The `refundsync` command line as a user runs it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.signature import verify
from tests import support


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = support.service_env("", "", DATABASE_URL="", REDIS_URL="", DR_WEBHOOK_SECRETS="")
    base.update(env or {})
    return support.run_cli(base, *args)


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (["ingest"], "REDIS_URL, DATABASE_URL, DR_WEBHOOK_SECRETS"),
        (["worker"], "REDIS_URL, DATABASE_URL"),
        (["migrate"], "DATABASE_URL"),
        (["order", "show", "x"], "DATABASE_URL"),
    ],
)
def test_missing_setting_stops_with_one_clear_line(args: list[str], missing: str) -> None:
    result = _run(*args)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"refundsync: {missing} must be set (see README, Configuration)"
    ]


def test_ingest_refuses_to_start_without_a_secret_even_through_uvicorn() -> None:
    env = support.service_env("postgresql://x@127.0.0.1/x", "redis://127.0.0.1:1/0")
    env["DR_WEBHOOK_SECRETS"] = " , "
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "ingest.app:app", "--port", str(support.free_port())],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "refundsync: DR_WEBHOOK_SECRETS must be set" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_setting_is_named() -> None:
    result = _run("migrate", env={"DATABASE_URL": "postgresql://x", "DR_LIVE_MODE": "prod"})
    assert result.returncode == 1
    assert "DR_LIVE_MODE is invalid" in result.stderr


def test_usage_error_exits_2() -> None:
    assert _run("order").returncode == 2
    assert _run("sign").returncode == 2


def test_sign_prints_a_header_the_ingest_accepts(tmp_path: Path) -> None:
    payload = tmp_path / "event.json"
    payload.write_bytes(support.load_fixture("dr_examples/04_refund_complete.json"))
    result = _run("sign", "--secret", "s3cret", str(payload))
    assert result.returncode == 0
    header = result.stdout.strip()
    verify(header, payload.read_bytes(), ["s3cret"], tolerance_s=300, now=time.time())


def test_sign_reads_the_secret_from_a_file_or_the_environment(tmp_path: Path) -> None:
    """Never only from the command line, where `ps` shows it to every user."""
    payload = tmp_path / "event.json"
    payload.write_bytes(support.load_fixture("dr_examples/04_refund_complete.json"))
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    from_file = _run("sign", "--secret-file", str(secret_file), str(payload))
    assert from_file.returncode == 0, from_file.stderr
    verify(from_file.stdout.strip(), payload.read_bytes(), ["from-a-file"], tolerance_s=300)
    from_env = _run("sign", str(payload), env={"DR_WEBHOOK_SECRETS": "first-one,second-one"})
    assert from_env.returncode == 0, from_env.stderr
    verify(from_env.stdout.strip(), payload.read_bytes(), ["first-one"], tolerance_s=300)
    both = _run("sign", "--secret", "x", "--secret-file", str(secret_file), str(payload))
    assert both.returncode == 2
    neither = _run("sign", str(payload), env={"DR_WEBHOOK_SECRETS": ""})
    assert neither.returncode == 1
    assert neither.stderr.strip() == (
        "refundsync: no secret: give --secret-file, or set DR_WEBHOOK_SECRETS"
    )


def test_order_and_event_show(database: support.Database) -> None:
    env = {"DATABASE_URL": database.url}
    missing = _run("order", "show", "no-such-order", env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "refundsync: order no-such-order not found"
    assert _run("events", "show", "no-such-event", env=env).returncode == 1
    failed = _run("events", "failed", "--limit", "5", env=env)
    assert failed.returncode == 0
    assert isinstance(json.loads(failed.stdout), list)


def test_migrate_is_idempotent(database: support.Database) -> None:
    result = _run("migrate", env={"DATABASE_URL": database.url})
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_database_down_is_one_line(database: support.Database) -> None:
    url = f"postgresql://postgres@127.0.0.1:{support.free_port()}/nowhere"
    result = _run("order", "show", "x", env={"DATABASE_URL": url})
    assert result.returncode == 1
    assert result.stderr.startswith("refundsync: database unavailable:")
    assert len(result.stderr.strip().splitlines()) == 1


# A worker whose consumer fails the way a kombu bug does: Celery logs "Unrecoverable
# error" and stops the worker.
_UNRECOVERABLE = """
from celery.worker.consumer import Consumer
def start(self):
    raise RuntimeError("injected")
Consumer.start = start
from worker.cli import main
main(["worker", "--concurrency", "1", "--without-mingle", "--without-gossip"])
"""


def test_a_worker_stopped_by_an_unrecoverable_error_exits_1_and_one_stopped_by_sigterm_0(
    database: support.Database,
) -> None:
    # A supervisor that restarts failed processes has to see the first as a failure.
    redis = support.RedisServer().start()
    env = support.service_env(database.url, redis.url)
    try:
        failing = support.Process("worker-failing", ["-c", _UNRECOVERABLE], env, module=False)
        try:
            assert failing.proc.wait(timeout=60) == 1, failing.log()[-4000:]
            assert "Unrecoverable error: RuntimeError('injected')" in failing.log()
        finally:
            failing.stop()
        worker = support.start_worker(env, "stopped")
        try:
            worker.proc.send_signal(signal.SIGTERM)
            assert worker.proc.wait(timeout=60) == 0, worker.log()[-4000:]
        finally:
            worker.stop()
    finally:
        redis.cleanup()
