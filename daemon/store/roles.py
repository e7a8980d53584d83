"""Least privilege on PostgreSQL: the group roles the migrations make, and the login
role an administrator makes per node (``wattkeeper db add-agent NODE``).

Roles belong to the whole server, not to one database, so every name starts with the
database's own (``<db>_agent``, ``<db>_controller``, ``<db>_admin``): several
wattkeeper databases on one server, or the test suite's many, never share a role.
Row-level security keys on the login role: ``agent_roles`` says which node each
agent role speaks for, and the policies let it see and write that node's rows only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import Connection, text

GROUPS = ("agent", "controller", "admin")
MAX_ROLE = 63
"""PostgreSQL truncates longer identifiers; names are kept within it instead."""


def _fit(base: str, suffix: str) -> str:
    """``base_suffix`` within 63 bytes; a base too long keeps its start and gains a
    hash of the whole, so two long names that share a start stay apart."""
    name = f"{base}_{suffix}"
    if len(name.encode()) <= MAX_ROLE:
        return name
    tag = hashlib.sha256(base.encode()).hexdigest()[:8]
    room = MAX_ROLE - len(suffix.encode()) - len(tag) - 2
    start = base.encode()[:room].decode(errors="ignore")
    return f"{start}_{tag}_{suffix}"


def group_role(database: str, group: str) -> str:
    assert group in GROUPS
    return _fit(database, group)


def agent_role(database: str, node: str) -> str:
    """The login role of one node's agent: readable where it fits."""
    clean = re.sub(r"[^a-z0-9_]+", "_", node.lower()).strip("_") or "node"
    role = _fit(f"{database}_node_{clean}", "agent")
    if clean != node:
        # Two nodes whose names differ only in what was replaced stay apart.
        tag = hashlib.sha256(node.encode()).hexdigest()[:6]
        role = _fit(f"{database}_node_{clean}_{tag}", "agent")
    return role


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """What PostgreSQL stores for a SCRAM-SHA-256 password, made here: the server (and
    its statement log) never sees the password itself. The password is ASCII, so
    SASLprep leaves it as it is."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    stored_key = hashlib.sha256(client_key).digest()
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def quote(conn: Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote_identifier(name)


@dataclass(frozen=True)
class NewLogin:
    role: str
    password: str


class RoleError(Exception):
    """A role cannot be made or removed; the message says why and what to do."""


def add_agent(conn: Connection, node: str, now: float) -> NewLogin:
    """A login role for ``node``'s agent, a member of ``<db>_agent``, with a new random
    password (shown once), recorded in ``agent_roles``. In the caller's transaction."""
    database = conn.scalar(text("SELECT current_database()"))
    role = agent_role(database, node)
    taken = conn.execute(
        text("SELECT role_name FROM agent_roles WHERE node = :node"), {"node": node}
    ).first()
    if taken is not None:
        raise RoleError(
            f"node {node!r} already has the login role {taken[0]}: "
            f"wattkeeper db remove-agent {node} first to make a new one"
        )
    if conn.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}):
        raise RoleError(f"a role named {role} already exists on this server: drop it first")
    password = secrets.token_urlsafe(24)
    group = group_role(database, "agent")
    # CREATE ROLE takes no bind parameters: the verifier is base64, '$' and ':' (sent as
    # it is, not through text(), which would read ':x' as a parameter), and the names
    # are quoted identifiers.
    conn.exec_driver_sql(
        f"CREATE ROLE {quote(conn, role)} LOGIN PASSWORD '{scram_verifier(password)}' "
        f"IN ROLE {quote(conn, group)}"
    )
    conn.execute(
        text("INSERT INTO agent_roles (role_name, node, created_at) VALUES (:r, :n, :t)"),
        {"r": role, "n": node, "t": now},
    )
    return NewLogin(role, password)


def remove_agent(conn: Connection, node: str) -> str:
    found = conn.execute(
        text("SELECT role_name FROM agent_roles WHERE node = :node"), {"node": node}
    ).first()
    if found is None:
        raise RoleError(f"node {node!r} has no login role (wattkeeper db agents lists them)")
    role = found[0]
    conn.execute(text("DELETE FROM agent_roles WHERE node = :node"), {"node": node})
    if conn.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}):
        conn.execute(text(f"DROP OWNED BY {quote(conn, role)}"))
        conn.execute(text(f"DROP ROLE {quote(conn, role)}"))
    return role


def agents(conn: Connection) -> list[tuple[str, str, float]]:
    return [
        (node, role, created)
        for node, role, created in conn.execute(
            text("SELECT node, role_name, created_at FROM agent_roles ORDER BY node")
        )
    ]
