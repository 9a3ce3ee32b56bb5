"""Publishing events through the normal events.apply path: stored ones again (sweeper,
replay), and ones found only in DR's Events API (reconciliation). Sealed like the ingest's
messages (models.messages): the worker applies nothing else."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from models.messages import APPLY_TASK, apply_args, apply_options
from models.store import StoredEvent
from worker.app import app, settings
from worker.processing import queue_keys


def republish(events: Iterable[StoredEvent], source: str) -> int:
    """Queue each stored payload for events.apply; returns how many were queued."""
    key = queue_keys(settings).signing_key()
    count = 0
    for event in events:
        app.send_task(
            APPLY_TASK,
            args=apply_args(key, event.payload, event.received_at.isoformat(), source),
            queue=settings.queue,
            **apply_options(event.id, event.type),
        )
        count += 1
    return count


def publish_reconciled(body: str, event_id: str, event_type: str, received_at: datetime) -> None:
    """Queue one event found by reconciliation, as the ingest queues a webhook: the same
    message, with `source` "reconcile"."""
    key = queue_keys(settings).signing_key()
    app.send_task(
        APPLY_TASK,
        args=apply_args(key, body, received_at.isoformat(), "reconcile"),
        queue=settings.queue,
        **apply_options(event_id, event_type),
    )
