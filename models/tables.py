"""The Postgres schema (SQLAlchemy Core). Alembic migrations create it; this mirrors them."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
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

metadata = MetaData()


def _timestamp(name: str, *, nullable: bool = True) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


def _money(name: str, *, nullable: bool = False) -> Column[object]:
    # Unconstrained NUMERIC keeps the scale it was given (27.01 stays 27.01); amounts are
    # rounded to the currency's minor unit and range-checked before they get here.
    return Column(name, Numeric(asdecimal=True), nullable=nullable)


webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", Text, primary_key=True, comment="DR event id: the dedup key"),
    Column("type", Text, nullable=False),
    _timestamp("created_time"),
    Column("live_mode", Boolean),
    Column("payload", JSONB, nullable=False),
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
    Column("error", Text),
    Column("order_id", Text),
    Column("source", Text, nullable=False, server_default="webhook"),
    _timestamp("received_at", nullable=False),
    _timestamp("processed_at"),
    Index("webhook_events_outcome_received", "outcome", text("received_at DESC")),
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
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
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
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("order_id", Text, nullable=False, index=True),
    Column("event_id", Text, nullable=False, index=True),
    Column("entity", Text, nullable=False),
    Column("entity_id", Text, nullable=False),
    Column("from_state", Text),
    Column("to_state", Text, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

reconcile_checkpoints = Table(
    "reconcile_checkpoints",
    metadata,
    Column("name", Text, primary_key=True, comment="what is reconciled, e.g. 'events'"),
    _timestamp("position", nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    comment="createdTime up to which DR's Events API has been listed and published",
)
