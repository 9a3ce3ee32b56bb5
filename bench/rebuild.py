"""Benchmark 5: the upgrade to contract v2 of the summary on a large ledger.

    .venv/bin/python -m bench.rebuild [--events 1000000] [--orders 100000]

A database at migration 0005 (contract v1) is filled with `--events` applied events of
`--orders` orders (generated histories, as DR would send them), then timed: the migration to
0006 (columns and two indexes), and `refundsync order rebuild` (every order recomputed from
its events). The baseline, in the same invocation: the pure rules run over the same events
in this process with no database, the floor of any rebuild. Prints seconds and events/s.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg

from models import rebuild
from models.db import make_engine
from models.migrate import upgrade
from models.rules import OrderState
from tests import eventgen, support

CHUNK = 20_000


def histories(events: int, orders: int) -> Iterator[tuple[str, dict[str, object]]]:
    """(order id, event) of `orders` orders' histories, `events` in all."""
    rng = random.Random(5)
    per_order = max(1, events // orders)
    for n in range(orders):
        order_id = f"rb-{n}-{uuid.UUID(int=rng.getrandbits(128)).hex[:8]}"
        for event in eventgen.order_history(rng, order_id, per_order):
            yield order_id, event


def load(url: str, events: int, orders: int) -> int:
    """Fill webhook_events (applied) and orders as contract v1 left them; rows loaded."""
    loaded = 0
    now = datetime.now(UTC)
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
        with conn.cursor() as cursor:
            with cursor.copy(
                "COPY webhook_events (id, type, payload, outcome, deliveries, attempts,"
                " received_at, processed_at, order_id) FROM STDIN"
            ) as copy:
                for order_id, event in histories(events, orders):
                    copy.write_row(
                        (
                            event["id"],
                            event["type"],
                            json.dumps(event),
                            "applied",
                            1,
                            1,
                            now,
                            now,
                            order_id,
                        )
                    )
                    loaded += 1
            cursor.execute("INSERT INTO orders (id) SELECT DISTINCT order_id FROM webhook_events")
        conn.commit()
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
    return loaded


def rules_only(events: int, orders: int) -> tuple[int, float]:
    """The pure rules over the same events, grouped by order: (events, seconds)."""
    by_order: dict[str, list[str]] = {}
    for order_id, event in histories(events, orders):
        by_order.setdefault(order_id, []).append(json.dumps(event))
    started = time.monotonic()
    count = 0
    for order_id, payloads in by_order.items():
        # The rebuild's own recomputation, with no database around it.
        rebuild.rebuilt(OrderState(order_id), payloads, "any")
        count += len(payloads)
    return count, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--orders", type=int, default=100_000)
    args = parser.parse_args()

    db = support.Database().create()
    try:
        upgrade(db.url, "0005")
        started = time.monotonic()
        loaded = load(db.url, args.events, args.orders)
        print(
            f"loaded {loaded} events of {args.orders} orders in {time.monotonic() - started:.1f} s"
        )

        started = time.monotonic()
        upgrade(db.url, "0006")
        migration_s = time.monotonic() - started
        print(f"migration 0005 -> 0006: {migration_s:.1f} s")

        engine = make_engine(db.url)
        try:
            done = rebuild.rebuild_all(engine, "any", batch=500)
        finally:
            engine.dispose()
        rate = done.events / done.seconds if done.seconds else 0.0
        print(
            f"rebuild: orders={done.orders} events={done.events} changed={done.changed}"
            f" {done.seconds:.1f} s, {rate:,.0f} events/s"
        )

        count, seconds = rules_only(args.events, args.orders)
        floor = count / seconds if seconds else 0.0
        print(
            f"baseline, the pure rules in-process: {count} events in {seconds:.1f} s,"
            f" {floor:,.0f} events/s"
        )
        print(
            f"RESULT events={done.events} migration_s={migration_s:.1f}"
            f" rebuild_s={done.seconds:.1f} rebuild/rules={rate / floor:.2f}"
        )
    finally:
        db.drop()


if __name__ == "__main__":
    main()
