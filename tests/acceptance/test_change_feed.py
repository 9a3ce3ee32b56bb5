"""The commerce system's side: the change feed read while many workers commit, and outbound
webhooks to a receiver on loopback that is down, failing, or whose worker is killed. Real
ingest, workers, beat, Postgres and Redis."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from sqlalchemy import Engine, text

from models.migrate import upgrade
from tests import deadlines, eventgen, support
from tests.receiver import SECRET, Receiver
from tests.support import API_TOKEN

# Outbound delivery policy for these tests: short timeouts and backoff, so a receiver that
# comes back is tried again within seconds.
NOTIFY_TIMEOUT_S = 2
BACKOFF_MAX_S = 4
SWEEP_S = 2
# A change waits at most one backoff (and one sweep) after its receiver is back, behind its
# order's earlier changes, each of which may fail a few times at 30 %.
DELIVERY_S = deadlines.APPLY_S + 20 * (BACKOFF_MAX_S + SWEEP_S)


@dataclass
class Service:
    """A refundsync of its own for one test: its database, broker and processes."""

    base: str
    engine: Engine
    env: dict[str, str]
    redis: support.RedisServer
    db_url: str
    processes: list[support.Process]

    def changes(self, after: str | None, limit: int = 1000) -> dict[str, Any]:
        params = {"limit": str(limit), **({"after": after} if after else {})}
        response = httpx.get(
            f"{self.base}/changes",
            params=params,
            headers={"Authorization": f"Bearer {API_TOKEN}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        page: dict[str, Any] = response.json()
        return page

    def order(self, order_id: str) -> dict[str, Any]:
        response = httpx.get(
            f"{self.base}/orders/{order_id}",
            headers={"Authorization": f"Bearer {API_TOKEN}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        summary: dict[str, Any] = response.json()
        return summary


@contextmanager
def service(
    tmp_path: Path, workers: int, *, receiver: Receiver | None = None, beat: bool = False
) -> Iterator[Service]:
    database = support.Database().create()
    redis = support.RedisServer().start()
    extra = {"REFUNDSYNC_SWEEP_INTERVAL_SECONDS": str(SWEEP_S)}
    if receiver is not None:
        extra |= {
            "REFUNDSYNC_NOTIFY_URL": receiver.url,
            "REFUNDSYNC_NOTIFY_SECRET": SECRET,
            "REFUNDSYNC_NOTIFY_TIMEOUT_SECONDS": str(NOTIFY_TIMEOUT_S),
            "REFUNDSYNC_NOTIFY_BACKOFF_MAX_SECONDS": str(BACKOFF_MAX_S),
        }
    env = support.service_env(database.url, redis.url, **extra)
    engine = support.engine_for(database.url)
    processes: list[support.Process] = []
    try:
        upgrade(database.url)
        ingest, base = support.start_ingest(env)
        processes.append(ingest)
        processes.extend(support.start_worker(env, f"w{n}") for n in range(workers))
        if beat:
            schedule = str(tmp_path / "beat-schedule")
            processes.append(support.Process("beat", ["beat", "--schedule", schedule], env))
        yield Service(base, engine, env, redis, database.url, processes)
    finally:
        for process in processes:
            process.stop()
        engine.dispose()
        redis.cleanup()
        database.drop()


def _histories(seed: int, orders: int, per_order: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events = [
        event
        for n in range(orders)
        for event in eventgen.order_history(rng, f"feed-{uuid.uuid4().hex[:10]}-{n}", per_order)
    ]
    rng.shuffle(events)
    return events


def _publish(svc: Service, events: list[dict[str, Any]]) -> list[str]:
    support.publish_all(svc.redis.url, svc.db_url, [orjson.dumps(e) for e in events])
    return [e["id"] for e in events]


def _stored_changes(engine: Engine) -> dict[tuple[str, int], str]:
    """Every change row: (order, version) -> its delivery."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT order_key, version, delivery FROM changes"))
        return {(row.order_key, row.version): row.delivery for row in rows}


class FeedReader(threading.Thread):
    """Follows the feed's cursor while the workers commit, as a commerce system would."""

    def __init__(self, svc: Service) -> None:
        super().__init__(daemon=True)
        self.svc = svc
        self.cursor: str | None = None
        self.seen: list[dict[str, Any]] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def read_page(self) -> int:
        page = self.svc.changes(self.cursor, limit=200)
        self.seen += page["changes"]
        self.cursor = page["next"]
        return len(page["changes"])

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.read_page()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def finish(self) -> None:
        self.halt.set()
        self.join(timeout=60)
        assert self.error is None, self.error
        while self.read_page():
            pass


def test_a_reader_following_the_cursor_sees_every_change_once_while_4_workers_commit(
    tmp_path: Path,
) -> None:
    events = _histories(181, orders=500, per_order=10)
    with service(tmp_path, workers=4) as svc:
        reader = FeedReader(svc)
        reader.start()
        ids = _publish(svc, events)
        support.wait_finished(svc.engine, ids, timeout=deadlines.BACKLOG_S)
        reader.finish()

        cursors = [change["cursor"] for change in reader.seen]
        assert len(set(cursors)) == len(cursors), "a change was read twice"
        stored = _stored_changes(svc.engine)
        assert len(reader.seen) == len(stored), "the reader missed changes"
        versions: dict[str, list[int]] = defaultdict(list)
        last: dict[str, dict[str, Any]] = {}
        for change in reader.seen:
            versions[change["orderId"]].append(change["version"])
            last[change["orderId"]] = change["summary"]
        for order_id, found in versions.items():
            assert found == list(range(1, len(found) + 1)), order_id
        assert set(last) == {order for order, _ in stored}
        for order_id, summary in last.items():
            current = svc.order(order_id)
            assert {**summary, "updatedAt": None} == {**current, "updatedAt": None}
        with svc.engine.connect() as conn:
            batched = conn.execute(
                text("SELECT count(*) FROM changes GROUP BY xid HAVING count(*) > 1")
            ).all()
        # The workers did commit several changes per transaction: the case a cursor by
        # commit order alone would get wrong.
        assert batched


def _orders_of(stored: dict[tuple[str, int], str]) -> dict[str, int]:
    newest: dict[str, int] = defaultdict(int)
    for order_id, version in stored:
        newest[order_id] = max(newest[order_id], version)
    return newest


def _assert_delivered_in_order(receiver: Receiver, stored: dict[tuple[str, int], str]) -> None:
    """Every change reached the receiver with a 2xx; none arrived before its order's
    earlier changes were delivered; every signature verified; one webhook-id per change."""
    assert set(stored.values()) == {"delivered"}
    received = list(receiver.received)
    assert {r.key for r in received if 200 <= r.status < 300} == set(stored)
    accepted: set[tuple[str, int]] = set()
    ids: dict[tuple[str, int], str] = {}
    for request in received:
        order_id, version = request.key
        earlier = {(order_id, v) for v in range(1, version)}
        assert earlier <= accepted, f"{request.key} arrived before its order's earlier changes"
        if 200 <= request.status < 300:
            accepted.add(request.key)
        assert request.verified == "ok", request.verified
        assert request.headers["webhook-id"] == request.data["cursor"]
        assert (
            ids.setdefault(request.key, request.headers["webhook-id"])
            == (request.headers["webhook-id"])
        )


def test_webhooks_reach_a_receiver_down_for_2_minutes_then_failing_30_percent(
    tmp_path: Path,
) -> None:
    receiver = Receiver(fail_rate=0.3)  # not listening yet: connections are refused
    events = _histories(182, orders=40, per_order=6)
    with service(tmp_path, workers=2, receiver=receiver, beat=True) as svc:
        down_since = time.monotonic()
        ids = _publish(svc, events)
        # The receiver being down never holds up the events.
        outcomes = support.wait_finished(svc.engine, ids)
        assert "failed" not in outcomes.values()
        with svc.engine.connect() as conn:
            refused = conn.execute(
                text("SELECT count(*) FROM deliveries WHERE status_code IS NULL")
            ).scalar_one()
        assert refused > 0
        metrics = f"{svc.base}/metrics"
        assert support.metric(metrics, "refundsync_notify_undelivered") > 0
        assert support.metric(metrics, "refundsync_notify_oldest_undelivered_age_seconds") > 0
        # The outage lasts its 2 minutes whatever happens meanwhile.
        time.sleep(max(0.0, down_since + 120 - time.monotonic()))
        receiver.start()
        try:
            stored = support.wait_for(
                lambda: (
                    (s := _stored_changes(svc.engine)) and set(s.values()) == {"delivered"} and s
                ),
                timeout=DELIVERY_S,
                interval=0.5,
                what="every change delivered",
            )
        finally:
            receiver.stop()
        _assert_delivered_in_order(receiver, stored)
        assert any(r.status == 500 for r in receiver.received)
        assert support.metric(metrics, "refundsync_notify_undelivered") == 0
        assert support.metric(metrics, "refundsync_notify_oldest_undelivered_age_seconds") == 0
        with svc.engine.connect() as conn:
            kinds = conn.execute(
                text("SELECT DISTINCT coalesce(status_code, 0) FROM deliveries")
            ).scalars()
            assert {0, 200, 500} <= set(kinds)
            bodies = conn.execute(
                text("SELECT count(*) FROM deliveries WHERE error LIKE '%ok%true%'")
            ).scalar_one()
        assert bodies == 0  # the receiver's answers are never kept


def test_a_worker_killed_mid_delivery_loses_nothing_and_resends_with_the_same_id(
    tmp_path: Path,
) -> None:
    receiver = Receiver(delay_s=0.2).start()
    events = _histories(183, orders=30, per_order=5)
    try:
        with service(tmp_path, workers=1, receiver=receiver, beat=True) as svc:
            ids = _publish(svc, events)
            support.wait_for(
                lambda: len(receiver.received) >= 10,
                timeout=deadlines.APPLY_S,
                what="deliveries under way",
            )
            worker = svc.processes[1]
            worker.stop(sig=9)
            assert len(receiver.delivered()) < len(_stored_changes(svc.engine))
            svc.processes.append(support.start_worker(svc.env, "w-again", 2))
            support.wait_finished(svc.engine, ids, timeout=deadlines.REDELIVERY_S)
            stored = support.wait_for(
                lambda: (
                    (s := _stored_changes(svc.engine)) and set(s.values()) == {"delivered"} and s
                ),
                timeout=DELIVERY_S + NOTIFY_TIMEOUT_S * 4 + 30,
                interval=0.5,
                what="every change delivered",
            )
            _assert_delivered_in_order(receiver, stored)
            by_id: dict[str, set[bytes]] = defaultdict(set)
            for request in receiver.received:
                by_id[request.headers["webhook-id"]].add(orjson.dumps(request.data))
            assert all(len(bodies) == 1 for bodies in by_id.values())
    finally:
        receiver.stop()


def test_dead_deliveries_are_listed_and_sent_again_from_the_cli(tmp_path: Path) -> None:
    receiver = Receiver(fail_rate=1.0).start()
    events = _histories(184, orders=3, per_order=3)
    try:
        with service(tmp_path, workers=1, receiver=receiver, beat=True) as svc:
            svc.env["REFUNDSYNC_NOTIFY_MAX_AGE_SECONDS"] = "3"
            svc.processes[1].stop()
            svc.processes[1] = support.start_worker(svc.env, "w-short")
            ids = _publish(svc, events)
            support.wait_finished(svc.engine, ids)
            stored = support.wait_for(
                lambda: (s := _stored_changes(svc.engine)) and set(s.values()) == {"dead"} and s,
                timeout=DELIVERY_S,
                interval=0.5,
                what="every change dead",
            )
            failed = support.run_cli(svc.env, "notify", "failed", "--dead")
            assert failed.returncode == 0, failed.stderr
            listed = [orjson.loads(line) for line in failed.stdout.splitlines()]
            assert {(item["order"], item["version"]) for item in listed} == set(stored)
            assert {item["lastStatus"] for item in listed} == {500}
            assert all(item["delivery"] == "dead" and item["attempts"] >= 1 for item in listed)

            receiver.fail_rate = 0.0
            again = support.run_cli(svc.env, "notify", "redeliver", "--dead")
            assert again.returncode == 0, again.stderr
            assert len(again.stdout.splitlines()) == len(stored)
            support.wait_for(
                lambda: set(_stored_changes(svc.engine).values()) == {"delivered"},
                timeout=DELIVERY_S,
                interval=0.5,
                what="every change delivered again",
            )
            assert {r.key for r in receiver.delivered()} == set(stored)

            tail = support.run_cli(svc.env, "changes", "tail")
            assert tail.returncode == 0, tail.stderr
            printed = [orjson.loads(line) for line in tail.stdout.splitlines()]
            assert printed == svc.changes(None)["changes"]
            assert tail.stderr.strip() == f"next: {printed[-1]['cursor']}"
            unknown = support.run_cli(svc.env, "notify", "redeliver", "1-999999999")
            assert unknown.returncode == 1
            assert "not found" in unknown.stderr
    finally:
        receiver.stop()
