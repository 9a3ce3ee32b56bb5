"""The worker's consumer: Celery's, with task events sent in batches.

Celery buffers task events (`task-received`, `-started`, `-succeeded`, ...) and publishes
the buffer on the next turn of the event loop, which under load is one Redis round trip
(and one new redis-py client) for every event or two: almost half of the worker main
process's time at 200 events/s. Here the buffer waits up to EVENT_FLUSH_S, or until
Celery's own size limit flushes it, so one publish carries many events. Flower shows a
task that much later; nothing else reads these events.
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

# How long a task event may wait before it is published.
EVENT_FLUSH_S = 0.1


class Consumer(CeleryConsumer):  # type: ignore[misc]
    _flush_pending = False

    def on_send_event_buffered(self) -> None:
        if self.hub is None or self._flush_pending:
            return
        self._flush_pending = True
        self.hub.call_later(EVENT_FLUSH_S, self._flush_buffered_events)

    def _flush_buffered_events(self) -> None:
        self._flush_pending = False
        self._flush_events()

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        # The last events of a stopping worker are not left in the buffer.
        if self._flush_pending:
            self._flush_pending = False
            self._flush_events()
        super().shutdown(*args, **kwargs)
