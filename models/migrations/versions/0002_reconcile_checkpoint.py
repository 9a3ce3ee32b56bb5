"""reconcile checkpoint

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reconcile_checkpoints",
        sa.Column("name", sa.Text(), nullable=False, comment="what is reconciled, e.g. 'events'"),
        sa.Column("position", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("name"),
        comment="createdTime up to which DR's Events API has been listed and published",
    )


def downgrade() -> None:
    op.drop_table("reconcile_checkpoints")
