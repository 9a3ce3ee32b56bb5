"""Outbound webhooks against receivers that misbehave (on loopback, in this process), the
settings that turn them on, and the change feed's answers to bad requests."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, text

from models import feed
from models.outbox import Attempt
from models.settings import Settings
from models.tables import changes
from tests import deadlines, support
from tests.receiver import SECRET, Receiver
from tests.support import API_TOKEN, Stack
from worker import notify

TIMEOUT_S = 1.0
OTHER_SECRET = "whsec_" + "B" * 43 + "="
CHANGE = {
    "cursor": "42-7",
    "orderId": "ord-1",
    "invoiceId": None,
    "upstreamId": "up-1",
    "version": 3,
    "eventId": "evt-1",
    "changedAt": "2026-12-07T12:00:00Z",
    "summary": {"orderId": "ord-1", "version": 3},
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.stop()
        notify.reset()


def _settings(receiver: Receiver) -> Settings:
    notify.reset()
    return Settings(
        REFUNDSYNC_NOTIFY_URL=receiver.url,
        REFUNDSYNC_NOTIFY_SECRET=SECRET,
        REFUNDSYNC_NOTIFY_TIMEOUT_SECONDS=TIMEOUT_S,
    )


def _post(receiver: Receiver) -> tuple[Attempt, float]:
    started = time.monotonic()
    attempt = notify.post(_settings(receiver), CHANGE, datetime.now(UTC))
    return attempt, time.monotonic() - started


def test_a_change_is_posted_signed_the_standard_webhooks_way(receiver: Receiver) -> None:
    attempt, _ = _post(receiver.start())
    assert attempt.delivered
    assert attempt.error is None
    (request,) = receiver.received
    assert request.verified == "ok"
    assert request.headers["webhook-id"] == "42-7"
    assert request.data == CHANGE
    assert request.headers["content-type"] == "application/json"


def test_a_signature_under_another_secret_does_not_verify(receiver: Receiver) -> None:
    receiver.secret = "whsec_" + "A" * 43 + "="
    _post(receiver.start())
    (request,) = receiver.received
    assert request.verified != "ok"


def test_a_redirect_is_not_followed(receiver: Receiver) -> None:
    receiver.mode = "redirect"
    attempt, _ = _post(receiver.start())
    assert attempt.status == 302
    assert not attempt.delivered
    assert attempt.error is not None
    assert "redirect" in attempt.error
    assert len(receiver.received) == 1


def test_a_receiver_that_never_answers_is_given_up_on_within_the_timeout(
    receiver: Receiver,
) -> None:
    receiver.mode = "hang"
    attempt, took = _post(receiver.start())
    assert attempt.status is None
    assert attempt.error is not None
    assert attempt.error.startswith("TimeoutError")
    assert took < TIMEOUT_S * 3


def test_a_10_mb_answer_is_not_read_and_still_counts_as_delivered(receiver: Receiver) -> None:
    receiver.mode = "huge"
    attempt, took = _post(receiver.start())
    assert attempt.delivered
    assert took < TIMEOUT_S * 3


def test_a_receiver_that_is_down_is_an_attempt_with_its_reason(receiver: Receiver) -> None:
    attempt, _ = _post(receiver)  # never started: the connection is refused
    assert attempt.status is None
    assert attempt.error is not None
    assert attempt.error.startswith("ConnectionRefusedError")


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        (
            {"REFUNDSYNC_NOTIFY_URL": "ftp://example.com/hook", "REFUNDSYNC_NOTIFY_SECRET": SECRET},
            "REFUNDSYNC_NOTIFY_URL",
        ),
        (
            {"REFUNDSYNC_NOTIFY_URL": "example.com/hook", "REFUNDSYNC_NOTIFY_SECRET": SECRET},
            "REFUNDSYNC_NOTIFY_URL",
        ),
        (
            {
                "REFUNDSYNC_NOTIFY_URL": "https://example.com/hook",
                "REFUNDSYNC_NOTIFY_SECRET": "not-a-secret",
            },
            "REFUNDSYNC_NOTIFY_SECRET",
        ),
        (
            {
                "REFUNDSYNC_NOTIFY_URL": "https://example.com/hook",
                "REFUNDSYNC_NOTIFY_SECRET": "whsec_%%%",
            },
            "REFUNDSYNC_NOTIFY_SECRET",
        ),
        ({"REFUNDSYNC_NOTIFY_URL": "https://example.com/hook"}, "REFUNDSYNC_NOTIFY_SECRET"),
    ],
)
@pytest.mark.parametrize("command", ["worker", "ingest", "beat"])
def test_a_bad_notify_setting_stops_the_process_with_one_line(
    stack: Stack, variables: dict[str, str], named: str, command: str
) -> None:
    result = support.run_cli({**stack.env, **variables}, command)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stderr + result.stdout


def _changes(stack: Stack, **params: str) -> httpx.Response:
    return httpx.get(
        f"{stack.base}/changes",
        params=params,
        headers={"Authorization": f"Bearer {API_TOKEN}"},
        timeout=10,
    )


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"after": "abc"}, 400, "invalid_cursor"),
        ({"after": "1-2-3"}, 400, "invalid_cursor"),
        ({"after": "99999999999999999999-1"}, 400, "invalid_cursor"),
        ({"after": "9223372036854775807-1"}, 400, "invalid_cursor"),
        ({"limit": "0"}, 400, "invalid_limit"),
        ({"limit": "1001"}, 400, "invalid_limit"),
        ({"limit": "ten"}, 400, "invalid_limit"),
    ],
)
def test_the_feed_refuses_a_bad_request_with_its_reason(
    stack: Stack, params: dict[str, str], status: int, code: str
) -> None:
    response = _changes(stack, **params)
    assert response.status_code == status
    assert response.json()["error"] == code


def test_the_feed_needs_the_token(stack: Stack) -> None:
    response = httpx.get(f"{stack.base}/changes", timeout=10)
    assert response.status_code == 401


def test_a_cursor_older_than_retention_answers_410(stack: Stack) -> None:
    with stack.engine.begin() as conn:
        conn.execute(
            insert(changes).values(
                order_key=f"purged-{uuid.uuid4().hex}", kind="order", version=1, summary="{}"
            )
        )
    with stack.engine.begin() as conn:
        while feed.purge(conn, datetime.now(UTC) + timedelta(days=1), 10_000):
            pass
    expired = _changes(stack, after=feed.START.text)
    assert expired.status_code == 410
    assert expired.json()["error"] == "cursor_expired"
    # Without a cursor a reader starts again from the oldest change kept.
    fresh = _changes(stack)
    assert fresh.status_code == 200
    assert _changes(stack, after=fresh.json()["next"]).status_code == 200


def _read_to_end(stack: Stack, cursor: str | None) -> tuple[list[dict[str, Any]], str]:
    seen: list[dict[str, Any]] = []
    while True:
        response = _changes(stack, **({"after": cursor} if cursor else {}), limit="1000")
        assert response.status_code == 200, response.text
        page = response.json()
        seen += page["changes"]
        cursor = page["next"]
        if not page["changes"]:
            return seen, cursor


def test_a_change_committed_behind_an_open_transaction_waits_for_it(stack: Stack) -> None:
    """The feed's horizon: a transaction that began writing earlier may still commit a
    change ordered before this one, so the reader is not given this one yet."""
    _, cursor = _read_to_end(stack, None)
    order_key = f"horizon-{uuid.uuid4().hex}"
    with stack.engine.connect() as blocker:
        blocker.execute(text("SELECT pg_current_xact_id()"))  # holds a transaction id now
        with stack.engine.begin() as conn:
            conn.execute(
                insert(changes).values(order_key=order_key, kind="order", version=1, summary="{}")
            )
        held, held_cursor = _read_to_end(stack, cursor)
        assert order_key not in {change["orderId"] for change in held}
        assert support.metric(f"{stack.base}/metrics", "refundsync_changes_feed_lag_seconds") > 0
        blocker.rollback()
    released, _ = _read_to_end(stack, held_cursor)
    assert order_key in {change["orderId"] for change in released}


def test_the_example_receiver_keeps_each_orders_newest_summary(tmp_path: Path) -> None:
    """docs/examples/receiver.py, as a merchant would run it, fed retries and changes out
    of order: it keeps the newest version, and refuses a request signed with another key."""
    port = support.free_port()
    db = tmp_path / "shop.db"
    script = Path(__file__).resolve().parents[2] / "docs" / "examples" / "receiver.py"
    env = {**os.environ, "REFUNDSYNC_NOTIFY_SECRET": SECRET}
    process = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port), "--db", str(db)], env=env
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        support.wait_for(
            lambda: _listening(port), timeout=deadlines.LOCAL_PROCESS_S, what="the receiver"
        )
        notify.reset()
        settings = Settings(REFUNDSYNC_NOTIFY_URL=url, REFUNDSYNC_NOTIFY_SECRET=SECRET)
        changes_sent = [
            {**CHANGE, "cursor": f"1-{v}", "version": v, "summary": {"version": v}}
            for v in (1, 3, 2, 3, 1)
        ]
        for change in changes_sent:
            assert notify.post(settings, change, datetime.now(UTC)).status == 204
        notify.reset()
        forged = Settings(REFUNDSYNC_NOTIFY_URL=url, REFUNDSYNC_NOTIFY_SECRET=OTHER_SECRET)
        newer = {**CHANGE, "cursor": "1-9", "version": 9, "summary": {"version": 9}}
        assert notify.post(forged, newer, datetime.now(UTC)).status == 401
    finally:
        process.terminate()
        process.wait(timeout=10)
        notify.reset()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT order_key, version, summary FROM refund_summaries").fetchall()
    assert rows == [("ord-1", 3, '{"version": 3}')]


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False
