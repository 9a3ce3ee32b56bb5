"""Task events, which feed Flower, leave a real worker in batches and none is dropped."""

from __future__ import annotations

import json
import random
import uuid

from tests import deadlines, eventgen, support
from tests.support import EventTap
from worker.policy import EVENT_FLUSH_S

# Celery's own limit: a buffer this full is published at once.
CELERY_BUFFER_LIMIT = 24


def _task_ids(tap: EventTap, kind: str = "task-succeeded") -> set[str]:
    return {str(e["uuid"]) for _, events in tap.publishes for e in events if e["type"] == kind}


def _wait(tap: EventTap, count: int) -> None:
    support.wait_for(
        lambda: len(_task_ids(tap)) >= count,
        timeout=deadlines.APPLY_S,
        what=f"{count} task-succeeded events",
    )


def test_task_events_are_batched_and_complete(database: support.Database) -> None:
    redis = support.RedisServer().start()
    tap = EventTap(redis.url)
    tap.start()
    worker: support.Process | None = None
    engine = support.engine_for(database.url)
    try:
        worker = support.start_worker(support.service_env(database.url, redis.url), "ev", 2)
        rng = random.Random(5)
        events = [
            event
            for n in range(12)
            for event in eventgen.order_history(rng, f"ev-{uuid.uuid4().hex[:8]}-{n}", 5)
        ]
        support.publish_all(
            redis.url, database.url, [json.dumps(event).encode() for event in events]
        )
        support.wait_finished(engine, [str(event["id"]) for event in events])
        _wait(tap, len(events))

        # Monitors still see every task, by event id and type only.
        shown = " ".join(
            str(e["args"])
            for _, batch in tap.publishes
            for e in batch
            if e["type"] == "task-received"
        )
        assert all(f"'{event['id']}', '{event['type']}'" in shown for event in events)
        # Each task is reported received, started and succeeded, applied alone or together
        # with others (worker.pool).
        received = _task_ids(tap, "task-received")
        assert len(received) == len(events)
        assert _task_ids(tap, "task-started") == received == _task_ids(tap)
        # At most one publish per flush window, plus one per full buffer: one publish per
        # event loop turn (Celery's default) gives about one per task.
        times = [moment for moment, _ in tap.publishes]
        carried = sum(len(batch) for _, batch in tap.publishes)
        bound = (times[-1] - times[0]) / EVENT_FLUSH_S + carried / CELERY_BUFFER_LIMIT + 2
        assert len(tap.publishes) <= bound, (len(tap.publishes), bound, carried)
        assert len(tap.publishes) < len(events)
    finally:
        if worker is not None:
            worker.stop()
        tap.stop()
        engine.dispose()
        redis.cleanup()
