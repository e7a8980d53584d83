from __future__ import annotations

import itertools
import os
import signal
import subprocess
from collections.abc import Iterator

import pytest
from pg import PgServer, find_bindir

_counter = itertools.count()


def _missing(what: str) -> None:
    """Skip locally when a real dependency is absent; in CI that is a failure, not a skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI (.ci/run installs it)")
    pytest.skip(f"{what} not installed (.ci/run installs it)")


def started_pg() -> Iterator[PgServer]:
    """A fresh PostgreSQL server for the time of a fixture, stopped and removed after."""
    bindir = find_bindir()
    if bindir is None:
        _missing("PostgreSQL server (Debian package postgresql)")
    server = PgServer(bindir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    yield from started_pg()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    return pg_server.create_database(f"wk_{os.getpid()}_{next(_counter)}")


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'wattkeeper.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request) -> str:
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch) -> None:
    """No test may touch the user's real state directory or config."""
    monkeypatch.setenv("WATTKEEPER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("WATTKEEPER_CONFIG", raising=False)
    for name in list(os.environ):
        if name.startswith("WATTKEEPER_") and "__" in name:
            monkeypatch.delenv(name)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; whatever still runs at the end is woken (it may have
    been stopped with SIGSTOP), asked to stop, and killed if it does not."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            p.terminate()
    for p in started:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
