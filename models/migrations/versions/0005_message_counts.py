"""count deliveries by message, and attempts lost only when they had started

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "webhook_events",
        sa.Column(
            "messages",
            sa.Text(),
            server_default="",
            nullable=False,
            comment="ids of the queue messages counted in deliveries, each as ' id '",
        ),
    )
    op.add_column(
        "webhook_events",
        sa.Column(
            "running_message",
            sa.Text(),
            comment="the message whose attempt started in a transaction of its own and has not"
            " ended; if that message comes back, the attempt died with its worker",
        ),
    )


def downgrade() -> None:
    op.drop_column("webhook_events", "running_message")
    op.drop_column("webhook_events", "messages")
