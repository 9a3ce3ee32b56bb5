"""Fault injection on private Redis and Postgres instances: processes killed, the database
stopped, the broker restarted. Each test publishes a known event set, computes the final
state with the pure rules, and asserts it was reached with nothing lost and nothing doubled.

Each test prints a `RELIABILITY ...` line (run with `-s` to see them); docs/reliability.md
records them."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import Engine, text

from models.migrate import upgrade
from tests import deadlines, eventgen, support


@pytest.fixture(scope="module")
def cluster() -> Iterator[support.PostgresCluster]:
    pg = support.PostgresCluster().create()
    try:
        yield pg
    finally:
        pg.drop()


@dataclass
class Rig:
    """A private database and broker, and the processes a test starts against them."""

    db_url: str
    redis: support.RedisServer
    engine: Engine
    env: dict[str, str]
    processes: list[support.Process] = field(default_factory=list)

    def worker(self, name: str, concurrency: int = 2, *extra: str, **env: str) -> support.Process:
        process = support.start_worker({**self.env, **env}, name, concurrency, *extra)
        self.processes.append(process)
        return process


@pytest.fixture
def rig(cluster: support.PostgresCluster, request: pytest.FixtureRequest) -> Iterator[Rig]:
    name = f"t_{uuid.uuid4().hex[:10]}"
    admin = cluster.url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = cluster.url.rsplit("/", 1)[0] + f"/{name}"
    upgrade(db_url)
    redis = support.RedisServer(appendonly=True).start()
    rig = Rig(db_url, redis, support.engine_for(db_url), support.service_env(db_url, redis.url))
    try:
        yield rig
    finally:
        for process in rig.processes:
            process.stop(signal.SIGKILL)
        rig.engine.dispose()
        redis.cleanup()


def _events(seed: int, orders: int, per_order: int, prefix: str) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        event
        for n in range(orders)
        for event in eventgen.order_history(rng, f"{prefix}-{n}-{uuid.uuid4().hex[:6]}", per_order)
    ]


def _check(
    rig: Rig,
    events: list[dict[str, Any]],
    scenario: str,
    recovery_s: float | None = None,
    timeout: float = deadlines.BACKLOG_S,
) -> support.Tally:
    ids = [str(event["id"]) for event in events]
    support.wait_finished(rig.engine, ids, timeout=timeout)
    result = support.tally(rig.engine, ids)
    print(result.line(scenario, recovery_s))
    assert result.lost == 0
    assert result.doubled == 0
    assert result.failed == 0
    expected = eventgen.expected_summaries(events)
    assert support.summaries(rig.engine, list(expected)) == expected
    return result


def _all_finished(rig: Rig, ids: list[str]) -> bool:
    outcomes = support.outcomes(rig.engine, ids)
    return len(outcomes) == len(ids) and all(o != "queued" for o in outcomes.values())


def _pool_children(process: support.Process) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(process.proc.pid)], capture_output=True, text=True, check=False
    )
    return [int(pid) for pid in out.stdout.split()]


@pytest.mark.timeout(2 * deadlines.BACKLOG_S)
def test_pool_processes_sigkilled_every_half_second(rig: Rig) -> None:
    # Enough events for a drain of well over 5 kills: each kill takes down the up to
    # BATCH_LIMIT messages its process was applying together (worker.pool).
    events = _events(1, 2000, 10, "pk")
    assert len(events) == 20000
    support.publish_all(rig.redis.url, rig.db_url, [json.dumps(e).encode() for e in events])
    worker = rig.worker("pk", 2)
    ids = [str(e["id"]) for e in events]
    kills = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if _all_finished(rig, ids):
            break
        children = _pool_children(worker)
        if children:
            os.kill(random.choice(children), signal.SIGKILL)
            kills += 1
    assert kills >= 5
    print(f"pool kills: {kills}")
    _check(rig, events, "pool-sigkill-every-0.5s")


@pytest.mark.timeout(deadlines.APPLY_S + deadlines.RECOVERY_S)
def test_whole_worker_sigkilled_holding_messages_recovers_within_5_minutes(rig: Rig) -> None:
    events = _events(2, 100, 10, "wk")
    # Every fifth event comes twice, as DR sends duplicates: some copies of each kind are
    # among what the worker holds when it dies.
    bodies = [json.dumps(e).encode() for n, e in enumerate(events) for _ in range(2 - bool(n % 5))]
    support.publish_all(rig.redis.url, rig.db_url, bodies)
    doomed = rig.worker("doomed", 2)
    prefetch = 2 * int(
        support.python_json(
            "from worker.app import app; print(app.conf.worker_prefetch_multiplier)", rig.env
        )
    )
    ids = [str(e["id"]) for e in events]
    support.wait_for(
        lambda: len(support.outcomes(rig.engine, ids)) >= 50,
        timeout=deadlines.APPLY_S,
        what="progress",
    )
    # Killed while both pool processes are inside a task (held on a lock the test takes)
    # and the main process holds its full prefetch: every message it holds is then one
    # Redis counts as unacknowledged. A kill at a random instant can also land between
    # kombu's BRPOP and its note of the message as unacknowledged, a window no consumer can
    # close, where only reconciliation with DR brings the event back.
    with psycopg.connect(rig.db_url) as blocker:
        blocker.execute("LOCK TABLE orders IN EXCLUSIVE MODE")

        def both_waiting_prefetch_full() -> bool:
            with psycopg.connect(rig.db_url, autocommit=True) as conn:
                waiting = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'refundsync' AND wait_event_type = 'Lock'"
                ).fetchone()
            # With its prefetch full, the worker takes no more messages: no BRPOP is open.
            full = int(rig.redis.cli("HLEN", "unacked")) >= prefetch
            return bool(waiting and waiting[0] >= 2) and full

        support.wait_for(
            both_waiting_prefetch_full,
            timeout=deadlines.APPLY_S,
            what="both pool processes in a task and the prefetch full",
        )
        held = int(rig.redis.cli("HLEN", "unacked"))
        os.killpg(doomed.proc.pid, signal.SIGKILL)
        died = time.monotonic()
        blocker.rollback()
    assert held >= 1, "the worker held no unacknowledged message when it died"
    rig.worker("fresh", 2)
    support.wait_finished(rig.engine, ids, timeout=deadlines.RECOVERY_S)
    recovery = time.monotonic() - died
    assert recovery < 300
    _check(rig, events, "whole-worker-sigkill", recovery)
    # Every message taken and acknowledged: a second copy can still be on its way when its
    # event has finished.
    support.wait_for(
        lambda: (
            int(rig.redis.cli("LLEN", "refundsync")) == 0
            and int(rig.redis.cli("HLEN", "unacked")) == 0
        ),
        timeout=deadlines.APPLY_S,
        what="every message acknowledged",
    )
    with rig.engine.connect() as conn:
        deliveries, lost = conn.execute(
            text(
                "SELECT sum(deliveries), sum(lost_attempts) FROM webhook_events"
                " WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        ).one()
    print(f"held={held} deliveries={deliveries} lost_attempts={lost}")
    # Each message counts once as a copy, whether it was applied, waiting or back from the
    # dead worker.
    assert deliveries == len(bodies)
    # Only an attempt that had started can have died with the worker, at most one per pool
    # process: the messages waiting in its prefetch were never attempts.
    assert lost <= 2


@pytest.mark.timeout(deadlines.APPLY_S + deadlines.RECOVERY_S + deadlines.BACKLOG_S)
def test_postgres_stopped_for_20_seconds_mid_run(
    rig: Rig, cluster: support.PostgresCluster
) -> None:
    events = _events(3, 200, 10, "pg")
    support.publish_all(rig.redis.url, rig.db_url, [json.dumps(e).encode() for e in events])
    rig.worker("pg", 2)
    ids = [str(e["id"]) for e in events]
    support.wait_for(
        lambda: len(support.outcomes(rig.engine, ids)) >= 300,
        timeout=deadlines.APPLY_S,
        what="progress",
    )
    rig.engine.dispose()
    cluster.stop()
    time.sleep(20)
    cluster.start()
    restarted = time.monotonic()
    support.wait_finished(rig.engine, ids, timeout=deadlines.RECOVERY_S)
    _check(rig, events, "postgres-down-20s", time.monotonic() - restarted)


@pytest.mark.timeout(deadlines.APPLY_S + deadlines.RECOVERY_S)
def test_redis_restarted_mid_run_ingest_503s_and_sender_retries(rig: Rig) -> None:
    events = _events(4, 100, 10, "rd")
    ingest, base = support.start_ingest(rig.env)
    rig.processes.append(ingest)
    rig.worker("rd", 2)
    refused = 0
    sent = 0
    lock = threading.Lock()
    queue = [json.dumps(e).encode() for e in events]

    def sender() -> None:
        nonlocal refused, sent
        with httpx.Client(timeout=5) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    body = queue.pop()
                delay = 0.2
                while True:  # like DR: retry until a 2xx
                    try:
                        response = client.post(
                            f"{base}/webhooks/digital-river",
                            content=body,
                            headers=support.signed_headers(body),
                        )
                        if response.status_code == 202:
                            with lock:
                                sent += 1
                            break
                        assert response.status_code == 503, response.text
                        with lock:
                            refused += 1
                    except httpx.HTTPError:
                        pass
                    time.sleep(delay)
                    delay = min(delay * 2, 2)
                time.sleep(0.1)  # about 80 events/s in all, so Redis goes down mid-stream

    threads = [threading.Thread(target=sender) for _ in range(8)]
    for thread in threads:
        thread.start()
    support.wait_for(lambda: sent >= 300, timeout=deadlines.APPLY_S, what="300 events sent")
    rig.redis.cli("SHUTDOWN")  # saves the AOF
    support.wait_for(
        lambda: not rig.redis.ping(), timeout=deadlines.LOCAL_PROCESS_S, what="redis down"
    )
    time.sleep(5)
    rig.redis.start()
    back = time.monotonic()
    for thread in threads:
        thread.join(timeout=deadlines.APPLY_S)
    assert not any(thread.is_alive() for thread in threads), "a sender never got its 202"
    assert refused >= 1, "the ingest never answered 503 while Redis was down"
    # Time for a message held when Redis stopped to come back through the restore scan (the
    # visibility timeout, the restore scan and a task's time limit), and inside the test's
    # own timeout, so a miss reports which events never finished.
    _check(
        rig, events, "redis-restart-aof", time.monotonic() - back, timeout=deadlines.REDELIVERY_S
    )


def test_poison_event_is_quarantined_and_others_flow(rig: Rig) -> None:
    events = _events(5, 20, 10, "po")
    poison: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "type": "refund.pending",
        "createdTime": "2024-05-14T10:00:00Z",
        "liveMode": False,
        "data": {
            "object": {
                "id": "re_poison",
                "orderId": "po-poison",
                "currency": "USD",
                "amount": 1.0,
                "state": "pending",
                "reason": "poison-pill",
            }
        },
    }
    bodies = [json.dumps(e).encode() for e in events]
    bodies.insert(len(bodies) // 2, json.dumps(poison).encode())
    support.publish_all(rig.redis.url, rig.db_url, bodies)
    rig.worker("po", 2, "--include", "tests.faults.poison", REFUNDSYNC_MAX_ATTEMPTS="3")
    assert support.wait_finished(rig.engine, [poison["id"]], timeout=deadlines.APPLY_S) == {
        poison["id"]: "failed"
    }
    _check(rig, events, "poison-event")
    with rig.engine.connect() as conn:
        row = conn.execute(
            text("SELECT attempts, error FROM webhook_events WHERE id = :id"), {"id": poison["id"]}
        ).one()
    assert row.error.startswith("gave up after 3 attempts")
    assert row.attempts == 4
    assert int(rig.redis.cli("LLEN", "refundsync")) == 0
