"""Benchmark 2 (and 4): worker apply throughput against Celery's and Postgres's ceilings.

    .venv/bin/python -m bench.worker [--events 20000] [--orders 2000] [--runs 3]
    .venv/bin/python -m bench.worker --growth --preload-events 1000000 --preload-orders 100000

Events for `--orders` orders are preloaded in the queue; `refundsync worker --concurrency W`
(W = 1, 2) drains them; the time until every event has its outcome gives events/s. In the
same invocation: the same number of no-op Celery tasks drained with the same worker
settings (Celery's ceiling), and pgbench running one event's database work (bench/apply.sql,
prepared statements; Postgres's ceiling) with W clients. `--growth` (benchmark 4) instead
drains with W=2 on empty tables and on tables filled first with `--preload-*` rows,
alternating, and compares the per-event cost.
Prints medians and ratios, and each worker's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from models.migrate import upgrade
from tests import eventgen, support

# The worker options that load the no-op task.
NOOP_ARGS = ["--include", "bench.noop_tasks"]


def event_bodies(events: int, orders: int) -> list[bytes]:
    """DR events for `orders` orders (each order's history in order), as webhook bodies."""
    rng = random.Random(11)
    return [
        json.dumps(e).encode()
        for n in range(orders)
        for e in eventgen.order_history(rng, f"bw-{n}-{uuid.uuid4().hex[:6]}", events // orders)
    ]


def publish_noop(redis_url: str, bodies: list[bytes]) -> None:
    """One no-op task per event, with the event's arguments, on refundsync's queue."""
    from celery import Celery

    sender = Celery("bench", broker=redis_url, set_as_current=False)
    with sender.producer_or_acquire() as producer:
        for body in bodies:
            sender.send_task(
                "bench.noop",
                args=[body.decode(), "", "webhook"],
                queue="refundsync",
                producer=producer,
            )
    sender.close()


def queue_empty(redis: support.RedisServer) -> bool:
    """Nothing left on refundsync's queue, and nothing taken but unacknowledged."""
    return redis.cli("LLEN", "refundsync") == "0" and redis.cli("HLEN", "unacked") == "0"


def _rss_kib(pid: int) -> int:
    """Peak RSS of a process and its children (the pool)."""
    total = 0
    pids = [
        pid,
        *map(
            int,
            subprocess.run(
                ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
            ).stdout.split(),
        ),
    ]
    for p in pids:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except FileNotFoundError:
            continue
        total = max(total, int(re.search(r"VmHWM:\s+(\d+)", status).group(1)))  # type: ignore[union-attr]
    return total


def _drain(
    env: dict[str, str], name: str, concurrency: int, done: Any, extra: list[str]
) -> tuple[float, int]:
    worker = support.start_worker(env, name, concurrency, *extra)
    try:
        started = time.monotonic()
        peak = 0
        while not done():
            peak = max(peak, _rss_kib(worker.proc.pid))
            time.sleep(0.2)
        return time.monotonic() - started, peak
    finally:
        worker.stop()


def _preload(url: str, events: int, orders: int) -> None:
    """Fill the tables as a long-running deployment would have them."""
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO orders (id, currency) SELECT 'pre-' || g, 'USD'"
            " FROM generate_series(1, %s) g",
            (orders,),
        )
        conn.execute(
            "INSERT INTO refunds (order_id, id, state, amount, refunded_amount, last_event_id,"
            " last_event_time) SELECT 'pre-' || g, 're-pre-' || g, 'succeeded', 10, 10,"
            " 'pre-e-' || g, now() FROM generate_series(1, %s) g",
            (orders,),
        )
        # Every tenth order with a charge refund entry, every fiftieth with a chargeback: a
        # table left empty here would be analyzed as empty, and planned as such.
        conn.execute(
            "INSERT INTO charge_refunds (order_id, charge_id, entry_key, entry_id, amount,"
            " state, last_event_id, last_event_time) SELECT 'pre-' || g, 'ch-pre-' || g,"
            " 'cre-pre-' || g, 'cre-pre-' || g, 10, 'succeeded', 'pre-e-' || g, now()"
            " FROM generate_series(1, %s, 10) g",
            (orders,),
        )
        conn.execute(
            "INSERT INTO chargebacks (order_id, id, type, amount, last_event_id,"
            " last_event_time) SELECT 'pre-' || g, 'st-pre-' || g, 'fraud_chargeback', 10,"
            " 'pre-e-' || g, now() FROM generate_series(1, %s, 50) g",
            (orders,),
        )
        conn.execute(
            "INSERT INTO webhook_events (id, type, payload, outcome, deliveries, attempts,"
            " received_at, processed_at, order_id) SELECT 'pre-e-' || g, 'refund.complete',"
            " '{\"id\": \"x\"}', 'applied', 1, 1, now(), now(), 'pre-' || (g %% %s + 1)"
            " FROM generate_series(1, %s) g",
            (orders, events),
        )
        conn.execute(
            "INSERT INTO refund_history (order_id, event_id, entity, entity_id, to_state)"
            " SELECT 'pre-' || (g %% %s + 1), 'pre-e-' || g, 'refund', 're-pre-' || g,"
            " 'succeeded' FROM generate_series(1, %s) g",
            (orders, events),
        )
        # As a long-running deployment's tables are: vacuumed (visibility map and hint bits
        # set) and checkpointed, so the drain measures its own writes, not the load's.
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


def _refundsync(
    db: support.Database,
    redis: support.RedisServer,
    bodies: list[bytes],
    processes: int,
    preload_events: int,
    preload_orders: int,
) -> tuple[float, int, dict[str, str]]:
    """Drain the events with refundsync's worker: events/s, peak RSS, the worker's env."""
    upgrade(db.url)
    if preload_events:
        _preload(db.url, preload_events, preload_orders)
    env = support.service_env(db.url, redis.url, REFUNDSYNC_MAX_RETRIES="100")
    published = datetime.now(UTC)
    support.publish_all(redis.url, db.url, bodies)
    engine = support.engine_for(db.url)

    def finished() -> bool:
        # Postgres is asked only once the queue is empty: counting the outcomes at every
        # poll cost the drain a share of the cores (more on preloaded tables).
        if not queue_empty(redis):
            return False
        # Counted through the (outcome, received_at) index, only this batch's rows.
        with engine.connect() as conn:
            from sqlalchemy import text

            done = conn.execute(
                text(
                    "SELECT count(*) FROM webhook_events WHERE outcome IN"
                    " ('applied', 'stale', 'ignored', 'failed') AND received_at >= :since"
                ),
                {"since": published},
            ).scalar_one()
        return int(done) >= len(bodies)

    seconds, peak = _drain(env, f"apply{processes}", processes, finished, [])
    engine.dispose()
    return len(bodies) / seconds, peak, env


def _growth(args: argparse.Namespace, bodies: list[bytes]) -> None:
    """Benchmark 4: the same drain on empty tables and on preloaded ones, alternating."""
    rates: dict[str, list[float]] = {"empty": [], "preloaded": []}
    w = 2
    for run in range(args.runs):
        for kind in ("empty", "preloaded"):
            db = support.Database().create()
            redis = support.RedisServer().start()
            try:
                events, orders = (
                    (args.preload_events, args.preload_orders) if kind == "preloaded" else (0, 0)
                )
                rate, _, _ = _refundsync(db, redis, bodies, w, events, orders)
            finally:
                redis.cleanup()
                db.drop()
            rates[kind].append(rate)
            print(f"run {run + 1} {kind}: {rate:.0f} events/s", flush=True)
    empty, loaded = statistics.median(rates["empty"]), statistics.median(rates["preloaded"])
    print(
        f"\n{len(bodies)} events for {args.orders} orders, W={w}; medians over {args.runs} runs;"
        f" preloaded: {args.preload_events} events, {args.preload_orders} orders"
    )
    print(f"{'':20} {'events/s':>10} {'ms/event':>10}")
    for name, rate in (("empty tables", empty), ("preloaded tables", loaded)):
        print(f"{name:20} {rate:10.0f} {w * 1000 / rate:10.2f}")
    print(f"per-event cost, preloaded / empty = {empty / loaded:.2f} (target at most 1.20)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--orders", type=int, default=2_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--preload-events", type=int, default=0)
    parser.add_argument("--preload-orders", type=int, default=0)
    parser.add_argument(
        "--growth",
        action="store_true",
        help="benchmark 4: W=2 on empty tables against preloaded ones, same invocation",
    )
    args = parser.parse_args()
    bodies = event_bodies(args.events, args.orders)
    if args.growth:
        return _growth(args, bodies)
    results: dict[str, list[float]] = {}
    peaks: dict[int, int] = {}
    for run in range(args.runs):
        for processes in (1, 2):
            db = support.Database().create()
            redis = support.RedisServer().start()
            try:
                rate, peak, env = _refundsync(
                    db, redis, bodies, processes, args.preload_events, args.preload_orders
                )
                results.setdefault(f"refundsync W={processes}", []).append(rate)
                peaks[processes] = max(peaks.get(processes, 0), peak)

                # Celery's ceiling: the same number of no-op tasks, same settings.
                publish_noop(redis.url, bodies)
                seconds, _ = _drain(
                    env,
                    f"noop{processes}",
                    processes,
                    lambda r=redis: queue_empty(r),
                    NOOP_ARGS,
                )
                results.setdefault(f"celery no-op W={processes}", []).append(len(bodies) / seconds)

                # Postgres's ceiling: one event's database work, W clients.
                out = subprocess.run(
                    [
                        "pgbench",
                        "-n",
                        "-M",
                        "prepared",
                        "-c",
                        str(processes),
                        "-j",
                        str(processes),
                        "-T",
                        "10",
                        "-f",
                        str(Path(__file__).with_name("apply.sql")),
                        db.url.replace("postgresql+psycopg", "postgresql"),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                tps = float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]
                results.setdefault(f"pgbench apply W={processes}", []).append(tps)
            finally:
                redis.cleanup()
                db.drop()
            print(
                f"run {run + 1} W={processes}: "
                + ", ".join(
                    f"{k}={v[-1]:.0f}" for k, v in results.items() if k.endswith(f"W={processes}")
                ),
                flush=True,
            )
    print(
        f"\n{len(bodies)} events for {args.orders} orders; medians over {args.runs} runs"
        + (
            f"; tables preloaded with {args.preload_events} events, {args.preload_orders} orders"
            if args.preload_events
            else ""
        )
    )
    medians = {k: statistics.median(v) for k, v in results.items()}
    print(f"{'':28} {'events/s':>10}")
    for name, value in medians.items():
        print(f"{name:28} {value:10.0f}")
    for w in (1, 2):
        ours, noop = medians[f"refundsync W={w}"], medians[f"celery no-op W={w}"]
        pgbench = medians[f"pgbench apply W={w}"]
        # What a worker with no cost of its own beyond Celery's and one transaction per
        # event could reach while both share these cores (docs/benchmarks.md); events
        # applied together pay less than that transaction each.
        bound = 1 / (1 / noop + 1 / pgbench)
        print(
            f"W={w}: refundsync / celery no-op = {ours / noop:.2f},"
            f" refundsync / pgbench = {ours / pgbench:.2f},"
            f" shared-cores bound of a transaction per event {bound:.0f} events/s"
            f" ({bound / noop:.2f} x no-op;"
            f" refundsync at {ours / bound:.2f} of it),"
            f" peak RSS of one worker process {peaks[w] / 1024:.0f} MiB"
        )


if __name__ == "__main__":
    sys.exit(main())
