"""The change feed: one row per committed change to a summary (the outbox), and the cursor
that reads it without ever skipping one.

Why not `id >`: identity values are handed out at INSERT, and transactions commit in another
order, so a reader that has seen id 12 may later find 11 committed. Each row instead keeps
the id of the transaction that wrote it (`xid`, Postgres' `pg_current_xact_id()`, 64 bits
and never reused; or its order's previous change's, if greater: see insert_statement), and
the feed is ordered by `(xid, id)`. A read returns only rows whose
`xid` is below its snapshot's `xmin`, the oldest transaction still running: every
transaction below it has ended, so its rows are all visible or never will be, and every
transaction that commits later has an `xid` at or above it. A cursor below that horizon
therefore never passes a row that is still to come. The price: a long write transaction
(anywhere in the cluster) holds the horizon back, which `refundsync_changes_feed_lag_seconds`
shows. SQLite has one writer at a time (`BEGIN IMMEDIATE`), so there ids follow commits and
`xid` is 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    Insert,
    Text,
    bindparam,
    cast,
    delete,
    func,
    insert,
    literal_column,
    select,
    tuple_,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import aliased

from models.errors import PermanentError
from models.payloads import iso
from models.rules import OrderState
from models.summary import summarize
from models.tables import changes, changes_purged, deliveries

# The oldest transaction still running when the statement's snapshot was taken.
_HORIZON: ColumnElement[int] = literal_column(
    "(pg_snapshot_xmin(pg_current_snapshot())::text)::bigint"
)
# The writing transaction's id, 64 bits with its epoch: it never wraps.
_TRANSACTION: ColumnElement[int] = literal_column("(pg_current_xact_id()::text)::bigint")
_CURSOR = re.compile(r"([0-9]{1,19})-([0-9]{1,19})")
# A cursor's parts are Postgres bigints.
_BIGINT_MAX = 2**63 - 1


class InvalidCursor(PermanentError):
    """A cursor refundsync did not hand out."""


class CursorExpired(PermanentError):
    """A cursor older than the changes retention kept: the reader would miss changes."""


@dataclass(frozen=True, order=True)
class Cursor:
    """A position in the feed: after the change `id` of transaction `xid`."""

    xid: int
    id: int

    @property
    def text(self) -> str:
        return f"{self.xid}-{self.id}"

    @classmethod
    def parse(cls, value: str) -> Cursor:
        found = _CURSOR.fullmatch(value)
        if found is None or max(int(found[1]), int(found[2])) > _BIGINT_MAX:
            raise InvalidCursor("cursor is not one this feed handed out")
        return cls(int(found[1]), int(found[2]))


START = Cursor(0, 0)


def change_row(state: OrderState, event_id: str | None, *, deliver: bool) -> dict[str, Any]:
    """The feed row of a committed change: `state` is the order after it."""
    return {
        "order_key": state.order_id,
        "kind": state.kind,
        "upstream_id": state.upstream_id.value if state.upstream_id else None,
        "version": state.version,
        "event_id": event_id,
        # Its updatedAt is the row's changed_at, which only the database knows.
        "summary": orjson.dumps(summarize(state)).decode(),
        "delivery": "pending" if deliver else None,
    }


@cache
def insert_statement(dialect: str) -> Insert:
    """The INSERT of change_row's rows (the summary is JSON text, stored as it is)."""
    summary = bindparam("summary", type_=Text)
    values: dict[str, Any] = {
        name: bindparam(name, type_=changes.c[name].type)
        for name in ("order_key", "kind", "upstream_id", "version", "event_id", "delivery")
    }
    if dialect == "postgresql":
        values["summary"] = cast(summary, postgresql.JSON)
        # One order's changes follow its versions in the feed too. A transaction can have
        # been given its id before the one that held the order's lock ahead of it (ids are
        # handed out at a transaction's first write), so a change takes the greater of its
        # transaction's id and the order's previous change's `xid`. Still gap-free: the
        # stored value is never below the writer's own id, which is all the horizon needs.
        previous = aliased(changes)
        values["xid"] = func.greatest(
            _TRANSACTION,
            func.coalesce(
                select(previous.c.xid)
                .where(previous.c.order_key == values["order_key"])
                .order_by(previous.c.version.desc())
                .limit(1)
                .scalar_subquery(),
                0,
            ),
        )
    else:
        values["summary"] = summary
    return insert(changes).values(values)


# How change_row leaves the summary's updatedAt, which read time fills in.
_UNSET_UPDATED_AT = '"updatedAt":null'


def _summary_text(row: Any) -> str:
    """The stored summary's JSON with its updatedAt: the change's time. The top level's
    updatedAt is the last one in the text (only `version` follows it, and a nested one, in
    a refund's metadata say, comes before), so the text needs no parsing."""
    head, marker, tail = row.summary.rpartition(_UNSET_UPDATED_AT)
    if not marker:
        return str(row.summary)
    return f'{head}"updatedAt":"{iso(row.changed_at)}"{tail}'


def change_json(row: Any, *, encoded: bool = False) -> dict[str, Any]:
    """The contract's change: the feed's item and an outbound webhook's `data`. With
    `encoded`, its summary stays JSON text (orjson.Fragment) for orjson to write as it is."""
    text = _summary_text(row)
    invoice = row.kind == "invoice"
    return {
        "cursor": Cursor(row.xid, row.id).text,
        "orderId": None if invoice else row.order_key,
        "invoiceId": row.order_key if invoice else None,
        "upstreamId": row.upstream_id,
        "version": row.version,
        "eventId": row.event_id,
        "changedAt": iso(row.changed_at),
        "summary": orjson.Fragment(text) if encoded else orjson.loads(text),
    }


COLUMNS = (
    changes.c.id,
    changes.c.xid,
    changes.c.order_key,
    changes.c.kind,
    changes.c.upstream_id,
    changes.c.version,
    changes.c.event_id,
    changes.c.changed_at,
    # As stored: JSON text, never parsed on the way out (change_json).
    cast(changes.c.summary, Text).label("summary"),
)


@dataclass(frozen=True)
class Page:
    """A read of the feed: its rows in cursor order, and where the next read starts."""

    rows: list[Any]
    next: Cursor

    @property
    def changes(self) -> list[dict[str, Any]]:
        return [change_json(row) for row in self.rows]

    def encoded(self) -> bytes:
        """The `GET /changes` answer."""
        changes = [change_json(row, encoded=True) for row in self.rows]
        return orjson.dumps({"changes": changes, "next": self.next.text})


def _purged(conn: Connection) -> Cursor | None:
    row = conn.execute(select(changes_purged.c.xid, changes_purged.c.change_id)).first()
    return None if row is None else Cursor(row.xid, row.change_id)


def read(conn: Connection, after: Cursor | None, limit: int) -> Page:
    """Up to `limit` changes after `after` (from the oldest kept when None).

    Raises CursorExpired when retention removed changes the reader has not seen, and
    InvalidCursor for a cursor past every change written (a mistyped one would skip
    changes as they come)."""
    start = after or START
    query = (
        select(*COLUMNS)
        .where(tuple_(changes.c.xid, changes.c.id) > tuple_(start.xid, start.id))
        .order_by(changes.c.xid, changes.c.id)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        query = query.where(changes.c.xid < _HORIZON)
    rows = list(conn.execute(query))
    # The mark after the rows: a purge that committed between the two makes this answer 410
    # rather than hand out rows past changes it removed unseen.
    purged = _purged(conn)
    if after is not None and purged is not None and after < purged:
        raise CursorExpired("the cursor is older than the changes kept; read from the start")
    if rows:
        return Page(rows, Cursor(rows[-1].xid, rows[-1].id))
    if after is not None and after > max(_newest(conn), purged or START):
        raise InvalidCursor("the cursor is past every change written")
    return Page(rows, after or purged or START)


def _newest(conn: Connection) -> Cursor:
    row = conn.execute(
        select(changes.c.xid, changes.c.id)
        .order_by(changes.c.xid.desc(), changes.c.id.desc())
        .limit(1)
    ).first()
    return START if row is None else Cursor(row.xid, row.id)


def lag_seconds(conn: Connection, now: datetime) -> float:
    """How long the oldest committed change has waited behind the horizon (0 when none
    waits): a long transaction holds the whole feed back this long."""
    if conn.dialect.name != "postgresql":
        return 0.0
    oldest = conn.execute(
        select(func.min(changes.c.changed_at)).where(changes.c.xid >= _HORIZON)
    ).scalar()
    return 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())


def purge(conn: Connection, before: datetime, batch: int) -> int:
    """Remove up to `batch` of the oldest changes made before `before`, with their
    delivery attempts, and move the expiry mark past them; returns how many went."""
    query = (
        select(changes.c.id, changes.c.xid, changes.c.changed_at, changes.c.delivery)
        .order_by(changes.c.xid, changes.c.id)
        .limit(batch)
    )
    if conn.dialect.name == "postgresql":
        # Never past what readers can have been given.
        query = query.where(changes.c.xid < _HORIZON)
    # Changes leave in feed order, so a cursor before the mark is exactly one that missed
    # some. changed_at only roughly follows that order, so the first newer one stops it; so
    # does one still being delivered (an operator may have sent an old one again).
    gone: list[Any] = []
    for row in conn.execute(query):
        if row.changed_at >= before or row.delivery == "pending":
            break
        gone.append(row)
    if not gone:
        return 0
    ids = [row.id for row in gone]
    conn.execute(delete(deliveries).where(deliveries.c.change_id.in_(ids)))
    conn.execute(delete(changes).where(changes.c.id.in_(ids)))
    mark = {"id": 1, "xid": gone[-1].xid, "change_id": gone[-1].id, "purged_at": func.now()}
    conn.execute(delete(changes_purged))
    conn.execute(insert(changes_purged).values(mark))
    return len(gone)
