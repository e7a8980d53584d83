"""unique samples: one row per GPU (or node and endpoint) and timestamp

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 13:20:00.000000

An agent that crashes after the store took a batch, but before it trimmed its spool
file, replays that batch when it starts again. The rows carried the same timestamps
and nothing refused them, so the energy, the rollups and the token rates of those
seconds counted twice. The (gpu, ts) index of each sample table becomes unique and the
ingest skips rows already there (``ON CONFLICT DO NOTHING``). Duplicates already stored
are removed first, keeping the row written first.
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

KEYS = {
    "gpu_samples": ("ix_gpu_samples_gpu_ts", "uq_gpu_samples_gpu_ts", ["gpu_id", "ts"]),
    "host_samples": ("ix_host_samples_node_ts", "uq_host_samples_node_ts", ["node_id", "ts"]),
    "token_samples": (
        "ix_token_samples_node_ts",
        "uq_token_samples_node_ts",
        ["node_id", "ts", "endpoint", "model"],
    ),
}


def upgrade() -> None:
    for table, (old, new, columns) in KEYS.items():
        key = ", ".join(columns)
        op.execute(
            f"DELETE FROM {table} WHERE id NOT IN (SELECT min(id) FROM {table} GROUP BY {key})"
        )
        op.drop_index(old, table_name=table)
        op.create_index(new, table, columns, unique=True)


def downgrade() -> None:
    for table, (old, new, columns) in KEYS.items():
        op.drop_index(new, table_name=table)
        op.create_index(old, table, columns[:2], unique=False)
