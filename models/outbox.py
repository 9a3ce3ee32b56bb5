"""Outbound webhook deliveries of the feed's changes: which change of an order goes next, its
lease while a worker POSTs it, each attempt's record, and the backoff (a pure rule).

For one order, changes go out in version order: only the order's oldest undelivered change
(its head) is ever sent, so a change never reaches the receiver before the order's earlier
ones are delivered or dead. The head is leased while its POST is in flight, so two workers
never send one order's changes at once; a worker that dies leaves a lease that expires.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, exists, func, insert, or_, select, update
from sqlalchemy.orm import aliased

from models import feed
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


def lease_head(conn: Connection, order_key: str, now: datetime, lease_s: float) -> Head | None:
    """Lease the order's oldest undelivered change. None when it has none, when its retry
    is not due yet, or when a worker holds a lease on any of the order's changes (so one
    order's changes are never POSTed at once, even after an operator sent an older one
    again). The head's row stays locked until the caller commits, which serializes two
    workers leasing one order."""
    row = conn.execute(
        select(
            *feed.COLUMNS,
            changes.c.attempts,
            changes.c.next_attempt_at,
            changes.c.redelivered_at,
        )
        .where(changes.c.order_key == order_key, changes.c.delivery == PENDING)
        .order_by(changes.c.version)
        .limit(1)
        .with_for_update()
    ).first()
    if row is None or (row.next_attempt_at is not None and row.next_attempt_at > now):
        return None
    leased = conn.execute(
        select(changes.c.id)
        .where(
            changes.c.order_key == order_key,
            changes.c.delivery == PENDING,
            changes.c.leased_until > now,
        )
        .limit(1)
    ).first()
    if leased is not None:
        return None
    lease = now + timedelta(seconds=lease_s)
    conn.execute(
        update(changes)
        .where(changes.c.id == row.id)
        .values(leased_until=lease, attempts=row.attempts + 1)
    )
    attempt = row.attempts + 1
    return Head(feed.change_json(row), row.id, order_key, row.version, attempt, _since(row), lease)


def record(conn: Connection, head: Head, attempt: Attempt, step: Step, now: datetime) -> None:
    """Keep the attempt, and where the change's delivery now stands (its lease released),
    unless the lease was lost meanwhile: the state is then its new holder's to write."""
    conn.execute(
        insert(deliveries).values(
            change_id=head.change_id,
            attempt=head.attempt,
            attempted_at=now,
            status_code=attempt.status,
            latency_ms=attempt.latency_ms,
            error=attempt.error,
        )
    )
    conn.execute(
        update(changes)
        .where(changes.c.id == head.change_id, changes.c.leased_until == head.lease)
        .values(
            delivery=step.delivery,
            next_attempt_at=step.next_attempt_at,
            leased_until=None,
            delivered_at=now if step.delivery == DELIVERED else None,
        )
    )


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
