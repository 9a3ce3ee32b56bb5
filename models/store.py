"""Reading and writing refundsync's rows. Every function takes the caller's connection:
the caller's transaction scope decides what commits together."""

from __future__ import annotations

import json
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import (
    CompoundSelect,
    Connection,
    Insert,
    Select,
    Table,
    Text,
    Update,
    any_,
    bindparam,
    case,
    cast,
    func,
    literal,
    null,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects import postgresql, sqlite

from models.db import Params, execute_all, query_all
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

    @property
    def stored_error(self) -> str:
        """Why the database refused the payload, for a stand-in; else empty."""
        stored = json.loads(self.payload)
        error = stored.get("error") if isinstance(stored, dict) else None
        return error if self.unstorable and isinstance(error, str) else ""


def _insert(dialect: str, table: Table) -> postgresql.Insert:
    """The dialect's INSERT, the one with ON CONFLICT (Postgres and SQLite spell it alike)."""
    if dialect == "sqlite":
        # SQLite's Insert has the same on_conflict_* methods and `excluded`.
        return typing.cast(postgresql.Insert, sqlite.insert(table))
    return postgresql.insert(table)


def _upsert(dialect: str, table: Table, keys: tuple[str, ...], fields: tuple[str, ...]) -> Insert:
    """Insert a row from bound parameters named after its columns, or update its fields."""
    statement = _insert(dialect, table).values({name: bindparam(name) for name in keys + fields})
    return statement.on_conflict_do_update(
        index_elements=[table.c[key] for key in keys],
        set_={name: statement.excluded[name] for name in fields},
    )


def insert_for(conn: Connection, table: Table) -> postgresql.Insert:
    """The INSERT with ON CONFLICT for this connection's database."""
    return _insert(conn.dialect.name, table)


def _payload(dialect: str) -> Any:
    return payload_value(dialect, bindparam("payload", type_=Text))


def payload_value(dialect: str, raw: Any) -> Any:
    """The raw JSON text as a stored payload."""
    if dialect == "sqlite":
        return raw
    # Postgres parses the raw text; the payload is never decoded and encoded again here.
    return cast(raw, postgresql.JSONB)


# An event's stored error (why it failed, or its latest transient error) is cut to this
# length.
ERROR_CHARS = 2000

# At most this much of message ids is kept per event: past it (about a hundred copies of one
# event) a further message counts as a delivery each time it comes.
MAX_MESSAGES_CHARS = 4000


def _record_statement(dialect: str) -> Insert:
    marker = bindparam("marker", type_=Text)
    statement = _insert(dialect, webhook_events).values(
        id=bindparam("id"),
        type=bindparam("type"),
        created_time=bindparam("created_time"),
        live_mode=bindparam("live_mode"),
        payload=_payload(dialect),
        outcome=Outcome.QUEUED.value,
        # The first record is always a copy that reached a worker, even when it is a retry
        # whose first try could not record it.
        deliveries=1,
        messages=marker,
        attempts=1,
        lost_attempts=0,
        running_message=bindparam("starting", type_=Text),
        received_at=bindparam("received_at"),
        source=bindparam("source"),
    )
    # A copy whose type differs reuses another event's id: it is not that event and must
    # not count as a delivery or an attempt of it.
    same = webhook_events.c.type == statement.excluded.type
    unfinished = webhook_events.c.outcome == Outcome.QUEUED.value
    find = func.instr if dialect == "sqlite" else func.strpos
    # A message counts once in deliveries, however often it comes: retried, or back from a
    # worker that died holding it, it is the same copy from DR.
    unseen = same & (find(webhook_events.c.messages, marker) == 0)
    kept = func.length(webhook_events.c.messages) < MAX_MESSAGES_CHARS
    running = webhook_events.c.running_message
    return statement.on_conflict_do_update(
        index_elements=[webhook_events.c.id],
        set_={
            "deliveries": webhook_events.c.deliveries + case((unseen, 1), else_=0),
            "messages": case(
                (unseen & kept, webhook_events.c.messages + marker),
                else_=webhook_events.c.messages,
            ),
            "attempts": webhook_events.c.attempts + case((same & unfinished, 1), else_=0),
            # An attempt died with its worker only if it had started: its message is the one
            # marked running. A message that comes back without that mark was only waiting
            # in a worker's prefetch, or died inside the transaction that applies it, which
            # left nothing; the attempt after that marks itself.
            "lost_attempts": webhook_events.c.lost_attempts
            + case((same & unfinished & (running == bindparam("dead", type_=Text)), 1), else_=0),
            "running_message": case(
                (same & unfinished, func.coalesce(bindparam("starting", type_=Text), running)),
                else_=running,
            ),
        },
    ).returning(
        webhook_events.c.outcome,
        webhook_events.c.attempts,
        webhook_events.c.lost_attempts,
        webhook_events.c.type,
        webhook_events.c.error,
    )


def _lock_order_statement(dialect: str) -> Insert:
    # One statement creates the order if needed, locks its row and returns it: an upsert
    # that changes nothing still takes the row lock a concurrent event for the order waits on.
    statement = _insert(dialect, orders).values(id=bindparam("order_id"))
    return statement.on_conflict_do_update(
        index_elements=[orders.c.id], set_={"id": statement.excluded.id}
    ).returning(*orders.c)


def _lock_orders_statement() -> Insert:
    # Several orders at once (Postgres only), created if needed and locked in the order of
    # their ids: transactions that lock orders this way never wait on each other in a cycle.
    ids = func.unnest(bindparam("order_ids", type_=postgresql.ARRAY(Text))).label("id")
    statement = postgresql.insert(orders).from_select(["id"], select(ids).order_by(ids))
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


_FIGURES = ("dr_refunded", "dr_available", "dr_total")
_REFUND_FIELDS = (
    "state",
    "amount",
    "refunded_amount",
    "reason",
    "failure_reason",
    "created_time",
    "last_event_id",
    "last_event_time",
)
_ENTRY_FIELDS = ("entry_id", "created_time", "amount", "state", "last_event_id", "last_event_time")
_CHARGEBACK_FIELDS = ("type", "amount", "last_event_id", "last_event_time")
_HISTORY_FIELDS = ("order_id", "event_id", "entity", "entity_id", "from_state", "to_state")


@dataclass(frozen=True)
class _Statements:
    """Every statement an event runs, built once.

    A statement object caches its own cache key, so executing a prebuilt one skips building
    and hashing it again: most of the client's cost of a small statement.
    """

    record: Insert
    lock_event: Select[Any]
    finish_event: Update
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


def _statements(conn: Connection) -> _Statements:
    return _statements_for(conn.dialect.name)


@cache
def _statements_for(dialect: str) -> _Statements:
    figure_columns = [f"{prefix}_{part}" for prefix in _FIGURES for part in _FIGURE_PARTS]
    return _Statements(
        record=_record_statement(dialect),
        lock_event=select(webhook_events.c.outcome)
        .where(webhook_events.c.id == bindparam("event_id"))
        .with_for_update(),
        finish_event=webhook_events.update()
        .where(webhook_events.c.id == bindparam("event_id"))
        .values(
            outcome=bindparam("new_outcome"),
            error=bindparam("new_error"),
            order_id=bindparam("new_order_id"),
            processed_at=bindparam("processed_at"),
            running_message=None,
        ),
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
                for name in ("currency", "chargeback_event_id", "chargeback_event_time")
            }
            | {name: bindparam(f"new_{name}") for name in figure_columns}
            | {"updated_at": func.now()}
        ),
        save_refund=_upsert(dialect, refunds, ("order_id", "id"), _REFUND_FIELDS),
        save_entry=_upsert(
            dialect, charge_refunds, ("order_id", "charge_id", "entry_key"), _ENTRY_FIELDS
        ),
        save_chargeback=_upsert(dialect, chargebacks, ("order_id", "id"), _CHARGEBACK_FIELDS),
        history=refund_history.insert().values({name: bindparam(name) for name in _HISTORY_FIELDS}),
    )


def record_delivery(
    conn: Connection,
    header: EventHeader,
    raw: str,
    *,
    received_at: datetime,
    source: str,
    message: str,
    redelivered: bool = False,
) -> Delivery:
    """Insert the event row, or count one more copy of it, and mark `message`'s attempt as
    started, in a statement committed on its own.

    So the attempt counts however it ends: if its worker dies before the attempt is
    finished, the message comes back redelivered and finds itself marked (a poison event is
    seen as such). `redelivered` says it came back so.
    """
    params = _record_params(
        header, raw, received_at, source, message, start=True, redelivered=redelivered
    )
    return _delivery(conn.execute(_statements(conn).record, params).one())


def record_and_load(
    conn: Connection,
    header: EventHeader,
    raw: str,
    *,
    received_at: datetime,
    source: str,
    message: str,
    order_id: str | None,
) -> tuple[Delivery, OrderState | None]:
    """Record a copy (locking the event row), then lock and load its order if it exists.

    The three statements go out together (models.db.query_all). The order is read only
    once its lock is held, so it includes everything the lock's previous holder wrote. An
    order that does not exist yet is left to lock_order, so that a copy which turns out to
    be a duplicate never creates one.
    """
    statements = _statements(conn)
    queries: list[tuple[Any, dict[str, Any]]] = [
        (statements.record, _record_params(header, raw, received_at, source, message))
    ]
    if order_id is not None:
        key = {"order_id": order_id}
        queries += [(statements.lock_existing_order, key), (statements.children, key)]
    results = query_all(conn, queries)
    delivery = _delivery(results[0][0])
    if order_id is None or not results[1]:
        return delivery, None
    return delivery, _state(results[1][0], results[2])


# A copy to record: (raw payload, received at, source, message id), as record_and_load takes.
CopyFacts = tuple[str, datetime, str, str]


def record_copies(conn: Connection, copies: list[tuple[EventHeader, CopyFacts]]) -> list[Delivery]:
    """Record several copies in one round trip, each as record_and_load does (locking its
    event row), in the order given."""
    statements = _statements(conn)
    queries: list[tuple[Any, dict[str, Any]]] = [
        (statements.record, _record_params(header, *facts)) for header, facts in copies
    ]
    return [_delivery(rows[0]) for rows in query_all(conn, queries)]


def lock_orders(conn: Connection, order_ids: list[str]) -> dict[str, OrderState]:
    """Create the orders that do not exist, lock all of them in the order of their ids, and
    load their states, in one round trip; Postgres only."""
    statements = _statements(conn)
    key = {"order_ids": sorted(order_ids)}
    order_rows, child_rows = query_all(
        conn, [(statements.lock_orders, key), (statements.children_of_orders, key)]
    )
    children: dict[str, list[Any]] = {}
    for child in child_rows:
        children.setdefault(child.order_id, []).append(child)
    return {row.id: _state(row, children.get(row.id, ())) for row in order_rows}


def _record_params(
    header: EventHeader,
    raw: str,
    received_at: datetime,
    source: str,
    message: str,
    *,
    start: bool = False,
    redelivered: bool = False,
) -> dict[str, Any]:
    return {
        "id": header.id,
        "type": header.type,
        "created_time": header.created_time,
        "live_mode": header.live_mode,
        "payload": raw,
        "received_at": received_at,
        "source": source,
        "marker": f" {message} ",
        "starting": message if start else None,
        "dead": message if redelivered else None,
    }


def _delivery(row: Any) -> Delivery:
    return Delivery(Outcome(row.outcome), row.attempts, row.lost_attempts, row.type, row.error)


def lock_event(conn: Connection, event_id: str) -> Outcome | None:
    """Lock the event row for this transaction; concurrent copies wait here."""
    outcome = conn.execute(
        _statements(conn).lock_event, {"event_id": event_id}
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
    conn.execute(_statements(conn).finish_event, _finish_params(event_id, outcome, error, order_id))


def _finish_params(
    event_id: str, outcome: Outcome, error: str | None, order_id: str | None
) -> dict[str, Any]:
    assert outcome in FINAL_OUTCOMES  # noqa: S101 - a programming error, not input
    return {
        "event_id": event_id,
        "new_outcome": outcome.value,
        "new_error": None if error is None else error[:ERROR_CHARS],
        "new_order_id": order_id,
        # The moment it is applied, not when the transaction began.
        "processed_at": datetime.now(UTC),
    }


def note_error(conn: Connection, event_id: str, error: str, message: str) -> None:
    """Keep the latest transient error on an unfinished event, for operators: the attempt
    of `message` has ended, and its retry is another attempt."""
    unfinished = (webhook_events.c.id == event_id) & (
        webhook_events.c.outcome == Outcome.QUEUED.value
    )
    running = webhook_events.c.running_message
    conn.execute(
        webhook_events.update()
        .where(unfinished)
        .values(
            error=error[:ERROR_CHARS],
            running_message=case((running == message, None), else_=running),
        )
    )


def lock_order(conn: Connection, order_id: str) -> OrderState:
    """Create the order row if needed, lock it, and load its state."""
    row = conn.execute(_statements(conn).lock_order, {"order_id": order_id}).one()
    return _load(conn, row)


def load_order(conn: Connection, order_id: str) -> tuple[OrderState, datetime] | None:
    """The order's state and last update, without locking; None if unknown."""
    row = conn.execute(select(orders).where(orders.c.id == order_id)).one_or_none()
    if row is None:
        return None
    return _load(conn, row), row.updated_at


_FIGURE_PARTS = ("amount", "event_id", "event_time")


def _figure(row: Any, prefix: str) -> Figure | None:
    value = getattr(row, f"{prefix}_amount")
    if value is None:
        return None
    return Figure(
        value, EventRef(getattr(row, f"{prefix}_event_time"), getattr(row, f"{prefix}_event_id"))
    )


def _load(conn: Connection, row: Any) -> OrderState:
    return _state(row, conn.execute(_statements(conn).children, {"order_id": row.id}))


def _state(row: Any, children: Iterable[Any]) -> OrderState:
    """An order's state from its row and its children (the `children` statement's rows)."""
    rows: dict[str, list[Any]] = {"refund": [], "entry": [], "chargeback": []}
    for child in children:
        rows[child.kind].append(child)
    refund_rows, entry_rows, chargeback_rows = rows["refund"], rows["entry"], rows["chargeback"]
    return OrderState(
        order_id=row.id,
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
        f"new_{prefix}_amount": figure.value if figure else None,
        f"new_{prefix}_event_id": figure.event.id if figure else None,
        f"new_{prefix}_event_time": figure.event.time if figure else None,
    }


@dataclass(frozen=True)
class Finish:
    """An event's outcome, to be recorded."""

    event_id: str
    outcome: Outcome
    error: str | None = None
    order_id: str | None = None


def save_all(
    conn: Connection,
    orders_changed: Iterable[tuple[OrderState, OrderState]],
    history: list[dict[str, Any]],
    finishes: Iterable[Finish],
) -> None:
    """Every write of one or more events, sent together: for each locked order what differs
    between its two states, the history rows, and the events' outcomes."""
    statements = _statements(conn)
    rows: dict[Any, list[dict[str, Any]]] = {
        statements.save_order: [],
        statements.save_refund: [],
        statements.save_entry: [],
        statements.save_chargeback: [],
    }
    for before, after in orders_changed:
        for statement, changed in _order_writes(statements, before, after):
            rows[statement] += changed
    writes: list[tuple[Any, Params]] = [(s, changed) for s, changed in rows.items() if changed]
    if history:
        writes.append((statements.history, history))
    finished = [_finish_params(f.event_id, f.outcome, f.error, f.order_id) for f in finishes]
    if finished:
        writes.append((statements.finish_event, finished))
    if writes:
        execute_all(conn, writes)


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


def _order_writes(
    statements: _Statements, before: OrderState, after: OrderState
) -> list[tuple[Any, list[dict[str, Any]]]]:
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
            "last_event_id": refund.event.id,
            "last_event_time": refund.event.time,
        }
        for refund in after.refunds.values()
        if before.refunds.get(refund.id) != refund
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
            "last_event_id": entry.event.id,
            "last_event_time": entry.event.time,
        }
        for key, entry in after.charge_refunds.items()
        if before.charge_refunds.get(key) != entry
    ]
    chargeback_rows = [
        {
            "order_id": order_id,
            "id": row.id,
            "type": row.type,
            "amount": row.amount,
            "last_event_id": row.event.id,
            "last_event_time": row.event.time,
        }
        for row in after.chargebacks.values()
        if before.chargebacks.get(row.id) != row
    ]
    return [
        (statements.save_order, [order_row]),
        (statements.save_refund, refund_rows),
        (statements.save_entry, entry_rows),
        (statements.save_chargeback, chargeback_rows),
    ]


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
            webhook_events.c.received_at < datetime.now(UTC) - timedelta(seconds=older_than_s),
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
            running_message=None,
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
    outcome = webhook_events.c.outcome
    row = conn.execute(
        select(
            func.min(case((outcome == Outcome.QUEUED.value, webhook_events.c.received_at))),
            func.count(case((outcome == Outcome.FAILED.value, 1))),
        ).where(outcome.in_([Outcome.QUEUED.value, Outcome.FAILED.value]))
    ).one()
    oldest, failed = row
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)  # SQLite: an aggregate loses the column's type
    age = 0.0 if oldest is None else (datetime.now(UTC) - oldest).total_seconds()
    return Backlog(max(age, 0.0), int(failed))


def ping(conn: Connection) -> None:
    """Fail unless the database answers."""
    conn.execute(text("SELECT 1"))
