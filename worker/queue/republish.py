"""Publishing events through the normal events.apply path from inside the service: stored
ones again (sweeper, replay), and ones found only in DR's Events API (reconciliation).
Sealed like the ingest's messages (worker.queue.contract): the worker applies nothing
else."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from celery import Celery

from models.ledger import StoredEvent
from worker.queue.contract import (
    APPLY_TASK,
    NOTIFY_TASK,
    apply_args,
    apply_options,
    notify_options,
)


@dataclass(frozen=True)
class Sender:
    """Sends events.apply messages with `app`, sealed with `key`, saying they come from
    `source` (`sweeper`, `replay`, `reconcile`)."""

    app: Celery
    key: bytes
    queue: str
    source: str

    def __call__(self, body: str, event_id: str, event_type: str, received_at: datetime) -> None:
        """Queue one event as the ingest queues a webhook: the same message."""
        self.app.send_task(
            APPLY_TASK,
            args=apply_args(self.key, body, received_at.isoformat(), self.source),
            queue=self.queue,
            **apply_options(event_id, event_type),
        )

    def stored(self, events: Iterable[StoredEvent]) -> int:
        """Queue each stored payload again; returns how many were queued."""
        count = 0
        for event in events:
            self(event.payload, event.id, event.type, event.received_at)
            count += 1
        return count


# Orders per notify.deliver message: one task leases and POSTs them together.
ANNOUNCE_BATCH = 50


def announce(
    app: Celery, queue: str, newest: Mapping[str, int], countdown: float | None = None
) -> None:
    """Queue notify.deliver messages for these orders (each with the newest version that
    announced it), ANNOUNCE_BATCH orders to a message."""
    changes = sorted(newest.items())
    for start in range(0, len(changes), ANNOUNCE_BATCH):
        batch = changes[start : start + ANNOUNCE_BATCH]
        app.send_task(
            NOTIFY_TASK,
            args=[[list(change) for change in batch]],
            queue=queue,
            countdown=countdown,
            **notify_options(batch),
        )
