"""The event ledger: one `webhook_events` row per DR event id, with its copies
(`deliveries`), attempts, outcome and error, the stored payloads that replay and the
sweeper publish again, the events reconciliation lists, and its checkpoint. Every function
takes the caller's connection: the caller's transaction scope decides what commits
together."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, Protocol

from sqlalchemy import (
    Connection,
    Insert,
    Select,
    Text,
    Update,
    bindparam,
    case,
    cast,
    func,
    literal,
    select,
    text,
)

from models.db import insert_for, insert_statement, payload_value, query_all
from models.envelope import EventHeader
from models.outcome import FINAL_OUTCOMES, Outcome
from models.tables import reconcile_checkpoints, webhook_events


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


# An event's stored error (why it failed, or its latest transient error) is cut to this
# length.
ERROR_CHARS = 2000

# At most this much of message ids is kept per event: past it (about a hundred copies of one
# event) a further message counts as a delivery each time it comes.
MAX_MESSAGES_CHARS = 4000


def _record_statement(dialect: str) -> Insert:
    marker = bindparam("marker", type_=Text)
    statement = insert_statement(dialect, webhook_events).values(
        id=bindparam("id"),
        type=bindparam("type"),
        created_time=bindparam("created_time"),
        live_mode=bindparam("live_mode"),
        payload=payload_value(dialect, bindparam("payload", type_=Text)),
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
        order_id=bindparam("order_id", type_=Text),
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


@dataclass(frozen=True)
class _Statements:
    """The ledger's statements an event runs, built once per dialect (a prebuilt statement
    skips building and hashing its cache key again)."""

    record: Insert
    lock_event: Select[Any]
    finish_event: Update


def statements(conn: Connection) -> _Statements:
    """The ledger's prebuilt statements for this connection's database."""
    return _statements_for(conn.dialect.name)


@cache
def _statements_for(dialect: str) -> _Statements:
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
            # The order the rules applied the event to, else the one it names.
            order_id=func.coalesce(
                bindparam("new_order_id", type_=Text), webhook_events.c.order_id
            ),
            processed_at=bindparam("processed_at"),
            running_message=None,
        ),
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
    params = record_params(
        header, raw, received_at, source, message, start=True, redelivered=redelivered
    )
    return delivery_of(conn.execute(statements(conn).record, params).one())


# A copy to record: (raw payload, received at, source, message id), as record_and_load takes.
CopyFacts = tuple[str, datetime, str, str]


def record_copies(conn: Connection, copies: list[tuple[EventHeader, CopyFacts]]) -> list[Delivery]:
    """Record several copies in one round trip, each as models.store.record_and_load does
    (locking its event row), in the order given."""
    prebuilt = statements(conn)
    queries: list[tuple[Any, dict[str, Any]]] = [
        (prebuilt.record, record_params(header, *facts)) for header, facts in copies
    ]
    return [delivery_of(rows[0]) for rows in query_all(conn, queries)]


def record_params(
    header: EventHeader,
    raw: str,
    received_at: datetime,
    source: str,
    message: str,
    *,
    start: bool = False,
    redelivered: bool = False,
) -> dict[str, Any]:
    """The record statement's parameters for one copy (`start`: mark its attempt started)."""
    return {
        "id": header.id,
        "type": header.type,
        "created_time": header.created_time,
        "live_mode": header.live_mode,
        "payload": raw,
        "received_at": received_at,
        "source": source,
        "order_id": header.order_id,
        "marker": f" {message} ",
        "starting": message if start else None,
        "dead": message if redelivered else None,
    }


def delivery_of(row: Any) -> Delivery:
    """The Delivery a record statement returned."""
    return Delivery(Outcome(row.outcome), row.attempts, row.lost_attempts, row.type, row.error)


def lock_event(conn: Connection, event_id: str) -> Outcome | None:
    """Lock the event row for this transaction; concurrent copies wait here."""
    outcome = conn.execute(statements(conn).lock_event, {"event_id": event_id}).scalar_one_or_none()
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
    conn.execute(statements(conn).finish_event, finish_params(event_id, outcome, error, order_id))


def finish_params(
    event_id: str, outcome: Outcome, error: str | None, order_id: str | None
) -> dict[str, Any]:
    """The finish statement's parameters for one event."""
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


@dataclass(frozen=True)
class Finish:
    """An event's outcome, to be recorded."""

    event_id: str
    outcome: Outcome
    error: str | None = None
    order_id: str | None = None


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


def applied_events_of(conn: Connection, order_ids: Sequence[str]) -> list[tuple[str, str]]:
    """(order id, payload) of every event applied to these orders, or found stale: the set
    of distinct events an order's state is a function of."""
    query = select(webhook_events.c.order_id, cast(webhook_events.c.payload, Text)).where(
        webhook_events.c.order_id.in_(list(order_ids)),
        webhook_events.c.outcome.in_([Outcome.APPLIED.value, Outcome.STALE.value]),
    )
    return [(row[0], row[1]) for row in conn.execute(query)]


def ignored_events(conn: Connection, types: Sequence[str], limit: int) -> list[StoredEvent]:
    """Events of these types recorded as ignored, oldest first."""
    query = (
        select(*_STORED_COLUMNS)
        .where(
            webhook_events.c.outcome == Outcome.IGNORED.value,
            webhook_events.c.type.in_(list(types)),
        )
        .order_by(webhook_events.c.received_at, webhook_events.c.id)
        .limit(limit)
    )
    return [_stored(row) for row in conn.execute(query)]


def failed_events(conn: Connection, limit: int, event_type: str | None = None) -> list[StoredEvent]:
    """Failed events (of one type, if given), oldest first (the order they are replayed
    in)."""
    query = (
        select(*_STORED_COLUMNS)
        .where(webhook_events.c.outcome == Outcome.FAILED.value)
        .order_by(webhook_events.c.received_at, webhook_events.c.id)
        .limit(limit)
    )
    if event_type is not None:
        query = query.where(webhook_events.c.type == event_type)
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


def recorded_ids(conn: Connection, event_ids: Sequence[str]) -> set[str]:
    """Which of these event ids have an event row (the ingest's journal forgets those)."""
    if not event_ids:
        return set()
    query = select(webhook_events.c.id).where(webhook_events.c.id.in_(list(event_ids)))
    return {str(event_id) for event_id in conn.execute(query).scalars()}


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


class Listed(Protocol):
    """An event as DR's Events API lists it (worker.reconcile.dr_api.ListedEvent)."""

    @property
    def id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def created_time(self) -> datetime | None: ...
    @property
    def live_mode(self) -> bool | None: ...
    @property
    def order_id(self) -> str | None: ...
    @property
    def body(self) -> str: ...


def outcomes_of(conn: Connection, ids: Sequence[str]) -> dict[str, tuple[Outcome, datetime]]:
    """The outcome and arrival of those of `ids` that the ledger holds."""
    query = select(webhook_events.c.id, webhook_events.c.outcome, webhook_events.c.received_at)
    rows = conn.execute(query.where(webhook_events.c.id.in_(list(ids))))
    return {row.id: (Outcome(row.outcome), row.received_at) for row in rows}


def record_listed(
    conn: Connection, events: Sequence[Listed], now: datetime, source: str = "reconcile"
) -> set[str]:
    """Record listed events never seen as queued, from `source`; the ids recorded.

    No copy has reached a worker yet, so `deliveries` and `attempts` start at 0. An id that
    someone else recorded first is left out: its copy is already on its way.
    """
    rows = [
        {
            "id": event.id,
            "type": event.type,
            "created_time": event.created_time,
            "live_mode": event.live_mode,
            "payload": payload_value(conn.dialect.name, literal(event.body, Text)),
            "outcome": Outcome.QUEUED.value,
            "deliveries": 0,
            "attempts": 0,
            "received_at": now,
            "source": source,
            "order_id": event.order_id,
        }
        for event in events
    ]
    statement = (
        insert_for(conn, webhook_events)
        .values(rows)
        .on_conflict_do_nothing(index_elements=[webhook_events.c.id])
        .returning(webhook_events.c.id)
    )
    return set(conn.execute(statement).scalars())


def checkpoint(conn: Connection, name: str) -> datetime | None:
    """Where the checkpoint `name` stands, if it was ever set."""
    return conn.execute(
        select(reconcile_checkpoints.c.position).where(reconcile_checkpoints.c.name == name)
    ).scalar_one_or_none()


def advance_checkpoint(conn: Connection, name: str, position: datetime) -> datetime:
    """Move the checkpoint `name` forward to `position` (never back); returns where it is."""
    values = insert_for(conn, reconcile_checkpoints).values(name=name, position=position)
    stored_position, new_position = reconcile_checkpoints.c.position, values.excluded.position
    upsert = values.on_conflict_do_update(
        index_elements=[reconcile_checkpoints.c.name],
        set_={
            "position": case((stored_position > new_position, stored_position), else_=new_position),
            "updated_at": func.now(),
        },
    ).returning(reconcile_checkpoints.c.position)
    stored: datetime = conn.execute(upsert).scalar_one()
    return stored
