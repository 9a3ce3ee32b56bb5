"""How copies and attempts are counted, through the unit of work itself (in this process,
against the real database). A worker that dies leaves behind exactly what it committed, so
each death here is what the worker had committed when it was killed: nothing, or the
record of a started attempt (models.ledger.record_delivery)."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text

from models import ledger
from models.db import autocommit
from models.envelope import header_of
from models.outcome import Outcome
from models.settings import Settings
from tests import eventgen, support
from worker import processing


@pytest.fixture
def settings(database: support.Database) -> Iterator[Settings]:
    processing.reset_engine()
    settings = Settings(DATABASE_URL=database.url, REFUNDSYNC_MAX_ATTEMPTS=3)
    try:
        yield settings
    finally:
        processing.engine(settings).dispose()
        processing.reset_engine()


@pytest.fixture
def engine(database: support.Database) -> Iterator[Engine]:
    engine = support.engine_for(database.url)
    try:
        yield engine
    finally:
        engine.dispose()


def _event() -> dict[str, Any]:
    rng = random.Random(uuid.uuid4().int)
    return eventgen.order_history(rng, f"cnt-{uuid.uuid4().hex[:10]}", 1)[0]


def _copy(
    engine: Engine, event: dict[str, Any], message: str, *, redelivered: bool = False
) -> processing.Copy:
    copy: processing.Copy = support.sealed_copy(engine, event, message, redelivered=redelivered)
    return copy


def _started_then_died(engine: Engine, event: dict[str, Any], message: str) -> None:
    """What a worker leaves when it dies in an attempt that took the two-step path (a
    redelivered message): the attempt recorded as started, nothing else."""
    copy = _copy(engine, event, message, redelivered=True)
    header = header_of(json.loads(copy.body))
    with autocommit(engine) as conn:
        ledger.record_delivery(
            conn,
            header,
            copy.body,
            received_at=copy.received_at,
            source=copy.source,
            message=message,
            redelivered=True,
        )


def _counts(engine: Engine, event_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT outcome, deliveries, attempts, lost_attempts, error"
                " FROM webhook_events WHERE id = :id"
            ),
            {"id": event_id},
        ).one()
    return dict(row._mapping)


def test_a_copy_counts_once_however_often_its_message_comes(
    settings: Settings, engine: Engine
) -> None:
    event = _event()
    first, duplicate, later = (str(uuid.uuid4()) for _ in range(3))
    processing.process(settings, _copy(engine, event, first))
    # DR's second copy was held by a worker that died before starting it: it comes back
    # marked redelivered, and it is still a copy DR sent.
    processing.process(settings, _copy(engine, event, duplicate, redelivered=True))
    processing.process(settings, _copy(engine, event, duplicate, redelivered=True))
    processing.process(settings, _copy(engine, event, first))
    processing.process(settings, _copy(engine, event, later))
    counts = _counts(engine, str(event["id"]))
    assert counts["outcome"] == "applied"
    assert counts["deliveries"] == 3


def test_a_message_that_never_started_is_not_a_lost_attempt(
    settings: Settings, engine: Engine
) -> None:
    event = _event()
    # Only waiting in a worker's prefetch when the worker died: nothing of it was recorded.
    result = processing.process(settings, _copy(engine, event, "m-1", redelivered=True))
    assert result.outcome is Outcome.APPLIED
    counts = _counts(engine, str(event["id"]))
    assert (counts["deliveries"], counts["attempts"], counts["lost_attempts"]) == (1, 1, 0)


def test_a_started_attempt_that_died_is_lost_and_quarantines_at_the_limit(
    settings: Settings, engine: Engine
) -> None:
    event = _event()
    _started_then_died(engine, event, "m-1")
    _started_then_died(engine, event, "m-1")
    assert _counts(engine, str(event["id"]))["lost_attempts"] == 1
    # Another message of the same event, only waiting in the worker that died the second
    # time: its first return marks nothing lost.
    _started_then_died(engine, event, "m-2")
    assert _counts(engine, str(event["id"]))["lost_attempts"] == 1
    _started_then_died(engine, event, "m-2")
    result = processing.process(settings, _copy(engine, event, "m-2", redelivered=True))
    assert result.outcome is Outcome.FAILED
    counts = _counts(engine, str(event["id"]))
    assert counts["error"].startswith("gave up after 3 attempts died with their worker")
    assert (counts["deliveries"], counts["lost_attempts"]) == (2, 3)


def test_an_attempt_that_ended_in_a_retry_is_not_lost(settings: Settings, engine: Engine) -> None:
    event = _event()
    _started_then_died(engine, event, "m-1")
    processing.note_error(settings, str(event["id"]), "lock timeout", "m-1")
    assert _counts(engine, str(event["id"]))["error"] == "lock timeout"
    # Its retry (the same message) is held by a worker that dies before starting it.
    result = processing.process(settings, _copy(engine, event, "m-1", redelivered=True))
    assert result.outcome is Outcome.APPLIED
    counts = _counts(engine, str(event["id"]))
    assert (counts["deliveries"], counts["lost_attempts"]) == (1, 0)
