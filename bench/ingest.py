"""Benchmark 1: ingest throughput and latency against its ceiling and a naive peer.

    .venv/bin/python -m bench.ingest [--runs 3] [--seconds 10] [--connections 32]
        [--baseline DIR]

Each server runs under the same uvicorn settings (one process, httptools, no access log)
against a private Redis; wrk (Debian's package) drives 32 connections with signed DR
payloads of 2-4 KB, each with its own event id. Prints requests/s, p50 and p99 per server
(medians over the runs) and the ratios to the two baselines. With `--baseline DIR` (a
checkout of another tree, e.g. `git worktree add DIR <commit>`), that tree's ingest runs
too, in each round, and its ratios are printed beside this tree's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from models.migrate import upgrade
from models.signature import sign
from tests import eventgen, support

SECRET = "whsec_bench"
BASELINE = "baseline tree's ingest"
SERVERS = {
    "ceiling (trivial ASGI)": "bench.peers:ceiling",
    "naive (FastAPI + send_task)": "bench.peers:naive",
    "refundsync ingest": "ingest.app:app",
}


def payloads(path: Path, count: int) -> None:
    """Signed DR events, 2-4 KB each (DR's objects padded with realistic metadata)."""
    rng = random.Random(7)
    stamp = int(time.time()) + 60
    with path.open("w") as out:
        for n in range(count // 10):
            for event in eventgen.order_history(rng, f"bench-{n}-{uuid.uuid4().hex[:6]}", 10):
                event["data"]["object"]["metadata"] = {
                    f"k{i}": "x" * rng.randint(40, 90) for i in range(rng.randint(20, 35))
                }
                body = json.dumps(event).encode()
                out.write(f"{sign(SECRET, body, stamp)}\t{body.decode()}\n")


def wrk(url: str, script: Path, data: Path, seconds: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
            "--",
            str(data),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def percentile(p: str) -> float:
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50": percentile("50"),
        "p99": percentile("99"),
        "errors": float(non2xx.group(1)) if non2xx else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--baseline", type=Path, help="a checkout of the tree to compare with")
    args = parser.parse_args()
    servers = {name: (target, None) for name, target in SERVERS.items()}
    if args.baseline:
        servers[BASELINE] = ("ingest.app:app", args.baseline.resolve())
    if not shutil.which("wrk"):
        sys.exit("bench: wrk is needed (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="refundsync-bench-"))
    data = work / "signed.tsv"
    payloads(data, 20_000)
    redis = support.RedisServer().start()
    db = support.Database().create()
    # The ingest seals each message with the queue key the migrations create.
    upgrade(db.url)
    env = support.service_env(db.url, redis.url, DR_WEBHOOK_SECRETS=SECRET)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    try:
        for run in range(args.runs):
            for name, (target, tree) in servers.items():
                port = support.free_port()
                server = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        target,
                        "--port",
                        str(port),
                        "--no-access-log",
                        "--log-level",
                        "warning",
                        "--http",
                        "httptools",
                        "--loop",
                        "uvloop",
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    # The baseline's modules come first on its path.
                    cwd=tree,
                )
                base = f"http://127.0.0.1:{port}"
                support.wait_for(lambda b=base: _up(b), timeout=30, what=name)
                try:
                    result = wrk(
                        base,
                        Path(__file__).with_name("signed.lua"),
                        data,
                        args.seconds,
                        args.connections,
                    )
                finally:
                    server.terminate()
                    server.wait(timeout=30)
                redis.cli("FLUSHALL")
                results[name].append(result)
                print(f"run {run + 1} {name}: {result}", flush=True)
    finally:
        redis.cleanup()
        db.drop()
        shutil.rmtree(work, ignore_errors=True)
    medians = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for name, rs in results.items()
    }
    ours = medians["refundsync ingest"]
    print(f"\nmedians over {args.runs} runs, {args.connections} connections, {args.seconds}s each")
    print(f"{'server':32} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    for name, m in medians.items():
        print(f"{name:32} {m['rps']:9.0f} {m['p50']:8.2f} {m['p99']:8.2f} {m['errors']:8.0f}")
    print(f"\nrefundsync / ceiling = {ours['rps'] / medians['ceiling (trivial ASGI)']['rps']:.2f}")
    print(
        f"refundsync / naive   = {ours['rps'] / medians['naive (FastAPI + send_task)']['rps']:.2f}"
    )
    if BASELINE in medians:
        base_rps = medians[BASELINE]["rps"]
        ceiling = medians["ceiling (trivial ASGI)"]["rps"]
        print(f"baseline / ceiling   = {base_rps / ceiling:.2f}")
        print(f"refundsync / baseline = {ours['rps'] / base_rps:.2f}")


def _up(base: str) -> bool:
    try:
        return (
            httpx.post(f"{base}/webhooks/digital-river", content=b"{}", timeout=1).status_code > 0
        )
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
