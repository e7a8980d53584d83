"""controller memory: what the leading controller learned, kept in the store

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 05:20:00.000000

The latency ceilings, learned in-flight limits, routing efficiencies and the host
power coupling take minutes of feedback to learn. Kept only in the leader's memory,
they were lost with it: a restarted controller, or a standby taking over, began from
the GPUs' limits and relearned. The leader now writes them here every half minute
(fenced by its epoch) and a controller that takes the lease reads them back.

On PostgreSQL the controller group reads and writes the table and the admin group may
do anything with it; agents get nothing (no grant).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy import text

from wattkeeper.store.roles import group_role

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "controller_memory",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("epoch", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
    )
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        q = bind.dialect.identifier_preparer.quote_identifier
        database = bind.scalar(text("SELECT current_database()"))
        controller = q(group_role(database, "controller"))
        admin = q(group_role(database, "admin"))
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON controller_memory TO {controller}")
        op.execute(f"GRANT ALL ON controller_memory TO {admin}")


def downgrade() -> None:
    op.drop_table("controller_memory")
