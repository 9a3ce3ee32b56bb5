"""Benchmark 3: end-to-end latency at a steady webhook rate, ingest -> worker -> Postgres.

    .venv/bin/python -m bench.latency [--rate 200] [--seconds 60] [--runs 3] [--workers 2]
        [--warmup 2] [--timeline PREFIX]

Each run gets a fresh database, a private Redis, the real ingest and one real
`refundsync worker --concurrency W`. Signed DR events (eventgen histories of 10 events per
order; orders interleaved in groups of 100, so one order's events are about 0.5 s apart)
are sent open loop at a steady rate: send i starts at t0 + i/rate whatever the answers
before it, and its envelope `createdTime` is the moment it is sent. A short warm-up at the
same rate precedes the measured window and is left out. Once every event has an outcome,
the database gives per event, for outcome 'applied': received -> applied
(`processed_at - received_at`) and DR createdTime -> applied (`processed_at -
created_time`). `processed_at` is taken by the worker as it writes the outcome, just before
the commit. Prints p50/p95/p99/max per run, medians over the runs, the achieved send rate,
and whether received -> applied p99 stays under the 100 ms target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import subprocess
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import psycopg
import redis as redis_client

from models.migrate import upgrade
from tests import eventgen, support

TARGET_P99_MS = 100.0
PER_ORDER = 10
INTERLEAVE = 100  # orders whose events are sent round-robin
WAIT_S = 120.0
PERCENTILES = (50, 95, 99)


@dataclass
class Sent:
    """One webhook delivery as the sender saw it (times in seconds from t0)."""

    event_id: str
    scheduled: float
    started: float = 0.0
    answered: float = 0.0
    status: int = 0
    detail: str = ""
    started_epoch: float = 0.0
    answered_epoch: float = 0.0


@dataclass
class RunResult:
    sent: int
    measured: int
    send_rate: float
    late_p99_ms: float
    http_p50_ms: float
    http_p99_ms: float
    non_202: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    retried: int = 0
    received: dict[str, float] = field(default_factory=dict)
    created: dict[str, float] = field(default_factory=dict)
    log_problems: list[str] = field(default_factory=list)
    drain_rate: float = math.nan
    queue_max: int = 0
    queue_at_end: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    window: list[Sent] = field(default_factory=list)
    total_sent: int = 0
    commits: int = 0


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0-100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    found = {f"p{p}": percentile(values, p) for p in PERCENTILES}
    found["max"] = max(values) if values else math.nan
    return found


def iso_ms(moment: datetime) -> str:
    """ISO 8601 UTC with milliseconds and 'Z', as DR writes createdTime."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_events(rng: random.Random, run: int, count: int) -> list[dict[str, Any]]:
    """`count` events: PER_ORDER per order, round-robin over groups of INTERLEAVE orders."""
    orders = math.ceil(count / PER_ORDER)
    histories = [
        eventgen.order_history(rng, f"lat-{run}-{n}-{uuid.uuid4().hex[:6]}", PER_ORDER)
        for n in range(orders)
    ]
    events: list[dict[str, Any]] = []
    for start in range(0, orders, INTERLEAVE):
        group = histories[start : start + INTERLEAVE]
        for k in range(PER_ORDER):
            events.extend(history[k] for history in group if k < len(history))
    return events[:count]


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that carries one request at a time.

    The load generator shares the two cores with what it measures, so it must cost little:
    httpx took about 3 ms of a core per request here, a quarter of the machine at 200/s. This
    writes request bytes and reads only the status line and Content-Length of each answer
    (the ingest always sends one).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        length = next(
            (
                int(line.split(":", 1)[1])
                for line in head
                if line.lower().startswith("content-length:")
            ),
            0,
        )
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result(int(head[0].split(" ", 2)[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    async def request(self, data: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await asyncio.wait_for(self.waiter, 30)


async def send_all(base: str, events: list[dict[str, Any]], rate: float) -> list[Sent]:
    """Send every event open loop at `rate`/s; each send's createdTime is its start."""
    host, port = base.removeprefix("http://").split(":")
    head = (
        f"POST /webhooks/digital-river HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/json\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    sent = [Sent(str(event["id"]), i / rate) for i, event in enumerate(events)]
    idle: list[_Connection] = []
    opened: list[_Connection] = []
    t0 = loop.time() + 0.2

    async def one(record: Sent, event: dict[str, Any]) -> None:
        event["createdTime"] = iso_ms(datetime.now(UTC))
        body = json.dumps(event).encode()
        signature = support.signed_headers(body, secret=support.SECRET)["DigitalRiver-Signature"]
        data = (
            head
            + f"DigitalRiver-Signature: {signature}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        record.started = loop.time() - t0
        record.started_epoch = time.time()
        connection = None
        try:
            # The server closes a connection left idle for 5 s (uvicorn's keep-alive).
            while idle and idle[-1].closed.done():
                idle.pop()
            if idle:
                connection = idle.pop()
            else:
                _, connection = await loop.create_connection(_Connection, host, int(port))
                opened.append(connection)
            record.status = await connection.request(data)
            if record.status != 202:
                record.detail = f"HTTP {record.status}"
            idle.append(connection)
        except (OSError, TimeoutError) as exc:
            record.detail = f"{type(exc).__name__}: {exc}"[:200]
            if connection is not None and connection.transport is not None:
                connection.transport.close()
        record.answered = loop.time() - t0
        record.answered_epoch = time.time()

    tasks: list[asyncio.Task[None]] = []
    for record, event in zip(sent, events, strict=True):
        delay = t0 + record.scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(record, event)))
    await asyncio.gather(*tasks)
    for connection in opened:
        if connection.transport is not None:
            connection.transport.close()
    return sent


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def wait_outcomes(url: str, ids: list[str], timeout: float) -> int:
    """Wait until none of `ids` is missing or 'queued'; return how many still are."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM webhook_events WHERE id = ANY(%s) AND outcome <> 'queued'",
                (ids,),
            ).fetchone()
            left = len(ids) - int(row[0] if row else 0)
            if left == 0 or time.monotonic() > deadline:
                return left
            time.sleep(0.25)


def _ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def _machine() -> tuple[int, int, int]:
    """(busy, stolen, all) ticks of the whole machine so far, summed over its CPUs. Stolen
    time is when the hypervisor ran someone else on these cores: counted in busy, but
    nobody here used it."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values) - values[3] - values[4], values[7], sum(values)


def _commits(db: str) -> int:
    """Transactions committed in the database so far (the stats lag by up to ~0.5 s)."""
    with psycopg.connect(support.ADMIN_DSN, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (db,)
        ).fetchone()
    return int(row[0]) if row else 0


class CpuMeter:
    """CPU used by each part of this benchmark between start() and stop(), and by the rest
    of the machine (other people's work shares these cores)."""

    def __init__(
        self, ingest: support.Process, worker: support.Process, redis_port: int, db: str
    ) -> None:
        self.ingest, self.worker, self.db = ingest, worker, db
        info = subprocess.run(
            ["redis-cli", "-p", str(redis_port), "INFO", "server"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        self.redis = [
            int(line.split(":")[1]) for line in info.splitlines() if line.startswith("process_id:")
        ]

    def _pids(self) -> dict[str, list[int]]:
        with psycopg.connect(support.ADMIN_DSN, autocommit=True) as conn:
            backends = [
                int(row[0])
                for row in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.db,)
                )
            ]
        return {
            "sender": [os.getpid()],
            "ingest": [self.ingest.proc.pid, *_children(self.ingest.proc.pid)],
            "worker main": [self.worker.proc.pid],
            "worker pool": _children(self.worker.proc.pid),
            "postgres": backends,
            "redis": self.redis,
        }

    def _sample(self) -> dict[str, dict[int, int]]:
        return {
            part: {pid: t for pid in pids if (t := _ticks(pid)) is not None}
            for part, pids in self._pids().items()
        }

    def start(self) -> None:
        self.before, self.machine_before, self.t0 = self._sample(), _machine(), time.monotonic()

    def stop(self) -> dict[str, float]:
        """Cores used on average by each part, 'other' and 'machine'."""
        after, machine, wall = self._sample(), _machine(), time.monotonic() - self.t0
        hz = os.sysconf("SC_CLK_TCK")
        cores = {
            part: sum(t - self.before[part].get(pid, 0) for pid, t in ticks.items()) / hz / wall
            for part, ticks in after.items()
        }
        ticks = max(1, machine[2] - self.machine_before[2])
        cpus = os.cpu_count() or 1
        cores["machine"] = (machine[0] - self.machine_before[0]) / ticks * cpus
        cores["stolen"] = (machine[1] - self.machine_before[1]) / ticks * cpus
        cores["other"] = max(0.0, cores["machine"] - cores["stolen"] - sum(cores[p] for p in after))
        cores["seconds"] = wall
        return cores


class QueueSampler(threading.Thread):
    """Samples the worker queue's length twice a second."""

    def __init__(self, url: str, queue: str = "refundsync") -> None:
        super().__init__(daemon=True)
        self.client = redis_client.Redis.from_url(url)
        self.queue = queue
        self.samples: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.5):
            with contextlib.suppress(redis_client.RedisError):
                self.samples.append(int(self.client.llen(self.queue)))

    def stop(self) -> None:
        self.halt.set()
        self.join()
        self.client.close()


def log_problems(*processes: support.Process) -> list[str]:
    """Warning and error lines in the services' logs (read before they are removed)."""
    found = []
    for process in processes:
        for line in process.log().splitlines():
            if any(word in line for word in ('"WARNING"', '"ERROR"', '"CRITICAL"', "Traceback")):
                found.append(f"{process.name}: {line[:300]}")
    return found


def one_run(run: int, args: argparse.Namespace, rng: random.Random) -> RunResult:
    warmup = int(args.warmup * args.rate)
    events = make_events(rng, run, warmup + int(args.seconds * args.rate))
    with contextlib.ExitStack() as stack:
        db = support.Database().create()
        stack.callback(db.drop)
        redis = support.RedisServer().start()
        stack.callback(redis.cleanup)
        upgrade(db.url)
        env = support.service_env(db.url, redis.url)
        ingest, base = support.start_ingest(env)
        stack.callback(ingest.stop)
        worker = support.start_worker(env, "lat", args.workers)
        stack.callback(worker.stop)

        sampler = QueueSampler(redis.url)
        sampler.start()
        stack.callback(sampler.stop)
        meter = CpuMeter(ingest, worker, redis.port, db.name)
        commits_before = _commits(db.name)
        meter.start()
        sent: list[Sent] = run_async(send_all(base, events, args.rate))
        queue_at_end = sampler.samples[-1] if sampler.samples else 0
        accepted = [s.event_id for s in sent if s.status == 202]
        left = wait_outcomes(db.url, accepted, WAIT_S)
        cpu = meter.stop()
        commits = _commits(db.name) - commits_before
        if left:
            print(f"  run {run}: {left} events still unfinished after {WAIT_S:.0f} s", flush=True)
        measured_ids = [s.event_id for s in sent[warmup:] if s.status == 202]
        with psycopg.connect(db.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT id, outcome, attempts,"
                " extract(epoch FROM processed_at - received_at) * 1000,"
                " extract(epoch FROM processed_at - created_time) * 1000"
                " FROM webhook_events WHERE id = ANY(%s)",
                (measured_ids,),
            ).fetchall()
            if args.timeline:
                dump_timeline(conn, f"{args.timeline}-run{run}.csv", sent, warmup)
            drained = conn.execute(
                "SELECT count(*), extract(epoch FROM max(processed_at) - min(processed_at))"
                " FROM webhook_events WHERE outcome <> 'queued'"
            ).fetchone()
        problems = log_problems(ingest, worker)

    window = sent[warmup:]
    span = window[-1].started - window[0].started if len(window) > 1 else math.nan
    result = RunResult(
        sent=len(window),
        measured=len(measured_ids),
        send_rate=(len(window) - 1) / span if span else math.nan,
        late_p99_ms=percentile([(s.started - s.scheduled) * 1000 for s in window], 99),
        http_p50_ms=percentile([(s.answered - s.started) * 1000 for s in window], 50),
        http_p99_ms=percentile([(s.answered - s.started) * 1000 for s in window], 99),
        log_problems=problems,
        queue_max=max(sampler.samples, default=0),
        queue_at_end=queue_at_end,
        cpu=cpu,
        window=window,
        total_sent=len(sent),
        commits=commits,
    )
    if drained and drained[1]:
        result.drain_rate = int(drained[0]) / float(drained[1])
    for s in window:
        if s.status != 202:
            result.non_202[f"{s.status or 'error'} {s.detail}"] += 1
    found = {row[0] for row in rows}
    result.outcomes["missing"] = len(set(measured_ids) - found)
    for event_id, outcome, attempts, received_ms, created_ms in rows:
        result.outcomes[outcome] += 1
        result.retried += int(attempts or 0) > 1
        if outcome == "applied":
            result.received[event_id] = float(received_ms)
            result.created[event_id] = float(created_ms)
    if not result.outcomes["missing"]:
        del result.outcomes["missing"]
    return result


def dump_timeline(conn: psycopg.Connection[Any], path: str, sent: list[Sent], warmup: int) -> None:
    """Per event, in send order: when it was sent and answered (epoch seconds), when the
    ingest received it and when the worker applied it, for finding what a burst lines up
    with (checkpoints, autovacuum, the restore scan)."""
    rows = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT id, extract(epoch FROM received_at), extract(epoch FROM processed_at),"
            " attempts FROM webhook_events WHERE id = ANY(%s)",
            ([s.event_id for s in sent],),
        )
    }
    with open(path, "w") as out:
        out.write("index,warmup,sent,answered,status,received,processed,attempts\n")
        for i, s in enumerate(sent):
            received, processed, attempts = rows.get(s.event_id, (None, None, None))
            out.write(
                f"{i},{int(i < warmup)},{s.started_epoch:.6f},{s.answered_epoch:.6f},{s.status},"
                f"{received or ''},{processed or ''},{attempts or ''}\n"
            )


def fmt(stats: dict[str, float]) -> str:
    return " ".join(f"{stats[k]:8.1f}" for k in ("p50", "p95", "p99", "max"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="webhooks per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="worker --concurrency")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument(
        "--timeline", metavar="PREFIX", help="write each run's per-event times to PREFIX-runN.csv"
    )
    args = parser.parse_args()
    rng = random.Random(13)
    results: list[RunResult] = []
    for run in range(1, args.runs + 1):
        result = one_run(run, args, rng)
        results.append(result)
        received = summary(list(result.received.values()))
        total = max(1, result.total_sent)

        def per_event(part: str, r: RunResult = result, n: int = total) -> float:
            return r.cpu[part] * r.cpu["seconds"] * 1000 / n

        created = summary(list(result.created.values()))
        print(
            f"run {run}: sent {result.sent} at {result.send_rate:.1f}/s"
            f" (send lateness p99 {result.late_p99_ms:.1f} ms, 202 in p50"
            f" {result.http_p50_ms:.1f} / p99 {result.http_p99_ms:.1f} ms),"
            f" non-202 {sum(result.non_202.values())},"
            f" outcomes {dict(sorted(result.outcomes.items()))}, retried {result.retried}",
            flush=True,
        )
        print(f"  received -> applied ms  p50/p95/p99/max {fmt(received)}", flush=True)
        print(f"  created  -> applied ms  p50/p95/p99/max {fmt(created)}", flush=True)
        print(
            f"  worker drained {result.drain_rate:.1f} events/s; queue max {result.queue_max},"
            f" {result.queue_at_end} when sending ended",
            flush=True,
        )
        print(
            f"  CPU cores over {result.cpu['seconds']:.0f} s (send + drain): "
            + ", ".join(
                f"{part} {result.cpu[part]:.2f}"
                for part in (
                    "sender",
                    "ingest",
                    "worker main",
                    "worker pool",
                    "postgres",
                    "redis",
                    "other",
                )
            )
            + f"; machine {result.cpu['machine']:.2f} of {os.cpu_count()}"
            f" (stolen by the hypervisor {result.cpu['stolen']:.2f});"
            f" CPU ms/event: worker main {per_event('worker main'):.2f}, pool"
            f" {per_event('worker pool'):.2f}, postgres {per_event('postgres'):.2f};"
            f" commits/event {result.commits / total:.2f}",
            flush=True,
        )
        in_order = [
            result.received[s.event_id] for s in result.window if s.event_id in result.received
        ]
        tenth = max(1, len(in_order) // 10)
        print(
            "  received -> applied p50 of the first tenth sent"
            f" {percentile(in_order[:tenth], 50):.1f} ms,"
            f" of the last tenth {percentile(in_order[-tenth:], 50):.1f} ms",
            flush=True,
        )
        for reason, count in result.non_202.most_common(5):
            print(f"  non-202 x{count}: {reason}", flush=True)
        if result.log_problems:
            print(f"  {len(result.log_problems)} warning/error log lines, first:", flush=True)
            for line in result.log_problems[:5]:
                print(f"    {line}", flush=True)

    per_run = [
        (summary(list(r.received.values())), summary(list(r.created.values()))) for r in results
    ]
    print(
        f"\n{args.rate:.0f} signed webhooks/s for {args.seconds:.0f} s (+{args.warmup:.0f} s"
        f" warm-up), ingest -> 1 worker --concurrency {args.workers}; {args.runs} run(s)"
    )
    print("processed_at is taken by the worker as it writes the outcome, just before the commit")
    head = f"{'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}"
    print(
        f"\n{'':10} {'sent/s':>7} {'non-202':>7} {'applied':>7} {'other':>6} |"
        f" received -> applied (ms)            | DR createdTime -> applied (ms)"
    )
    print(f"{'':10} {'':>7} {'':>7} {'':>7} {'':>6} | {head} | {head}")
    for n, (result, (received, created)) in enumerate(zip(results, per_run, strict=True), 1):
        other = sum(v for k, v in result.outcomes.items() if k != "applied")
        print(
            f"{'run ' + str(n):10} {result.send_rate:7.1f} {sum(result.non_202.values()):7d}"
            f" {result.outcomes['applied']:7d} {other:6d} | {fmt(received)} | {fmt(created)}"
        )

    def med(index: int, key: str) -> float:
        return statistics.median(stats[index][key] for stats in per_run)

    medians = [{k: med(i, k) for k in ("p50", "p95", "p99", "max")} for i in (0, 1)]
    print(
        f"{'median':10} {statistics.median(r.send_rate for r in results):7.1f}"
        f" {statistics.median(sum(r.non_202.values()) for r in results):7.0f}"
        f" {statistics.median(r.outcomes['applied'] for r in results):7.0f}"
        f" {'':6} | {fmt(medians[0])} | {fmt(medians[1])}"
    )
    outcomes: Counter[str] = Counter()
    for result in results:
        outcomes.update(result.outcomes)
    print(f"\noutcomes over all runs: {dict(sorted(outcomes.items()))}")
    p99 = medians[0]["p99"]
    each = ", ".join(f"{stats[0]['p99']:.1f}" for stats in per_run)
    verdict = "MET" if p99 < TARGET_P99_MS else "NOT MET"
    print(
        f"target received -> applied p99 < {TARGET_P99_MS:.0f} ms at {args.rate:.0f}/s:"
        f" {verdict} (median p99 {p99:.1f} ms; per run {each})"
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
