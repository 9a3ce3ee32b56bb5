"""A burst queued before a worker starts: its pool processes apply the events several to a
transaction (worker.pool), with every outcome what it would be one event at a time."""

from __future__ import annotations

import json
import os
import random
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import redis as redis_client
from sqlalchemy import Engine, text

from tests import deadlines, eventgen, factories, support
from tests.support import EventTap


@dataclass
class Rig:
    """A private broker on the session's database, and the workers a test starts on them."""

    db_url: str
    redis: support.RedisServer
    engine: Engine
    env: dict[str, str]
    workers: list[support.Process] = field(default_factory=list)

    def worker(self, name: str, concurrency: int) -> support.Process:
        process = support.start_worker(self.env, name, concurrency)
        self.workers.append(process)
        return process


@pytest.fixture
def rig(database: support.Database) -> Iterator[Rig]:
    redis = support.RedisServer().start()
    rig = Rig(
        database.url,
        redis,
        support.engine_for(database.url),
        support.service_env(database.url, redis.url),
    )
    try:
        yield rig
    finally:
        for process in rig.workers:
            process.stop()
        rig.engine.dispose()
        redis.cleanup()


def _refund(order_id: str, amount: Any) -> dict[str, Any]:
    return factories.refund_event(order_id, amount=amount)


def test_a_burst_is_applied_together_as_it_would_be_alone(rig: Rig) -> None:
    rng = random.Random(11)
    prefix = f"bt-{uuid.uuid4().hex[:8]}"
    valid = [event for n in range(40) for event in eventgen.order_history(rng, f"{prefix}-{n}", 10)]
    invalid = _refund(f"{prefix}-invalid", "not a number")
    unhandled = {**_refund(f"{prefix}-other", 1), "type": "order.accepted"}
    # Postgres refuses the payload itself: the transaction it shares with others fails,
    # and each of them is then applied on its own.
    refused = _refund(f"{prefix}-nul", 1)
    refused["data"]["object"]["reason"] = "nul \u0000 here"
    twice = valid[::37]
    bodies: list[bytes] = []
    for n, event in enumerate(valid):
        bodies.append(json.dumps(event).encode())
        if event in twice:
            # A second copy right behind the first: in the same batch, as often as not.
            bodies.append(json.dumps(event).encode())
        if n == 100:
            bodies += [json.dumps(e).encode() for e in (invalid, unhandled, refused)]

    batch_limit = support.python_json("from worker.app import BATCH_LIMIT as b; print(b)", rig.env)
    support.publish_all(rig.redis.url, rig.db_url, bodies)
    rig.worker("bt", 2)
    special = [invalid["id"], unhandled["id"], refused["id"]]
    ids = [str(event["id"]) for event in valid]
    outcomes = support.wait_finished(rig.engine, ids + special, timeout=deadlines.APPLY_S)

    assert {outcomes[i] for i in ids} <= {"applied", "stale", "ignored"}
    assert outcomes[invalid["id"]] == "failed"
    assert outcomes[unhandled["id"]] == "ignored"
    assert outcomes[refused["id"]] == "failed"
    tally = support.tally(rig.engine, ids)
    assert (tally.lost, tally.doubled, tally.failed) == (0, 0, 0)
    assert tally.suppressed == len(twice)
    expected = eventgen.expected_summaries(valid)
    assert support.summaries(rig.engine, list(expected)) == expected

    with rig.engine.connect() as conn:
        # Rows written by one transaction share its id (xmin).
        per_transaction = Counter(
            row.xid
            for row in conn.execute(
                text("SELECT xmin::text AS xid FROM webhook_events WHERE id = ANY(:ids)"),
                {"ids": ids},
            )
        )
        errors: dict[str, str] = {
            row.id: row.error
            for row in conn.execute(
                text("SELECT id, error FROM webhook_events WHERE id = ANY(:ids)"),
                {"ids": [invalid["id"], refused["id"]]},
            )
        }
    assert max(per_transaction.values()) > 1, "no two events shared a transaction"
    assert max(per_transaction.values()) <= batch_limit
    assert len(per_transaction) < len(ids) / 2
    assert "amount" in errors[invalid["id"]]
    assert errors[refused["id"]]


def test_a_warm_shutdown_mid_burst_leaves_every_waiting_message_on_the_queue(
    rig: Rig,
) -> None:
    rng = random.Random(12)
    prefix = f"bs-{uuid.uuid4().hex[:8]}"
    events = [
        event for n in range(300) for event in eventgen.order_history(rng, f"{prefix}-{n}", 10)
    ]
    ids = [str(event["id"]) for event in events]
    support.publish_all(rig.redis.url, rig.db_url, [json.dumps(event).encode() for event in events])
    with psycopg.connect(rig.db_url) as blocker:
        # Both pool processes are held inside a job, waiting on the orders, while the
        # rest of what the worker holds waits for them.
        blocker.execute("LOCK TABLE orders IN EXCLUSIVE MODE")
        worker = rig.worker("bs1", 2)
        support.wait_for(
            lambda: _waiting_on_locks(rig.db_url) >= 2,
            timeout=deadlines.APPLY_S,
            what="both pool processes inside a job",
        )
        # Celery's warm shutdown: the worker takes no more messages; those waiting go
        # back to the queue, then the jobs in the pool finish (once the lock is gone).
        os.kill(worker.proc.pid, signal.SIGTERM)
        worker.wait_for_log('"batch.handed_back"', timeout=deadlines.APPLY_S)
    worker.proc.wait(timeout=60)
    worker.stop()
    assert int(rig.redis.cli("HLEN", "unacked")) == 0
    finished = {i for i, o in support.outcomes(rig.engine, ids).items() if o != "queued"}
    assert len(finished) < len(ids), "the burst drained before the shutdown"
    assert finished | set(_queued(rig.redis)) == set(ids)

    worker = rig.worker("bs2", 2)
    # Well inside the visibility timeout: nothing waits for it to come back.
    support.wait_finished(rig.engine, ids, timeout=deadlines.ONE_TASK_S)
    tally = support.tally(rig.engine, ids)
    assert (tally.lost, tally.doubled, tally.failed) == (0, 0, 0)
    lost = _lost_attempts(rig.engine, ids)
    # Not one was counted as an attempt that died with its worker: the only messages that
    # come back redelivered are those of jobs that finished as the worker stopped, whose
    # acknowledgement Celery no longer sent, and they find their events applied.
    assert lost == 0
    expected = eventgen.expected_summaries(events)
    assert support.summaries(rig.engine, list(expected)) == expected


def _waiting_on_locks(url: str) -> int:
    """Worker transactions of this database blocked on a lock."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'refundsync' AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def _lost_attempts(engine: Engine, ids: list[str]) -> int:
    """Attempts of these events counted as having died with their worker."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT coalesce(sum(lost_attempts), 0) FROM webhook_events"
                    " WHERE id = ANY(:ids)"
                ),
                {"ids": ids},
            ).scalar_one()
        )


def _queued(redis: support.RedisServer) -> dict[str, bool]:
    """The event ids of the messages on the queue (the task's labels carry them), and
    whether each is marked redelivered."""
    client = redis_client.Redis.from_url(redis.url)
    try:
        found = {}
        for raw in client.lrange("refundsync", 0, -1):
            message = json.loads(raw)
            event_id = str(message["headers"]["argsrepr"]).split("'")[1]
            found[event_id] = bool(message["properties"]["delivery_info"].get("redelivered"))
        return found
    finally:
        client.close()


def test_a_job_past_its_budget_hands_back_the_rest_untried(rig: Rig) -> None:
    # Every order is locked away: the transaction together times out on its lock, and so
    # does each message tried alone afterwards, until the job's budget for them is spent.
    rng = random.Random(13)
    prefix = f"bd-{uuid.uuid4().hex[:8]}"
    events = eventgen.order_history(rng, f"{prefix}-0", 9)[:9]
    ids = [str(event["id"]) for event in events]
    tap = EventTap(rig.redis.url)
    tap.start()
    try:
        support.publish_all(
            rig.redis.url, rig.db_url, [json.dumps(event).encode() for event in events]
        )
        with psycopg.connect(rig.db_url) as blocker:
            blocker.execute("LOCK TABLE orders IN EXCLUSIVE MODE")
            worker = rig.worker("bd", 1)
            worker.wait_for_log("not tried: the messages sent with it took too long", 90)
        tries = support.wait_finished(rig.engine, ids, timeout=deadlines.APPLY_S)
        # A message handed back untried comes again under its task id with its retries
        # as they were: a deferral spends none of the event's retry budget.
        received: dict[str, list[int]] = {}
        for _, batch in tap.publishes:
            for event in batch:
                if event["type"] == "task-received":
                    received.setdefault(str(event["uuid"]), []).append(int(event["retries"]))
        assert any(retries[:2] == [0, 0] for retries in received.values()), received
        assert set(tries.values()) <= {"applied", "stale", "ignored"}
        # No job was killed at its time limit (Celery logs each such kill), and no attempt
        # died with its worker.
        assert "Hard time limit" not in worker.log()
        assert _lost_attempts(rig.engine, ids) == 0
        expected = eventgen.expected_summaries(events)
        assert support.summaries(rig.engine, list(expected)) == expected
    finally:
        tap.stop()


_ACTIVE = """
import json
from worker.app import app
found = app.control.inspect(timeout=2).active() or {}
print(json.dumps([task["id"] for tasks in found.values() for task in tasks]))
"""

_TERMINATE = """
import json, sys
from worker.app import app
app.control.revoke(sys.argv[1], terminate=True)
print(json.dumps(True))
"""


def test_terminating_one_task_puts_the_others_of_its_job_back(rig: Rig) -> None:
    # Revoking a task with terminate kills the pool process running it, and with it the
    # job it shares with others; those others must go back on the queue, not be taken for
    # revoked too (acknowledged, and their events lost).
    rng = random.Random(14)
    prefix = f"bk-{uuid.uuid4().hex[:8]}"
    events = [event for n in range(4) for event in eventgen.order_history(rng, f"{prefix}-{n}", 8)]
    ids = [str(event["id"]) for event in events]
    support.publish_all(rig.redis.url, rig.db_url, [json.dumps(event).encode() for event in events])
    with psycopg.connect(rig.db_url) as blocker:
        # Every job waits on the orders, long enough to be caught running.
        blocker.execute("LOCK TABLE orders IN EXCLUSIVE MODE")
        rig.worker("bk", 1)
        active: list[str] = []

        def together() -> bool:
            active[:] = support.python_json(_ACTIVE, rig.env)
            return len(active) > 1

        support.wait_for(together, timeout=deadlines.APPLY_S, what="a job of several tasks running")
        victim = active[0]
        assert support.python_json(_TERMINATE.replace("sys.argv[1]", repr(victim)), rig.env)
        # The job's process is gone: no task of the job is running any more.
        support.wait_for(
            lambda: victim not in support.python_json(_ACTIVE, rig.env),
            timeout=deadlines.ONE_TASK_S,
            what="the job terminated",
        )

    # Only the terminated task's event is missing: it was revoked, as asked.
    def all_but_one() -> bool:
        return len(_finished(rig.engine, ids)) >= len(ids) - 1

    support.wait_for(all_but_one, timeout=deadlines.APPLY_S, what="every other event finished")
    finished = _finished(rig.engine, ids)
    assert len(finished) == len(ids) - 1
    tally = support.tally(rig.engine, finished)
    assert (tally.lost, tally.doubled, tally.failed) == (0, 0, 0)


def _finished(engine: Engine, ids: list[str]) -> list[str]:
    return [i for i, outcome in support.outcomes(engine, ids).items() if outcome != "queued"]
