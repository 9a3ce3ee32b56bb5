"""The schema (SQLAlchemy Core). Alembic migrations create it; this mirrors them.

Postgres in production; SQLite in the standalone mode, where two types need help: SQLite
keeps neither a time zone nor an exact decimal.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    FetchedValue,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

metadata = MetaData()


class UtcTimestamp(TypeDecorator[datetime]):
    """A point in time, always read back aware (UTC).

    Postgres keeps `timestamptz` as such; SQLite stores text without an offset, so values
    are written in UTC and read back as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or dialect.name != "sqlite" or value.tzinfo is None:
            return value
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=UTC)


class Money(TypeDecorator[Decimal]):
    """An exact decimal amount: NUMERIC in Postgres; on SQLite, its text (27.10 stays 27.10)."""

    impl = Numeric(asdecimal=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        # SQLite has no decimal type; the migrations give these columns TEXT affinity.
        if dialect.name == "sqlite":
            return dialect.type_descriptor(Text())
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None or dialect.name != "sqlite":
            return value
        return str(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None or isinstance(value, Decimal):
            return value
        return Decimal(str(value))


# JSONB in Postgres; JSON text elsewhere.
Payload = JSON().with_variant(JSONB(astext_type=Text()), "postgresql")


def _timestamp(name: str, *, nullable: bool = True) -> Column[object]:
    return Column(name, UtcTimestamp(), nullable=nullable)


def _money(name: str, *, nullable: bool = False) -> Column[object]:
    # Unconstrained NUMERIC keeps the scale it was given (27.01 stays 27.01); amounts are
    # rounded to the currency's minor unit and range-checked before they get here.
    return Column(name, Money(), nullable=nullable)


webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", Text, primary_key=True, comment="DR event id: the dedup key"),
    Column("type", Text, nullable=False),
    _timestamp("created_time"),
    Column("live_mode", Boolean),
    Column("payload", Payload, nullable=False),
    Column("outcome", Text, nullable=False, server_default="queued"),
    Column("deliveries", Integer, nullable=False, server_default="0"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column(
        "lost_attempts",
        Integer,
        nullable=False,
        server_default="0",
        comment="attempts whose message came back unacknowledged (worker killed or lost)",
    ),
    Column(
        "messages",
        Text,
        nullable=False,
        server_default="",
        comment="ids of the queue messages counted in deliveries, each as ' id '",
    ),
    Column(
        "running_message",
        Text,
        comment="the message whose attempt started in a transaction of its own and has not"
        " ended; if that message comes back, the attempt died with its worker",
    ),
    Column("error", Text),
    Column("order_id", Text),
    Column("source", Text, nullable=False, server_default="webhook"),
    _timestamp("received_at", nullable=False),
    _timestamp("processed_at"),
    Index("webhook_events_outcome_received", "outcome", text("received_at DESC")),
    Index("webhook_events_order_received", "order_id", text("received_at DESC")),
    Index(
        "webhook_events_unfinished",
        "received_at",
        postgresql_where=text("outcome = 'queued'"),
    ),
)

orders = Table(
    "orders",
    metadata,
    Column("id", Text, primary_key=True),
    Column("currency", Text),
    Column("chargeback_event_id", Text),
    _timestamp("chargeback_event_time"),
    _money("dr_refunded_amount", nullable=True),
    Column("dr_refunded_event_id", Text),
    _timestamp("dr_refunded_event_time"),
    _money("dr_available_amount", nullable=True),
    Column("dr_available_event_id", Text),
    _timestamp("dr_available_event_time"),
    _money("dr_total_amount", nullable=True),
    Column("dr_total_event_id", Text),
    _timestamp("dr_total_event_time"),
    Column("kind", Text, nullable=False, server_default="order"),
    _money("dr_captured_amount", nullable=True),
    Column("dr_captured_event_id", Text),
    _timestamp("dr_captured_event_time"),
    Column("upstream_id", Text),
    Column("upstream_id_event_id", Text),
    _timestamp("upstream_id_event_time"),
    Column("order_state", Text),
    Column("order_state_event_id", Text),
    _timestamp("order_state_event_time"),
    Column("dispute_status", Text),
    Column("dispute_status_event_id", Text),
    _timestamp("dispute_status_event_time"),
    Column("version", Integer, nullable=False, server_default="0"),
    Index("orders_upstream_id", "upstream_id"),
    Column("created_at", UtcTimestamp(), nullable=False, server_default=func.now()),
    Column("updated_at", UtcTimestamp(), nullable=False, server_default=func.now()),
)

refunds = Table(
    "refunds",
    metadata,
    Column("order_id", Text, nullable=False),
    Column("id", Text, nullable=False),
    Column("state", Text, nullable=False),
    _money("amount"),
    _money("refunded_amount"),
    Column("reason", Text),
    Column("failure_reason", Text),
    _timestamp("created_time"),
    Column("last_event_id", Text, nullable=False),
    _timestamp("last_event_time", nullable=False),
    Column("type", Text),
    Column("items", Payload),
    Column("metadata", Payload),
    _timestamp("expires_time"),
    Column("token_information", Payload),
    _timestamp("checked_at"),
    # Keyed within the order: a refund id sent under another order never moves rows.
    PrimaryKeyConstraint("order_id", "id"),
    ForeignKeyConstraint(["order_id"], ["orders.id"]),
)

charge_refunds = Table(
    "charge_refunds",
    metadata,
    Column("order_id", Text, nullable=False),
    Column("charge_id", Text, nullable=False),
    Column("entry_key", Text, nullable=False, comment="entry id, else 'createdTime|amount'"),
    Column("entry_id", Text),
    _timestamp("created_time"),
    _money("amount"),
    Column("state", Text, nullable=False),
    Column("last_event_id", Text, nullable=False),
    _timestamp("last_event_time", nullable=False),
    Column("failure_code", Text),
    Column("failure_message", Text),
    PrimaryKeyConstraint("order_id", "charge_id", "entry_key"),
    ForeignKeyConstraint(["order_id"], ["orders.id"]),
)

chargebacks = Table(
    "chargebacks",
    metadata,
    Column("order_id", Text, nullable=False),
    Column("id", Text, nullable=False, comment="DR sales transaction id"),
    Column("type", Text, nullable=False),
    _money("amount"),
    Column("last_event_id", Text, nullable=False),
    _timestamp("last_event_time", nullable=False),
    PrimaryKeyConstraint("order_id", "id"),
    ForeignKeyConstraint(["order_id"], ["orders.id"]),
)

refund_history = Table(
    "refund_history",
    metadata,
    # SQLite numbers a row only through an INTEGER PRIMARY KEY.
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), Identity(), primary_key=True),
    Column("order_id", Text, nullable=False, index=True),
    Column("event_id", Text, nullable=False, index=True),
    Column("entity", Text, nullable=False),
    Column("entity_id", Text, nullable=False),
    Column("from_state", Text),
    Column("to_state", Text, nullable=False),
    Column("recorded_at", UtcTimestamp(), nullable=False, server_default=func.now()),
)

reconcile_checkpoints = Table(
    "reconcile_checkpoints",
    metadata,
    Column("name", Text, primary_key=True, comment="what is reconciled, e.g. 'events'"),
    _timestamp("position", nullable=False),
    Column("updated_at", UtcTimestamp(), nullable=False, server_default=func.now()),
    comment="createdTime up to which DR's Events API has been listed and published",
)

queue_keys = Table(
    "queue_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("secret", Text, nullable=False, comment="hex of 32 random bytes"),
    Column("created_at", UtcTimestamp(), nullable=False, server_default=func.now()),
    comment="HMAC keys of queue message seals: the newest seals, every one verifies",
)

refused_messages = Table(
    "refused_messages",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), Identity(), primary_key=True),
    Column("refused_at", UtcTimestamp(), nullable=False, server_default=func.now()),
    Column("event_id", Text, comment="as the message claims it; not trusted"),
    Column("event_type", Text, comment="as the message claims it; not trusted"),
    Column("source", Text, comment="as the message claims it; not trusted"),
    Column("reason", Text, nullable=False),
    comment="events.apply messages not sealed by refundsync: never applied",
)

changes = Table(
    "changes",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), Identity(), primary_key=True),
    Column(
        "xid",
        BigInteger,
        nullable=False,
        server_default=FetchedValue(),
        comment="the writing transaction's id (pg_current_xact_id); 0 on SQLite",
    ),
    Column("order_key", Text, nullable=False, comment="the order's or invoice's DR id"),
    Column("kind", Text, nullable=False),
    Column("upstream_id", Text),
    Column("version", Integer, nullable=False),
    Column("event_id", Text, comment="the event that made the change; null for a rebuild"),
    Column("changed_at", UtcTimestamp(), nullable=False, server_default=func.now()),
    # JSON, not JSONB: stored as written (its keys in the contract's order), never queried.
    Column("summary", JSON, nullable=False, comment="the summary after it, but updatedAt"),
    Column("delivery", Text, comment="pending, delivered or dead; null when not sent"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    _timestamp("next_attempt_at"),
    _timestamp("leased_until"),
    _timestamp("delivered_at"),
    Column("announced_at", UtcTimestamp(), comment="when the sweep last published it"),
    Column(
        "redelivered_at",
        UtcTimestamp(),
        comment="when an operator sent it again; its deliveries' age counts from then",
    ),
    Index("changes_cursor", "xid", "id"),
    Index("changes_order_version", "order_key", "version", unique=True),
    Index(
        "changes_undelivered",
        "order_key",
        "version",
        postgresql_where=text("delivery = 'pending'"),
        sqlite_where=text("delivery = 'pending'"),
    ),
    # SQLite would hand a purged row's id out again without it; cursors must only grow.
    sqlite_autoincrement=True,
    comment="the change feed, written with the change it records (the outbox)",
)

changes_purged = Table(
    "changes_purged",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("xid", BigInteger, nullable=False),
    Column("change_id", BigInteger, nullable=False),
    Column("purged_at", UtcTimestamp(), nullable=False, server_default=func.now()),
    comment="one row: the cursor of the newest change removed by retention",
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), Identity(), primary_key=True),
    Column("change_id", BigInteger, nullable=False, index=True),
    Column("attempt", Integer, nullable=False),
    Column("attempted_at", UtcTimestamp(), nullable=False),
    Column("status_code", Integer),
    Column("latency_ms", Integer, nullable=False),
    Column("error", Text, comment="what failed, never the receiver's response body"),
    comment="one row per attempt to POST a change to REFUNDSYNC_NOTIFY_URL",
)
