"""An order's rows: the order and its refunds, charge refund entries and chargebacks,
locked and loaded as one OrderState, the writes of what an event changed, and its history
rows. Every function takes the caller's connection."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, TypeVar

from sqlalchemy import (
    CompoundSelect,
    Connection,
    Engine,
    Insert,
    Select,
    Table,
    Text,
    Update,
    any_,
    bindparam,
    func,
    literal,
    null,
    select,
    union_all,
)
from sqlalchemy.dialects import postgresql

from models.db import autocommit, insert_statement, query_all, upsert
from models.payloads import EntryState, RefundState
from models.rules import (
    PENDING_STATES as PENDING_REFUND_STATES,
)
from models.rules import (
    Change,
    ChargebackRow,
    ChargeRefundRow,
    EventRef,
    Figure,
    Note,
    OrderState,
    RefundRow,
)
from models.tables import charge_refunds, chargebacks, orders, refund_history, refunds

K = TypeVar("K")
V = TypeVar("V")


def _lock_order_statement(dialect: str) -> Insert:
    # One statement creates the order if needed, locks its row and returns it: an upsert
    # that changes nothing still takes the row lock a concurrent event for the order waits on.
    statement = insert_statement(dialect, orders).values(
        id=bindparam("order_id"), kind=bindparam("kind")
    )
    return statement.on_conflict_do_update(
        index_elements=[orders.c.id], set_={"id": statement.excluded.id}
    ).returning(*orders.c)


def _lock_orders_statement() -> Insert:
    # Several orders at once (Postgres only), created if needed and locked in the order of
    # their ids: transactions that lock orders this way never wait on each other in a cycle.
    keys = (
        func.unnest(
            bindparam("order_ids", type_=postgresql.ARRAY(Text)),
            bindparam("kinds", type_=postgresql.ARRAY(Text)),
        )
        .table_valued("id", "kind")
        .render_derived()
    )
    statement = postgresql.insert(orders).from_select(
        ["id", "kind"], select(keys.c.id, keys.c.kind).order_by(keys.c.id)
    )
    return statement.on_conflict_do_update(
        index_elements=[orders.c.id], set_={"id": statement.excluded.id}
    ).returning(*orders.c)


_CHILD_COLUMNS = (
    "id",
    "charge_id",
    "entry_key",
    "entry_id",
    "state",
    "amount",
    "refunded_amount",
    "reason",
    "failure_reason",
    "created_time",
    "type",
    "last_event_id",
    "last_event_time",
    "items",
    "metadata",
    "expires_time",
    "token_information",
    "failure_code",
    "failure_message",
)


def _children_statement(*, many: bool = False) -> CompoundSelect[Any]:
    # An order's (or, `many`, several orders') refunds, charge refund entries and
    # chargebacks in one round trip: one row shape for all three, `kind` naming the table a
    # row comes from.
    def part(kind: str, table: Table) -> Select[Any]:
        columns = [
            table.c[name] if name in table.c else null().label(name) for name in _CHILD_COLUMNS
        ]
        match = (
            table.c.order_id == any_(bindparam("order_ids", type_=postgresql.ARRAY(Text)))
            if many
            else table.c.order_id == bindparam("order_id")
        )
        return select(literal(kind).label("kind"), table.c.order_id, *columns).where(match)

    return union_all(
        part("refund", refunds), part("entry", charge_refunds), part("chargeback", chargebacks)
    )


_FIGURES = ("dr_refunded", "dr_available", "dr_total", "dr_captured")
_NOTES = ("upstream_id", "order_state", "dispute_status")
_REFUND_FIELDS = (
    "state",
    "amount",
    "refunded_amount",
    "reason",
    "failure_reason",
    "created_time",
    "last_event_id",
    "last_event_time",
    "type",
    "items",
    "metadata",
    "expires_time",
    "token_information",
)
_ENTRY_FIELDS = (
    "entry_id",
    "created_time",
    "amount",
    "state",
    "last_event_id",
    "last_event_time",
    "failure_code",
    "failure_message",
)
_CHARGEBACK_FIELDS = ("type", "amount", "last_event_id", "last_event_time")
_HISTORY_FIELDS = ("order_id", "event_id", "entity", "entity_id", "from_state", "to_state")


@dataclass(frozen=True)
class _Statements:
    """The order statements an event runs, built once per dialect.

    A statement object caches its own cache key, so executing a prebuilt one skips building
    and hashing it again: most of the client's cost of a small statement.
    """

    lock_order: Insert
    lock_existing_order: Select[Any]
    lock_orders: Insert
    children: CompoundSelect[Any]
    children_of_orders: CompoundSelect[Any]
    save_order: Update
    save_refund: Insert
    save_entry: Insert
    save_chargeback: Insert
    history: Insert


def statements(conn: Connection) -> _Statements:
    """The order statements, prebuilt, for this connection's database."""
    return _statements_for(conn.dialect.name)


@cache
def _statements_for(dialect: str) -> _Statements:
    figure_columns = [f"{prefix}_{part}" for prefix in _FIGURES for part in _FIGURE_PARTS]
    figure_columns += [f"{note}{part}" for note in _NOTES for part in _NOTE_PARTS]
    return _Statements(
        lock_order=_lock_order_statement(dialect),
        lock_existing_order=select(orders)
        .where(orders.c.id == bindparam("order_id"))
        .with_for_update(),
        lock_orders=_lock_orders_statement(),
        children=_children_statement(),
        children_of_orders=_children_statement(many=True),
        save_order=orders.update()
        .where(orders.c.id == bindparam("order_id"))
        .values(
            {
                name: bindparam(f"new_{name}")
                for name in ("currency", "chargeback_event_id", "chargeback_event_time", "version")
            }
            | {name: bindparam(f"new_{name}") for name in figure_columns}
            | {"updated_at": func.now()}
        ),
        save_refund=upsert(dialect, refunds, ("order_id", "id"), _REFUND_FIELDS),
        save_entry=upsert(
            dialect, charge_refunds, ("order_id", "charge_id", "entry_key"), _ENTRY_FIELDS
        ),
        save_chargeback=upsert(dialect, chargebacks, ("order_id", "id"), _CHARGEBACK_FIELDS),
        history=refund_history.insert().values({name: bindparam(name) for name in _HISTORY_FIELDS}),
    )


def lock_orders(conn: Connection, kinds: Mapping[str, str]) -> dict[str, OrderState]:
    """Create the orders that do not exist (`kinds`: each id's kind), lock all of them in
    the order of their ids, and load their states, in one round trip; Postgres only."""
    prebuilt = statements(conn)
    ids = sorted(kinds)
    key = {"order_ids": ids}
    order_rows, child_rows = query_all(
        conn,
        [
            (prebuilt.lock_orders, {**key, "kinds": [kinds[i] for i in ids]}),
            (prebuilt.children_of_orders, key),
        ],
    )
    children: dict[str, list[Any]] = {}
    for child in child_rows:
        children.setdefault(child.order_id, []).append(child)
    return {row.id: state_of(row, children.get(row.id, ())) for row in order_rows}


def lock_existing(conn: Connection, after: str, limit: int) -> list[OrderState]:
    """Lock and load up to `limit` orders (and invoices) whose ids follow `after`, by id."""
    query = (
        select(orders).where(orders.c.id > after).order_by(orders.c.id).limit(limit)
    ).with_for_update()
    rows = conn.execute(query).all()
    if conn.dialect.name != "postgresql":
        return [_load(conn, row) for row in rows]
    # Their children in one query (Postgres: an array parameter).
    children: dict[str, list[Any]] = {row.id: [] for row in rows}
    found = conn.execute(statements(conn).children_of_orders, {"order_ids": list(children)})
    for child in found:
        children[child.order_id].append(child)
    return [state_of(row, children[row.id]) for row in rows]


def lock_order(conn: Connection, order_id: str, kind: str = "order") -> OrderState:
    """Create the order row (of `kind`) if needed, lock it, and load its state."""
    row = conn.execute(statements(conn).lock_order, {"order_id": order_id, "kind": kind}).one()
    return _load(conn, row)


def pending_refunds(
    conn: Connection, *, older_than: datetime, limit: int
) -> list[tuple[str, str, str]]:
    """Refunds still pending (or pending_information) that were created before `older_than`
    and not asked about since: (order id, refund id, state), the least recently asked first.
    A refund without a createdTime counts from the event that last changed it."""
    created = func.coalesce(refunds.c.created_time, refunds.c.last_event_time)
    query = (
        select(refunds.c.order_id, refunds.c.id, refunds.c.state)
        .where(
            refunds.c.state.in_([s.value for s in PENDING_REFUND_STATES]),
            created < older_than,
            (refunds.c.checked_at.is_(None)) | (refunds.c.checked_at < older_than),
        )
        .order_by(refunds.c.checked_at.nulls_first(), refunds.c.order_id, refunds.c.id)
        .limit(limit)
    )
    return [(row.order_id, row.id, row.state) for row in conn.execute(query)]


def mark_checked(engine: Engine, keys: Iterable[tuple[str, str]], at: datetime) -> None:
    """Note that DR was asked about these refunds (order id, refund id) at `at`.

    One row per statement, each committed on its own: a statement that held several refund
    rows at once could deadlock with workers, which lock an order before its refunds."""
    statement = (
        refunds.update()
        .where(refunds.c.order_id == bindparam("key_order"), refunds.c.id == bindparam("key_id"))
        .values(checked_at=bindparam("at"))
    )
    with autocommit(engine) as conn:
        for order_id, refund_id in keys:
            conn.execute(statement, {"key_order": order_id, "key_id": refund_id, "at": at})


def changed_since(conn: Connection, since: datetime, limit: int) -> list[str]:
    """The ids of orders changed since `since`, the most recently changed first."""
    query = (
        select(orders.c.id)
        .where(orders.c.updated_at >= since)
        .order_by(orders.c.updated_at.desc(), orders.c.id)
        .limit(limit)
    )
    return list(conn.execute(query).scalars())


def load_order(
    conn: Connection, order_id: str, kind: str = "order"
) -> tuple[OrderState, datetime] | None:
    """The order's (or invoice's) state and last update, without locking; None if unknown."""
    query = select(orders).where(orders.c.id == order_id, orders.c.kind == kind)
    row = conn.execute(query).one_or_none()
    if row is None:
        return None
    return _load(conn, row), row.updated_at


def orders_of_upstream(conn: Connection, upstream_id: str) -> list[tuple[OrderState, datetime]]:
    """The orders whose newest Order names `upstream_id`, by order id."""
    query = (
        select(orders)
        .where(orders.c.upstream_id == upstream_id, orders.c.kind == "order")
        .order_by(orders.c.id)
    )
    return [(_load(conn, row), row.updated_at) for row in conn.execute(query).all()]


_FIGURE_PARTS = ("amount", "event_id", "event_time")
_NOTE_PARTS = ("", "_event_id", "_event_time")


def _figure(row: Any, prefix: str) -> Figure | None:
    value = getattr(row, f"{prefix}_amount")
    if value is None:
        return None
    return Figure(
        value, EventRef(getattr(row, f"{prefix}_event_time"), getattr(row, f"{prefix}_event_id"))
    )


def _note(row: Any, name: str) -> Note | None:
    value = getattr(row, name)
    if value is None:
        return None
    return Note(
        value, EventRef(getattr(row, f"{name}_event_time"), getattr(row, f"{name}_event_id"))
    )


def _load(conn: Connection, row: Any) -> OrderState:
    return state_of(row, conn.execute(statements(conn).children, {"order_id": row.id}))


def state_of(row: Any, children: Iterable[Any]) -> OrderState:
    """An order's state from its row and its children (the `children` statement's rows)."""
    rows: dict[str, list[Any]] = {"refund": [], "entry": [], "chargeback": []}
    for child in children:
        rows[child.kind].append(child)
    refund_rows, entry_rows, chargeback_rows = rows["refund"], rows["entry"], rows["chargeback"]
    return OrderState(
        order_id=row.id,
        kind=row.kind,
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
                type=r.type,
                items=tuple(r.items or ()),
                metadata=r.metadata or {},
                expires_time=r.expires_time,
                token_information=r.token_information,
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
                failure_code=e.failure_code,
                failure_message=e.failure_message,
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
        dr_captured=_figure(row, "dr_captured"),
        upstream_id=_note(row, "upstream_id"),
        order_state=_note(row, "order_state"),
        dispute_status=_note(row, "dispute_status"),
        version=row.version,
    )


def _figure_values(prefix: str, figure: Figure | None) -> dict[str, Any]:
    return {
        f"new_{prefix}_amount": figure.value if figure else None,
        f"new_{prefix}_event_id": figure.event.id if figure else None,
        f"new_{prefix}_event_time": figure.event.time if figure else None,
    }


def _note_values(name: str, note: Note | None) -> dict[str, Any]:
    return {
        f"new_{name}": note.value if note else None,
        f"new_{name}_event_id": note.event.id if note else None,
        f"new_{name}_event_time": note.event.time if note else None,
    }


def history_rows(order_id: str, event_id: str, changes: Iterable[Change]) -> list[dict[str, Any]]:
    """The history rows of an event's changes to an order."""
    return [
        {
            "order_id": order_id,
            "event_id": event_id,
            "entity": change.entity,
            "entity_id": change.entity_id,
            "from_state": change.from_state,
            "to_state": change.to_state,
        }
        for change in changes
    ]


def _changed(before: Mapping[K, V], after: Mapping[K, V]) -> list[V]:
    """The rows of `after` that are new or differ from `before`'s."""
    return [row for key, row in after.items() if before.get(key) != row]


def _last_event(event: EventRef) -> dict[str, Any]:
    return {"last_event_id": event.id, "last_event_time": event.time}


def order_writes(
    conn: Connection, before: OrderState, after: OrderState
) -> list[tuple[Any, list[dict[str, Any]]]]:
    """What differs between two states of a locked order, as (statement, rows) pairs."""
    prebuilt = statements(conn)
    order_id = after.order_id
    chargeback = after.chargeback_event
    order_row = {
        "order_id": order_id,
        "new_currency": after.currency,
        "new_chargeback_event_id": chargeback.id if chargeback else None,
        "new_chargeback_event_time": chargeback.time if chargeback else None,
        **_figure_values("dr_refunded", after.dr_refunded),
        **_figure_values("dr_available", after.dr_available),
        **_figure_values("dr_total", after.dr_total),
        **_figure_values("dr_captured", after.dr_captured),
        **_note_values("upstream_id", after.upstream_id),
        **_note_values("order_state", after.order_state),
        **_note_values("dispute_status", after.dispute_status),
        "new_version": after.version,
    }
    refund_rows = [
        {
            "order_id": order_id,
            "id": refund.id,
            "state": refund.state.value,
            "amount": refund.amount,
            "refunded_amount": refund.refunded_amount,
            "reason": refund.reason,
            "failure_reason": refund.failure_reason,
            "created_time": refund.created_time,
            **_last_event(refund.event),
            "type": refund.type,
            "items": list(refund.items),
            "metadata": refund.metadata,
            "expires_time": refund.expires_time,
            "token_information": refund.token_information,
        }
        for refund in _changed(before.refunds, after.refunds)
    ]
    entry_rows = [
        {
            "order_id": order_id,
            "charge_id": entry.charge_id,
            "entry_key": entry.entry_key,
            "entry_id": entry.entry_id,
            "created_time": entry.created_time,
            "amount": entry.amount,
            "state": entry.state.value,
            **_last_event(entry.event),
            "failure_code": entry.failure_code,
            "failure_message": entry.failure_message,
        }
        for entry in _changed(before.charge_refunds, after.charge_refunds)
    ]
    chargeback_rows = [
        {
            "order_id": order_id,
            "id": row.id,
            "type": row.type,
            "amount": row.amount,
            **_last_event(row.event),
        }
        for row in _changed(before.chargebacks, after.chargebacks)
    ]
    return [
        (prebuilt.save_order, [order_row]),
        (prebuilt.save_refund, refund_rows),
        (prebuilt.save_entry, entry_rows),
        (prebuilt.save_chargeback, chargeback_rows),
    ]
