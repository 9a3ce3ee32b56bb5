"""The pure parts of the change feed and its deliveries: the cursor, and what follows an
attempt (delivered, retried after a backoff with jitter, or dead)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import orjson
import pytest

from models import feed
from models.feed import Cursor, InvalidCursor
from models.outbox import DEAD, DELIVERED, PENDING, Attempt, Step, next_step
from models.rules import OrderState

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
DAY = 86_400.0


@pytest.mark.parametrize("text", ["0-0", "1-2", "9223372036854775807-9223372036854775807"])
def test_a_cursor_reads_back_as_written(text: str) -> None:
    assert Cursor.parse(text).text == text


@pytest.mark.parametrize(
    "text",
    [
        *("", "1", "1-", "-1", "a-b", "1-2-3", " 1-2", "1-2\n", "1_0-1"),
        "9223372036854775808-1",
        "\u0661-\u0662",  # digits, but not ASCII ones
    ],
)
def test_a_cursor_the_feed_never_handed_out_is_refused(text: str) -> None:
    with pytest.raises(InvalidCursor):
        Cursor.parse(text)


def test_cursors_order_by_transaction_then_row() -> None:
    assert Cursor(5, 100) < Cursor(6, 1) < Cursor(6, 2)


def _step(status: int | None, attempts: int, now: datetime, jitter: float = 0.0) -> Step:
    return next_step(
        Attempt(status, 5),
        attempts,
        T0,
        now,
        max_age_s=3 * DAY,
        backoff_max_s=3600,
        jitter=jitter,
    )


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_a_2xx_delivers(status: int) -> None:
    assert _step(status, 1, T0).delivery == DELIVERED


@pytest.mark.parametrize("status", [None, 199, 301, 302, 400, 410, 429, 500, 503])
def test_anything_else_is_tried_again(status: int | None) -> None:
    assert _step(status, 1, T0).delivery == PENDING


@pytest.mark.parametrize(
    ("attempts", "low", "high"),
    [(1, 0.5, 1.0), (2, 1.0, 2.0), (5, 8.0, 16.0), (12, 1024.0, 2048.0), (13, 1800.0, 3600.0)],
)
def test_the_backoff_doubles_up_to_its_cap_and_jitter_spreads_its_upper_half(
    attempts: int, low: float, high: float
) -> None:
    for jitter, expected in ((0.0, low), (0.999999, high)):
        step = _step(500, attempts, T0, jitter)
        assert step.delivery == PENDING
        assert step.next_attempt_at is not None
        waited = (step.next_attempt_at - T0).total_seconds()
        assert waited == pytest.approx(expected, rel=1e-4)
    # A hundred attempts in, the cap still holds (no overflow).
    far = _step(500, 100, T0, 0.5)
    assert far.next_attempt_at is not None
    assert (far.next_attempt_at - T0).total_seconds() == pytest.approx(2700)


def test_a_retry_is_never_later_than_the_max_age_and_after_it_the_change_is_dead() -> None:
    almost = T0 + timedelta(seconds=3 * DAY - 10)
    step = _step(500, 30, almost, 0.9)
    assert step.next_attempt_at == T0 + timedelta(seconds=3 * DAY)
    assert _step(500, 31, T0 + timedelta(seconds=3 * DAY)).delivery == DEAD
    # A 2xx at the last moment still counts.
    assert _step(200, 31, T0 + timedelta(seconds=4 * DAY)).delivery == DELIVERED


def _row(summary: dict[str, object]) -> SimpleNamespace:
    return SimpleNamespace(
        id=2,
        xid=1,
        order_key="ord-1",
        kind="order",
        upstream_id=None,
        version=2,
        event_id="evt-1",
        changed_at=T0,
        summary=orjson.dumps(summary).decode(),
    )


def test_a_change_carries_its_time_as_the_summarys_updated_at_and_nothing_nested_moves() -> None:
    state = OrderState("ord-1", currency="USD", version=2)
    stored = feed.change_row(state, "evt-1", deliver=False)
    summary = orjson.loads(stored["summary"])
    # The invariant the splice relies on: the top level's updatedAt is the last in the text.
    assert list(summary)[-2:] == ["updatedAt", "version"]
    summary["refunds"] = [{"id": "re-1", "metadata": {"updatedAt": None}}]
    change = feed.change_json(_row(summary))
    assert change["summary"]["updatedAt"] == "2026-12-07T12:00:00Z"
    assert change["summary"]["refunds"][0]["metadata"] == {"updatedAt": None}
    assert change["changedAt"] == change["summary"]["updatedAt"]
    encoded = orjson.loads(orjson.dumps(feed.change_json(_row(summary), encoded=True)))
    assert encoded == change


def test_a_process_pauses_its_posts_after_no_answer_and_resumes_on_any_answer() -> None:
    from worker.notify import _Pause

    pause = _Pause()
    assert pause.left() <= 0
    pause.after(Attempt(None, 1000, "ConnectError: refused"), cap_s=60)
    first = pause.left()
    assert 0.4 < first <= 1.0
    for _ in range(10):
        pause.after(Attempt(None, 1000, "ReadTimeout"), cap_s=60)
    assert 29 < pause.left() <= 60
    pause.after(Attempt(503, 5, "HTTP 503"), cap_s=60)
    assert pause.left() <= 0
