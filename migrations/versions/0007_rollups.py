"""rollups: one row per minute for the samples older than the raw retention window

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 07:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _floats(*names: str) -> list[sa.Column]:
    return [sa.Column(name, sa.Float(), nullable=True) for name in names]


def upgrade() -> None:
    op.create_table(
        "gpu_samples_1m",
        sa.Column("gpu_id", sa.Integer(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        *_floats(
            "power_mean_w",
            "power_max_w",
            "energy_j",
            "sm_clock_mean_mhz",
            "mem_clock_mean_mhz",
            "utilization_gpu_mean_ratio",
            "temperature_mean_c",
            "temperature_max_c",
            "power_limit_min_w",
            "power_limit_max_w",
            "power_capped_ratio",
        ),
        sa.ForeignKeyConstraint(
            ["gpu_id"],
            ["gpus.id"],
            name=op.f("fk_gpu_samples_1m_gpu_id_gpus"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("gpu_id", "ts", name=op.f("pk_gpu_samples_1m")),
    )
    op.create_index(op.f("ix_gpu_samples_1m_ts"), "gpu_samples_1m", ["ts"])
    op.create_table(
        "host_samples_1m",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        *_floats("cpu_util_mean_ratio", "non_gpu_power_mean_w", "non_gpu_power_max_w"),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["nodes.id"],
            name=op.f("fk_host_samples_1m_node_id_nodes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("node_id", "ts", name=op.f("pk_host_samples_1m")),
    )
    op.create_index(op.f("ix_host_samples_1m_ts"), "host_samples_1m", ["ts"])
    op.create_table(
        "token_samples_1m",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("endpoint", sa.String(length=512), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("up_ratio", sa.Float(), nullable=False),
        *_floats(
            "prompt_tokens_total",
            "generation_tokens_total",
            "generation_tokens_mean_per_s",
            "requests_running_mean",
            "requests_waiting_mean",
            "kv_cache_usage_max_ratio",
            "ttft_p90_max_s",
            "tpot_p90_max_s",
            "ttft_mean_s",
            "tpot_mean_s",
            "latency_requests",
        ),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["nodes.id"],
            name=op.f("fk_token_samples_1m_node_id_nodes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "node_id", "endpoint", "model", "ts", name=op.f("pk_token_samples_1m")
        ),
    )
    op.create_index(op.f("ix_token_samples_1m_ts"), "token_samples_1m", ["ts"])


def downgrade() -> None:
    for table in ("token_samples_1m", "host_samples_1m", "gpu_samples_1m"):
        op.drop_index(op.f(f"ix_{table}_ts"), table_name=table)
        op.drop_table(table)
