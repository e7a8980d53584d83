"""least privilege on PostgreSQL: group roles for agents, controllers and admins, and
row-level security that keeps an agent to its own node's rows

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 23:30:00.000000

On SQLite only ``agent_roles`` is made (one process, one file: nothing to separate).
On PostgreSQL the role running ``db upgrade`` needs CREATEROLE (or superuser): it makes
``<db>_agent``, ``<db>_controller`` and ``<db>_admin``, grants each what its daemon or
its person does, and turns on row-level security where rows belong to a node. The
tables' owner (the role that migrates) is not bound by the policies.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy import text

from wattkeeper.store.roles import GROUPS, group_role

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

READ = (
    "alembic_version",
    "nodes",
    "gpus",
    "gpu_samples",
    "host_samples",
    "token_samples",
    "budgets",
    "budget_schedules",
    "targets",
    "routes",
    "leader",
    "audit_log",
    "gpu_samples_1m",
    "host_samples_1m",
    "token_samples_1m",
)
# What each daemon writes; a person (admin) may change anything.
AGENT_WRITES = (
    "INSERT ON nodes",
    "UPDATE (last_seen_at, backend, agent_id, standby) ON nodes",
    "INSERT, UPDATE, DELETE ON gpus",
    "INSERT ON gpu_samples, host_samples, token_samples",
    "INSERT ON audit_log",
)
CONTROLLER_WRITES = (
    "UPDATE (drained, drained_by) ON nodes",
    "INSERT, UPDATE, DELETE ON targets, routes, leader",
    "INSERT, UPDATE, DELETE ON gpu_samples_1m, host_samples_1m, token_samples_1m",
    "DELETE ON gpu_samples, host_samples, token_samples",
    "INSERT, DELETE ON audit_log",
)
MY_NODE = "wattkeeper_agent_node()"
MY_NODE_ID = "wattkeeper_agent_node_id()"
MY_GPUS = f"gpu_id IN (SELECT id FROM gpus WHERE node_id = {MY_NODE_ID})"
# Per table: the agent's rows. The controller and the admin see and write every row.
AGENT_ROWS = {
    "nodes": f"name = {MY_NODE}",
    "gpus": f"node_id = {MY_NODE_ID}",
    "gpu_samples": MY_GPUS,
    "host_samples": f"node_id = {MY_NODE_ID}",
    "token_samples": f"node_id = {MY_NODE_ID}",
    "targets": MY_GPUS,
    "routes": f"node_id = {MY_NODE_ID}",
    "gpu_samples_1m": MY_GPUS,
    "host_samples_1m": f"node_id = {MY_NODE_ID}",
    "token_samples_1m": f"node_id = {MY_NODE_ID}",
}


def upgrade() -> None:
    op.create_table(
        "agent_roles",
        sa.Column("role_name", sa.String(length=63), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("role_name", name=op.f("pk_agent_roles")),
        sa.UniqueConstraint("node", name=op.f("uq_agent_roles_node")),
    )
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    q = bind.dialect.identifier_preparer.quote_identifier
    able = bind.scalar(
        text("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user")
    )
    if not able:
        raise RuntimeError(
            "this migration creates the agent, controller and admin roles: run "
            "wattkeeper db upgrade as a role with CREATEROLE (or a superuser)"
        )
    database = bind.scalar(text("SELECT current_database()"))
    schema = q(bind.scalar(text("SELECT current_schema()")))
    names = [group_role(database, g) for g in GROUPS]
    agent, controller, admin = (q(n) for n in names)
    for name in names:
        role = q(name)
        if not bind.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": name}):
            op.execute(f"CREATE ROLE {role} NOLOGIN")
        op.execute(f"GRANT CONNECT ON DATABASE {q(database)} TO {role}")
        op.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        op.execute(f"GRANT SELECT ON {', '.join(READ)} TO {role}")
        op.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role}")
    for grant in AGENT_WRITES:
        op.execute(f"GRANT {grant} TO {agent}")
    for grant in CONTROLLER_WRITES:
        op.execute(f"GRANT {grant} TO {controller}")
    op.execute(f"GRANT ALL ON {', '.join((*READ, 'agent_roles'))} TO {admin}")

    # Which node the connected agent speaks for: SECURITY DEFINER, so agents need not
    # read agent_roles, and keyed on session_user, the login role.
    # Every name in their bodies is qualified and pg_temp comes last: an agent that
    # made a temporary table called agent_roles or nodes would otherwise have it read
    # in their place, with the definer's rights, and pass for any node.
    op.execute(
        "CREATE FUNCTION wattkeeper_agent_node() RETURNS text LANGUAGE sql STABLE "
        f"SECURITY DEFINER SET search_path = pg_catalog, {schema}, pg_temp AS "
        f"$$ SELECT node FROM {schema}.agent_roles WHERE role_name = session_user $$"
    )
    op.execute(
        "CREATE FUNCTION wattkeeper_agent_node_id() RETURNS integer LANGUAGE sql STABLE "
        f"SECURITY DEFINER SET search_path = pg_catalog, {schema}, pg_temp AS "
        f"$$ SELECT id FROM {schema}.nodes WHERE name = {schema}.wattkeeper_agent_node() $$"
    )
    for fn in ("wattkeeper_agent_node()", "wattkeeper_agent_node_id()"):
        op.execute(f"REVOKE ALL ON FUNCTION {fn} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {fn} TO {agent}")

    for table, mine in AGENT_ROWS.items():
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY {table}_all ON {table} TO {controller}, {admin} "
            "USING (true) WITH CHECK (true)"
        )
        op.execute(
            f"CREATE POLICY {table}_agent ON {table} TO {agent} USING ({mine}) WITH CHECK ({mine})"
        )
    # The audit log: the controller and the admin read all of it, an agent its own lines.
    op.execute("ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY audit_log_all ON audit_log TO {controller}, {admin} "
        "USING (true) WITH CHECK (true)"
    )
    # Its own lines, read back too: an INSERT ... RETURNING must see the row it made.
    op.execute(
        f"CREATE POLICY audit_log_agent ON audit_log TO {agent} "
        f"USING (actor = 'agent:' || {MY_NODE}) WITH CHECK (actor = 'agent:' || {MY_NODE})"
    )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        q = bind.dialect.identifier_preparer.quote_identifier
        database = bind.scalar(text("SELECT current_database()"))
        logins = [r for (r,) in bind.execute(text("SELECT role_name FROM agent_roles"))]
        for table in (*AGENT_ROWS, "audit_log"):
            op.execute(f"DROP POLICY IF EXISTS {table}_all ON {table}")
            op.execute(f"DROP POLICY IF EXISTS {table}_agent ON {table}")
            op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
        op.execute("DROP FUNCTION IF EXISTS wattkeeper_agent_node_id()")
        op.execute("DROP FUNCTION IF EXISTS wattkeeper_agent_node()")
        for role in [*logins, *(group_role(database, g) for g in GROUPS)]:
            exists = bind.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role})
            if exists:
                op.execute(f"DROP OWNED BY {q(role)}")
                op.execute(f"DROP ROLE {q(role)}")
    op.drop_table("agent_roles")
