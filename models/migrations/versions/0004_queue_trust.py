"""queue keys that seal events.apply messages, and the messages refused for lacking a seal

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    keys = op.create_table(
        "queue_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False, comment="hex of 32 random bytes"),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
        comment="HMAC keys of queue message seals: the newest seals, every one verifies",
    )
    # Made here, so every process that can reach the database shares it and nothing else
    # (Redis, Flower) ever holds it.
    op.bulk_insert(keys, [{"id": 1, "secret": secrets.token_hex(32)}])
    op.create_table(
        "refused_messages",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(),
            nullable=False,
        ),
        sa.Column(
            "refused_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("event_id", sa.Text(), comment="as the message claims it; not trusted"),
        sa.Column("event_type", sa.Text(), comment="as the message claims it; not trusted"),
        sa.Column("source", sa.Text(), comment="as the message claims it; not trusted"),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        comment="events.apply messages not sealed by refundsync: never applied",
    )


def downgrade() -> None:
    op.drop_table("refused_messages")
    op.drop_table("queue_keys")
