"""token samples carry the servers' latency and KV-cache use; nodes say who drained them

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 04:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

COLUMNS = (
    "kv_cache_usage_ratio",
    "ttft_p90_s",
    "tpot_p90_s",
    "ttft_mean_s",
    "tpot_mean_s",
    "ttft_p90_floor_s",
    "tpot_p90_floor_s",
    "latency_requests",
)


def upgrade() -> None:
    with op.batch_alter_table("token_samples", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("drained_by", sa.String(length=255), nullable=True))
        batch_op.add_column(
            sa.Column("standby", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_column("standby")
        batch_op.drop_column("drained_by")
    with op.batch_alter_table("token_samples", schema=None) as batch_op:
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
