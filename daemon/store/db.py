"""Engines, per-dialect settings, schema checks and migrations, all in one place.

SQLite gets WAL, foreign keys and a busy timeout so the agent and controller threads
of one process (and the CLI beside them) do not trip over each other; PostgreSQL gets a
connect timeout so a database that is down is an error within seconds, not a hang.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError as AlembicError
from sqlalchemy import Connection, Engine, Table, TextClause, create_engine, event, inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import NullPool

import wattkeeper.migrations as _migrations

log = logging.getLogger(__name__)


class StoreError(Exception):
    """The store cannot be used: unreachable, bad URL, or a schema that is not at head."""

    outage: bool = False
    """The database server did not answer or refused the connection as a server does
    while down (SQLSTATE class 08, 57P0x): an outage to ride out, not a mistake."""
    refused: bool = False
    """The database answered and refused the data itself (a constraint, a value out of
    its column: SQLSTATE classes 22 and 23): sending it again will not help, unlike a
    lock, a timeout, a lost connection or a full disk."""


def is_outage(exc: BaseException) -> bool:
    """Whether a driver error says the server is away rather than that the request is
    wrong: no SQLSTATE at all (nothing answered: refused, timed out, unreachable), or a
    connection-class one. A missing database or a bad password has its own SQLSTATE."""
    orig = getattr(exc, "orig", exc)
    if not hasattr(orig, "sqlstate"):
        return False  # not a PostgreSQL driver error (SQLite: a path, a permission)
    state = orig.sqlstate
    if state is not None:
        return state.startswith("08") or state in _OUTAGE_STATES
    # libpq gives no SQLSTATE for a failed connection: a server that answered says
    # FATAL, and only its transient refusals count as an outage.
    text = str(orig)
    if "FATAL" not in text:
        return True
    return any(phrase in text for phrase in _TRANSIENT_FATAL)


_OUTAGE_STATES = ("57P01", "57P02", "57P03", "53300")
_TRANSIENT_FATAL = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "too many clients",
    "remaining connection slots are reserved",
)


class SchemaOutdatedError(StoreError):
    """The database schema is older (or newer) than this version of wattkeeper expects."""


def insert_new(dialect: Dialect, table: Any) -> Any:
    """An INSERT that skips the rows whose unique key is already stored. Samples are
    keyed by where and when they were taken, so the same sample sent twice (a backlog
    replayed after a crash) lands once, and the batch around it lands all the same. No
    conflict target: an agent's role may insert samples but not read them, and a
    target would need it to."""
    module = postgresql if dialect.name == "postgresql" else sqlite
    return module.insert(table).on_conflict_do_nothing()


_PG_ARRAY = {"INTEGER": "integer[]", "FLOAT": "double precision[]", "BOOLEAN": "boolean[]"}


def insert_rows(conn: Connection, model: Any, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (all with the same keys) as ``insert_new`` does, in one statement.

    On PostgreSQL the rows go as one array per column, unnested by the server
    (``INSERT ... SELECT * FROM unnest(...)``): one statement planned once, where an
    executemany costs the server an execution per row. It is what a batch of many ticks
    needs, and unlike ``COPY`` it works under row-level security, which checks each row
    against the agent's policy all the same. SQLite takes an executemany."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        conn.execute(insert_new(conn.dialect, model), rows)
        return
    names = tuple(rows[0])
    statement = _unnest_insert(model.__table__, names)
    conn.execute(statement, {n: [r[n] for r in rows] for n in names})


@functools.cache
def _unnest_insert(table: Table, names: tuple[str, ...]) -> TextClause:
    """The statement for one table and column set, built once: it is the hot path of
    every agent's write."""
    casts = [
        f"CAST(:{n} AS {_PG_ARRAY.get(str(table.c[n].type).split('(')[0], 'text[]')})"
        for n in names
    ]
    return text(
        f"INSERT INTO {table.name} ({', '.join(names)}) "
        f"SELECT * FROM unnest({', '.join(casts)}) ON CONFLICT DO NOTHING"
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """Per-connection settings. The journal mode is not among them: setting it writes the
    file's header, and a command pointed at a file that is not (yet) a wattkeeper store
    must leave it as it was. WAL is set once, when the migrations create the schema
    (``upgrade``), and SQLite keeps it in the file for every later connection."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str, *, create_dirs: bool = True, must_exist: bool = False) -> Engine:
    """An engine for ``url``; refuses a malformed URL or an unknown driver by name.

    ``must_exist`` is for every command but the two that may create a store (``run`` on
    SQLite and ``db upgrade``): they must not leave an empty SQLite file (and its
    directory) behind when pointed at the wrong path.
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
                f"no database at {db}: create it with `wattkeeper db upgrade --db "
                f"{describe_url(url)}`"
            )
        if db and db != ":memory:" and create_dirs and not must_exist:
            _private_file(Path(db).expanduser())
        if db and db != ":memory:":
            _warn_if_readable(Path(db).expanduser())
        engine = _create(parsed, connect_args={"timeout": 10, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return _create(
            parsed,
            pool_pre_ping=True,
            # Keepalives and a TCP user timeout: a server host that dies or a failover
            # that leaves a half-open socket ends the call in about 30 s instead of never.
            connect_args={
                "connect_timeout": 5,
                "options": "-c statement_timeout=30000",
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                "tcp_user_timeout": 30000,
            },
        )
    raise StoreError(
        f"unsupported database {backend!r} in {describe_url(url)}: use sqlite:///PATH or "
        "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
    )


def _private_file(path: Path) -> None:
    """Make the store's directory (0700) and file (0600) before SQLite does, so that
    budgets, the audit log and the node claims are never readable by every local user;
    SQLite gives its -wal and -shm files the database file's mode."""
    parent = path.parent
    try:
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create the directory {parent} for {path}: {exc.strerror or exc}"
        ) from None
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass  # a store that exists is used as it is, whoever made it
    except OSError:
        pass  # SQLite will say why it cannot open it, in its own words


_warned: set[Path] = set()


def _warn_if_readable(path: Path) -> None:
    """A store file every user can read says so, once per process; its mode is the
    owner's choice, so it is named rather than changed."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o004 and path not in _warned:
        _warned.add(path)
        log.warning(
            "the store %s is readable by every local user (mode %o): chmod 600 %s",
            path,
            mode & 0o777,
            path,
        )


def _create(url: URL, **kwargs: Any) -> Engine:
    """``create_engine``, with a driver that is not installed or not known named in one
    line (``postgresql+pg8000`` without pg8000, a typo in the driver)."""
    try:
        return create_engine(url, **kwargs)
    except (ImportError, NoSuchModuleError, ArgumentError) as exc:
        raise StoreError(
            f"cannot use the database driver {url.drivername!r} ({type(exc).__name__}: "
            f"{scrub(str(exc))}): wattkeeper ships sqlite and postgresql+psycopg"
        ) from None


_USERINFO = re.compile(r"(?P<user>[^\s:/@?#]*):(?P<secret>[^\s@/]*)@")
_SECRET_PARAM = re.compile(r"(?i)(?P<key>password|passwd|pass|pwd)=(?P<secret>[^\s&;]*)")


def scrub(text: str) -> str:
    """``text`` with anything in the places a password goes masked: the ``user:secret@``
    of a URL and ``password=`` parameters. By position, not by the password's value, so
    a short password does not mask its letters all over the message."""
    text = _USERINFO.sub(lambda m: f"{m['user']}:***@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}=***", text)


def describe_url(url: str) -> str:
    """The URL without its password (in the user part or a query parameter), for
    messages and logs; a URL too malformed to parse is scrubbed the same way."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return scrub(url)
    query = {
        k: ("***" if _SECRET_PARAM.fullmatch(f"{k}=x") else v) for k, v in parsed.query.items()
    }
    return parsed.set(query=query).render_as_string(hide_password=True)


def error_line(exc: BaseException, _url: str | Engine | None = None) -> str:
    """One line for a database error, with anything shaped like a password masked.

    Drivers put the server's words in the message and never the password, but a DSN
    echoed back by a driver could carry one: scrub it here, where every store error is
    made, rather than trust each message.
    """
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return scrub(text.splitlines()[0] if text else type(orig).__name__)


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
        error = StoreError(
            f"cannot reach the database {engine_name(engine)}: {error_line(exc, engine)}"
        )
        error.outage = is_outage(exc)
        raise error from None


def engine_name(engine: Engine) -> str:
    return describe_url(engine.url.render_as_string(hide_password=False))


def _script_knows(revision: str) -> bool:
    """Whether the migrations shipped with this wattkeeper include ``revision``."""
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except AlembicError:
        return False


def check_revision(revision: str) -> None:
    """Refuse a revision the migrations do not know, naming the ones they do."""
    if revision in ("head", "base"):
        return
    if not _script_knows(revision):
        script = ScriptDirectory.from_config(alembic_config())
        known = ", ".join(["base", *(r.revision for r in script.walk_revisions()), "head"])
        raise StoreError(f"unknown schema revision {revision!r}: known are {known}")


def upgrade(engine: Engine, revision: str = "head") -> None:
    check_revision(revision)
    current = current_revision(engine)  # reachability check with a clean message
    _known(engine, current)
    _migrate(engine, command.upgrade, revision)
    if engine.dialect.name == "sqlite":
        # Agent, controller and CLI read and write at once: WAL lets readers go on while
        # one writes. Stored in the file, so set once here, where the store is made.
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")


def _known(engine: Engine, current: str | None) -> None:
    """Refuse to migrate from a revision these migrations do not know (a newer
    wattkeeper wrote the schema): Alembic could only fail half-way."""
    if current is not None and not _script_knows(current):
        raise SchemaOutdatedError(
            f"the database {engine_name(engine)} is at schema {current}, which this "
            f"wattkeeper does not know (its newest is {head_revision()}): a newer "
            "wattkeeper wrote it; run that version, or restore a backup"
        )


def downgrade(engine: Engine, revision: str = "base") -> None:
    check_revision(revision)
    _known(engine, current_revision(engine))
    _migrate(engine, command.downgrade, revision)


def _migrate(engine: Engine, step: Any, revision: str) -> None:
    """Run an Alembic command; a database error on the way is one StoreError line."""
    try:
        step(alembic_config(engine), revision)
    except SQLAlchemyError as exc:
        raise StoreError(
            f"migrating {engine_name(engine)} failed: {error_line(exc, engine)}"
        ) from None


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
    path = engine.url.database
    with _exclusive(Path(path).expanduser().parent if path and path != ":memory:" else None):
        # Under the lock: a second `run` starting at the same moment waits here, then
        # finds the schema the first one made, rather than half of it.
        try:
            with engine.connect() as conn:
                tables = set(inspect(conn).get_table_names())
                current = MigrationContext.configure(conn).get_current_revision()
        except SQLAlchemyError as exc:
            raise StoreError(
                f"cannot reach the database {engine_name(engine)}: {error_line(exc, engine)}"
            ) from None
        # After `db downgrade base` only Alembic's bookkeeping table is left: empty too.
        if current is not None or tables - {"alembic_version"}:
            return False
        upgrade(engine)
        return True


@contextmanager
def _exclusive(directory: Path | None) -> Iterator[None]:
    """An advisory lock on the store's directory (``flock``), held while a store is
    created, so concurrent first starts do not race each other's migrations. A lock on
    the directory leaves no file behind; SQLite's own locks (``fcntl``) are unaffected."""
    if directory is None or not directory.is_dir():
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
