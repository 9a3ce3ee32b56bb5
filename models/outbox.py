"""Outbound webhook deliveries of the feed's changes: which change of an order goes next, its
lease while a worker POSTs it, each attempt's record, and the backoff (a pure rule).

For one order, changes go out in version order: only the order's oldest undelivered change
(its head) is ever sent, so a change never reaches the receiver before the order's earlier
ones are delivered or dead. The head is leased while its POST is in flight, so two workers
never send one order's changes at once; a worker that dies leaves a lease that expires.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, exists, func, insert, or_, select, update
from sqlalchemy.orm import aliased

from models import feed
from models.db import Params, execute_all
from models.tables import changes, deliveries

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
# The first retry waits about this long; each one after doubles it, up to the configured cap.
FIRST_BACKOFF_S = 1.0


@dataclass(frozen=True)
class Head:
    """An order's next change to deliver, leased to this worker."""

    change: dict[str, Any]
    change_id: int
    order_key: str
    version: int
    attempt: int
    # Deliveries are retried until this long after it (REFUNDSYNC_NOTIFY_MAX_AGE_SECONDS).
    since: datetime
    # Until when this worker holds the order.
    lease: datetime
    # The order has later changes waiting.
    more: bool = False


@dataclass(frozen=True)
class Attempt:
    """What one POST came to: the status (None when no response came), how long it took,
    and what failed (never the response body)."""

    status: int | None
    latency_ms: int
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True)
class Step:
    """What follows an attempt: `delivery` (pending, delivered or dead), and when a pending
    one is tried next."""

    delivery: str
    next_attempt_at: datetime | None = None


def next_step(
    attempt: Attempt,
    attempts: int,
    since: datetime,
    now: datetime,
    *,
    max_age_s: float,
    backoff_max_s: float,
    jitter: float,
) -> Step:
    """After attempt number `attempts`: delivered on a 2xx; else retried after an exponential
    backoff with jitter (`jitter` in [0, 1) spreads it over its upper half, so retries of
    many orders do not arrive together), never past `max_age_s` after `since`, then dead."""
    if attempt.delivered:
        return Step(DELIVERED)
    deadline = since + timedelta(seconds=max_age_s)
    if now >= deadline:
        return Step(DEAD)
    backoff = min(backoff_max_s, FIRST_BACKOFF_S * 2 ** min(attempts - 1, 40))
    delay = backoff / 2 + backoff / 2 * jitter
    return Step(PENDING, min(now + timedelta(seconds=delay), deadline))


def _since(row: Any) -> datetime:
    since: datetime = row.redelivered_at or row.changed_at
    return since


def _lease_statement() -> Any:
    earlier, leased, later = aliased(changes), aliased(changes), aliased(changes)
    now = bindparam("now", type_=changes.c.leased_until.type)
    return (
        update(changes)
        .where(
            changes.c.order_key.in_(bindparam("keys", expanding=True)),
            changes.c.delivery == PENDING,
            ~exists().where(
                earlier.c.order_key == changes.c.order_key,
                earlier.c.delivery == PENDING,
                earlier.c.version < changes.c.version,
            ),
            or_(changes.c.next_attempt_at.is_(None), changes.c.next_attempt_at <= now),
            or_(changes.c.leased_until.is_(None), changes.c.leased_until <= now),
            ~exists().where(
                leased.c.order_key == changes.c.order_key,
                leased.c.delivery == PENDING,
                leased.c.leased_until > now,
            ),
        )
        .values(leased_until=bindparam("lease", type_=changes.c.leased_until.type))
        .returning(
            *feed.COLUMNS,
            changes.c.attempts,
            changes.c.redelivered_at,
            exists()
            .where(
                later.c.order_key == changes.c.order_key,
                later.c.delivery == PENDING,
                later.c.version > changes.c.version,
            )
            .label("more"),
        )
    )


# Built once: an UPDATE with three correlated subqueries takes SQLAlchemy longer to build
# than Postgres to run.
_LEASE = _lease_statement()


def lease_heads(
    conn: Connection, order_keys: Sequence[str], now: datetime, lease_s: float
) -> list[Head]:
    """Lease each named order's oldest undelivered change (its head), in one statement.

    An order is skipped when its head's retry is not due yet, or when a worker holds a
    lease on any of its changes (so one order's changes are never POSTed at once, even after
    an operator sent an older one again). Two workers leasing one order meet on the head's
    row: the second re-checks it once the first's lease is committed, and skips it.
    """
    lease = now + timedelta(seconds=lease_s)
    rows = conn.execute(_LEASE, {"keys": list(order_keys), "now": now, "lease": lease}).all()
    return [
        Head(
            feed.change_json(row),
            row.id,
            row.order_key,
            row.version,
            row.attempts + 1,
            _since(row),
            lease,
            bool(row.more),
        )
        for row in sorted(rows, key=lambda row: row.order_key)
    ]


@dataclass(frozen=True)
class Done:
    """One leased head's attempt and what follows it; no attempt when it was not tried
    (its lease is then only given back)."""

    head: Head
    attempt: Attempt | None
    step: Step | None
    at: datetime


_RECORD = (
    update(changes)
    .where(changes.c.id == bindparam("b_id"), changes.c.leased_until == bindparam("b_lease"))
    .values(
        delivery=bindparam("b_delivery"),
        next_attempt_at=bindparam("b_next"),
        leased_until=None,
        delivered_at=bindparam("b_delivered_at"),
        attempts=changes.c.attempts + 1,
    )
)
_RELEASE = (
    update(changes)
    .where(changes.c.id == bindparam("b_id"), changes.c.leased_until == bindparam("b_lease"))
    .values(leased_until=None)
)
_ATTEMPT = insert(deliveries).values(
    {
        name: bindparam(name, type_=deliveries.c[name].type)
        for name in ("change_id", "attempt", "attempted_at", "status_code", "latency_ms", "error")
    }
)


def record(conn: Connection, done: Sequence[Done]) -> None:
    """Keep the attempts, and where each change's delivery now stands (its lease released),
    in one round trip. A change whose lease was lost meanwhile keeps its attempt in
    `deliveries`, but its state is its new holder's to write."""
    tried = [d for d in done if d.attempt is not None and d.step is not None]
    writes: list[tuple[Any, Params]] = []
    if tried:
        writes.append(
            (
                _ATTEMPT,
                [
                    {
                        "change_id": d.head.change_id,
                        "attempt": d.head.attempt,
                        "attempted_at": d.at,
                        "status_code": d.attempt.status,
                        "latency_ms": d.attempt.latency_ms,
                        "error": d.attempt.error,
                    }
                    for d in tried
                    if d.attempt is not None
                ],
            )
        )
        writes.append(
            (
                _RECORD,
                [
                    {
                        "b_id": d.head.change_id,
                        "b_lease": d.head.lease,
                        "b_delivery": d.step.delivery,
                        "b_next": d.step.next_attempt_at,
                        "b_delivered_at": d.at if d.step.delivery == DELIVERED else None,
                    }
                    for d in tried
                    if d.step is not None
                ],
            )
        )
    untried = [
        {"b_id": d.head.change_id, "b_lease": d.head.lease} for d in done if d.attempt is None
    ]
    if untried:
        writes.append((_RELEASE, untried))
    if writes:
        execute_all(conn, writes)


def due_heads(
    conn: Connection, now: datetime, announce_after_s: float, limit: int
) -> list[tuple[str, int]]:
    """Orders whose head is due and not leased, and was not announced in the last
    `announce_after_s`: a retry whose time came, or a change whose announcement was lost
    (no task took it up that long after it). Each is marked as announced now."""
    earlier = aliased(changes)
    announced_before = now - timedelta(seconds=announce_after_s)
    heads = conn.execute(
        select(changes.c.id, changes.c.order_key, changes.c.version)
        .where(
            changes.c.delivery == PENDING,
            ~exists().where(
                earlier.c.order_key == changes.c.order_key,
                earlier.c.delivery == PENDING,
                earlier.c.version < changes.c.version,
            ),
            or_(changes.c.leased_until.is_(None), changes.c.leased_until <= now),
            or_(changes.c.next_attempt_at.is_(None), changes.c.next_attempt_at <= now),
            changes.c.changed_at <= announced_before,
            or_(changes.c.announced_at.is_(None), changes.c.announced_at <= announced_before),
        )
        .limit(limit)
    ).all()
    if heads:
        conn.execute(
            update(changes)
            .where(changes.c.id.in_([row.id for row in heads]))
            .values(announced_at=now)
        )
    return [(row.order_key, row.version) for row in heads]


@dataclass(frozen=True)
class Undelivered:
    """A change that is dead or still failing, with its last attempt."""

    cursor: str
    order_key: str
    version: int
    delivery: str
    attempts: int
    changed_at: datetime
    status: int | None
    error: str | None


def failing(conn: Connection, *, dead_only: bool, limit: int) -> list[Undelivered]:
    """Dead changes, and (unless `dead_only`) pending ones already tried, oldest first."""
    wanted = (
        changes.c.delivery == DEAD
        if dead_only
        else or_(
            changes.c.delivery == DEAD,
            and_(changes.c.delivery == PENDING, changes.c.attempts > 0),
        )
    )
    rows = conn.execute(
        select(
            changes.c.id,
            changes.c.xid,
            changes.c.order_key,
            changes.c.version,
            changes.c.delivery,
            changes.c.attempts,
            changes.c.changed_at,
        )
        .where(wanted)
        .order_by(changes.c.xid, changes.c.id)
        .limit(limit)
    ).all()
    found = []
    for row in rows:
        attempt = conn.execute(
            select(deliveries.c.status_code, deliveries.c.error)
            .where(deliveries.c.change_id == row.id)
            .order_by(deliveries.c.attempt.desc(), deliveries.c.id.desc())
            .limit(1)
        ).first()
        found.append(
            Undelivered(
                feed.Cursor(row.xid, row.id).text,
                row.order_key,
                row.version,
                row.delivery,
                row.attempts,
                row.changed_at,
                attempt.status_code if attempt else None,
                attempt.error if attempt else None,
            )
        )
    return found


def redeliver(
    conn: Connection, cursors: list[feed.Cursor] | None, now: datetime
) -> list[tuple[feed.Cursor, str, int]]:
    """Send changes again: the ones named (delivered, dead, or never sent because webhooks
    were off where they were written), or every dead one when `cursors` is None. Each is
    tried at once and then backs off as a new one, for the max age from now; a lease in
    force is kept. Returns each one's cursor, order and version."""
    target = (
        changes.c.delivery == DEAD
        if cursors is None
        else or_(
            *(and_(changes.c.id == cursor.id, changes.c.xid == cursor.xid) for cursor in cursors)
        )
    )
    rows = conn.execute(
        update(changes)
        .where(target)
        .values(delivery=PENDING, next_attempt_at=None, attempts=0, redelivered_at=now)
        .returning(changes.c.xid, changes.c.id, changes.c.order_key, changes.c.version)
    ).all()
    return [(feed.Cursor(row.xid, row.id), row.order_key, row.version) for row in rows]


def backlog(conn: Connection, now: datetime) -> tuple[int, float]:
    """How many changes wait to be delivered, and the age in seconds of the oldest."""
    count, oldest = conn.execute(
        select(func.count(), func.min(changes.c.changed_at)).where(changes.c.delivery == PENDING)
    ).one()
    age = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
    return int(count), age
