"""Celery tasks: thin wrappers that translate a message into one call of the unit of work."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery import Task
from celery.exceptions import Reject
from celery.utils.time import get_exponential_backoff_interval
from kombu.exceptions import OperationalError

from models import store
from models.db import transaction
from models.errors import TransientError
from models.logs import bound
from models.messages import APPLY_TASK, RECONCILE_TASK, SWEEP_TASK, apply_options
from worker import processing
from worker.app import MAX_RETRY_COUNTDOWN_S, app, settings
from worker.publish import republish
from worker.reconcile import TASK_SOFT_TIME_LIMIT_S, TASK_TIME_LIMIT_S, run_scheduled

# At most this many stuck events are republished per sweep, so one sweep stays short.
SWEEP_BATCH = 500

log = logging.getLogger("refundsync.worker")


@app.task(name=APPLY_TASK, bind=True, max_retries=None, acks_late=True)
def apply_event(
    self: Task[Any, Any],
    body: str,
    received_at: str,
    source: str = "webhook",
    counted: bool = False,
) -> str:
    """Apply one DR event (the raw webhook body) and return its outcome.

    `counted` is set on retries of a copy already counted in `deliveries`.
    """
    request = self.request
    with bound(task_id=request.id):
        return _apply_event(self, body, received_at, source, counted)


def _apply_event(
    self: Task[Any, Any], body: str, received_at: str, source: str, counted: bool
) -> str:
    request = self.request
    redelivered = bool((request.delivery_info or {}).get("redelivered"))
    try:
        result = processing.process(
            settings,
            body,
            received_at=_parse_time(received_at),
            source=source,
            # A retry or a redelivery of this same message is not another copy from DR.
            new_copy=not counted and not redelivered,
        )
    except TransientError as exc:
        event_id, event_type = exc.event_id, exc.event_type
        countdown = get_exponential_backoff_interval(
            factor=1, retries=request.retries, maximum=MAX_RETRY_COUNTDOWN_S, full_jitter=True
        )
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
            retry = self.retry(
                kwargs={"counted": counted or exc.counted},
                countdown=countdown,
                throw=False,
                **apply_options(event_id, event_type),
            )
        except (OperationalError, OSError) as publish_error:
            # The broker would not take the retry: put this very message back rather than
            # acknowledge it, so the event is not lost.
            raise Reject(str(publish_error), requeue=True) from exc
        raise retry from exc
    return result.outcome.value if result.outcome else "unrecordable"


@app.task(name=SWEEP_TASK, ignore_result=True)
def sweep_stuck_events() -> int:
    """Publish again events recorded long ago but never finished.

    Recovers a message lost between broker and worker (a Redis that lost data, a crash
    between record and acknowledgement) without waiting for DR to retry. A copy that was
    merely slow is harmless: the event row deduplicates it.
    """
    with transaction(processing.engine(settings)) as conn:
        stuck = store.stuck_events(conn, settings.stuck_after_seconds, limit=SWEEP_BATCH)
    count = republish(stuck, source="sweeper")
    if count:
        log.warning(
            "events.swept",
            extra={"count": count, "older_than_s": settings.stuck_after_seconds},
        )
    return count


@app.task(
    name=RECONCILE_TASK,
    ignore_result=True,
    # Acknowledged on receipt: a run lost with its worker is redone by the next tick, and a
    # long backfill must not be handed to a second worker when the visibility timeout ends.
    acks_late=False,
    soft_time_limit=TASK_SOFT_TIME_LIMIT_S,
    time_limit=TASK_TIME_LIMIT_S,
)
def reconcile_events() -> int:
    """Publish events DR's Events API has that were never applied (see worker.reconcile)."""
    return run_scheduled(settings, processing.engine(settings))


def _parse_time(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value).astimezone(UTC)
    except (TypeError, ValueError):
        return datetime.now(UTC)
