"""initial schema (Postgres; SQLite for the standalone mode)

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# SQLite (standalone mode) has no decimal type, and its NUMERIC affinity would turn 27.10
# into the float 27.1: amounts are kept there as their exact text.
MONEY = sa.Numeric().with_variant(sa.Text(), "sqlite")

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=True),
        sa.Column("chargeback_event_id", sa.Text(), nullable=True),
        sa.Column("chargeback_event_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dr_refunded_amount", MONEY, nullable=True),
        sa.Column("dr_refunded_event_id", sa.Text(), nullable=True),
        sa.Column("dr_refunded_event_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dr_available_amount", MONEY, nullable=True),
        sa.Column("dr_available_event_id", sa.Text(), nullable=True),
        sa.Column("dr_available_event_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dr_total_amount", MONEY, nullable=True),
        sa.Column("dr_total_event_id", sa.Text(), nullable=True),
        sa.Column("dr_total_event_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "refund_history",
        sa.Column(
            "id",
            # SQLite (standalone mode) numbers rows only through an INTEGER PRIMARY KEY.
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("entity", sa.Text(), nullable=False),
        sa.Column("entity_id", sa.Text(), nullable=False),
        sa.Column("from_state", sa.Text(), nullable=True),
        sa.Column("to_state", sa.Text(), nullable=False),
        sa.Column(
            "recorded_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_refund_history_event_id"), "refund_history", ["event_id"], unique=False
    )
    op.create_index(
        op.f("ix_refund_history_order_id"), "refund_history", ["order_id"], unique=False
    )
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.Text(), nullable=False, comment="DR event id: the dedup key"),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("created_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("live_mode", sa.Boolean(), nullable=True),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("outcome", sa.Text(), server_default="queued", nullable=False),
        sa.Column("deliveries", sa.Integer(), server_default="0", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("order_id", sa.Text(), nullable=True),
        sa.Column("source", sa.Text(), server_default="webhook", nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "webhook_events_outcome_received",
        "webhook_events",
        ["outcome", sa.literal_column("received_at DESC")],
        unique=False,
    )
    op.create_index(
        "webhook_events_unfinished",
        "webhook_events",
        ["received_at"],
        unique=False,
        postgresql_where=sa.text("outcome = 'queued'"),
    )
    op.create_table(
        "charge_refunds",
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("charge_id", sa.Text(), nullable=False),
        sa.Column(
            "entry_key", sa.Text(), nullable=False, comment="entry id, else 'createdTime|amount'"
        ),
        sa.Column("entry_id", sa.Text(), nullable=True),
        sa.Column("created_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("last_event_id", sa.Text(), nullable=False),
        sa.Column("last_event_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
        ),
        sa.PrimaryKeyConstraint("order_id", "charge_id", "entry_key"),
    )
    op.create_table(
        "chargebacks",
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False, comment="DR sales transaction id"),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("last_event_id", sa.Text(), nullable=False),
        sa.Column("last_event_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
        ),
        sa.PrimaryKeyConstraint("order_id", "id"),
    )
    op.create_table(
        "refunds",
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("refunded_amount", MONEY, nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("created_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_event_id", sa.Text(), nullable=False),
        sa.Column("last_event_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
        ),
        sa.PrimaryKeyConstraint("order_id", "id"),
    )


def downgrade() -> None:
    op.drop_table("refunds")
    op.drop_table("chargebacks")
    op.drop_table("charge_refunds")
    op.drop_index(
        "webhook_events_unfinished",
        table_name="webhook_events",
        postgresql_where=sa.text("outcome = 'queued'"),
    )
    op.drop_index("webhook_events_outcome_received", table_name="webhook_events")
    op.drop_table("webhook_events")
    op.drop_index(op.f("ix_refund_history_order_id"), table_name="refund_history")
    op.drop_index(op.f("ix_refund_history_event_id"), table_name="refund_history")
    op.drop_table("refund_history")
    op.drop_table("orders")
