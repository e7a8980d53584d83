"""Real Alembic migrations on an empty SQLite and an empty PostgreSQL, up and down."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from wattkeeper.store.db import (
    SchemaOutdatedError,
    check_schema,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    upgrade,
)
from wattkeeper.store.models import Base

TABLES = {
    "nodes",
    "gpus",
    "gpu_samples",
    "host_samples",
    "token_samples",
    "budgets",
    "targets",
    "audit_log",
}


def test_up_down_up(db_url):
    engine = make_engine(db_url)
    assert current_revision(engine) is None
    with pytest.raises(SchemaOutdatedError, match="wattkeeper db upgrade"):
        check_schema(engine)
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert TABLES <= set(inspect(engine).get_table_names())
    check_schema(engine)
    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert not TABLES & set(inspect(engine).get_table_names())
    upgrade(engine)
    assert TABLES <= set(inspect(engine).get_table_names())


def test_migrations_match_the_models(db_url):
    """A model change without a migration would make this fail."""
    engine = make_engine(db_url)
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_migrate_on_start_brings_an_empty_database_to_head(sqlite_url):
    engine = make_engine(sqlite_url)
    check_schema(engine, migrate=True)
    assert current_revision(engine) == head_revision()


def test_sqlite_pragmas(sqlite_url):
    """WAL is set where the schema is made and stays in the file; merely connecting
    changes no file's journal mode."""
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "delete"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    upgrade(engine)
    engine.dispose()
    with make_engine(sqlite_url).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_stepping_down_and_up_keeps_the_fleet(db_url):
    """Each step down and back up keeps the nodes, GPUs and their samples: on SQLite a
    column drop rebuilds the table, which with foreign keys on used to cascade."""
    from wattkeeper.collectors.gpu import GpuInfo, PowerLimitConstraints
    from wattkeeper.store.repository import Store

    engine = make_engine(db_url)
    upgrade(engine)
    store = Store(engine)
    info = GpuInfo("GPU-keep", 0, "H100", "0:0", 1, PowerLimitConstraints(200.0, 700.0, 700.0), 1)
    ids = store.register_node("n1", "sim", [info], 1.0)
    store.set_drained("n1", True, "cli:root", 2.0)

    def counts() -> tuple[int, int]:
        with engine.connect() as c:
            return (
                c.exec_driver_sql("SELECT count(*) FROM nodes").scalar_one(),
                c.exec_driver_sql("SELECT count(*) FROM gpus").scalar_one(),
            )

    assert ids and counts() == (1, 1)
    for rev in ("0002", "0001"):
        downgrade(engine, rev)
        assert counts() == (1, 1), rev
    upgrade(engine)
    assert counts() == (1, 1)
    if engine.dialect.name == "sqlite":
        with engine.connect() as c:  # and foreign keys are on again afterwards
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1


def test_samples_stored_twice_before_they_were_unique_are_kept_once(db_url):
    """Duplicates a replay left before 0010 are removed by it (the first row written
    stays), so its unique indexes can be built on a store that has them. Token rows
    cannot be told from a second engine's before they had a series: all are kept."""
    engine = make_engine(db_url)
    upgrade(engine, "0009")
    with engine.begin() as c:  # in SQL: today's models have columns 0009 lacks
        c.exec_driver_sql(
            "INSERT INTO nodes (name, registered_at, last_seen_at, drained, standby, backend)"
            " VALUES ('n1', 1, 1, false, false, 'sim')"
        )
        node = c.exec_driver_sql("SELECT id FROM nodes").scalar_one()
        for i in (1, 2):
            c.exec_driver_sql(
                'INSERT INTO gpus (uuid, node_id, "index", name, pci_bus_id, memory_total_bytes,'
                " power_min_w, power_max_w, power_default_w)"
                f" VALUES ('GPU-{i}', {node}, {i}, 'H100', '0:{i}', 1, 200, 700, 700)"
            )
        g1, g2 = (
            c.exec_driver_sql(f"SELECT id FROM gpus WHERE uuid = 'GPU-{i}'").scalar_one()
            for i in (1, 2)
        )
    rows = [(g1, 10.0, 100.0), (g1, 10.0, 999.0), (g1, 11.0, 101.0), (g2, 10.0, 200.0)]
    with engine.begin() as c:
        for gpu, ts, watts in rows:
            c.exec_driver_sql(
                "INSERT INTO gpu_samples (gpu_id, ts, power_w, throttle_reasons)"
                f" VALUES ({gpu}, {ts}, {watts}, '')"
            )
        for _ in range(2):
            c.exec_driver_sql(
                "INSERT INTO host_samples (node_id, ts, power_source)"
                f" VALUES ({node}, 10.0, 'model')"
            )
            c.exec_driver_sql(
                "INSERT INTO token_samples (node_id, ts, endpoint, model, up)"
                f" VALUES ({node}, 10.0, 'http://a/metrics', 'm', true)"
            )
    upgrade(engine)
    with engine.connect() as c:
        kept = c.exec_driver_sql(
            "SELECT gpu_id, ts, power_w FROM gpu_samples ORDER BY gpu_id, ts"
        ).all()
        assert [tuple(r) for r in kept] == [(g1, 10.0, 100.0), (g1, 11.0, 101.0), (g2, 10.0, 200.0)]
        assert c.exec_driver_sql("SELECT count(*) FROM host_samples").scalar_one() == 1
        series = c.exec_driver_sql("SELECT id, series FROM token_samples ORDER BY id").all()
        assert [s for _, s in series] == ["", f"id:{series[1][0]}"]
    downgrade(engine, "0009")  # and back: the plain indexes again
    assert current_revision(engine) == "0009"
