"""The apply pipeline in this process, on a SQLite file: the same record, decide and save
steps a worker runs, with no Postgres, Redis or Celery (the real ones are left to the
integration and acceptance tests)."""

from __future__ import annotations

import json
import random
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from models import feed, ledger, views
from models.migrate import upgrade
from models.outcome import Outcome
from models.settings import Settings
from tests import eventgen, support
from worker import processing


@pytest.fixture(scope="module")
def settings() -> Iterator[Settings]:
    with tempfile.TemporaryDirectory(prefix="refundsync-pipeline-") as directory:
        url = f"sqlite:///{Path(directory) / 'refundsync.db'}"
        upgrade(url)
        processing.reset_engine()
        settings = Settings(DATABASE_URL=url)
        try:
            yield settings
        finally:
            processing.engine(settings).dispose()
            processing.reset_engine()


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    return processing.engine(settings)


def _copy(engine: Engine, event: dict[str, Any], message: str | None = None) -> processing.Copy:
    copy: processing.Copy = support.sealed_copy(engine, event, message or uuid.uuid4().hex)
    return copy


def test_any_order_and_any_copies_give_the_summary_of_the_rules(
    settings: Settings, engine: Engine
) -> None:
    rng = random.Random(21)
    events = [
        event
        for n in range(5)
        for event in eventgen.order_history(rng, f"pipe-{uuid.uuid4().hex[:8]}-{n}", 8)
    ]
    copies = events + rng.sample(events, 10)
    rng.shuffle(copies)
    for event in copies:
        result = processing.process(settings, _copy(engine, event))
        assert result.outcome is not None
    expected = eventgen.expected_summaries(events)
    with engine.connect() as conn:
        found = {
            order_id: eventgen.comparable(views.order_summary(conn, order_id) or {})
            for order_id in expected
        }
    assert found == expected


def test_a_message_counts_once_however_often_it_comes(settings: Settings, engine: Engine) -> None:
    event = eventgen.order_history(random.Random(22), f"pipe-{uuid.uuid4().hex[:8]}", 1)[0]
    first = processing.process(settings, _copy(engine, event, "m-1"))
    again = processing.process(settings, _copy(engine, event, "m-1"))
    other = processing.process(settings, _copy(engine, event, "m-2"))
    assert first.outcome in {Outcome.APPLIED, Outcome.IGNORED, Outcome.STALE}
    assert again.duplicate
    assert other.duplicate
    with engine.connect() as conn:
        deliveries = conn.execute(
            text("SELECT deliveries FROM webhook_events WHERE id = :id"), {"id": event["id"]}
        ).scalar_one()
    assert deliveries == 2


def test_a_preview_changes_nothing(settings: Settings, engine: Engine) -> None:
    history = eventgen.order_history(random.Random(23), f"pipe-{uuid.uuid4().hex[:8]}", 3)
    for event in history:
        processing.process(settings, _copy(engine, event))
    order_id = next(iter(eventgen.expected_summaries(history)))
    with engine.connect() as conn:
        before = views.order_summary(conn, order_id)
        stored = ledger.stored_events(conn, [str(history[-1]["id"])])[0]
    preview = processing.preview(settings, stored)
    assert preview.outcome is not None
    with engine.connect() as conn:
        assert views.order_summary(conn, order_id) == before
        assert ledger.stored_events(conn, [stored.id])[0].outcome == stored.outcome


def _published(name: str, event_id: str, **obj: Any) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(support.load_fixture(f"dr_published/{name}"))
    return {**event, "id": event_id, "data": {"object": {**event["data"]["object"], **obj}}}


@pytest.mark.parametrize(
    ("name", "obj", "reason"),
    [
        pytest.param(
            "refund.complete.json",
            {"items": [{"itemId": "i1", "quantity": -2, "amount": 5.0}]},
            "quantity -2 is negative",
            id="negative-quantity",
        ),
        pytest.param(
            "refund.complete.json",
            {"items": [{"itemId": "i1", "percent": 100.5}]},
            "percent 100.5 is not 0-100",
            id="percent-over-100",
        ),
        pytest.param(
            "order.refunded.json",
            {"upstreamId": "u" * 10_000},
            "upstreamId",
            id="upstream-id-of-10000-characters",
        ),
        pytest.param(
            "refund.complete.json",
            {"orderId": None},
            "a Refund needs orderId or invoiceId",
            id="invoice-refund-with-neither-id",
        ),
    ],
)
def test_bad_input_of_the_new_kinds_fails_with_its_reason_and_changes_nothing(
    settings: Settings, engine: Engine, name: str, obj: dict[str, Any], reason: str
) -> None:
    event = _published(name, f"bad-{uuid.uuid4().hex}", **obj)
    order_id = event["data"]["object"].get("orderId") or event["data"]["object"]["id"]
    with engine.connect() as conn:
        before = views.order_summary(conn, order_id)
    result = processing.process(settings, _copy(engine, event))
    assert result.outcome is Outcome.FAILED
    with engine.connect() as conn:
        record = views.event_record(conn, event["id"])
        assert views.order_summary(conn, order_id) == before
    assert record is not None
    assert record["outcome"] == "failed"
    assert reason in (record["error"] or "")


def test_the_feed_holds_each_change_once_in_version_order_and_expires_with_retention(
    settings: Settings, engine: Engine
) -> None:
    rng = random.Random(23)
    orders = [f"feed-{uuid.uuid4().hex[:8]}-{n}" for n in range(4)]
    events = [event for order_id in orders for event in eventgen.order_history(rng, order_id, 8)]
    copies = events + rng.sample(events, 8)
    rng.shuffle(copies)
    with engine.connect() as conn:
        start = feed.read(conn, None, 1000).next
    for event in copies:
        processing.process(settings, _copy(engine, event))

    seen: list[dict[str, Any]] = []
    cursor = start
    with engine.connect() as conn:
        while page := feed.read(conn, cursor, 5).changes:
            seen += page
            cursor = feed.Cursor.parse(page[-1]["cursor"])
        current = {order_id: views.order_summary(conn, order_id) for order_id in orders}
    assert [c["cursor"] for c in seen] == sorted({c["cursor"] for c in seen}, key=feed.Cursor.parse)
    for order_id in orders:
        mine = [c for c in seen if c["orderId"] == order_id]
        assert [c["version"] for c in mine] == list(range(1, len(mine) + 1))
        assert mine[-1]["version"] == (current[order_id] or {})["version"]
        assert {**mine[-1]["summary"], "updatedAt": None} == {
            **(current[order_id] or {}),
            "updatedAt": None,
        }

    with engine.begin() as conn:
        removed = feed.purge(conn, datetime.now(UTC) + timedelta(days=1), 10_000)
    assert removed >= len(seen)
    with engine.connect() as conn, pytest.raises(feed.CursorExpired):
        feed.read(conn, start, 10)
    with engine.connect() as conn:
        fresh = feed.read(conn, None, 10)
    assert fresh.changes == []
    assert fresh.next >= cursor
