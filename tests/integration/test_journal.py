"""The ingest's journal on a real Redis: a 202 means the message and its entry are both
there; the journal is capped; REFUNDSYNC_REDIS_MIN_REPLICAS waits for replicas; the sweep
forgets what Postgres recorded and publishes again what it never did, but nothing that may
still be waiting in the queue; and a real worker with beat applies events whose messages
were lost."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from tests import deadlines, eventgen, support
from worker.policy import JOURNAL_SWEEP_S
from worker.queue import journal
from worker.queue.keys import QueueKeys
from worker.queue.publish import BrokerUnavailable, Publisher

KEYS = QueueKeys(lambda: [b"k" * 32])
QUEUE = "refundsync"


@pytest.fixture
def server() -> Iterator[support.RedisServer]:
    instance = support.RedisServer().start()
    try:
        yield instance
    finally:
        instance.cleanup()


def _publish(
    url: str, events: list[dict[str, Any]], received_at: datetime | None = None, **options: Any
) -> list[int]:
    """Publish each event through the ingest's publisher, received now or at
    `received_at`; returns what on_unjournaled got."""
    unjournaled: list[int] = []

    async def run() -> None:
        publisher = Publisher(url, QUEUE, KEYS, on_unjournaled=unjournaled.append, **options)
        try:
            for event in events:
                await publisher.publish(
                    json.dumps(event),
                    event["id"],
                    event["type"],
                    (received_at or datetime.now(UTC)).isoformat(),
                )
        finally:
            await publisher.close()

    asyncio.run(run())
    return unjournaled


def _events(n: int) -> list[dict[str, Any]]:
    return [{"id": f"evt-{uuid.uuid4().hex[:10]}", "type": "refund.pending"} for _ in range(n)]


def test_a_queued_event_has_its_journal_entry(server: support.RedisServer) -> None:
    events = _events(3)
    assert _publish(server.url, events) == []
    keys = journal.JournalKeys(QUEUE)
    assert server.cli("LLEN", QUEUE) == "3"
    assert server.cli("HLEN", keys.entries) == "3"
    assert server.cli("ZCARD", keys.times) == "3"
    entry = journal.decode(events[0]["id"], server.cli("HGET", keys.entries, events[0]["id"]))
    assert entry is not None
    assert json.loads(entry.body) == events[0]
    assert entry.event_type == "refund.pending"


def test_a_full_journal_still_queues_and_counts_what_it_could_not_keep(
    server: support.RedisServer,
) -> None:
    unjournaled = _publish(server.url, _events(5), journal_cap=3)
    assert server.cli("LLEN", QUEUE) == "5"
    assert server.cli("ZCARD", journal.JournalKeys(QUEUE).times) == "3"
    assert sum(unjournaled) == 2


def test_min_replicas_refuses_without_the_replicas_and_accepts_with_them(
    server: support.RedisServer,
) -> None:
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="0 of 1 Redis replicas"):
        _publish(server.url, _events(1), min_replicas=1)
    # WAIT gives up inside the ingest's own deadline, so DR gets its 503 in time.
    assert time.monotonic() - started < deadlines.LOCAL_PROCESS_S
    replica = support.RedisServer(extra=["--replicaof", "127.0.0.1", str(server.port)]).start()
    try:
        support.wait_for(
            lambda: "master_link_status:up" in replica.cli("INFO", "replication"),
            timeout=deadlines.LOCAL_PROCESS_S,
            what="the replica in sync",
        )
        events = _events(2)
        _publish(server.url, events, min_replicas=1)
        assert replica.cli("HEXISTS", journal.JournalKeys(QUEUE).entries, events[1]["id"]) == "1"
    finally:
        replica.cleanup()


def test_a_sweep_forgets_recorded_events_and_republishes_lost_ones(
    server: support.RedisServer,
) -> None:
    keys = journal.JournalKeys(QUEUE)
    recorded, lost, waiting, young = _events(4)
    now = time.time()
    # Two events accepted ten minutes ago, whose messages are gone from the queue: one
    # recorded, one lost. One five minutes ago, still waiting in the queue behind a
    # backlog; one just now.
    _publish(server.url, [recorded, lost])
    client = redis.Redis(port=server.port)
    client.delete(QUEUE)
    client.zadd(keys.times, {recorded["id"]: (now - 600) * 1000, lost["id"]: (now - 600) * 1000})
    five_minutes_ago = datetime.fromtimestamp(now - 300, UTC)
    _publish(server.url, [waiting], received_at=five_minutes_ago)
    client.zadd(keys.times, {waiting["id"]: (now - 300) * 1000})
    _publish(server.url, [young])
    recorded_id, lost_id, waiting_id, young_id = (
        event["id"] for event in (recorded, lost, waiting, young)
    )
    published: list[journal.Entry] = []
    swept = journal.sweep(
        client,
        keys,
        lambda ids: {recorded_id} & set(ids),
        published.append,
        lambda: time.time() * 1000,
        grace_s=60,
    )
    client.close()
    assert (swept.removed, swept.republished) == (1, 1)
    assert [entry.event_id for entry in published] == [lost_id]
    assert server.cli("HEXISTS", keys.entries, recorded_id) == "0"
    # The republished entry stays until its event is recorded, stamped anew.
    assert float(server.cli("ZSCORE", keys.times, lost_id)) > time.time() * 1000 - 60_000
    for kept in (waiting_id, young_id):
        assert server.cli("HEXISTS", keys.entries, kept) == "1"


@pytest.mark.timeout(deadlines.PROCESS_START_S * 2 + deadlines.APPLY_S + 4 * JOURNAL_SWEEP_S)
def test_events_whose_messages_were_lost_are_applied_from_the_journal(
    database: support.Database, server: support.RedisServer, tmp_path: Any
) -> None:
    events = eventgen.histories(19, 6, 5, "jr")
    support.publish_all(server.url, database.url, [json.dumps(e).encode() for e in events])
    # A third of the messages taken off the queue and gone, as by workers killed between
    # kombu's BRPOP and its note of them as unacknowledged.
    lost = len(events) // 3
    server.cli("RPOP", QUEUE, str(lost))
    env = support.service_env(database.url, server.url, REFUNDSYNC_JOURNAL_GRACE_SECONDS="2")
    processes = [
        support.start_worker(env, "jr", 2),
        support.Process("beat", ["beat", "--schedule", str(tmp_path / "schedule")], env),
    ]
    try:
        engine = support.engine_for(database.url)
        ids = [str(e["id"]) for e in events]
        support.wait_finished(engine, ids, timeout=deadlines.APPLY_S + 2 * JOURNAL_SWEEP_S)
        expected = eventgen.expected_summaries(events)
        assert support.summaries(engine, list(expected)) == expected
        keys = journal.JournalKeys(QUEUE)
        support.wait_for(
            lambda: (
                server.cli("ZCARD", keys.times) == "0" and server.cli("HLEN", keys.entries) == "0"
            ),
            timeout=3 * JOURNAL_SWEEP_S,
            what="the journal emptied once every event was recorded",
        )
        assert "journal.republished" in processes[0].log()
        engine.dispose()
    finally:
        for process in processes:
            process.stop()


def test_a_sweep_reads_on_past_a_round_that_ends_inside_one_push(
    server: support.RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The events of one push share their millisecond; rounds of 3 must not skip the rest.
    monkeypatch.setattr(journal, "SWEEP_BATCH", 3)
    keys = journal.JournalKeys(QUEUE)
    events = _events(8)
    _publish(server.url, events)
    client = redis.Redis(port=server.port)
    old = (time.time() - 600) * 1000
    client.zadd(keys.times, {event["id"]: old for event in events})
    swept = journal.sweep(
        client,
        keys,
        lambda ids: set(ids),
        lambda entry: None,
        lambda: time.time() * 1000,
        grace_s=60,
    )
    client.close()
    assert swept.removed == 8
    assert server.cli("ZCARD", keys.times) == "0"


def test_only_one_sweep_runs_at_a_time(server: support.RedisServer) -> None:
    keys = journal.JournalKeys(QUEUE)
    client = redis.Redis(port=server.port)
    args: tuple[Any, ...] = (lambda ids: set(), lambda entry: None, lambda: time.time() * 1000, 60)
    client.set(keys.lock, "another sweep", px=60_000)
    assert journal.locked_sweep(client, keys, *args) is None
    client.delete(keys.lock)
    assert journal.locked_sweep(client, keys, *args) == journal.Swept()
    # Released afterwards.
    assert client.exists(keys.lock) == 0
    client.close()
