"""Benchmark 6: the change feed and outbound webhooks.

    .venv/bin/python -m bench.notify throughput [--events 10000] [--orders 1000] [--runs 3]
        [--before REV]
    .venv/bin/python -m bench.notify latency [--rate 200] [--seconds 30] [--runs 3]
    .venv/bin/python -m bench.notify feed [--rows 1000000] [--reads 40] [--runs 3]

throughput: preloaded events drained by `refundsync worker --concurrency 2`, alternating
three variants per round on fresh databases: this code with deliveries on (a receiver on
loopback gets every change), this code with them off (the feed is still written), and the
code at REV (default: the commit before the feed existed), which writes neither. Prints
events/s per variant, medians, and the ratios; with deliveries on, also the time until the
last change was delivered.

latency: signed webhooks sent open loop at `--rate` to the real ingest, one worker
(--concurrency 2) delivering to a receiver on loopback. Per change: received (the ingest's
`received_at`) -> applied (`processed_at`), the baseline, and received -> delivered (the
receiver's clock on its first 2xx); p50/p99 per run and medians.

feed: `GET /changes?after=C&limit=1000` at random cursors through the real ingest, on a feed
of `--rows` changes and, alternating in the same invocation, of 10,000 (the baseline: what
the table's size costs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg

from bench.latency import make_events, percentile, run_async, send_all, wait_outcomes
from bench.worker import event_bodies, queue_empty
from models.feed import change_row
from models.migrate import upgrade
from models.payloads import Envelope, as_utc, load_json
from models.rules import EventRef, Ignore, OrderState, apply, interpret
from tests import eventgen, support
from tests.receiver import SECRET

# The commit before the change feed: the throughput baseline.
BEFORE = "4210356"


class SinkProcess:
    """bench.sink on a free port, in a process of its own."""

    def __init__(self) -> None:
        self.port = support.free_port()
        handle, name = tempfile.mkstemp(prefix="refundsync-sink-", suffix=".tsv")
        os.close(handle)
        self.out = Path(name)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.sink", str(self.port), str(self.out)],
            cwd=Path(__file__).resolve().parents[1],
        )
        support.wait_for(self._listening, timeout=10, what="the sink")

    def _listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
            return True
        return False

    @property
    def env(self) -> dict[str, str]:
        url = f"http://127.0.0.1:{self.port}/hooks"
        return {"REFUNDSYNC_NOTIFY_URL": url, "REFUNDSYNC_NOTIFY_SECRET": SECRET}

    def stop(self) -> list[tuple[float, str]]:
        """Every request's arrival time and eventId."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        lines = self.out.read_text().splitlines()
        self.out.unlink()
        return [(float(at), event_id) for at, event_id in (line.split("\t") for line in lines)]


def _count(url: str, sql: str, *params: Any) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


def _drain(variant: str, bodies: list[bytes], tree: Path | None) -> tuple[float, float | None]:
    """events/s applying the preloaded events, and seconds until every change was delivered
    (deliveries on only)."""
    with contextlib.ExitStack() as stack:
        db = support.Database().create()
        stack.callback(db.drop)
        redis = support.RedisServer().start()
        stack.callback(redis.cleanup)
        upgrade(db.url)
        extra: dict[str, str] = {"REFUNDSYNC_MAX_RETRIES": "100"}
        sink = None
        if variant == "on":
            sink = SinkProcess()
            stack.callback(sink.stop)
            extra |= sink.env
        env = support.service_env(db.url, redis.url, **extra)
        published = datetime.now(UTC)
        support.publish_all(redis.url, db.url, bodies)
        url = db.url.replace("postgresql+psycopg", "postgresql")
        worker = support.start_worker(env, f"bench-{variant}", 2, cwd=tree)
        stack.callback(worker.stop)
        started = time.monotonic()
        applied = None
        while True:
            if applied is None and queue_empty(redis):
                done = _count(
                    url,
                    "SELECT count(*) FROM webhook_events WHERE outcome <> 'queued'"
                    " AND received_at >= %s",
                    published,
                )
                if done >= len(bodies):
                    applied = time.monotonic() - started
                    if sink is None:
                        return len(bodies) / applied, None
            if applied is not None:
                waiting = _count(url, "SELECT count(*) FROM changes WHERE delivery = 'pending'")
                if waiting == 0:
                    return len(bodies) / applied, time.monotonic() - started
            time.sleep(0.2)


@contextlib.contextmanager
def _checkout(rev: str) -> Any:
    """The code at `rev` in a temporary git worktree (removed afterwards)."""
    root = Path(__file__).resolve().parents[1]
    directory = Path(tempfile.mkdtemp(prefix="refundsync-bench-before-"))
    subprocess.run(
        ["git", "-C", str(root), "worktree", "add", "--detach", "-q", str(directory), rev],
        check=True,
    )
    try:
        yield directory
    finally:
        subprocess.run(
            ["git", "-C", str(root), "worktree", "remove", "--force", str(directory)],
            check=False,
        )


def throughput(args: argparse.Namespace) -> None:
    bodies = event_bodies(args.events, args.orders)
    rates: dict[str, list[float]] = {"on": [], "off": [], "before": []}
    delivered: list[float] = []
    with _checkout(args.before) as before:
        for run in range(1, args.runs + 1):
            for variant in ("on", "off", "before"):
                rate, all_delivered = _drain(
                    variant, bodies, before if variant == "before" else None
                )
                rates[variant].append(rate)
                if all_delivered is not None:
                    delivered.append(all_delivered)
                print(f"run {run} {variant:6}: {rate:7.0f} events/s", flush=True)
            print(
                f"  on/before {rates['on'][-1] / rates['before'][-1]:.2f},"
                f" on/off {rates['on'][-1] / rates['off'][-1]:.2f};"
                f" every change delivered {delivered[-1]:.1f} s after the start",
                flush=True,
            )
    medians = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"\n{len(bodies)} events for {args.orders} orders, worker --concurrency 2;"
        f" medians over {args.runs} runs (events/s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in medians.items())
    )
    per_run = [on / b for on, b in zip(rates["on"], rates["before"], strict=True)]
    print(
        f"deliveries on / code before the feed: median {statistics.median(per_run):.2f}"
        f" (per run {', '.join(f'{r:.2f}' for r in per_run)}); on / off"
        f" {medians['on'] / medians['off']:.2f}; off / before"
        f" {medians['off'] / medians['before']:.2f}; target >= 0.85"
    )


def _latency_run(run: int, args: argparse.Namespace, rng: random.Random) -> tuple[Any, Any]:
    warmup = int(2 * args.rate)
    events = make_events(rng, run, warmup + int(args.seconds * args.rate))
    sink = SinkProcess()
    arrivals: list[tuple[float, str]] = []
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: arrivals.extend(sink.stop()))
        db = support.Database().create()
        stack.callback(db.drop)
        redis = support.RedisServer().start()
        stack.callback(redis.cleanup)
        upgrade(db.url)
        env = support.service_env(db.url, redis.url, **sink.env)
        ingest, base = support.start_ingest(env)
        stack.callback(ingest.stop)
        worker = support.start_worker(env, "lat", 2)
        stack.callback(worker.stop)
        sent = run_async(send_all(base, events, args.rate))
        accepted = [s.event_id for s in sent[warmup:] if s.status == 202]
        wait_outcomes(db.url, accepted, 120)
        url = db.url.replace("postgresql+psycopg", "postgresql")
        deadline = time.monotonic() + 120
        while _count(url, "SELECT count(*) FROM changes WHERE delivery = 'pending'"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT e.id, extract(epoch FROM e.received_at),"
                " extract(epoch FROM e.processed_at) FROM webhook_events e"
                " JOIN changes c ON c.event_id = e.id WHERE e.id = ANY(%s)",
                (accepted,),
            ).fetchall()
    first: dict[str, float] = {}
    for at, event_id in arrivals:
        first.setdefault(event_id, at)
    applied = [(float(p) - float(r)) * 1000 for _, r, p in rows]
    delivered = [(first[i] - float(r)) * 1000 for i, r, _ in rows if i in first]
    missing = len(rows) - len(delivered)
    return (applied, delivered, missing), len(accepted)


def latency(args: argparse.Namespace) -> None:
    rng = random.Random(61)
    runs = []
    for run in range(1, args.runs + 1):
        (applied, delivered, missing), accepted = _latency_run(run, args, rng)
        runs.append(
            (
                percentile(applied, 50),
                percentile(applied, 99),
                percentile(delivered, 50),
                percentile(delivered, 99),
            )
        )
        print(
            f"run {run}: {accepted} events, {len(delivered)} changes delivered"
            f" ({missing} not), received -> applied p50/p99 {runs[-1][0]:.1f}/{runs[-1][1]:.1f}"
            f" ms, received -> delivered p50/p99 {runs[-1][2]:.1f}/{runs[-1][3]:.1f} ms",
            flush=True,
        )
    med = [statistics.median(r[i] for r in runs) for i in range(4)]
    print(
        f"\n{args.rate:.0f} webhooks/s for {args.seconds:.0f} s, {args.runs} runs, medians:"
        f" received -> applied p50 {med[0]:.1f} p99 {med[1]:.1f} ms (baseline);"
        f" received -> delivered p50 {med[2]:.1f} p99 {med[3]:.1f} ms; target p99 < 250 ms:"
        f" {'MET' if med[3] < 250 else 'NOT MET'}"
    )


def _summary_text() -> str:
    """A realistic stored summary: an order after ten events of its life."""
    state = OrderState("bench-order")
    for raw in eventgen.order_history(random.Random(5), "bench-order", 10):
        envelope = Envelope.model_validate(load_json(orjson.dumps(raw).decode()))
        plan = interpret(envelope, "any")
        if not isinstance(plan, Ignore):
            state = apply(state, EventRef(as_utc(envelope.createdTime), envelope.id), plan).state
    text: str = change_row(state, "evt", deliver=False)["summary"]
    return text


def _fill(url: str, rows: int) -> list[str]:
    """`rows` changes of realistic size, committed in transactions of 10,000; returns some
    cursors to read from."""
    summary = _summary_text()
    with psycopg.connect(url, autocommit=True) as conn:
        for start in range(0, rows, 10_000):
            conn.execute(
                "INSERT INTO changes (order_key, kind, version, event_id, summary)"
                " SELECT 'ord-' || g, 'order', 1, 'evt-' || g, %s::json"
                " FROM generate_series(%s::int, %s::int) g",
                (summary, start, min(rows, start + 10_000) - 1),
            )
        conn.execute("VACUUM ANALYZE changes")
        # Cursors with at least a full page after them.
        found = conn.execute(
            "SELECT xid, id FROM changes WHERE id <= %s ORDER BY random() LIMIT 200",
            (rows - 1000,),
        )
        return [f"{xid}-{change_id}" for xid, change_id in found]


def _reads(rows: int, reads: int) -> list[float]:
    with contextlib.ExitStack() as stack:
        db = support.Database().create()
        stack.callback(db.drop)
        redis = support.RedisServer().start()
        stack.callback(redis.cleanup)
        upgrade(db.url)
        cursors = _fill(db.url.replace("postgresql+psycopg", "postgresql"), rows)
        env = support.service_env(db.url, redis.url)
        ingest, base = support.start_ingest(env)
        stack.callback(ingest.stop)
        headers = {"Authorization": f"Bearer {support.API_TOKEN}"}
        took = []
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            client.get("/changes", params={"limit": "1000"})  # connections and caches warm
            for cursor in random.Random(rows).sample(cursors, min(reads, len(cursors))):
                started = time.perf_counter()
                response = client.get("/changes", params={"after": cursor, "limit": "1000"})
                took.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200, response.text
                assert len(orjson.loads(response.content)["changes"]) == 1000
        return took


def feed(args: argparse.Namespace) -> None:
    results: dict[int, list[float]] = {10_000: [], args.rows: []}
    for run in range(1, args.runs + 1):
        for rows in (10_000, args.rows):
            took = _reads(rows, args.reads)
            results[rows].append(statistics.median(took))
            print(
                f"run {run}: {rows:>9} changes: GET /changes?limit=1000 median"
                f" {statistics.median(took):.1f} ms, p90 {percentile(took, 90):.1f} ms,"
                f" max {max(took):.1f} ms over {len(took)} reads",
                flush=True,
            )
    small, large = (statistics.median(results[k]) for k in (10_000, args.rows))
    print(
        f"\nmedians over {args.runs} runs: {small:.1f} ms at 10,000 changes,"
        f" {large:.1f} ms at {args.rows:,}; ratio {large / small:.2f}; target < 50 ms:"
        f" {'MET' if large < 50 else 'NOT MET'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = parser.add_subparsers(dest="part", required=True)
    one = parts.add_parser("throughput")
    one.add_argument("--events", type=int, default=10_000)
    one.add_argument("--orders", type=int, default=1_000)
    one.add_argument("--runs", type=int, default=3)
    one.add_argument("--before", default=BEFORE)
    two = parts.add_parser("latency")
    two.add_argument("--rate", type=float, default=200.0)
    two.add_argument("--seconds", type=float, default=30.0)
    two.add_argument("--runs", type=int, default=3)
    three = parts.add_parser("feed")
    three.add_argument("--rows", type=int, default=1_000_000)
    three.add_argument("--reads", type=int, default=40)
    three.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    {"throughput": throughput, "latency": latency, "feed": feed}[args.part](args)


if __name__ == "__main__":
    main()
