"""Reconciliation with DR's Events API: events DR has that refundsync never applied.

A webhook can be missed for good: an endpoint down past DR's 72 hours of retries, a
webhook DR disabled, a broker that lost its data. DR keeps 30 days of events behind
`GET /events`. A run lists the handled event types from the stored checkpoint minus an
overlap, records and publishes through `events.apply` every event that was never
recorded (or is stuck unfinished), and moves the checkpoint only over what it has
listed and published in full.

The decisions (the window, which listed event to publish, where the checkpoint may move,
what counts as drift) are pure functions of values at the top of this module; the run
below them only moves values between Postgres, DR's API and the broker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, write_to_textfile
from sqlalchemy import Connection, Engine, Text, case, func, literal, select
from sqlalchemy import exc as sa_exc

from models.db import insert_for, is_sqlite, payload_value, transaction
from models.orders import load_order
from models.rules import FINAL_OUTCOMES, HANDLED_EVENTS, Outcome, iso, refunded_amount
from models.settings import Settings
from models.tables import orders, reconcile_checkpoints, webhook_events
from worker.dr_api import DRApiError, DRClient, DROrder, EventPage, ListedEvent

log = logging.getLogger("refundsync.reconcile")

# DR's Events API keeps this much history.
RETENTION = timedelta(days=30)
# DR measures its 30 days on its own clock, at each request; starting this far inside the
# window keeps the last request of a slow run from asking for events already gone.
RETENTION_MARGIN = timedelta(minutes=10)
# A run lists its window one slice at a time and moves the checkpoint after each slice,
# so a long backfill that stops half way keeps the days it finished.
SLICE = timedelta(days=1)
CHECKPOINT = "events"
# Any constant shared by every reconciler; distinct from the migration lock.
LOCK_KEY = 0x7265_636F_6E63
RECONCILED_TYPES = tuple(sorted(HANDLED_EVENTS))
# The beat task's bounds. It is acknowledged on receipt (a lost run is redone by the next
# tick), so it may outlive the broker's visibility timeout; the soft limit lets it unlock
# and stop cleanly, the hard one kills what is left.
RECONCILE_SOFT_TIME_LIMIT_S = 14 * 60
RECONCILE_TIME_LIMIT_S = 15 * 60

_DRIFT_NAME = "refundsync_reconcile_drift_orders"
_DRIFT_HELP = "Orders whose refundedAmount differed from DR's at the last drift check"
DRIFT_ORDERS = Gauge(_DRIFT_NAME, _DRIFT_HELP, multiprocess_mode="mostrecent")
PUBLISHED = Counter(
    "refundsync_reconcile_published_total",
    "Events found only in DR's Events API and published by reconciliation",
)

Publish = Callable[[str, str, str, datetime], None]


# ---------------------------------------------------------------------------------------
# Pure rules


@dataclass(frozen=True)
class Window:
    """The createdTime range a run lists: [start, end)."""

    start: datetime
    end: datetime
    # Set when the wanted start (the checkpoint, or --since) is older than DR keeps:
    # events created in [lost_from, start) can no longer be recovered from DR.
    lost_from: datetime | None = None


def plan_window(
    *, checkpoint: datetime | None, since: datetime | None, now: datetime, overlap: timedelta
) -> Window:
    """Where a run starts listing.

    `since` (an operator's backfill) wins; else the checkpoint minus the overlap, which
    catches events DR made visible late; with neither, all that DR still keeps. Never
    earlier than DR's 30 days.
    """
    earliest = now - RETENTION + RETENTION_MARGIN
    if since is not None:
        wanted, needed = since, since
    elif checkpoint is not None:
        wanted, needed = checkpoint - overlap, checkpoint
    else:
        wanted, needed = earliest, None
    lost_from = needed if needed is not None and needed < earliest else None
    return Window(start=min(max(wanted, earliest), now), end=now, lost_from=lost_from)


def slices(
    start: datetime, end: datetime, size: timedelta = SLICE
) -> list[tuple[datetime, datetime]]:
    """[start, end) cut into consecutive ranges of at most `size`, oldest first."""
    cuts: list[tuple[datetime, datetime]] = []
    while start < end:
        cuts.append((start, min(start + size, end)))
        start += size
    return cuts


class Verdict(StrEnum):
    """What a run does with one listed event."""

    MISSING = "missing"  # never recorded: record it, publish it
    STUCK = "stuck"  # recorded, unfinished for longer than a message takes: publish again
    IN_FLIGHT = "in_flight"  # recorded a moment ago, unfinished: its message is on its way
    DONE = "done"  # finished (applied, stale, ignored or failed): nothing to do
    OTHER_TYPE = "other_type"  # not a handled type (DR ignored the filter): left alone


PUBLISHED_VERDICTS = frozenset({Verdict.MISSING, Verdict.STUCK})


@dataclass(frozen=True)
class Known:
    """What webhook_events says of a listed event."""

    outcome: Outcome
    received_at: datetime


def verdict(
    event_type: str, known: Known | None, *, now: datetime, stuck_after: timedelta
) -> Verdict:
    """Whether a listed event must be published."""
    if event_type not in HANDLED_EVENTS:
        return Verdict.OTHER_TYPE
    if known is None:
        return Verdict.MISSING
    if known.outcome in FINAL_OUTCOMES:
        return Verdict.DONE
    # The sweeper's threshold: younger than this, the event's message is most likely
    # still queued, and another copy would only be a duplicate.
    return Verdict.STUCK if now - known.received_at >= stuck_after else Verdict.IN_FLIGHT


def next_checkpoint(current: datetime | None, listed: Iterable[datetime]) -> datetime | None:
    """The checkpoint after a slice was listed and published in full: the newest event
    seen, never moving back. (Moved after each complete slice only: DR does not state its
    sort order, so no earlier point proves that nothing older is still to come.)"""
    newest = max(listed, default=None)
    if newest is None:
        return current
    return newest if current is None or newest > current else current


@dataclass(frozen=True)
class Drift:
    """An order whose refunded amount differs from DR's."""

    order_id: str
    currency: str | None
    ours: Decimal
    # None: DR does not know the order (a key for the other mode, or a deleted order).
    dr: Decimal | None


def drift(order_id: str, currency: str | None, ours: Decimal, dr: DROrder | None) -> Drift | None:
    """A Drift when our refundedAmount and DR's order figure differ, else None.

    An Order without `refundedAmount` has refunded nothing.
    """
    if dr is None:
        return Drift(order_id, currency, ours, None)
    theirs = dr.refunded_amount if dr.refunded_amount is not None else Decimal(0)
    return None if theirs == ours else Drift(order_id, currency, ours, theirs)


# ---------------------------------------------------------------------------------------
# The run


@dataclass
class Summary:
    """What one run did (or, dry, would do)."""

    window: Window
    checkpoint_before: datetime | None
    checkpoint_after: datetime | None
    dry_run: bool = False
    listed: int = 0
    done: int = 0
    in_flight: int = 0
    other_types: int = 0
    published: int = 0
    api_calls: int = 0

    def line(self) -> str:
        """The summary printed by `refundsync reconcile`."""
        verb = "would_publish" if self.dry_run else "published"
        return (
            f"listed={self.listed} already_done={self.done} in_flight={self.in_flight}"
            f" other_types={self.other_types} {verb}={self.published}"
            f" window={iso(self.window.start)}..{iso(self.window.end)}"
            f" checkpoint={iso(self.checkpoint_after) or 'none'}"
            f" api_calls={self.api_calls}"
        )


def client_for(settings: Settings) -> DRClient:
    """A DR API client for these settings; the caller checked that the key is set."""
    if settings.dr_api_key is None:
        raise DRApiError("DR_API_KEY is not set")
    return DRClient(settings.dr_api_base_url, settings.dr_api_key.get_secret_value())


def log_status(settings: Settings) -> None:
    """One line at start saying whether reconciliation runs here (never the key)."""
    if settings.dr_api_key is None:
        log.info("reconcile.disabled", extra={"reason": "DR_API_KEY not set"})
        return
    log.info(
        "reconcile.enabled",
        extra={
            "base_url": settings.dr_api_base_url,
            "interval_s": settings.reconcile_interval_seconds,
            "overlap_s": settings.reconcile_overlap_seconds,
        },
    )


def _now() -> datetime:
    return datetime.now(UTC)


@contextmanager
def exclusive(engine: Engine) -> Iterator[bool]:
    """Hold the reconcile advisory lock for the block, if no other run holds it.

    A session lock, on a connection kept for the whole run: if the process dies, Postgres
    ends the session and the lock with it.
    """
    if is_sqlite(engine):
        # The standalone mode: one worker, and beat schedules one run at a time.
        yield True
        return
    with engine.connect() as conn:
        got = bool(conn.execute(select(func.pg_try_advisory_lock(LOCK_KEY))).scalar_one())
        conn.commit()
        try:
            yield got
        finally:
            if got:
                _unlock(conn)


def _unlock(conn: Connection) -> None:
    try:
        conn.execute(select(func.pg_advisory_unlock(LOCK_KEY)))
        conn.commit()
    except sa_exc.SQLAlchemyError:
        # A session that cannot unlock is broken; it must not go back to the pool still
        # holding the lock. Closing it ends the session, and the lock with it.
        with suppress(sa_exc.SQLAlchemyError):
            conn.invalidate()


def run(
    settings: Settings,
    engine: Engine,
    client: DRClient,
    publish: Publish,
    *,
    since: datetime | None = None,
    dry_run: bool = False,
    clock: Callable[[], datetime] = _now,
) -> Summary | None:
    """One reconcile run; None if another run holds the lock (this one did nothing).

    A dry run lists and decides, and records, publishes and moves nothing.
    Raises DRApiError (and database or broker errors) with the checkpoint where the last
    complete slice left it.
    """
    if dry_run:
        return _run(settings, engine, client, publish, since, dry_run, clock)
    with exclusive(engine) as got:
        if not got:
            log.info("reconcile.busy", extra={"reason": "another reconcile is running"})
            return None
        return _run(settings, engine, client, publish, since, dry_run, clock)


def _run(
    settings: Settings,
    engine: Engine,
    client: DRClient,
    publish: Publish,
    since: datetime | None,
    dry_run: bool,
    clock: Callable[[], datetime],
) -> Summary:
    checkpoint = load_checkpoint(engine)
    window = plan_window(
        checkpoint=checkpoint,
        since=since,
        now=clock(),
        overlap=timedelta(seconds=settings.reconcile_overlap_seconds),
    )
    if window.lost_from is not None:
        log.warning(
            "reconcile.beyond_retention",
            extra={
                "lost_from": iso(window.lost_from),
                "lost_until": iso(window.start),
                "reason": "older than DR's 30 days of events; not recoverable from DR",
            },
        )
    summary = Summary(window, checkpoint, checkpoint, dry_run=dry_run)
    log.info(
        "reconcile.start",
        extra={
            "window_start": iso(window.start),
            "window_end": iso(window.end),
            "checkpoint": iso(checkpoint),
            "dry_run": dry_run,
        },
    )
    calls_before = client.calls
    stuck_after = timedelta(seconds=settings.stuck_after_seconds)
    try:
        for start, end in slices(window.start, window.end):
            listed: list[datetime] = []
            pages = client.list_events(types=RECONCILED_TYPES, created_gte=start, created_lt=end)
            for page in pages:
                _reconcile_page(engine, page, summary, publish, stuck_after, clock)
                listed.extend(event.created_time for event in page.events)
            position = next_checkpoint(summary.checkpoint_after, listed)
            if not dry_run and position is not None and position != summary.checkpoint_after:
                summary.checkpoint_after = advance_checkpoint(engine, position)
    finally:
        summary.api_calls = client.calls - calls_before
    log.info(
        "reconcile.done",
        extra={
            "listed": summary.listed,
            "already_done": summary.done,
            "in_flight": summary.in_flight,
            "other_types": summary.other_types,
            "published": summary.published,
            "checkpoint": iso(summary.checkpoint_after),
            "api_calls": summary.api_calls,
            "dry_run": dry_run,
        },
    )
    return summary


def _reconcile_page(
    engine: Engine,
    page: EventPage,
    summary: Summary,
    publish: Publish,
    stuck_after: timedelta,
    clock: Callable[[], datetime],
) -> None:
    now = clock()
    known = known_events(engine, [event.id for event in page.events])
    chosen: list[tuple[ListedEvent, Verdict]] = []
    for event in page.events:
        found = verdict(event.type, known.get(event.id), now=now, stuck_after=stuck_after)
        summary.listed += 1
        if found is Verdict.DONE:
            summary.done += 1
        elif found is Verdict.IN_FLIGHT:
            summary.in_flight += 1
        elif found is Verdict.OTHER_TYPE:
            summary.other_types += 1
        else:
            chosen.append((event, found))
    if summary.dry_run:
        summary.published += len(chosen)
        return
    # Recorded before publishing: a message the broker then loses is found unfinished by
    # the sweeper, and a run right after this one sees the event in flight, not missing.
    mine = record_missing(
        engine, [event for event, found in chosen if found is Verdict.MISSING], now
    )
    for event, found in chosen:
        if found is Verdict.MISSING and event.id not in mine:
            # A webhook copy got it recorded between the read above and the insert.
            summary.in_flight += 1
            continue
        publish(event.body, event.id, event.type, now)
        PUBLISHED.inc()
        summary.published += 1
        log.info(
            "reconcile.published",
            extra={
                "event_id": event.id,
                "event_type": event.type,
                "created_time": iso(event.created_time),
                "reason": found.value,
            },
        )


def known_events(engine: Engine, ids: Sequence[str]) -> dict[str, Known]:
    """The recorded outcome and arrival of those of `ids` that webhook_events holds."""
    if not ids:
        return {}
    query = select(webhook_events.c.id, webhook_events.c.outcome, webhook_events.c.received_at)
    with engine.connect() as conn:
        rows = conn.execute(query.where(webhook_events.c.id.in_(list(ids))))
        return {row.id: Known(Outcome(row.outcome), row.received_at) for row in rows}


def record_missing(engine: Engine, events: Sequence[ListedEvent], now: datetime) -> set[str]:
    """Record never-seen events as queued, source 'reconcile'; the ids this run must publish.

    No copy has reached a worker yet, so `deliveries` and `attempts` start at 0. An id that
    someone else recorded first is left out: its copy is already on its way.
    """
    if not events:
        return set()
    try:
        with transaction(engine) as conn:
            return _insert_placeholders(conn, events, now)
    except sa_exc.DataError:
        pass
    # Postgres refused one payload (e.g. a \u0000 in a string): record the others one by
    # one. A refused one is published unrecorded; its worker records it as failed.
    ids: set[str] = set()
    for event in events:
        try:
            with transaction(engine) as conn:
                ids |= _insert_placeholders(conn, [event], now)
        except sa_exc.DataError:
            ids.add(event.id)
    return ids


def _insert_placeholders(
    conn: Connection, events: Sequence[ListedEvent], now: datetime
) -> set[str]:
    rows = [
        {
            "id": event.id,
            "type": event.type,
            "created_time": event.created_time,
            "live_mode": event.live_mode,
            "payload": payload_value(conn.dialect.name, literal(event.body, Text)),
            "outcome": Outcome.QUEUED.value,
            "deliveries": 0,
            "attempts": 0,
            "received_at": now,
            "source": "reconcile",
        }
        for event in events
    ]
    statement = (
        insert_for(conn, webhook_events)
        .values(rows)
        .on_conflict_do_nothing(index_elements=[webhook_events.c.id])
        .returning(webhook_events.c.id)
    )
    return set(conn.execute(statement).scalars())


def load_checkpoint(engine: Engine) -> datetime | None:
    """The createdTime up to which events have been listed and published, if any."""
    with engine.connect() as conn:
        return conn.execute(
            select(reconcile_checkpoints.c.position).where(
                reconcile_checkpoints.c.name == CHECKPOINT
            )
        ).scalar_one_or_none()


def advance_checkpoint(engine: Engine, position: datetime) -> datetime:
    """Move the checkpoint forward to `position` (never back); returns where it is."""
    with transaction(engine) as conn:
        values = insert_for(conn, reconcile_checkpoints).values(name=CHECKPOINT, position=position)
        stored_position, new_position = reconcile_checkpoints.c.position, values.excluded.position
        upsert = values.on_conflict_do_update(
            index_elements=[reconcile_checkpoints.c.name],
            set_={
                "position": case(
                    (stored_position > new_position, stored_position), else_=new_position
                ),
                "updated_at": func.now(),
            },
        ).returning(reconcile_checkpoints.c.position)
        stored: datetime = conn.execute(upsert).scalar_one()
    return stored


def run_scheduled(settings: Settings, engine: Engine, publish: Publish) -> int:
    """The beat task's run: how many events it published (0 when it could not run)."""
    if settings.dr_api_key is None:
        log.warning("reconcile.skipped", extra={"reason": "DR_API_KEY not set on this worker"})
        return 0
    try:
        with client_for(settings) as client:
            summary = run(settings, engine, client, publish)
    except DRApiError as exc:
        # The next tick tries again from the same checkpoint; nothing is lost by waiting.
        log.warning("reconcile.failed", extra={"error": str(exc)})
        return 0
    return summary.published if summary else 0


# ---------------------------------------------------------------------------------------
# Drift check


@dataclass(frozen=True)
class DriftReport:
    """The orders checked against DR and those that differ."""

    checked: int
    mismatches: tuple[Drift, ...]
    api_calls: int


def check_orders(engine: Engine, client: DRClient, *, since: datetime, limit: int) -> DriftReport:
    """Compare refundedAmount with DR's `GET /orders/{id}` for orders changed since `since`
    (the most recently changed first, at most `limit`: one DR call each)."""
    with engine.connect() as conn:
        ids = conn.execute(
            select(orders.c.id)
            .where(orders.c.updated_at >= since)
            .order_by(orders.c.updated_at.desc(), orders.c.id)
            .limit(limit)
        ).scalars()
        ours: list[tuple[str, str | None, Decimal]] = []
        for order_id in ids.all():
            loaded = load_order(conn, order_id)
            if loaded is not None:
                state = loaded[0]
                ours.append((order_id, state.currency, refunded_amount(state)))
    calls_before = client.calls
    found = []
    for order_id, currency, amount in ours:
        mismatch = drift(order_id, currency, amount, client.get_order(order_id))
        if mismatch is not None:
            found.append(mismatch)
            log.warning(
                "reconcile.drift",
                extra={
                    "order_id": order_id,
                    "currency": currency,
                    "refunded_amount": str(amount),
                    "dr_refunded_amount": None if mismatch.dr is None else str(mismatch.dr),
                },
            )
    DRIFT_ORDERS.set(len(found))
    return DriftReport(len(ours), tuple(found), client.calls - calls_before)


def write_drift_metric(path: Path, mismatches: int) -> None:
    """Write the drift gauge in Prometheus text format (node_exporter's textfile
    collector), for a check run by cron rather than inside a scraped process."""
    registry = CollectorRegistry()
    Gauge(_DRIFT_NAME, _DRIFT_HELP, registry=registry).set(mismatches)
    write_to_textfile(str(path), registry)
