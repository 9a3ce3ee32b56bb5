"""contract v2 of the refund summary: the order's figures and words, its version, the refund
fields DR sends, invoices, and the event's order

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

Adds columns only. Existing orders keep what v1 stored; `refundsync orders rebuild` then
recomputes every order from its stored events, filling what v1 did not keep.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

MONEY = sa.Numeric().with_variant(sa.Text(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _kept(prefix: str, value: sa.Column) -> list[sa.Column]:  # type: ignore[type-arg]
    """A value of DR's order and the event that carried it."""
    return [
        value,
        sa.Column(f"{prefix}_event_id", sa.Text()),
        sa.Column(f"{prefix}_event_time", sa.DateTime(timezone=True)),
    ]


def upgrade() -> None:
    for column in [
        sa.Column(
            "kind",
            sa.Text(),
            nullable=False,
            server_default="order",
            comment="'order', or 'invoice' for the refunds of an invoice",
        ),
        *_kept("dr_captured", sa.Column("dr_captured_amount", MONEY)),
        *_kept("upstream_id", sa.Column("upstream_id", sa.Text())),
        *_kept("order_state", sa.Column("order_state", sa.Text())),
        *_kept("dispute_status", sa.Column("dispute_status", sa.Text())),
        sa.Column(
            "version",
            sa.Integer(),
            nullable=False,
            server_default="0",
            comment="one more for every event that changed the summary",
        ),
    ]:
        op.add_column("orders", column)
    op.create_index("orders_upstream_id", "orders", ["upstream_id"])
    refund_columns: list[sa.Column] = [  # type: ignore[type-arg]
        sa.Column("type", sa.Text()),
        sa.Column("items", JSON),
        sa.Column("metadata", JSON),
        sa.Column("expires_time", sa.DateTime(timezone=True)),
        sa.Column("token_information", JSON),
        sa.Column(
            "checked_at",
            sa.DateTime(timezone=True),
            comment="when DR's Refunds API was last asked about this refund while pending",
        ),
    ]
    for refund_column in refund_columns:
        op.add_column("refunds", refund_column)
    op.add_column("charge_refunds", sa.Column("failure_code", sa.Text()))
    op.add_column("charge_refunds", sa.Column("failure_message", sa.Text()))
    op.create_index(
        "webhook_events_order_received",
        "webhook_events",
        ["order_id", sa.text("received_at DESC")],
    )


def downgrade() -> None:
    op.drop_index("webhook_events_order_received", table_name="webhook_events")
    for name in ("failure_message", "failure_code"):
        op.drop_column("charge_refunds", name)
    for name in ("checked_at", "token_information", "expires_time", "metadata", "items", "type"):
        op.drop_column("refunds", name)
    op.drop_index("orders_upstream_id", table_name="orders")
    for name in (
        "version",
        *(f"dispute_status{part}" for part in ("", "_event_id", "_event_time")),
        *(f"order_state{part}" for part in ("", "_event_id", "_event_time")),
        *(f"upstream_id{part}" for part in ("", "_event_id", "_event_time")),
        *(f"dr_captured{part}" for part in ("_amount", "_event_id", "_event_time")),
        "kind",
    ):
        op.drop_column("orders", name)
