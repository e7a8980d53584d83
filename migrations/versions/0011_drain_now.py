"""drain now: a drain that may not wait for the node's requests to finish

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 16:30:00.000000

A drain lets the node's in-flight requests finish, which at a busy node takes a minute
or more, and all that time the node draws power. When a budget is below what the
serving nodes draw at their floors, that minute is a minute over budget. ``drain_now``
marks a drain that must end at once: the node's agent runs its drain-now actuator
(which sends the in-flight requests back to the router), once per drain. It is cleared
with the drain. The controller may set it on PostgreSQL, as it sets the drain itself.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy import text

from wattkeeper.store.roles import group_role

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(
            sa.Column("drain_now", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    q = bind.dialect.identifier_preparer.quote_identifier
    controller = q(group_role(bind.scalar(text("SELECT current_database()")), "controller"))
    op.execute(f"GRANT UPDATE (drain_now) ON nodes TO {controller}")


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("drain_now")
