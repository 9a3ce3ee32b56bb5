"""The read API's JSON views (the contract's order refund summary and event processing
record), shared by `GET /orders`, `GET /events` and the CLI."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select

from models.orders import load_order, orders_of_upstream
from models.payloads import iso
from models.summary import summarize
from models.tables import webhook_events


def order_summary(conn: Connection, order_id: str) -> dict[str, Any] | None:
    """The contract's order refund summary, or None for an unknown order."""
    loaded = load_order(conn, order_id)
    return None if loaded is None else summarize(*loaded)


def invoice_summary(conn: Connection, invoice_id: str) -> dict[str, Any] | None:
    """The refund summary of an invoice's refunds, or None for an unknown invoice."""
    loaded = load_order(conn, invoice_id, "invoice")
    return None if loaded is None else summarize(*loaded)


def upstream_summaries(conn: Connection, upstream_id: str) -> list[dict[str, Any]]:
    """The summaries of the orders whose merchant order id is `upstream_id`."""
    return [summarize(*loaded) for loaded in orders_of_upstream(conn, upstream_id)]


_RECORD_COLUMNS = (
    webhook_events.c.id,
    webhook_events.c.type,
    webhook_events.c.created_time,
    webhook_events.c.live_mode,
    webhook_events.c.order_id,
    webhook_events.c.received_at,
    webhook_events.c.processed_at,
    webhook_events.c.outcome,
    webhook_events.c.deliveries,
    webhook_events.c.attempts,
    webhook_events.c.error,
)


def _record(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "type": row.type,
        "createdTime": iso(row.created_time),
        "liveMode": row.live_mode,
        "orderId": row.order_id,
        "receivedAt": iso(row.received_at),
        "processedAt": iso(row.processed_at),
        "outcome": row.outcome,
        "deliveries": row.deliveries,
        "attempts": row.attempts,
        "error": row.error,
    }


def event_record(conn: Connection, event_id: str) -> dict[str, Any] | None:
    """The contract's event processing record, or None."""
    row = conn.execute(
        select(*_RECORD_COLUMNS).where(webhook_events.c.id == event_id)
    ).one_or_none()
    return None if row is None else _record(row)


def event_records(
    conn: Connection, *, outcome: str | None, limit: int, order_id: str | None = None
) -> list[dict[str, Any]]:
    """Processing records, newest first, optionally of one outcome and of one order."""
    query = select(*_RECORD_COLUMNS).order_by(
        webhook_events.c.received_at.desc(), webhook_events.c.id
    )
    if outcome is not None:
        query = query.where(webhook_events.c.outcome == outcome)
    if order_id is not None:
        query = query.where(webhook_events.c.order_id == order_id)
    return [_record(row) for row in conn.execute(query.limit(limit))]
