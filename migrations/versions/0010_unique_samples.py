"""unique samples: one row per GPU (or node, endpoint and series) and timestamp

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 13:20:00.000000

An agent that crashes after the store took a batch, but before it trimmed its spool
file, replays that batch when it starts again. The rows carried the same timestamps
and nothing refused them, so the energy, the rollups and the token rates of those
seconds counted twice. The (gpu, ts) index of each sample table becomes unique and the
ingest skips rows already there (``ON CONFLICT DO NOTHING``).

Token samples gain ``series``, the labels that tell apart several series of one model
on one endpoint (data-parallel vLLM engines, Triton model versions), which are rows of
their own and part of the key. Stored GPU and host duplicates are removed, keeping the
row written first. Stored token rows cannot be told apart from a replay (they have no
series yet), so none is removed: each one after the first of its key is marked
``id:<id>`` in ``series``.

Each removal is one ``DELETE ... WHERE EXISTS`` that probes the (gpu, ts) index, in the
migration's transaction: it holds the sample tables for as long as it takes (minutes at
hundreds of millions of rows), so upgrade in a quiet moment; agents spool meanwhile.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

OLD = {
    "gpu_samples": ("ix_gpu_samples_gpu_ts", ["gpu_id", "ts"]),
    "host_samples": ("ix_host_samples_node_ts", ["node_id", "ts"]),
    "token_samples": ("ix_token_samples_node_ts", ["node_id", "ts"]),
}
NEW = {
    "gpu_samples": ("uq_gpu_samples_gpu_ts", ["gpu_id", "ts"]),
    "host_samples": ("uq_host_samples_node_ts", ["node_id", "ts"]),
    "token_samples": (
        "uq_token_samples_node_ts",
        ["node_id", "ts", "endpoint", "model", "series"],
    ),
}


def _earlier(table: str, columns: list[str]) -> str:
    same = " AND ".join(f"e.{c} = {table}.{c}" for c in columns)
    return f"EXISTS (SELECT 1 FROM {table} e WHERE {same} AND e.id < {table}.id)"


def upgrade() -> None:
    with op.batch_alter_table("token_samples") as batch:
        batch.add_column(sa.Column("series", sa.String(255), nullable=False, server_default=""))
    for table in ("gpu_samples", "host_samples"):
        op.execute(f"DELETE FROM {table} WHERE {_earlier(table, OLD[table][1])}")
    key = ["node_id", "ts", "endpoint", "model"]
    op.execute(
        "UPDATE token_samples SET series = 'id:' || CAST(id AS VARCHAR(20)) "
        f"WHERE {_earlier('token_samples', key)}"
    )
    for table, (old, _) in OLD.items():
        op.drop_index(old, table_name=table)
        name, columns = NEW[table]
        op.create_index(name, table, columns, unique=True)


def downgrade() -> None:
    for table, (old, columns) in OLD.items():
        op.drop_index(NEW[table][0], table_name=table)
        op.create_index(old, table, columns, unique=False)
    with op.batch_alter_table("token_samples") as batch:
        batch.drop_column("series")
