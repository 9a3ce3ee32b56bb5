"""What one transaction of the unit of work sends together: the ledger's and the order's
statements in one round trip (models.db.query_all, execute_all). The ledger
(models.ledger) and an order's rows (models.orders) are read and written there; this module
only combines them."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from models import feed, ledger, orders
from models.db import Params, execute_all, query_all
from models.envelope import EventHeader
from models.rules import OrderState


def record_and_load(
    conn: Connection,
    header: EventHeader,
    raw: str,
    *,
    received_at: datetime,
    source: str,
    message: str,
    order_id: str | None,
) -> tuple[ledger.Delivery, OrderState | None]:
    """Record a copy (locking the event row), then lock and load its order if it exists.

    The three statements go out together (models.db.query_all). The order is read only
    once its lock is held, so it includes everything the lock's previous holder wrote. An
    order that does not exist yet is left to orders.lock_order, so that a copy which turns
    out to be a duplicate never creates one.
    """
    queries: list[tuple[Any, dict[str, Any]]] = [
        (
            ledger.statements(conn).record,
            ledger.record_params(header, raw, received_at, source, message),
        )
    ]
    if order_id is not None:
        key = {"order_id": order_id}
        prebuilt = orders.statements(conn)
        queries += [(prebuilt.lock_existing_order, key), (prebuilt.children, key)]
    results = query_all(conn, queries)
    delivery = ledger.delivery_of(results[0][0])
    if order_id is None or not results[1]:
        return delivery, None
    return delivery, orders.state_of(results[1][0], results[2])


def save_all(
    conn: Connection,
    orders_changed: Iterable[tuple[OrderState, OrderState]],
    history: list[dict[str, Any]],
    finishes: Iterable[ledger.Finish],
    feed_rows: list[dict[str, Any]],
) -> None:
    """Every write of one or more events, sent together: for each locked order what differs
    between its two states, the history rows, the events' outcomes, and the feed's changes
    (models.feed: the outbox, committed with what it records)."""
    prebuilt = orders.statements(conn)
    rows: dict[Any, list[dict[str, Any]]] = {
        prebuilt.save_order: [],
        prebuilt.save_refund: [],
        prebuilt.save_entry: [],
        prebuilt.save_chargeback: [],
    }
    for before, after in orders_changed:
        for statement, changed in orders.order_writes(conn, before, after):
            rows[statement] += changed
    writes: list[tuple[Any, Params]] = [(s, changed) for s, changed in rows.items() if changed]
    if history:
        writes.append((prebuilt.history, history))
    finished = [ledger.finish_params(f.event_id, f.outcome, f.error, f.order_id) for f in finishes]
    if finished:
        writes.append((ledger.statements(conn).finish_event, finished))
    if feed_rows:
        writes.append((feed.insert_statement(conn.dialect.name), feed_rows))
    if writes:
        execute_all(conn, writes)
