"""The worker's consumer: Celery's, with events.apply requests sent to the pool together
(worker.batching) and task events sent in batches.

Celery buffers task events (`task-received`, `-started`, `-succeeded`, ...) and publishes
the buffer on the next turn of the event loop, which under load is one Redis round trip
(and one new redis-py client) for every event or two: almost half of the worker main
process's time at 200 events/s. Here the buffer waits up to EVENT_FLUSH_S, or until
Celery's own size limit flushes it, so one publish carries many events. Flower shows a
task that much later; nothing else reads these events.
"""

from __future__ import annotations

import time
from contextlib import suppress
from typing import Any

from celery.exceptions import TaskRevokedError
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.request import Request

from worker.queue.contract import APPLY_TASK

# How long a task event may wait before it is published.
EVENT_FLUSH_S = 0.1


class Consumer(CeleryConsumer):
    # When the scheduled flush is due (0: none is scheduled).
    _flush_due = 0.0

    def __init__(self, on_task_request: Any, *args: Any, **kwargs: Any) -> None:
        # Here, not at import: batching loads the worker's settings.
        from worker import batching

        def handle(request: Request) -> None:
            if request.name != APPLY_TASK or not batching.applies(self.pool):
                on_task_request(request)
                return
            # A revoked request was acknowledged and reported when it was found revoked.
            with suppress(TaskRevokedError):
                batching.submit(request, self.pool)

        super().__init__(handle, *args, **kwargs)

    def on_send_event_buffered(self) -> None:
        if self.hub is None:
            return
        now = time.monotonic()
        # A flush is on its way, unless it is long overdue: a timer lost with the event
        # loop must not leave events in the buffer until Celery's size limit is reached.
        if self._flush_due and now < self._flush_due + 10 * EVENT_FLUSH_S:
            return
        self._flush_due = now + EVENT_FLUSH_S
        self.hub.call_later(EVENT_FLUSH_S, self._flush_buffered_events)

    def _flush_buffered_events(self) -> None:
        self._flush_due = 0.0
        self._flush_events()

    def stop(self) -> None:
        # The worker is stopping and takes no more messages: those waiting for a pool
        # process go back while the connection is still there to acknowledge them.
        from worker import batching

        batching.hand_back_waiting(self.pool)
        super().stop()

    def on_close(self) -> None:
        # As Celery drops its reserved requests with the connection they came on.
        from worker import batching

        batching.forget_waiting(self.pool)
        super().on_close()

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        # The last events of a stopping worker are not left in the buffer.
        if self._flush_due:
            self._flush_buffered_events()
        super().shutdown(*args, **kwargs)
