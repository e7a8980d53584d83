"""``db``: the schema and, on PostgreSQL, the login roles. These commands work on the
database itself rather than through the store, since they run before a store can open
(an empty or old schema) or as a role the daemons never have (CREATEROLE).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from wattkeeper.cli.common import ConfigOpt, DbOpt, Output, OutputOpt, _config, _emit_json, fail

db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(
    db: DbOpt = None,
    config: ConfigOpt = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Apply migrations up to head (creates the schema on an empty database)."""
    from wattkeeper.store.db import StoreError, current_revision, describe_url, make_engine, upgrade

    cfg = _config(config)
    url = db or cfg.store.resolved_url()
    try:
        engine = make_engine(url)
        before = current_revision(engine)
        upgrade(engine, revision)
        after = current_revision(engine)
    except StoreError as exc:
        fail(str(exc))
    typer.echo(f"{describe_url(url)}: schema {before or 'empty'} -> {after}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, or 'base' for empty.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask before dropping data.")] = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Roll migrations back (``base`` drops every wattkeeper table and its data)."""
    from wattkeeper.store.db import StoreError, check_revision

    try:
        check_revision(revision)
    except StoreError as exc:
        fail(str(exc), 2)
    if not yes and not typer.confirm(
        f"Roll the schema back to {revision}? Tables and their data may be dropped.",
        default=False,
    ):
        fail("not confirmed: nothing changed (pass --yes to skip the question)")
    from wattkeeper.store.db import (
        StoreError,
        current_revision,
        describe_url,
        downgrade,
        make_engine,
    )

    cfg = _config(config)
    url = db or cfg.store.resolved_url()
    try:
        engine = make_engine(url, must_exist=True)
        downgrade(engine, revision)
        after = current_revision(engine)
    except StoreError as exc:
        fail(str(exc))
    typer.echo(f"{describe_url(url)}: schema now {after or 'empty'}")


@db_app.command("current")
def db_current(db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Print the schema revision of the database and the one this version needs."""
    from wattkeeper.store.db import StoreError, current_revision, head_revision, make_engine

    cfg = _config(config)
    try:
        current = current_revision(make_engine(db or cfg.store.resolved_url(), must_exist=True))
    except StoreError as exc:
        fail(str(exc))
    typer.echo(f"current: {current or 'empty'}  head: {head_revision()}")


def _postgres_roles(db: str | None, config: str | None, what: str) -> Any:
    """The engine for a roles command: PostgreSQL only, at a schema that has the roles."""
    from wattkeeper.store.db import StoreError, check_schema, make_engine

    cfg = _config(config)
    try:
        engine = make_engine(db or cfg.store.resolved_url(), must_exist=True)
        if engine.dialect.name != "postgresql":
            fail(
                f"{what}: login roles and row-level security are PostgreSQL's; an SQLite "
                "store is one file that only its owner reads"
            )
        check_schema(engine, migrate=False)
    except StoreError as exc:
        fail(str(exc))
    return engine


@db_app.command("add-agent")
def db_add_agent(
    node: Annotated[str, typer.Argument(help="The node's name, as its agent gives it (--node).")],
    output: OutputOpt = Output.table,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Make a PostgreSQL login role for one node's agent (member of <db>_agent): it may
    write that node's samples and read its targets, nothing of any other node, and no
    budget. The password is printed once; run as a role with CREATEROLE."""
    from sqlalchemy.exc import SQLAlchemyError

    from wattkeeper.store.db import describe_url, error_line
    from wattkeeper.store.roles import RoleError, add_agent

    if not node.strip() or len(node) > 255:
        fail("the node name must be 1 to 255 characters", 2)
    engine = _postgres_roles(db, config, "db add-agent")
    try:
        with engine.begin() as conn:
            login = add_agent(conn, node, time.time())
    except RoleError as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        fail(f"db add-agent: {error_line(exc, engine)}")
    url = engine.url.set(username=login.role, password=login.password)
    shown = url.render_as_string(hide_password=False)
    if output == Output.json:
        _emit_json({"node": node, "role": login.role, "password": login.password, "url": shown})
    else:
        typer.echo(f"node {node}: login role {login.role}")
        typer.echo(f"url: {shown}")
    typer.echo(
        f"the password is shown once: give the agent on {node} this URL in store.url of a "
        f"0600 config file or in WATTKEEPER_STORE__URL ({describe_url(str(engine.url))})",
        err=True,
    )


@db_app.command("remove-agent")
def db_remove_agent(
    node: Annotated[str, typer.Argument(help="The node whose login role goes.")],
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Drop a node's login role: its agent can no longer connect."""
    from sqlalchemy.exc import SQLAlchemyError

    from wattkeeper.store.db import error_line
    from wattkeeper.store.roles import RoleError, remove_agent

    engine = _postgres_roles(db, config, "db remove-agent")
    try:
        with engine.begin() as conn:
            role = remove_agent(conn, node)
    except RoleError as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        fail(f"db remove-agent: {error_line(exc, engine)}")
    typer.echo(f"node {node}: login role {role} dropped")


@db_app.command("roles")
def db_roles(output: OutputOpt = Output.table, db: DbOpt = None, config: ConfigOpt = None) -> None:
    """The group roles of this database (grant them to logins) and each node's login."""
    from sqlalchemy import text

    from wattkeeper.store.roles import GROUPS, agents, group_role

    engine = _postgres_roles(db, config, "db roles")
    with engine.connect() as conn:
        database = conn.scalar(text("SELECT current_database()"))
        logins = agents(conn)
    groups = {g: group_role(database, g) for g in GROUPS}
    if output == Output.json:
        _emit_json(
            {
                "groups": groups,
                "agents": [{"node": n, "role": r, "created_at": t} for n, r, t in logins],
            }
        )
        return
    for group, role in groups.items():
        typer.echo(f"{group:<10} {role}")
    for node, role, _ in logins:
        typer.echo(f"agent      {role}  (node {node})")
