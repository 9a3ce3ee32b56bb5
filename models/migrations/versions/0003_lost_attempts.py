"""count attempts that ended with their worker lost

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "webhook_events",
        sa.Column(
            "lost_attempts",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="attempts whose message came back unacknowledged (worker killed or lost)",
        ),
    )


def downgrade() -> None:
    op.drop_column("webhook_events", "lost_attempts")
