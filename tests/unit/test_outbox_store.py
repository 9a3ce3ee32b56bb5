"""The deliveries' state in the database (models.outbox), on a SQLite file in this process:
who may POST an order's change and when, what an attempt records, and what the sweep, an
operator's redelivery and retention do to it."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from models import feed, outbox
from models.db import make_engine
from models.migrate import upgrade
from models.rules import OrderState
from models.tables import changes, deliveries

# The test's "now": a moment after the changes are written (their changed_at is the
# database's clock), well inside the max age.
T0 = datetime.now(UTC) + timedelta(seconds=5)
LEASE_S = 30.0


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with tempfile.TemporaryDirectory(prefix="refundsync-outbox-") as directory:
        url = f"sqlite:///{Path(directory) / 'refundsync.db'}"
        upgrade(url)
        db = make_engine(url, pool_size=1)
        try:
            yield db
        finally:
            db.dispose()


def _order(engine: Engine, versions: int) -> str:
    order_key = f"ob-{uuid.uuid4().hex[:10]}"
    rows = [
        feed.change_row(OrderState(order_key, currency="USD", version=v), f"e{v}", deliver=True)
        for v in range(1, versions + 1)
    ]
    with engine.begin() as conn:
        for row in rows:
            conn.execute(feed.insert_statement("sqlite"), row)
    return order_key


def _lease(engine: Engine, order_key: str, now: datetime = T0) -> outbox.Head | None:
    with engine.begin() as conn:
        heads = outbox.lease_heads(conn, [order_key], now, LEASE_S)
    assert len(heads) <= 1
    return heads[0] if heads else None


def _record(engine: Engine, head: outbox.Head, status: int | None, now: datetime = T0) -> None:
    attempt = outbox.Attempt(status, 3, None if status == 200 else "failed")
    step = outbox.next_step(
        attempt, head.attempt, head.since, now, max_age_s=3600, backoff_max_s=60, jitter=0.0
    )
    with engine.begin() as conn:
        outbox.record(conn, [outbox.Done(head, attempt, step, now)])


def _states(engine: Engine, order_key: str) -> list[tuple[int, str | None, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(changes.c.version, changes.c.delivery, changes.c.attempts)
            .where(changes.c.order_key == order_key)
            .order_by(changes.c.version)
        )
        return [(row.version, row.delivery, row.attempts) for row in rows]


def test_an_orders_changes_are_leased_one_at_a_time_in_version_order(engine: Engine) -> None:
    order_key = _order(engine, 3)
    head = _lease(engine, order_key)
    assert head is not None
    assert head.version == 1
    assert head.change["version"] == 1
    assert _lease(engine, order_key) is None  # the order is held
    _record(engine, head, 200)
    second = _lease(engine, order_key)
    assert second is not None
    assert second.version == 2
    assert _states(engine, order_key) == [(1, "delivered", 1), (2, "pending", 0), (3, "pending", 0)]


def test_a_failed_head_is_not_leased_again_before_its_retry_and_holds_the_rest(
    engine: Engine,
) -> None:
    order_key = _order(engine, 2)
    head = _lease(engine, order_key)
    assert head is not None
    _record(engine, head, 500)
    assert _lease(engine, order_key) is None  # retry in 0.5 s at the earliest
    later = _lease(engine, order_key, T0 + timedelta(seconds=2))
    assert later is not None
    assert later.version == 1
    assert later.attempt == 2


def test_an_expired_lease_is_taken_over_and_the_old_holder_writes_nothing(engine: Engine) -> None:
    order_key = _order(engine, 1)
    first = _lease(engine, order_key)
    assert first is not None
    taken = _lease(engine, order_key, T0 + timedelta(seconds=LEASE_S + 1))
    assert taken is not None
    _record(engine, first, 500)  # the first holder comes back late, with a failure
    _record(engine, taken, 200, T0 + timedelta(seconds=LEASE_S + 2))
    # The late holder's attempt is kept, but only the holder's outcome counts.
    assert _states(engine, order_key) == [(1, "delivered", 1)]
    with engine.connect() as conn:
        kept = conn.execute(
            select(deliveries.c.attempt, deliveries.c.status_code)
            .where(deliveries.c.change_id == taken.change_id)
            .order_by(deliveries.c.id)
        ).all()
    assert [(row.attempt, row.status_code) for row in kept] == [(1, 500), (1, 200)]


def test_an_older_change_sent_again_waits_while_a_later_one_is_in_flight(engine: Engine) -> None:
    order_key = _order(engine, 2)
    first = _lease(engine, order_key)
    assert first is not None
    _record(engine, first, 200)
    second = _lease(engine, order_key)
    assert second is not None
    with engine.begin() as conn:
        again = outbox.redeliver(conn, [feed.Cursor.parse(first.change["cursor"])], T0)
    assert [(key, version) for _, key, version in again] == [(order_key, 1)]
    assert _lease(engine, order_key) is None  # version 2 is still in flight
    _record(engine, second, 200)
    resent = _lease(engine, order_key)
    assert resent is not None
    assert (resent.version, resent.attempt) == (1, 1)


def test_dead_changes_are_sent_again_as_new_ones(engine: Engine) -> None:
    order_key = _order(engine, 1)
    head = _lease(engine, order_key)
    assert head is not None
    attempt = outbox.Attempt(None, 3, "ConnectError")
    with engine.begin() as conn:
        outbox.record(conn, [outbox.Done(head, attempt, outbox.Step(outbox.DEAD), T0)])
    with engine.connect() as conn:
        listed = outbox.failing(conn, dead_only=True, limit=1000)
    assert (order_key, 1, "ConnectError") in {(f.order_key, f.version, f.error) for f in listed}
    with engine.begin() as conn:
        again = outbox.redeliver(conn, None, T0 + timedelta(hours=1))
    assert (order_key, 1) in {(key, version) for _, key, version in again}
    resent = _lease(engine, order_key, T0 + timedelta(hours=1))
    assert resent is not None
    assert resent.attempt == 1
    assert resent.since == T0 + timedelta(hours=1)


def test_the_sweep_publishes_a_due_head_once_per_period(engine: Engine) -> None:
    order_key = _order(engine, 2)
    with engine.connect() as conn:
        written = conn.execute(
            select(changes.c.changed_at).where(changes.c.order_key == order_key).limit(1)
        ).scalar_one()
    after = written + timedelta(seconds=30)
    with engine.begin() as conn:
        first = outbox.due_heads(conn, after, 20, limit=10_000)
    with engine.begin() as conn:
        again = outbox.due_heads(conn, after + timedelta(seconds=5), 20, limit=10_000)
    with engine.begin() as conn:
        later = outbox.due_heads(conn, after + timedelta(seconds=25), 20, limit=10_000)
    assert (order_key, 1) in first
    assert (order_key, 2) not in first  # only an order's head
    assert order_key not in {key for key, _ in again}
    assert (order_key, 1) in later


def test_retention_never_removes_a_change_still_being_delivered(engine: Engine) -> None:
    order_key = _order(engine, 1)
    with engine.begin() as conn:
        feed.purge(conn, datetime.now(UTC) + timedelta(days=1), 100_000)
    with engine.connect() as conn:
        left = conn.execute(select(changes.c.version).where(changes.c.order_key == order_key)).all()
    assert len(left) == 1


def test_orders_are_leased_together_and_a_lease_given_back_untried_counts_no_attempt(
    engine: Engine,
) -> None:
    first, second = _order(engine, 2), _order(engine, 1)
    with engine.begin() as conn:
        heads = outbox.lease_heads(conn, [second, first, "unknown"], T0, LEASE_S)
    assert [(h.order_key, h.version) for h in heads] == sorted([(first, 1), (second, 1)])
    with engine.begin() as conn:
        outbox.record(conn, [outbox.Done(h, None, None, T0) for h in heads])
    assert _states(engine, first) == [(1, "pending", 0), (2, "pending", 0)]
    again = _lease(engine, first)
    assert again is not None
    assert (again.version, again.attempt) == (1, 1)
