"""What the operator console shows: search hits, an order's life as a timeline, and the
figures of its health page. Reads only; each function takes the caller's connection."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from models import ledger, outbox
from models.tables import changes, deliveries, orders, refund_history, refunds, webhook_events
from models.views import event_records, order_summary


@dataclass(frozen=True)
class Hit:
    """An order a search found, and what matched."""

    order_id: str
    matched: str


def search(conn: Connection, term: str, limit: int = 20) -> list[Hit]:
    """Orders whose DR order id, merchant (upstream) id, event id or refund id is `term`."""
    term = term.strip()
    if not term:
        return []
    found: dict[str, str] = {}

    def add(order_ids: Any, matched: str) -> None:
        for order_id in order_ids:
            if order_id is not None:
                found.setdefault(str(order_id), matched)

    add(conn.execute(select(orders.c.id).where(orders.c.id == term)).scalars(), "order id")
    add(
        conn.execute(
            select(orders.c.id).where(orders.c.upstream_id == term).limit(limit)
        ).scalars(),
        "upstream id",
    )
    add(
        conn.execute(
            select(webhook_events.c.order_id).where(webhook_events.c.id == term)
        ).scalars(),
        "event id",
    )
    add(
        conn.execute(select(refunds.c.order_id).where(refunds.c.id == term).limit(limit)).scalars(),
        "refund id",
    )
    return [Hit(order_id, matched) for order_id, matched in list(found.items())[:limit]]


@dataclass
class Step:
    """One event of an order's life: its processing record, what it changed (history
    rows) and the change feed versions it made, with their outbound delivery."""

    event: dict[str, Any]
    changed: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)


def timeline(conn: Connection, order_id: str, limit: int = 1000) -> list[Step]:
    """The order's events, oldest first by DR's createdTime, with what each changed."""
    records = event_records(conn, outcome=None, limit=limit, order_id=order_id)
    records.sort(key=lambda record: (record["createdTime"] or "", record["id"]))
    steps = {record["id"]: Step(record) for record in records}
    history = conn.execute(
        select(refund_history)
        .where(refund_history.c.order_id == order_id)
        .order_by(refund_history.c.id)
    )
    for row in history:
        if row.event_id in steps:
            steps[row.event_id].changed.append(
                {
                    "entity": row.entity,
                    "entityId": row.entity_id,
                    "from": row.from_state,
                    "to": row.to_state,
                }
            )
    made = conn.execute(
        select(
            changes.c.id,
            changes.c.version,
            changes.c.event_id,
            changes.c.delivery,
            changes.c.attempts,
        )
        .where(changes.c.order_key == order_id)
        .order_by(changes.c.version)
    ).all()
    last_answer: dict[int, Any] = defaultdict(lambda: None)
    if made:
        answers = conn.execute(
            select(deliveries.c.change_id, deliveries.c.status_code, deliveries.c.error)
            .where(deliveries.c.change_id.in_([row.id for row in made]))
            .order_by(deliveries.c.id)
        )
        for answer in answers:
            last_answer[answer.change_id] = answer
    for row in made:
        if row.event_id in steps:
            answer = last_answer[row.id]
            steps[row.event_id].versions.append(
                {
                    "version": row.version,
                    "delivery": row.delivery or "not sent",
                    "attempts": row.attempts,
                    "lastStatus": None if answer is None else answer.status_code,
                    "lastError": None if answer is None else answer.error,
                }
            )
    return list(steps.values())


@dataclass(frozen=True)
class Health:
    """The health page's figures that live in Postgres."""

    oldest_unfinished_age_s: float
    failed: int
    undelivered: int
    oldest_undelivered_age_s: float
    reconciled_to: datetime | None


def health(conn: Connection, now: datetime) -> Health:
    backlog = ledger.backlog(conn)
    undelivered, oldest = outbox.backlog(conn, now)
    return Health(
        backlog.oldest_unfinished_age_s,
        backlog.failed,
        undelivered,
        oldest,
        ledger.checkpoint(conn, "events"),
    )


def order_page(conn: Connection, order_id: str) -> tuple[dict[str, Any], list[Step]] | None:
    """The order's summary and timeline, or None for an unknown order."""
    summary = order_summary(conn, order_id)
    if summary is None:
        return None
    return summary, timeline(conn, order_id)
