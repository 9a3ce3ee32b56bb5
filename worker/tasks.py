"""Celery tasks: thin wrappers that translate a message into one call of the unit of work."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Task
from celery.exceptions import Reject, Retry

from models import feed, ledger, outbox
from models.db import transaction
from models.errors import Deferred, TransientError
from models.logs import bound
from worker import notify, processing
from worker.app import app, settings
from worker.metrics import JOURNAL_REPUBLISHED
from worker.policy import (
    DEFERRED,
    MAX_RETRY_COUNTDOWN_S,
    Deferral,
    handed_back,
    retry_countdown,
)
from worker.pool import PrivateRequest
from worker.queue import journal
from worker.queue.contract import (
    APPLY_TASK,
    JOURNAL_SWEEP_TASK,
    NOTIFY_SWEEP_TASK,
    NOTIFY_TASK,
    PENDING_CHECK_TASK,
    PURGE_TASK,
    RECONCILE_TASK,
    SWEEP_TASK,
)
from worker.queue.republish import Sender
from worker.queue.republish import announce as publish_announcements
from worker.reconcile import pending
from worker.reconcile.run import RECONCILE_SOFT_TIME_LIMIT_S, RECONCILE_TIME_LIMIT_S, run_scheduled

# At most this many stuck events are republished per sweep, so one sweep stays short.
SWEEP_BATCH = 500

log = logging.getLogger("refundsync.worker")


@app.task(name=APPLY_TASK, bind=True, max_retries=None, acks_late=True, Request=PrivateRequest)
def apply_event(
    self: Task[Any, Any],
    body: str,
    received_at: str,
    source: str = "webhook",
    seal: object = None,
    counted: object = None,
) -> str:
    """Apply one DR event (the raw webhook body) and return its outcome.

    `seal` proves the message came from refundsync (worker.queue.contract). `counted` is ignored:
    retries published by earlier versions carry it.
    """
    with bound(task_id=self.request.id):
        copy = processing.copy_of(
            self.request.delivery_info, self.request.id, body, received_at, source, seal
        )
        return _apply_event(self, copy)


def _apply_event(self: Task[Any, Any], copy: processing.Copy) -> str:
    deferred = getattr(self.request, DEFERRED, None)
    if isinstance(deferred, Deferral):
        return _defer(self, deferred.reason)
    body = copy.body
    try:
        result = processing.process(settings, copy)
        notify.announce(app, settings, [result])
    except TransientError as exc:
        return _retry(self, exc, event_id=processing.event_id_of(body))
    except Exception as exc:
        # The process edge: whatever went wrong, an event that did not finish is never
        # acknowledged. It is retried like a transient error, and fails after the limit.
        log.exception("event.unexpected_error")
        return _retry(self, exc, event_id=processing.event_id_of(body))
    return result.task_result


def _defer(task: Task[Any, Any], reason: str) -> str:
    """Queue this message again untried, its retries as they were (Celery's retry would
    count one more, and back off as for a failure)."""
    request = task.request
    exc = Deferred(reason)
    log.info("event.deferred", extra={"reason": reason})
    again = handed_back(task, request)
    try:
        again.apply_async()
    except Exception as publish_failed:  # noqa: BLE001 - whatever stopped the publish
        # Put this very message back instead, as for a retry that could not be published.
        raise Reject(str(publish_failed), requeue=True) from exc
    raise Retry(exc=exc, when=0, sig=again)


def _retry(task: Task[Any, Any], exc: Exception, *, event_id: str | None) -> str:
    """Retry with backoff; after the retry limit, record the event as failed."""
    request = task.request
    if request.retries >= settings.max_retries and event_id:
        reason = f"gave up after {request.retries} retries; last error: {exc}"
        try:
            return processing.fail(settings, event_id, reason).outcome or "failed"
        except TransientError:
            pass  # not even the failure can be recorded: keep retrying, never drop it
    countdown = retry_countdown(exc, request.retries)
    log.info(
        "event.retry",
        extra={
            "event_id": event_id,
            "retries": request.retries,
            "countdown_s": round(countdown, 1),
            "error": str(exc),
        },
    )
    try:
        retry = task.retry(
            kwargs={},
            countdown=countdown,
            throw=False,
            # The monitor labels travel with the retry; the arguments hold the payload.
            argsrepr=request.argsrepr,
            kwargsrepr=request.kwargsrepr,
        )
    except Reject as publish_failed:
        # Celery could not publish the retry and would drop this message: put this very
        # message back instead, so the event is not lost.
        raise Reject(publish_failed.reason, requeue=True) from exc
    raise retry from exc


@app.task(name=SWEEP_TASK, ignore_result=True)
def sweep_stuck_events() -> int:
    """Publish again events recorded long ago but never finished.

    Recovers a message lost between broker and worker (a Redis that lost data, a crash
    between record and acknowledgement) without waiting for DR to retry. A copy that was
    merely slow is harmless: the event row deduplicates it.
    """
    with transaction(processing.engine(settings)) as conn:
        stuck = ledger.stuck_events(conn, settings.stuck_after_seconds, limit=SWEEP_BATCH)
    count = sender("sweeper").stored(stuck)
    if count:
        log.warning(
            "events.swept",
            extra={"count": count, "older_than_s": settings.stuck_after_seconds},
        )
    return count


@app.task(name=JOURNAL_SWEEP_TASK, ignore_result=True)
def sweep_journal() -> int:
    """Forget the journal entries of events Postgres recorded; publish again the ones it
    never recorded (worker.queue.journal)."""
    engine = processing.engine(settings)
    publish = sender("journal")

    def recorded(event_ids: list[str]) -> set[str]:
        with engine.connect() as conn:
            return ledger.recorded_ids(conn, event_ids)

    def republish(entry: journal.Entry) -> None:
        received_at = datetime.fromisoformat(entry.received_at)
        publish(entry.body, entry.event_id, entry.event_type, received_at)

    with app.connection_for_write() as connection:
        swept = journal.locked_sweep(
            connection.default_channel.client,
            journal.JournalKeys(settings.queue),
            recorded,
            republish,
            lambda: time.time() * 1000,
            settings.journal_grace_seconds,
        )
    if swept is None:
        log.info("journal.sweep_skipped", extra={"reason": "another sweep is running"})
        return 0
    if swept.republished or swept.unreadable:
        JOURNAL_REPUBLISHED.inc(swept.republished)
        log.warning(
            "journal.republished",
            extra={
                "count": swept.republished,
                "unreadable": swept.unreadable,
                "older_than_s": settings.journal_grace_seconds,
            },
        )
    return swept.republished


# The options of beat's runs against DR's API. Acknowledged on receipt: a run lost with its
# worker is redone by the next tick, and a long backfill must not be handed to a second
# worker when the visibility timeout ends.
_DR_RUN: dict[str, Any] = {
    "ignore_result": True,
    "acks_late": False,
    "soft_time_limit": RECONCILE_SOFT_TIME_LIMIT_S,
    "time_limit": RECONCILE_TIME_LIMIT_S,
}


@app.task(name=RECONCILE_TASK, **_DR_RUN)
def reconcile_events() -> int:
    """Publish events DR's Events API has that were never applied (see worker.reconcile)."""
    return run_scheduled(settings, processing.engine(settings), sender("reconcile"))


@app.task(name=PENDING_CHECK_TASK, **_DR_RUN)
def check_pending_refunds() -> int:
    """Ask DR about refunds pending too long (see worker.reconcile.pending)."""
    return pending.run_scheduled(settings, processing.engine(settings), sender(pending.SOURCE))


def sender(source: str) -> Sender:
    """Publishes events.apply messages from this worker, sealed with the newest queue key."""
    return Sender(app, processing.queue_keys(settings).signing_key(), settings.queue, source)


@app.task(
    name=NOTIFY_TASK,
    ignore_result=True,
    # Taken on receipt: a delivery lost with its worker is redone by the sweep once its
    # lease has ended (a copy Redis handed to a second worker would find the order leased).
    acks_late=False,
    soft_time_limit=notify.task_time_limit(settings) - 5,
    time_limit=notify.task_time_limit(settings),
)
def deliver_changes(changes: list[list[Any]]) -> str:
    """POST these orders' undelivered changes, each order's oldest first, to the commerce
    system (worker.notify). `changes` are the [order, version] pairs that announced it."""
    order_keys = [str(change[0]) for change in changes]
    done = notify.deliver(settings, processing.engine(settings), order_keys)
    versions = {str(change[0]): int(change[1]) for change in changes}
    if done.more:
        publish_announcements(app, settings.queue, {key: versions.get(key, 0) for key in done.more})
    for order_key, wait in done.retry_in_s.items():
        if wait <= MAX_RETRY_COUNTDOWN_S:
            # Sooner than the sweep would: a short backoff waits in the worker (longer ones
            # would outlast the visibility timeout, and are the sweep's). A moment past the
            # retry time: a head not yet due is left alone.
            publish_announcements(
                app,
                settings.queue,
                {order_key: versions.get(order_key, 0)},
                countdown=max(wait, 0.0) + 0.1,
            )
    return f"delivered={done.delivered}"


@app.task(name=NOTIFY_SWEEP_TASK, ignore_result=True)
def sweep_deliveries() -> int:
    """Publish the deliveries that are due: retries whose time came, announcements lost."""
    if settings.notify_url is None:
        return 0
    now = datetime.now(UTC)
    with transaction(processing.engine(settings)) as conn:
        due = outbox.due_heads(
            conn, now, notify.announce_after_seconds(settings), limit=SWEEP_BATCH
        )
    publish_announcements(app, settings.queue, dict(due))
    if due:
        log.info("notify.swept", extra={"count": len(due)})
    return len(due)


# Changes removed per transaction by the retention purge.
PURGE_BATCH = 5000


@app.task(name=PURGE_TASK, ignore_result=True)
def purge_changes() -> int:
    """Remove changes older than REFUNDSYNC_CHANGES_RETENTION_DAYS, oldest first."""
    before = datetime.now(UTC) - timedelta(days=settings.changes_retention_days)
    total = 0
    while True:
        with transaction(processing.engine(settings)) as conn:
            removed = feed.purge(conn, before, PURGE_BATCH)
        total += removed
        if removed < PURGE_BATCH:
            break
    if total:
        log.info("changes.purged", extra={"count": total})
    return total
