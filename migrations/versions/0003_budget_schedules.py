"""budget schedules: a budget that holds during a window, once or on a cron schedule

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 04:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budget_schedules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(length=255), nullable=False),
        sa.Column("limit_w", sa.Float(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("cron", sa.String(length=255), nullable=True),
        sa.Column("at_ts", sa.Float(), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budget_schedules")),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("budget_schedules")
