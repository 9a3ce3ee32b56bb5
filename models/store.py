"""Reading and writing refundsync's rows. Every function takes the caller's connection:
the caller's transaction scope decides what commits together."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Text, case, cast, func, literal, select, text
from sqlalchemy.dialects.postgresql import JSONB, insert

from models.payloads import EntryState, RefundState
from models.rules import (
    FINAL_OUTCOMES,
    Change,
    ChargebackRow,
    ChargeRefundRow,
    EventRef,
    Figure,
    OrderState,
    Outcome,
    RefundRow,
    iso,
    summarize,
)
from models.tables import (
    charge_refunds,
    chargebacks,
    orders,
    refund_history,
    refunds,
    webhook_events,
)


@dataclass(frozen=True)
class EventHeader:
    """What is recorded of an event before it is validated: enough to find it again."""

    id: str
    type: str
    created_time: datetime | None
    live_mode: bool | None


@dataclass(frozen=True)
class Delivery:
    """The event row after a copy of the event reached a worker."""

    outcome: Outcome
    attempts: int
    lost_attempts: int
    type: str
    error: str | None


@dataclass(frozen=True)
class StoredEvent:
    """An event as stored, enough to publish it again."""

    id: str
    type: str
    payload: str
    received_at: datetime
    outcome: Outcome

    @property
    def unstorable(self) -> bool:
        """Postgres refused the original payload; only a stand-in was kept."""
        stored = json.loads(self.payload)
        return isinstance(stored, dict) and stored.get("unstorable") is True


def record_delivery(
    conn: Connection,
    header: EventHeader,
    raw: str,
    *,
    received_at: datetime,
    source: str,
    new_copy: bool,
    redelivered: bool = False,
) -> Delivery:
    """Insert the event row, or count one more copy of it.

    Committed on its own before processing, so `attempts` survives a worker that dies
    mid-task: a poison event is seen as such however its attempts ended.
    """
    copies = 1 if new_copy else 0
    # A message that comes back unacknowledged means an attempt died with its worker.
    lost = 1 if redelivered else 0
    statement = insert(webhook_events).values(
        id=header.id,
        type=header.type,
        created_time=header.created_time,
        live_mode=header.live_mode,
        payload=cast(literal(raw, Text), JSONB),
        outcome=Outcome.QUEUED.value,
        # The first record is always a copy that reached a worker, even when it is a retry
        # whose first try could not record it.
        deliveries=1,
        attempts=1,
        lost_attempts=lost,
        received_at=received_at,
        source=source,
    )
    # A copy whose type differs reuses another event's id: it is not that event and must
    # not count as a delivery or an attempt of it.
    same = webhook_events.c.type == statement.excluded.type
    unfinished = webhook_events.c.outcome == Outcome.QUEUED.value
    upsert = statement.on_conflict_do_update(
        index_elements=[webhook_events.c.id],
        set_={
            "deliveries": webhook_events.c.deliveries + case((same, copies), else_=0),
            "attempts": webhook_events.c.attempts + case((same & unfinished, 1), else_=0),
            "lost_attempts": webhook_events.c.lost_attempts
            + case((same & unfinished, lost), else_=0),
        },
    ).returning(
        webhook_events.c.outcome,
        webhook_events.c.attempts,
        webhook_events.c.lost_attempts,
        webhook_events.c.type,
        webhook_events.c.error,
    )
    row = conn.execute(upsert).one()
    return Delivery(Outcome(row.outcome), row.attempts, row.lost_attempts, row.type, row.error)


def lock_event(conn: Connection, event_id: str) -> Outcome | None:
    """Lock the event row for this transaction; concurrent copies wait here."""
    outcome = conn.execute(
        select(webhook_events.c.outcome).where(webhook_events.c.id == event_id).with_for_update()
    ).scalar_one_or_none()
    return None if outcome is None else Outcome(outcome)


def finish_event(
    conn: Connection,
    event_id: str,
    outcome: Outcome,
    *,
    error: str | None = None,
    order_id: str | None = None,
) -> None:
    """Record the event's outcome."""
    assert outcome in FINAL_OUTCOMES  # noqa: S101 - a programming error, not input
    conn.execute(
        webhook_events.update()
        .where(webhook_events.c.id == event_id)
        .values(outcome=outcome.value, error=error, order_id=order_id, processed_at=func.now())
    )


def note_error(conn: Connection, event_id: str, error: str) -> None:
    """Keep the latest transient error on an unfinished event, for operators."""
    conn.execute(
        webhook_events.update()
        .where(webhook_events.c.id == event_id, webhook_events.c.outcome == Outcome.QUEUED.value)
        .values(error=error)
    )


def lock_order(conn: Connection, order_id: str) -> OrderState:
    """Create the order row if needed, lock it, and load its state."""
    conn.execute(insert(orders).values(id=order_id).on_conflict_do_nothing())
    row = conn.execute(select(orders).where(orders.c.id == order_id).with_for_update()).one()
    return _load(conn, row)


def load_order(conn: Connection, order_id: str) -> tuple[OrderState, datetime] | None:
    """The order's state and last update, without locking; None if unknown."""
    row = conn.execute(select(orders).where(orders.c.id == order_id)).one_or_none()
    if row is None:
        return None
    return _load(conn, row), row.updated_at


def order_summary(conn: Connection, order_id: str) -> dict[str, Any] | None:
    """The contract's order refund summary, or None for an unknown order."""
    loaded = load_order(conn, order_id)
    return None if loaded is None else summarize(*loaded)


def _figure(row: Any, prefix: str) -> Figure | None:
    value = getattr(row, f"{prefix}_amount")
    if value is None:
        return None
    return Figure(
        value, EventRef(getattr(row, f"{prefix}_event_time"), getattr(row, f"{prefix}_event_id"))
    )


def _load(conn: Connection, row: Any) -> OrderState:
    order_id = row.id
    refund_rows = conn.execute(select(refunds).where(refunds.c.order_id == order_id))
    entry_rows = conn.execute(select(charge_refunds).where(charge_refunds.c.order_id == order_id))
    chargeback_rows = conn.execute(select(chargebacks).where(chargebacks.c.order_id == order_id))
    return OrderState(
        order_id=order_id,
        currency=row.currency,
        refunds={
            r.id: RefundRow(
                id=r.id,
                state=RefundState(r.state),
                amount=r.amount,
                refunded_amount=r.refunded_amount,
                reason=r.reason,
                failure_reason=r.failure_reason,
                created_time=r.created_time,
                event=EventRef(r.last_event_time, r.last_event_id),
            )
            for r in refund_rows
        },
        charge_refunds={
            (e.charge_id, e.entry_key): ChargeRefundRow(
                charge_id=e.charge_id,
                entry_key=e.entry_key,
                entry_id=e.entry_id,
                created_time=e.created_time,
                amount=e.amount,
                state=EntryState(e.state),
                event=EventRef(e.last_event_time, e.last_event_id),
            )
            for e in entry_rows
        },
        chargebacks={
            c.id: ChargebackRow(
                id=c.id,
                type=c.type,
                amount=c.amount,
                event=EventRef(c.last_event_time, c.last_event_id),
            )
            for c in chargeback_rows
        },
        chargeback_event=(
            EventRef(row.chargeback_event_time, row.chargeback_event_id)
            if row.chargeback_event_id
            else None
        ),
        dr_refunded=_figure(row, "dr_refunded"),
        dr_available=_figure(row, "dr_available"),
        dr_total=_figure(row, "dr_total"),
    )


def _figure_values(prefix: str, figure: Figure | None) -> dict[str, Any]:
    return {
        f"{prefix}_amount": figure.value if figure else None,
        f"{prefix}_event_id": figure.event.id if figure else None,
        f"{prefix}_event_time": figure.event.time if figure else None,
    }


def save_order(
    conn: Connection,
    before: OrderState,
    after: OrderState,
    changes: tuple[Change, ...],
    event_id: str,
) -> None:
    """Write what differs between two states of a locked order, and one history row per change."""
    order_id = after.order_id
    conn.execute(
        orders.update()
        .where(orders.c.id == order_id)
        .values(
            currency=after.currency,
            chargeback_event_id=after.chargeback_event.id if after.chargeback_event else None,
            chargeback_event_time=after.chargeback_event.time if after.chargeback_event else None,
            **_figure_values("dr_refunded", after.dr_refunded),
            **_figure_values("dr_available", after.dr_available),
            **_figure_values("dr_total", after.dr_total),
            updated_at=func.now(),
        )
    )
    for refund in after.refunds.values():
        if before.refunds.get(refund.id) == refund:
            continue
        values = {
            "state": refund.state.value,
            "amount": refund.amount,
            "refunded_amount": refund.refunded_amount,
            "reason": refund.reason,
            "failure_reason": refund.failure_reason,
            "created_time": refund.created_time,
            "last_event_id": refund.event.id,
            "last_event_time": refund.event.time,
        }
        conn.execute(
            insert(refunds)
            .values(order_id=order_id, id=refund.id, **values)
            .on_conflict_do_update(index_elements=[refunds.c.order_id, refunds.c.id], set_=values)
        )
    for key, entry in after.charge_refunds.items():
        if before.charge_refunds.get(key) == entry:
            continue
        values = {
            "entry_id": entry.entry_id,
            "created_time": entry.created_time,
            "amount": entry.amount,
            "state": entry.state.value,
            "last_event_id": entry.event.id,
            "last_event_time": entry.event.time,
        }
        conn.execute(
            insert(charge_refunds)
            .values(
                order_id=order_id, charge_id=entry.charge_id, entry_key=entry.entry_key, **values
            )
            .on_conflict_do_update(
                index_elements=[
                    charge_refunds.c.order_id,
                    charge_refunds.c.charge_id,
                    charge_refunds.c.entry_key,
                ],
                set_=values,
            )
        )
    for chargeback in after.chargebacks.values():
        if before.chargebacks.get(chargeback.id) == chargeback:
            continue
        values = {
            "type": chargeback.type,
            "amount": chargeback.amount,
            "last_event_id": chargeback.event.id,
            "last_event_time": chargeback.event.time,
        }
        conn.execute(
            insert(chargebacks)
            .values(order_id=order_id, id=chargeback.id, **values)
            .on_conflict_do_update(
                index_elements=[chargebacks.c.order_id, chargebacks.c.id], set_=values
            )
        )
    if changes:
        conn.execute(
            refund_history.insert(),
            [
                {
                    "order_id": order_id,
                    "event_id": event_id,
                    "entity": change.entity,
                    "entity_id": change.entity_id,
                    "from_state": change.from_state,
                    "to_state": change.to_state,
                }
                for change in changes
            ],
        )


_RECORD_COLUMNS = (
    webhook_events.c.id,
    webhook_events.c.type,
    webhook_events.c.created_time,
    webhook_events.c.live_mode,
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


def event_records(conn: Connection, *, outcome: str | None, limit: int) -> list[dict[str, Any]]:
    """Processing records, newest first, optionally of one outcome."""
    query = select(*_RECORD_COLUMNS).order_by(
        webhook_events.c.received_at.desc(), webhook_events.c.id
    )
    if outcome is not None:
        query = query.where(webhook_events.c.outcome == outcome)
    return [_record(row) for row in conn.execute(query.limit(limit))]


_STORED_COLUMNS = (
    webhook_events.c.id,
    webhook_events.c.type,
    cast(webhook_events.c.payload, Text).label("payload"),
    webhook_events.c.received_at,
    webhook_events.c.outcome,
)


def _stored(row: Any) -> StoredEvent:
    return StoredEvent(row.id, row.type, row.payload, row.received_at, Outcome(row.outcome))


def stored_events(conn: Connection, ids: list[str]) -> list[StoredEvent]:
    """The stored events with these ids, in the order asked; unknown ids are left out."""
    rows = {
        row.id: _stored(row)
        for row in conn.execute(select(*_STORED_COLUMNS).where(webhook_events.c.id.in_(ids)))
    }
    return [rows[event_id] for event_id in ids if event_id in rows]


def failed_events(conn: Connection, limit: int) -> list[StoredEvent]:
    """Failed events, oldest first (the order they are replayed in)."""
    query = (
        select(*_STORED_COLUMNS)
        .where(webhook_events.c.outcome == Outcome.FAILED.value)
        .order_by(webhook_events.c.received_at, webhook_events.c.id)
        .limit(limit)
    )
    return [_stored(row) for row in conn.execute(query)]


def stuck_events(conn: Connection, older_than_s: int, limit: int) -> list[StoredEvent]:
    """Events received over `older_than_s` seconds ago and still unfinished."""
    query = (
        select(*_STORED_COLUMNS)
        .where(
            webhook_events.c.outcome == Outcome.QUEUED.value,
            webhook_events.c.received_at
            < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_s),
        )
        .order_by(webhook_events.c.received_at)
        .limit(limit)
    )
    return [_stored(row) for row in conn.execute(query)]


def requeue(conn: Connection, event_id: str) -> None:
    """Make an event unfinished again, with a fresh attempt budget, for a replay."""
    conn.execute(
        webhook_events.update()
        .where(webhook_events.c.id == event_id)
        .values(
            outcome=Outcome.QUEUED.value,
            attempts=0,
            lost_attempts=0,
            error=None,
            processed_at=None,
        )
    )


@dataclass(frozen=True)
class Backlog:
    """What operators alert on: the oldest unfinished event and the failed ones."""

    oldest_unfinished_age_s: float
    failed: int


def backlog(conn: Connection) -> Backlog:
    """Age of the oldest unfinished event (0 when none) and the count of failed events."""
    row = conn.execute(
        text(
            "SELECT coalesce(extract(epoch FROM now() - min(received_at)"
            " FILTER (WHERE outcome = 'queued')), 0) AS oldest,"
            " count(*) FILTER (WHERE outcome = 'failed') AS failed"
            " FROM webhook_events WHERE outcome IN ('queued', 'failed')"
        )
    ).one()
    return Backlog(float(row.oldest), int(row.failed))


def ping(conn: Connection) -> None:
    """Fail unless the database answers."""
    conn.execute(text("SELECT 1"))
