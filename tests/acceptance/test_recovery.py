"""Getting events back: the stuck-event sweeper and `refundsync events replay`."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import text

from tests import deadlines, factories, support
from tests.support import Stack


def _refund_event(order_id: str, state: str = "pending") -> dict[str, Any]:
    return factories.refund_event(order_id, state=state, amount=7.5)


def _insert_lost(
    stack: Stack, event: dict[str, Any], outcome: str = "queued", **values: Any
) -> None:
    """An event row whose message never reached a worker (or whose outcome we set)."""
    with stack.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO webhook_events (id, type, created_time, live_mode, payload, outcome,"
                " deliveries, attempts, error, received_at)"
                " VALUES (:id, :type, :created, false, CAST(:payload AS jsonb), :outcome, 1,"
                " :attempts, :error, now() - interval '1 hour')"
            ),
            {
                "id": event["id"],
                "type": event["type"],
                "created": event["createdTime"],
                "payload": json.dumps(event),
                "outcome": outcome,
                "attempts": values.get("attempts", 1),
                "error": values.get("error"),
            },
        )


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _row(stack: Stack, event_id: str) -> Any:
    with stack.engine.connect() as conn:
        return conn.execute(
            text("SELECT outcome, attempts, deliveries, error FROM webhook_events WHERE id = :id"),
            {"id": event_id},
        ).one()


def test_sweeper_republishes_an_event_whose_message_was_lost(stack: Stack, tmp_path: Path) -> None:
    order_id = f"ord-{uuid.uuid4().hex[:10]}"
    event = _refund_event(order_id)
    _insert_lost(stack, event)
    beat = support.Process(
        "beat",
        ["beat", "--schedule", str(tmp_path / "beat-schedule")],
        {**stack.env, "REFUNDSYNC_SWEEP_INTERVAL_SECONDS": "1"},
    )
    try:
        assert support.wait_finished(stack.engine, [event["id"]], timeout=deadlines.APPLY_S) == {
            event["id"]: "applied"
        }
    finally:
        beat.stop()
    assert _row(stack, event["id"]).deliveries >= 2
    assert stack.api(f"/orders/{order_id}").json()["pendingRefundAmount"] == "7.50"


def test_replay_dry_run_prints_the_change_and_touches_nothing(stack: Stack) -> None:
    order_id = f"ord-{uuid.uuid4().hex[:10]}"
    event = _refund_event(order_id, "succeeded")
    _insert_lost(stack, event, outcome="failed", attempts=9, error="gave up after 8 attempts")

    result = _cli(stack, "events", "replay", "--dry-run", event["id"])
    assert result.returncode == 0, result.stderr
    preview = json.loads(result.stdout)
    assert preview["outcome"] == "applied"
    assert [c["to"] for c in preview["changes"]] == ["succeeded"]
    row = _row(stack, event["id"])
    assert (row.outcome, row.attempts, row.error) == ("failed", 9, "gave up after 8 attempts")
    assert stack.api(f"/orders/{order_id}").status_code == 404


def test_replay_dry_run_of_a_payload_the_database_refused_says_so(stack: Stack) -> None:
    event = _refund_event(f"ord-{uuid.uuid4().hex[:10]}", "succeeded")
    event["data"]["object"]["reason"] = "nul \u0000 here"  # valid JSON; JSONB refuses it
    assert support.post_event(stack.base, event).status_code == 202
    assert support.wait_finished(stack.engine, [event["id"]]) == {event["id"]: "failed"}

    result = _cli(stack, "events", "replay", "--dry-run", event["id"])
    assert result.returncode == 0, result.stderr
    preview = json.loads(result.stdout)
    assert preview["outcome"] is None
    assert preview["reason"].startswith("not replayable: the database refused its payload")
    assert "only DR can send it again" in preview["reason"]
    assert "Field required" not in preview["reason"]
    assert preview["changes"] == []


def test_replay_failed_applies_what_can_be_applied_and_refails_the_rest(stack: Stack) -> None:
    order_id = f"ord-{uuid.uuid4().hex[:10]}"
    recoverable = _refund_event(order_id, "succeeded")
    _insert_lost(stack, recoverable, outcome="failed", attempts=9, error="gave up after 8 attempts")
    broken = _refund_event(order_id)
    broken["data"]["object"]["currency"] = "XXQ"
    assert support.post_event(stack.base, broken).status_code == 202
    assert support.wait_finished(stack.engine, [broken["id"]]) == {broken["id"]: "failed"}

    result = _cli(stack, "events", "replay", "--failed")
    assert result.returncode == 0, result.stderr
    assert f"queued {recoverable['id']} refund.complete" in result.stdout
    found = support.wait_finished(stack.engine, [recoverable["id"], broken["id"]])
    assert found == {recoverable["id"]: "applied", broken["id"]: "failed"}
    assert "unknown currency" in _row(stack, broken["id"]).error
    assert _row(stack, broken["id"]).attempts == 1
    assert stack.api(f"/orders/{order_id}").json()["refundedAmount"] == "7.50"


def test_replay_of_an_applied_event_is_stale_and_changes_nothing(stack: Stack) -> None:
    order_id = f"ord-{uuid.uuid4().hex[:10]}"
    event = _refund_event(order_id)
    assert support.post_event(stack.base, event).status_code == 202
    support.wait_finished(stack.engine, [event["id"]])
    before = stack.api(f"/orders/{order_id}").json()

    result = _cli(stack, "events", "replay", event["id"])
    assert result.returncode == 0, result.stderr
    assert support.wait_finished(stack.engine, [event["id"]]) == {event["id"]: "stale"}
    assert stack.api(f"/orders/{order_id}").json() == before


def test_replay_usage_and_unknown_ids(stack: Stack) -> None:
    assert _cli(stack, "events", "replay").returncode == 2
    assert _cli(stack, "events", "replay", "--failed", "x").returncode == 2
    result = _cli(stack, "events", "replay", "--dry-run", "no-such-event")
    assert result.returncode == 1
    assert result.stderr.strip() == "refundsync: not found: no-such-event"


def test_events_failed_lists_failed_events(stack: Stack) -> None:
    event = _refund_event(f"ord-{uuid.uuid4().hex[:10]}")
    del event["data"]["object"]["id"]
    assert support.post_event(stack.base, event).status_code == 202
    support.wait_finished(stack.engine, [event["id"]])
    result = _cli(stack, "events", "failed")
    assert result.returncode == 0
    assert event["id"] in [record["id"] for record in json.loads(result.stdout)]


def _unmigrated_rig(
    tmp_path: Path, **env: str
) -> tuple[support.Database, support.RedisServer, dict[str, str]]:
    database = support.Database().create()
    redis = support.RedisServer().start()
    return database, redis, support.service_env(database.url, redis.url, **env)


def test_worker_started_before_migrate_keeps_events_until_the_schema_exists(tmp_path: Path) -> None:
    """Never acknowledged while it cannot be recorded; monitors see labels, not payloads."""
    from models.migrate import upgrade

    database, redis, env = _unmigrated_rig(tmp_path)
    worker = None
    engine = support.engine_for(database.url)
    try:
        event = _refund_event(f"ord-{uuid.uuid4().hex[:10]}")
        event["data"]["object"]["reason"] = "jane@example.com at 221B Baker Street"
        # Sealed with a key of the test's, which it adds once the schema exists: before,
        # there is no key to seal with.
        key = secrets.token_bytes(32)
        support.publish_all(redis.url, database.url, [json.dumps(event).encode()], key=key)
        worker = support.start_worker(env, "early")
        worker.wait_for_log("event.retry", timeout=deadlines.PROCESS_START_S)
        # Each retry line names its event, even when the failure came before the body was
        # read (here: not even the queue keys can be read).
        retries = [json.loads(line) for line in worker.log().splitlines() if "event.retry" in line]
        assert retries
        assert all(line.get("event_id") == event["id"] for line in retries)
        scheduled = subprocess.run(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "inspect",
                "scheduled",
                "reserved",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert event["id"] in scheduled.stdout + worker.log()
        assert "jane@example.com" not in scheduled.stdout
        assert "Baker Street" not in scheduled.stdout
        # The worker is stopped meanwhile, so it finds the schema with the test's key in it.
        os.killpg(worker.proc.pid, signal.SIGSTOP)
        try:
            upgrade(database.url)
            with engine.begin() as conn:
                conn.execute(
                    text("INSERT INTO queue_keys (id, secret) VALUES (2, :s)"), {"s": key.hex()}
                )
        finally:
            os.killpg(worker.proc.pid, signal.SIGCONT)
        found = support.wait_finished(engine, [event["id"]], timeout=deadlines.RECOVERY_S)
        assert found == {event["id"]: "applied"}
        assert "jane@example.com" not in worker.log()
    finally:
        if worker:
            worker.stop()
        engine.dispose()
        redis.cleanup()
        database.drop()


def test_transient_errors_past_the_retry_limit_fail_the_event_with_the_last_error(
    stack: Stack,
) -> None:
    redis = support.RedisServer().start()
    env = {**stack.env, "REDIS_URL": redis.url, "REFUNDSYNC_MAX_RETRIES": "1"}
    worker = None
    order_id = f"ord-{uuid.uuid4().hex[:10]}"
    event = _refund_event(order_id)
    try:
        worker = support.start_worker(env, "limited")
        with stack.engine.connect() as holder:
            # The order stays locked past every lock timeout of every attempt.
            holder.execute(text("INSERT INTO orders (id) VALUES (:id)"), {"id": order_id})
            support.publish_all(redis.url, stack.db_url, [json.dumps(event).encode()])
            found = support.wait_finished(stack.engine, [event["id"]], timeout=deadlines.RECOVERY_S)
            holder.rollback()
        assert found == {event["id"]: "failed"}
        error = _row(stack, event["id"]).error
        assert error.startswith("gave up after 1 retries; last error:")
        assert "LockNotAvailable" in error
    finally:
        if worker:
            worker.stop()
        redis.cleanup()


def test_celery_worker_without_a_database_refuses_to_start(stack: Stack) -> None:
    env = {k: v for k, v in stack.env.items() if k != "DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool", "solo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "refundsync: DATABASE_URL must be set" in result.stderr
