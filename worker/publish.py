"""Publishing stored events again (sweeper, replay) through the normal events.apply path."""

from __future__ import annotations

from collections.abc import Iterable

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
