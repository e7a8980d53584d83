"""Engines, per-dialect settings, schema checks and migrations, all in one place.

SQLite gets WAL, foreign keys and a busy timeout so the agent and controller threads
of one process (and the CLI beside them) do not trip over each other; PostgreSQL gets a
connect timeout so a database that is down is an error within seconds, not a hang.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError as AlembicError
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool

import wattkeeper.migrations as _migrations


class StoreError(Exception):
    """The store cannot be used: unreachable, bad URL, or a schema that is not at head."""


class SchemaOutdatedError(StoreError):
    """The database schema is older (or newer) than this version of wattkeeper expects."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    _sqlite_session_pragmas(cur)


def _sqlite_reader_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """A reader leaves the journal mode alone: setting it writes the file's header, and a
    read-only command must not change (or turn into a database) a file it was pointed at.
    The mode is stored in the file, so a reader of a WAL store reads it as WAL anyway."""
    cur = dbapi_conn.cursor()
    _sqlite_session_pragmas(cur)


def _sqlite_session_pragmas(cur: Any) -> None:
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str, *, create_dirs: bool = True, must_exist: bool = False) -> Engine:
    """An engine for ``url``; refuses a malformed URL or an unknown driver by name.

    ``must_exist`` is for commands that only read: they must not leave an empty SQLite
    file (and its directory) behind when pointed at the wrong path.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise StoreError(
            f"invalid database URL {describe_url(url)!r}: expected sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and must_exist and not Path(db).expanduser().exists():
            raise StoreError(
                f"no database at {db}: create it with `wattkeeper db upgrade --db {url}`"
            )
        if db and db != ":memory:" and create_dirs and not must_exist:
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 10, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_reader_pragmas if must_exist else _sqlite_pragmas)
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(
            parsed,
            pool_pre_ping=True,
            connect_args={"connect_timeout": 5, "options": "-c statement_timeout=30000"},
        )
    raise StoreError(
        f"unsupported database {backend!r} in {describe_url(url)}: use sqlite:///PATH or "
        "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
    )


def describe_url(url: str) -> str:
    """The URL without its password, for messages and logs.

    A URL too malformed to parse is not echoed at all: whatever stands between ``://``
    and ``@`` may be a password.
    """
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        scheme, sep, rest = url.partition("://")
        if sep and "@" in rest:
            return f"{scheme}://***@{rest.rpartition('@')[2]}"
        return url


def error_line(exc: BaseException, url: str | Engine | None = None) -> str:
    """One line for a database error, with any password in ``url`` masked.

    Drivers put the server's words in the message and never the password, but a DSN
    echoed back by a driver or a hand-written message could carry one: scrub it here,
    where every store error is made, rather than trust each message.
    """
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    line = text.splitlines()[0] if text else type(orig).__name__
    password = None
    if isinstance(url, Engine):
        password = url.url.password
    elif url:
        try:
            password = make_url(url).password
        except (ArgumentError, ValueError):
            password = None
    if password:
        line = line.replace(str(password), "***")
    return line


def alembic_config(engine: Engine | None = None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(_migrations.__file__).parent))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at; a clear StoreError when it cannot be reached."""
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise StoreError(
            f"cannot reach the database {engine_name(engine)}: {error_line(exc, engine)}"
        ) from None


def engine_name(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def check_revision(revision: str) -> None:
    """Refuse a revision the migrations do not know, naming the ones they do."""
    if revision in ("head", "base"):
        return
    script = ScriptDirectory.from_config(alembic_config())
    try:
        found = script.get_revision(revision)
    except AlembicError:
        found = None
    if found is None:
        known = ", ".join(["base", *(r.revision for r in script.walk_revisions()), "head"])
        raise StoreError(f"unknown schema revision {revision!r}: known are {known}")


def upgrade(engine: Engine, revision: str = "head") -> None:
    check_revision(revision)
    current_revision(engine)  # reachability check with a clean message
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    check_revision(revision)
    current_revision(engine)
    command.downgrade(alembic_config(engine), revision)


def create_if_empty(engine: Engine) -> bool:
    """Create the schema at head in an embedded store that holds nothing yet.

    The single-host default should just work on first use, as Grafana's and Prefect's
    embedded SQLite stores do. Only SQLite, and only when the database has no table at
    all: a database with tables is someone's data (ours at another revision, or not
    ours), and PostgreSQL is migrated by an administrator, since many agents starting
    at once must not race each other's DDL and a least-privilege role cannot run it.
    Returns whether the schema was created.
    """
    if engine.dialect.name != "sqlite":
        return False
    try:
        with engine.connect() as conn:
            if inspect(conn).get_table_names():
                return False
    except SQLAlchemyError as exc:
        raise StoreError(
            f"cannot reach the database {engine_name(engine)}: {error_line(exc, engine)}"
        ) from None
    upgrade(engine)
    return True


def check_schema(engine: Engine, *, migrate: bool = False) -> None:
    """Refuse to run on a schema that is not at head, naming the command that fixes it."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if migrate:
        upgrade(engine)
        return
    where = describe_url(str(engine.url))
    # A URL whose password is masked cannot be pasted back: name the option instead.
    db_arg = where if engine.url.password is None else "URL"
    if current is None:
        raise SchemaOutdatedError(
            f"the database {where} has no wattkeeper schema: run `wattkeeper db upgrade"
            f" --db {db_arg}` (or set store.migrate_on_start = true)"
        )
    raise SchemaOutdatedError(
        f"the database {where} is at schema {current}, this wattkeeper needs {head}: "
        f"run `wattkeeper db upgrade --db {db_arg}` (or set store.migrate_on_start = true)"
    )


__all__ = [
    "NullPool",
    "SchemaOutdatedError",
    "StoreError",
    "check_schema",
    "create_if_empty",
    "current_revision",
    "downgrade",
    "head_revision",
    "make_engine",
    "upgrade",
]
