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
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text

from models.migrate import upgrade
from tests import deadlines, eventgen, support
from worker.policy import JOURNAL_SWEEP_S


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
    events = eventgen.histories(1, 2000, 10, "pk")
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
    events = eventgen.histories(2, 100, 10, "wk")
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
    # Redis counts as unacknowledged, and comes back through the restore scan. (A kill at
    # a random instant can also land between kombu's BRPOP and its note of the message as
    # unacknowledged, where the ingest's journal brings the event back: the tests below.)
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


# Kills and stops while events stream in: enough that some land in every step of a
# delivery, kombu's BRPOP-to-unacknowledged window included.
STOPS = 20


def _stop_and_restart_workers(
    rig: Rig, tmp_path: Path, stop: Callable[[support.Process], None], seed: int, scenario: str
) -> None:
    """Stream 2,000 events through an ingest to two workers while `stop` ends a random
    worker at a random instant, STOPS times, each restarted at once; beat runs throughout
    and DR_API_KEY is unset (no reconciliation). Every event must be applied exactly once."""
    events = eventgen.histories(seed, 200, 10, scenario[:2])
    assert "DR_API_KEY" not in rig.env
    ingest, base = support.start_ingest(rig.env)
    rig.processes.append(ingest)
    rig.processes.append(
        support.Process("beat", ["beat", "--schedule", str(tmp_path / "schedule")], rig.env)
    )
    workers = [rig.worker(f"{scenario[:2]}{n}", 2) for n in range(2)]
    # About 20 events/s: the stream lasts about as long as the stops.
    stream = support.Stream(base, [json.dumps(e).encode() for e in events], pause=0.4)
    stream.start()
    rng = random.Random(seed)
    for _ in range(STOPS):
        # A random instant: not staged on anything the worker is doing.
        time.sleep(rng.uniform(0, 2))
        n = rng.randrange(len(workers))
        stop(workers[n])
        workers[n] = rig.worker(f"{scenario[:2]}{n}", 2)
    last_stop = time.monotonic()
    stream.join(deadlines.BACKLOG_S)
    ids = [str(e["id"]) for e in events]
    support.wait_finished(rig.engine, ids, timeout=deadlines.RECOVERY_S)
    recovery = time.monotonic() - last_stop
    _check(rig, events, scenario, recovery)
    with rig.engine.connect() as conn:
        from_journal = conn.execute(
            text("SELECT count(*) FROM webhook_events WHERE id = ANY(:ids) AND source = 'journal'"),
            {"ids": ids},
        ).scalar_one()
    # How many came back only through the journal (their first recorded copy was its).
    print(f"RELIABILITY scenario={scenario} from_journal={from_journal}")
    # The journal keeps nothing once every event is recorded.
    support.wait_for(
        lambda: rig.redis.cli("ZCARD", "refundsync:journal:at") == "0",
        timeout=3 * JOURNAL_SWEEP_S,
        what="the journal emptied",
    )


@pytest.mark.timeout(STOPS * deadlines.PROCESS_START_S + deadlines.RECOVERY_S + deadlines.BACKLOG_S)
def test_whole_workers_sigkilled_at_random_instants_lose_nothing(rig: Rig, tmp_path: Path) -> None:
    def kill(worker: support.Process) -> None:
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(timeout=deadlines.LOCAL_PROCESS_S)

    _stop_and_restart_workers(rig, tmp_path, kill, 6, "random-sigkill-x20")


@pytest.mark.timeout(
    STOPS * (deadlines.PROCESS_START_S + deadlines.ONE_TASK_S)
    + deadlines.RECOVERY_S
    + deadlines.BACKLOG_S
)
def test_busy_workers_stopped_warm_20_times_lose_nothing(rig: Rig, tmp_path: Path) -> None:
    def warm_shutdown(worker: support.Process) -> None:
        # SIGTERM to the main process, as a supervisor stops a worker: it finishes what is
        # running and hands back what it holds.
        os.kill(worker.proc.pid, signal.SIGTERM)
        worker.proc.wait(timeout=deadlines.ONE_TASK_S + deadlines.LOCAL_PROCESS_S)

    _stop_and_restart_workers(rig, tmp_path, warm_shutdown, 7, "warm-shutdown-x20")


@pytest.mark.timeout(deadlines.APPLY_S + deadlines.RECOVERY_S + deadlines.BACKLOG_S)
def test_postgres_stopped_for_20_seconds_mid_run(
    rig: Rig, cluster: support.PostgresCluster
) -> None:
    events = eventgen.histories(3, 200, 10, "pg")
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
    events = eventgen.histories(4, 100, 10, "rd")
    ingest, base = support.start_ingest(rig.env)
    rig.processes.append(ingest)
    rig.worker("rd", 2)
    # About 80 events/s in all, so Redis goes down mid-stream.
    stream = support.Stream(base, [json.dumps(e).encode() for e in events], pause=0.1)
    stream.start()
    support.wait_for(
        lambda: stream.accepted >= 300, timeout=deadlines.APPLY_S, what="300 events sent"
    )
    rig.redis.cli("SHUTDOWN")  # saves the AOF
    support.wait_for(
        lambda: not rig.redis.ping(), timeout=deadlines.LOCAL_PROCESS_S, what="redis down"
    )
    time.sleep(5)
    rig.redis.start()
    back = time.monotonic()
    stream.join(deadlines.APPLY_S)
    assert stream.refused >= 1, "the ingest never answered 503 while Redis was down"
    # Time for a message held when Redis stopped to come back through the restore scan (the
    # visibility timeout, the restore scan and a task's time limit), and inside the test's
    # own timeout, so a miss reports which events never finished.
    _check(
        rig, events, "redis-restart-aof", time.monotonic() - back, timeout=deadlines.REDELIVERY_S
    )


def test_poison_event_is_quarantined_and_others_flow(rig: Rig) -> None:
    events = eventgen.histories(5, 20, 10, "po")
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
