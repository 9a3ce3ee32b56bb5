"""the change feed (the outbox) and outbound webhook deliveries

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

`changes` holds one row per committed change to a summary, written in the transaction that
made it; `xid` is that transaction's id, which orders the feed (docs/design.md, "The change
feed"). `deliveries` records each attempt to POST a change to the commerce system.
"""

import sqlalchemy as sa
from alembic import op

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "changes",
        sa.Column("id", ID, sa.Identity(), primary_key=True),
        sa.Column(
            "xid",
            sa.BigInteger(),
            nullable=False,
            # The top-level transaction's id, 64 bits with its epoch: it never wraps.
            server_default=sa.text("(pg_current_xact_id()::text)::bigint") if postgres else "0",
            comment="the writing transaction's id (pg_current_xact_id); 0 on SQLite",
        ),
        sa.Column("order_key", sa.Text(), nullable=False, comment="the order's or invoice's DR id"),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("upstream_id", sa.Text()),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "event_id", sa.Text(), comment="the event that made the change; null for a rebuild"
        ),
        sa.Column(
            "changed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "summary", sa.JSON(), nullable=False, comment="the summary after it, but updatedAt"
        ),
        sa.Column("delivery", sa.Text(), comment="pending, delivered or dead; null when not sent"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True)),
        sa.Column("leased_until", sa.DateTime(timezone=True)),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
        sa.Column(
            "announced_at", sa.DateTime(timezone=True), comment="when the sweep last published it"
        ),
        sa.Column(
            "redelivered_at",
            sa.DateTime(timezone=True),
            comment="when an operator sent it again; its deliveries' age counts from then",
        ),
        sqlite_autoincrement=True,
        comment="the change feed, written with the change it records (the outbox)",
    )
    op.create_index("changes_cursor", "changes", ["xid", "id"])
    op.create_index("changes_order_version", "changes", ["order_key", "version"], unique=True)
    op.create_index(
        "changes_undelivered",
        "changes",
        ["order_key", "version"],
        postgresql_where=sa.text("delivery = 'pending'"),
        sqlite_where=sa.text("delivery = 'pending'"),
    )
    op.create_table(
        "changes_purged",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("xid", sa.BigInteger(), nullable=False),
        sa.Column("change_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "purged_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        comment="one row: the cursor of the newest change removed by retention",
    )
    op.create_table(
        "deliveries",
        sa.Column("id", ID, sa.Identity(), primary_key=True),
        sa.Column("change_id", sa.BigInteger(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_code", sa.Integer()),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), comment="what failed, never the receiver's response body"),
        comment="one row per attempt to POST a change to REFUNDSYNC_NOTIFY_URL",
    )
    op.create_index("ix_deliveries_change_id", "deliveries", ["change_id"])


def downgrade() -> None:
    op.drop_table("deliveries")
    op.drop_table("changes_purged")
    op.drop_table("changes")
