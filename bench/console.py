"""Benchmark 7: the operator console's pages for an order with 1,000 events.

    .venv/bin/python -m bench.console [--events 1000] [--requests 50]

One order's history of `--events` events (generated as DR would send them) is published and
applied by a real worker; then a real ingest with the console on answers `--requests` GETs of
each page, one at a time, signed in. The baseline, in the same invocation: the read API's
`GET /orders/{id}` (the same summary as JSON, no timeline) on the same ingest. Prints the
median and p95 of each, and the ratio of the order page to the baseline.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
import uuid

import httpx

from ingest.console import COOKIE
from models.migrate import upgrade
from tests import deadlines, eventgen, support

PASSWORD = "bench-console"


def _timed(url: str, headers: dict[str, str], requests: int) -> list[float]:
    times = []
    with httpx.Client(timeout=30, headers=headers) as client:
        client.get(url)  # the first request warms the connection and the caches
        for _ in range(requests):
            started = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, (url, response.status_code)
    return times


def _login(base: str) -> str:
    page = httpx.get(f"{base}/console/login", timeout=30)
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token
    first = re.search(rf"{COOKIE}=([^;]*)", page.headers["set-cookie"])
    assert first
    cookie = first.group(1)
    signed_in = httpx.post(
        f"{base}/console/login",
        data={"csrf": token.group(1), "password": PASSWORD},
        headers={"cookie": f"{COOKIE}={cookie}"},
        timeout=30,
    )
    found = re.search(rf"{COOKIE}=([^;]*)", signed_in.headers["set-cookie"])
    assert signed_in.status_code == 303
    assert found
    return found.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    redis = support.RedisServer().start()
    db = support.Database().create()
    processes: list[support.Process] = []
    try:
        upgrade(db.url)
        order_id = f"bench-{uuid.uuid4().hex[:8]}"
        events = eventgen.order_history(random.Random(7), order_id, args.events)
        support.publish_all(redis.url, db.url, [json.dumps(e).encode() for e in events])
        env = support.service_env(db.url, redis.url, REFUNDSYNC_CONSOLE_PASSWORD=PASSWORD)
        processes.append(support.start_worker(env, "bench", 2))
        engine = support.engine_for(db.url)
        support.wait_finished(
            engine, [str(e["id"]) for e in events], timeout=deadlines.BACKLOG_S * 5
        )
        engine.dispose()
        ingest, base = support.start_ingest(env)
        processes.append(ingest)
        cookie = {"cookie": f"{COOKIE}={_login(base)}"}
        token = {"authorization": f"Bearer {support.API_TOKEN}"}
        pages = {
            "GET /orders/{id} (baseline)": (f"{base}/orders/{order_id}", token),
            "console order page": (f"{base}/console/orders/{order_id}", cookie),
            "console search": (f"{base}/console/?q=nothing-{order_id}", cookie),
            "console failed events": (f"{base}/console/failed", cookie),
            "console health": (f"{base}/console/health", cookie),
        }
        results = {
            name: _timed(url, headers, args.requests) for name, (url, headers) in pages.items()
        }
    finally:
        for process in processes:
            process.stop()
        redis.cleanup()
        db.drop()
    print(f"\n{len(events)} events on one order, {args.requests} requests each, one at a time")
    print(f"{'page':32} {'median ms':>10} {'p95 ms':>8}")
    for name, times in results.items():
        p95 = statistics.quantiles(times, n=20)[-1]
        print(f"{name:32} {statistics.median(times):10.1f} {p95:8.1f}")
    base_median = statistics.median(results["GET /orders/{id} (baseline)"])
    order_median = statistics.median(results["console order page"])
    print(f"\norder page / baseline = {order_median / base_median:.1f}")


if __name__ == "__main__":
    main()
