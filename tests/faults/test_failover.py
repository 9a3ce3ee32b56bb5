"""Redis Sentinel failover mid-stream: a primary, a replica and three Sentinels on loopback;
the ingest, a worker and beat reach Redis through the Sentinels. The primary is SIGKILLed
while events stream in, the replica is promoted, and the old primary comes back as a
replica.

With REFUNDSYNC_REDIS_MIN_REPLICAS=1 every event that got a 202 is applied exactly once.
With 0 the test reports how many acknowledged events the failover lost: ones the primary
took but had not yet passed to its replica (message and journal entry alike), which is
why the setting exists. On loopback that window is a fraction of a millisecond and the
count is usually 0; across hosts it is the replication lag. Each run prints a `RELIABILITY` line."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from tests import deadlines, eventgen, support
from worker.queue.journal import JournalKeys

KILL_AFTER = 200


@pytest.fixture
def group() -> Iterator[support.SentinelGroup]:
    sentinels = support.SentinelGroup().start()
    try:
        yield sentinels
    finally:
        sentinels.cleanup()


def _lost_in_failover(
    group: support.SentinelGroup, engine: object, accepted: list[str]
) -> set[str]:
    """Events acknowledged before the failover that neither Postgres recorded nor the new
    primary's journal holds: nothing can bring them back (a journal entry leaves only once
    its event is recorded)."""
    new_primary = group.replica
    journaled = set(new_primary.cli("HKEYS", JournalKeys("refundsync").entries).split())
    with engine.connect() as conn:  # type: ignore[attr-defined]
        recorded = {
            row[0]
            for row in conn.execute(
                text("SELECT id FROM webhook_events WHERE id = ANY(:ids)"), {"ids": accepted}
            )
        }
    return set(accepted) - journaled - recorded


def _run(
    database: support.Database, group: support.SentinelGroup, tmp_path: Path, min_replicas: int
) -> None:
    # Seeds no other test uses: event ids come from them, and the database is the session's.
    events = eventgen.histories(1910 + min_replicas, 60, 10, f"fo{min_replicas}")
    env = support.service_env(
        database.url, group.url, REFUNDSYNC_REDIS_MIN_REPLICAS=str(min_replicas)
    )
    ingest, base = support.start_ingest(env)
    processes = [
        ingest,
        support.start_worker(env, f"fo{min_replicas}", 2),
        support.Process("beat", ["beat", "--schedule", str(tmp_path / "schedule")], env),
    ]
    engine = support.engine_for(database.url)
    try:
        stream = support.Stream(base, [json.dumps(e).encode() for e in events], pause=0.02)
        stream.start()
        support.wait_for(
            lambda: stream.accepted >= KILL_AFTER,
            timeout=deadlines.APPLY_S,
            what=f"{KILL_AFTER} events accepted",
        )
        primary_pid = group.primary.pid()
        os.kill(primary_pid, signal.SIGKILL)
        killed = time.monotonic()
        before_kill = list(stream.accepted_ids)
        support.wait_for(
            lambda: group.master_port() == group.replica.port,
            timeout=deadlines.LOCAL_PROCESS_S * 3,
            what="the replica promoted",
        )
        promoted = time.monotonic() - killed
        # Taken once the replica is the primary, before anything else can change what it
        # holds of the events acknowledged so far.
        lost = _lost_in_failover(group, engine, before_kill)
        # The old primary comes back; the Sentinels make it a replica of the new one (so
        # WAIT can be answered again).
        group.primary.start()
        stream.join(deadlines.BACKLOG_S)
        assert ingest.proc.poll() is None, "the ingest stopped"
        kept = [event_id for event_id in stream.accepted_ids if event_id not in lost]
        support.wait_finished(engine, kept, timeout=deadlines.RECOVERY_S)
        recovery = time.monotonic() - killed
        result = support.tally(engine, kept)
        print(
            result.line(f"sentinel-failover-min-replicas-{min_replicas}", recovery)
            + f" accepted={stream.accepted} lost_in_failover={len(lost)}"
            f" refused={stream.refused} promoted_s={promoted:.1f}"
        )
        assert result.lost == 0
        assert result.doubled == 0
        assert result.failed == 0
        if min_replicas:
            assert lost == set()
            expected = eventgen.expected_summaries(events)
            assert support.summaries(engine, list(expected)) == expected
    finally:
        for process in processes:
            process.stop()
        engine.dispose()


@pytest.mark.timeout(
    deadlines.PROCESS_START_S * 3 + deadlines.APPLY_S + deadlines.BACKLOG_S + deadlines.RECOVERY_S
)
@pytest.mark.parametrize("min_replicas", [1, 0])
def test_a_primary_killed_mid_stream_loses_no_acknowledged_event(
    database: support.Database,
    group: support.SentinelGroup,
    tmp_path: Path,
    min_replicas: int,
) -> None:
    _run(database, group, tmp_path, min_replicas)
