"""Delivery timing: how long a task may run, when a message a dead worker held comes back,
how long an event waits before its next attempt, and how a message is handed back untried.
Import-safe (nothing runs here), so tests derive their deadlines from the same numbers the
workers use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Signature, Task
from celery.utils.time import get_exponential_backoff_interval

from models.errors import DatabaseBusy

__all__ = [
    "BATCH_LIMIT",
    "DEFERRED",
    "EVENT_FLUSH_S",
    "JOURNAL_SWEEP_S",
    "MAX_RETRY_COUNTDOWN_S",
    "RESTORE_SCAN_S",
    "TASK_TIME_LIMIT_S",
    "VISIBILITY_TIMEOUT_S",
    "Deferral",
    "handed_back",
    "retry_countdown",
]

# A message a dead worker held is restored to the queue once it has been unacknowledged
# this long. Together with the restore scan below, a lost worker's events are back within
# about VISIBILITY_TIMEOUT_S + RESTORE_SCAN_S, well under the 5 minutes the design promises.
VISIBILITY_TIMEOUT_S = 120
# kombu scans for such messages every `unacked_restore_interval` seconds, but by default
# only on every 10th tick (100 s); scanning on every tick costs one ZRANGE per 10 s.
RESTORE_SCAN_S = 10
# Every task is far inside the visibility timeout: statements and lock waits are bounded
# (models.db) and this hard limit kills anything else.
TASK_TIME_LIMIT_S = 60
# At most this many messages go to a pool process as one job (worker.pool).
BATCH_LIMIT = 8
# How long a task event may wait in the worker before it is published (worker.pool).
EVENT_FLUSH_S = 0.1
# How often beat sweeps the ingest's journal (worker.queue.journal): an entry stays about
# this long after its event is recorded.
JOURNAL_SWEEP_S = 15
# Retry countdowns wait in the worker while their message counts as unacknowledged, so the
# longest one must stay below the visibility timeout or the message would be run twice.
MAX_RETRY_COUNTDOWN_S = 60


def retry_countdown(exc: Exception, retries: int) -> float:
    """Seconds before attempt `retries + 1`: an exponential backoff with full jitter, for a
    database that is gone or overloaded; none after a busy SQLite database, whose busy
    timeout was already the wait (another writer held it, and nothing is gone)."""
    if isinstance(exc, DatabaseBusy):
        return 0.0
    return float(
        get_exponential_backoff_interval(
            factor=1, retries=retries, maximum=MAX_RETRY_COUNTDOWN_S, full_jitter=True
        )
    )


# A field of the task's request (`self.request` in the task) naming why the pool hands its
# message back untried. Only the pool sets it; handed_back below keeps it out of the
# message published again.
DEFERRED = "refundsync_deferred"


@dataclass(frozen=True)
class Deferral:
    """The value of that field. A message's headers become request fields too, so a header
    of that name (JSON) is never taken for one: only an object the pool made is."""

    reason: str


def handed_back(task: Task[Any, Any], request: Any) -> Signature[Any]:
    """The message `request` came in, to publish again as it was.

    Celery copies a request's unknown fields into the new message's headers; the pool's
    mark must not go with it, or the copy would be handed back again, for ever."""
    again = task.signature_from_request(
        request,
        None,
        {},
        retries=request.retries,
        argsrepr=request.argsrepr,
        kwargsrepr=request.kwargsrepr,
    )
    headers = again.options.get("headers")
    if isinstance(headers, dict):
        headers.pop(DEFERRED, None)
    return again
