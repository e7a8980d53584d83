"""Alembic environment: runs on the engine wattkeeper hands over, never on a config file URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from wattkeeper.store.db import make_engine
from wattkeeper.store.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds a table to change it (copy, drop, rename); with foreign keys
        # on, dropping ``nodes`` would cascade to every GPU, sample and target. SQLite
        # only honours this outside a transaction, so before the migration begins.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        include_name=lambda name, type_, _parent: (
            type_ != "table" or name in target_metadata.tables
        ),
    )
    with context.begin_transaction():
        context.run_migrations()
    if sqlite:
        connection.commit()
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")


engine = config.attributes.get("engine")
if engine is None:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("run migrations through `wattkeeper db upgrade`")
    engine = make_engine(url)
with engine.connect() as conn:
    _run(conn)
    conn.commit()
