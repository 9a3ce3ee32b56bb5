"""Where a drain's CPU goes: CPU per event of each process, refundsync against Celery's no-op.

    .venv/bin/python -m bench.cpu [--concurrency 2] [--events 60000] [--window 15] [--runs 3]

Events are preloaded as in benchmark 2; once the worker has drained for a few seconds, the
CPU time (user + system, from /proc) of its main process, its pool processes, every
Postgres process and the private Redis is read at both ends of a window, and divided by the
messages drained in it. The same is done for as many no-op tasks drained with the same
settings. Also printed: how busy the whole machine was (from /proc/stat) and the drain
rate. Medians over the runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.worker import NOOP_ARGS, event_bodies, publish_noop
from models.migrate import upgrade
from tests import support

_TICK = os.sysconf("SC_CLK_TCK")
PARTS = ("main", "pool", "postgres", "redis")


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _pids(*pgrep: str) -> list[int]:
    found = subprocess.run(["pgrep", *pgrep], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


def _machine() -> tuple[int, int]:
    """Jiffies in all, and idle (idle + iowait), since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values), values[3] + values[4]


def _sample(worker: support.Process, redis: support.RedisServer) -> dict[str, dict[int, float]]:
    """CPU seconds so far of each process of each part, by pid."""
    pid = worker.proc.pid
    parts = {
        "main": [pid],
        "pool": _pids("-P", str(pid)),
        # Every Postgres process on the machine: run the benchmark with nothing else on it.
        "postgres": _pids("-x", "postgres"),
        "redis": _pids("-f", f"redis-server.*:{redis.port}"),
    }
    return {part: {p: _cpu_s(p) for p in pids} for part, pids in parts.items()}


def _used(before: dict[int, float], after: dict[int, float]) -> float:
    # Only processes alive at both ends: one that ended inside the window took its CPU
    # time with it.
    return sum(after[pid] - before[pid] for pid in after.keys() & before.keys())


def _window(
    env: dict[str, str],
    redis: support.RedisServer,
    concurrency: int,
    extra: list[str],
    window_s: float,
) -> dict[str, float]:
    worker = support.start_worker(env, "cpu", concurrency, *extra)

    def queued() -> int:
        return int(redis.cli("LLEN", "refundsync"))

    try:
        time.sleep(3)  # past the start-up
        before, left, machine = _sample(worker, redis), queued(), _machine()
        started = time.monotonic()
        time.sleep(window_s)
        after, drained = _sample(worker, redis), left - queued()
        seconds, (total, idle) = time.monotonic() - started, _machine()
        if queued() == 0:
            raise SystemExit("the queue ran dry inside the window: pass more --events")
        if drained <= 0:
            raise SystemExit("nothing was drained inside the window: see the worker's log")
    finally:
        worker.stop()
    figures = {part: 1000 * _used(before[part], after[part]) / drained for part in PARTS}
    figures["busy"] = 1 - (idle - machine[1]) / (total - machine[0])
    figures["rate"] = drained / seconds
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--orders", type=int, default=2_000)
    parser.add_argument("--window", type=float, default=15.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    bodies = event_bodies(args.events, args.orders)
    kinds: dict[str, tuple[Callable[[str, str], None], list[str]]] = {
        "refundsync": (lambda url, db_url: support.publish_all(url, db_url, bodies), []),
        "celery no-op": (lambda url, _: publish_noop(url, bodies), NOOP_ARGS),
    }
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for run in range(args.runs):
        for kind, (publish, extra) in kinds.items():
            db = support.Database().create()
            redis = support.RedisServer().start()
            try:
                upgrade(db.url)
                publish(redis.url, db.url)
                env = support.service_env(db.url, redis.url, REFUNDSYNC_MAX_RETRIES="100")
                figures = _window(env, redis, args.concurrency, extra, args.window)
            finally:
                redis.cleanup()
                db.drop()
            results[kind].append(figures)
            print(f"run {run + 1} {kind}: {figures['rate']:.0f}/s", flush=True)
    print(
        f"\nW={args.concurrency}, windows of {args.window:.0f} s, medians over {args.runs} runs;"
        " ms of CPU per event (user + system); `all` adds up the parts' medians"
    )
    print(f"{'':14}" + "".join(f"{name:>10}" for name in (*PARTS, "all", "busy", "/s")))
    for kind, runs in results.items():
        median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        every = sum(median[part] for part in PARTS)
        print(
            f"{kind:14}"
            + "".join(f"{median[part]:10.2f}" for part in PARTS)
            + f"{every:10.2f}{median['busy']:10.0%}{median['rate']:10.0f}"
        )


if __name__ == "__main__":
    main()
