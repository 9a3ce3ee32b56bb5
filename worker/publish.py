"""Publishing events through the normal events.apply path: stored ones again (sweeper,
replay), and ones found only in DR's Events API (reconciliation)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from models.messages import APPLY_TASK, apply_options
from models.rules import iso
from models.store import StoredEvent
from worker.app import app, settings


def republish(events: Iterable[StoredEvent], source: str) -> int:
    """Queue each stored payload for events.apply; returns how many were queued."""
    count = 0
    for event in events:
        app.send_task(
            APPLY_TASK,
            args=[event.payload, iso(event.received_at), source],
            queue=settings.queue,
            **apply_options(event.id, event.type),
        )
        count += 1
    return count


def publish_reconciled(body: str, event_id: str, event_type: str, received_at: datetime) -> None:
    """Queue one event found by reconciliation, as the ingest queues a webhook: the same
    message, with `source` "reconcile"."""
    app.send_task(
        APPLY_TASK,
        args=[body, iso(received_at), "reconcile"],
        queue=settings.queue,
        **apply_options(event_id, event_type),
    )
