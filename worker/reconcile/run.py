"""The run of reconciliation: it only moves values between Postgres, DR's API and the
broker; what it decides is worker.reconcile.plan's."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, write_to_textfile
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy import exc as sa_exc

from models import ledger
from models.db import is_sqlite, transaction
from models.orders import changed_since, load_order
from models.payloads import iso
from models.settings import Settings
from models.summary import refunded_amount
from worker.reconcile.dr_api import DRApiError, DRClient, EventPage, ListedEvent
from worker.reconcile.plan import (
    LISTED_TYPES,
    Drift,
    Known,
    Verdict,
    Window,
    drift,
    next_checkpoint,
    plan_window,
    slices,
    verdict,
)

log = logging.getLogger("refundsync.reconcile")
CHECKPOINT = "events"
# Any constant shared by every reconciler; distinct from the migration lock.
LOCK_KEY = 0x7265_636F_6E63
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
            for event_type in LISTED_TYPES:
                pages = client.list_events(event_type, created_gte=start, created_lt=end)
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
    with engine.connect() as conn:
        found = ledger.outcomes_of(conn, ids)
    return {event_id: Known(outcome, received) for event_id, (outcome, received) in found.items()}


def record_missing(
    engine: Engine, events: Sequence[ListedEvent], now: datetime, source: str = "reconcile"
) -> set[str]:
    """Record never-seen events as queued, from `source`; the ids this run must publish.

    No copy has reached a worker yet, so `deliveries` and `attempts` start at 0. An id that
    someone else recorded first is left out: its copy is already on its way.
    """
    if not events:
        return set()
    try:
        with transaction(engine) as conn:
            return ledger.record_listed(conn, events, now, source)
    except sa_exc.DataError:
        pass
    # Postgres refused one payload (e.g. a \u0000 in a string): record the others one by
    # one. A refused one is published unrecorded; its worker records it as failed.
    ids: set[str] = set()
    for event in events:
        try:
            with transaction(engine) as conn:
                ids |= ledger.record_listed(conn, [event], now, source)
        except sa_exc.DataError:
            ids.add(event.id)
    return ids


def load_checkpoint(engine: Engine) -> datetime | None:
    """The createdTime up to which events have been listed and published, if any."""
    with engine.connect() as conn:
        return ledger.checkpoint(conn, CHECKPOINT)


def advance_checkpoint(engine: Engine, position: datetime) -> datetime:
    """Move the checkpoint forward to `position` (never back); returns where it is."""
    with transaction(engine) as conn:
        return ledger.advance_checkpoint(conn, CHECKPOINT, position)


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
        ours: list[tuple[str, str | None, Decimal]] = []
        for order_id in changed_since(conn, since, limit):
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
