"""Every store method fails the same way when the database is really gone.

The outages are real: a PostgreSQL server that is stopped, and an SQLite file in a
directory that does not exist (the tests run as root, so file modes would stop nothing).
No method is patched to raise.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from conftest import started_pg
from pg import PgServer

from wattkeeper.clock import SimClock
from wattkeeper.collectors.gpu import GpuInfo, GpuSample, PowerLimitConstraints
from wattkeeper.config import load_config
from wattkeeper.policies.route import RouteTarget
from wattkeeper.policies.schedule import Schedule
from wattkeeper.runtime import build_simulated, open_store
from wattkeeper.simulator.facility import FacilitySpec
from wattkeeper.store.db import StoreError, make_engine, upgrade
from wattkeeper.store.repository import NodeTick, Store, TargetSpec, TokenRow

NOW = 1_800_000_000.0
INFO = GpuInfo(
    uuid="GPU-err-0",
    index=0,
    name="NVIDIA H100 80GB HBM3",
    pci_bus_id="00000000:18:00.0",
    memory_total_bytes=80 * 2**30,
    power_limits=PowerLimitConstraints(200.0, 700.0, 700.0),
    max_sm_clock_mhz=1980,
)
SAMPLE = GpuSample(
    uuid="GPU-err-0",
    timestamp=NOW,
    power_w=500.0,
    power_instant_w=510.0,
    energy_j=1e6,
    sm_clock_mhz=1700.0,
    mem_clock_mhz=2619.0,
    utilization_gpu_ratio=0.9,
    temperature_c=60.0,
    power_limit_w=700.0,
    power_limit_requested_w=700.0,
    throttle_reasons=(),
)

CALLS = {
    "register_node": lambda s: s.register_node("n0", "sim", [INFO], NOW),
    "node_id": lambda s: s.node_id("n0"),
    "set_drained": lambda s: s.set_drained("n0", True, "test", NOW),
    "drain_now": lambda s: s.drain_now("n0", "test", NOW),
    "node_drained": lambda s: s.node_drained("n0"),
    "set_standby": lambda s: s.set_standby("n0", True),
    "original_power_limits": lambda s: s.original_power_limits("n0"),
    "clear_original_power_limits": lambda s: s.clear_original_power_limits([1]),
    "node_backends": lambda s: s.node_backends(),
    "remove_nodes": lambda s: s.remove_nodes(["n0"], "test", NOW),
    "set_original_power_limit": lambda s: s.set_original_power_limit(1, 700.0),
    "write_samples": lambda s: s.write_samples(
        "n0",
        {"GPU-err-0": 1},
        [SAMPLE],
        NOW,
        host=(0.2, 900.0, "model"),
        tokens=[TokenRow(endpoint="http://n0:8000/metrics", model="m", up=True)],
    ),
    "write_ticks": lambda s: s.write_ticks(
        "n0", {"GPU-err-0": 1}, [NodeTick(NOW, (SAMPLE,), (0.2, 900.0, "model"))]
    ),
    "retain": lambda s: s.retain(NOW, 3600.0, 7200.0),
    "get_budget": lambda s: s.get_budget(),
    "set_budget": lambda s: s.set_budget(5000.0, "test", NOW),
    "add_schedule": lambda s: s.add_schedule(
        Schedule(0, "facility", 4000.0, 3600.0, cron="0 17 * * 1-5"), "test", NOW
    ),
    "schedules": lambda s: s.schedules(),
    "budgets": lambda s: s.budgets(),
    "remove_schedule": lambda s: s.remove_schedule(1, "test", NOW),
    "write_targets": lambda s: s.write_targets([TargetSpec("GPU-err-0", 400.0)], NOW, 30.0),
    "write_routes": lambda s: s.write_routes([RouteTarget("n0", 128, 16, "test")], NOW),
    "routes": lambda s: s.routes(),
    "node_claims": lambda s: s.node_claims(),
    "lead": lambda s: s.lead("me m 1 t", "me", "m", 1, NOW, 10.0),
    "resign": lambda s: s.resign("me m 1 t", NOW),
    "leader": lambda s: s.leader(),
    "release_node": lambda s: s.release_node("n0", "host m 1 t"),
    "targets_for_node": lambda s: s.targets_for_node("n0"),
    "orders_for_node": lambda s: s.orders_for_node("n0"),
    "remember": lambda s: s.remember("learned", {"coupling": 0.2}, NOW),
    "recall": lambda s: s.recall("learned"),
    "audit": lambda s: s.audit("test", "x.y", "n0", {}, NOW),
    "audit_log": lambda s: s.audit_log(10),
    "newest_sample_ts": lambda s: s.newest_sample_ts(),
    "snapshot": lambda s: s.snapshot(NOW),
}
NO_IO = {"session"}
"""Public methods that open nothing: ``session()`` only builds a Session object."""


def test_every_public_method_is_exercised():
    public = {
        name
        for name, member in vars(Store).items()
        if not name.startswith("_") and inspect.isfunction(member)
    }
    assert public - NO_IO == set(CALLS), "add the new store method to CALLS"


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PgServer]:
    """A server of this module's own, since the test stops it."""
    yield from started_pg()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def dead_store(request, tmp_path) -> Iterator[tuple[Store, str]]:
    """A store that worked, then lost its database for real; yields it and its URL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'gone' / 'wattkeeper.db'}"
        store = Store(make_engine(url, create_dirs=False))
        yield store, url
        return
    server = request.getfixturevalue("own_pg")
    # A fresh name per test: id() of a finished request object is reused, and the
    # server keeps every database made on it.
    url = server.create_database(f"errors_{uuid.uuid4().hex[:16]}")
    engine = make_engine(url)
    upgrade(engine)
    store = Store(engine)
    CALLS["register_node"](store)
    server.halt()
    try:
        yield store, url
    finally:
        engine.dispose()
        server.start_again()


@pytest.mark.parametrize("method", sorted(CALLS))
def test_each_method_raises_store_error_on_a_real_outage(dead_store, method):
    store, _ = dead_store
    with pytest.raises(StoreError) as info:
        CALLS[method](store)
    message = str(info.value)
    assert "\n" not in message
    assert "database" in message


def test_agent_falls_back_on_every_gpu_in_one_tick_while_postgres_is_stopped(own_pg):
    """The agent catches StoreError around the store calls of a tick: with the
    database stopped, an expired lease caps every GPU at once, none left behind."""
    url = own_pg.create_database("agent_outage")
    upgrade(make_engine(url))
    cfg = load_config(None, environ={})
    store = open_store(cfg, url)
    rt = build_simulated(cfg, store, FacilitySpec(1, 8), SimClock(10_000.0))
    try:
        store.set_budget(1_000_000.0, "test", rt.clock.now())
        for t in range(1, 12):
            rt.clock.set(10_000.0 + t)
            rt.facility.advance_to(rt.clock.now())
            rt.tick_agents()
            if t % 5 == 0:
                rt.tick_controller()
        leases = [t.lease_expires_at for t in store.targets_for_node("sim-node-0").values()]
        assert len(leases) == 8
        own_pg.halt()
        try:
            # A lease runs from when the agent read it (its monotonic clock), at most
            # one agent interval after the controller wrote it.
            rt.clock.set(max(leases) + cfg.agent.interval_s + 1)
            rt.facility.advance_to(rt.clock.now())
            rt.tick_agents()
            agent = rt.agents[0]
            assert not agent.state.store_ok
            limits = [s.power_limit_requested_w for s in agent.state.samples.values()]
            requested = rt.facility.limit_requested[:8]
            assert list(requested) == [pytest.approx(0.6 * 700)] * 8, limits
        finally:
            own_pg.start_again()
    finally:
        rt.store.engine.dispose()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wattkeeper", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://u:secret@127.0.0.1:1/x",
        "postgres://u:secret@127.0.0.1:1/x",
        "mysql://u:secret@127.0.0.1:1/x",
        "postgresql+psycopg://u:secret@127.0.0.1:notaport/x",
    ],
)
@pytest.mark.parametrize("command", [["audit"], ["status"], ["budget", "show"]])
def test_unreachable_or_bad_database_is_one_line_without_the_password(url, command):
    r = _cli(*command, "--db", url)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "secret" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@127.0.0.1:1/x?password=secret",
        "u:secret@127.0.0.1/x",
        "postgresql:/u:secret@127.0.0.1/x",
        "postgresql//u:secret@h/x",
        "sqlite://u:secret@/nonexistent-dir/none.db",
        "postgresql+pg8000://u:secret@127.0.0.1:1/x",
        "postgresql+nope://u:secret@127.0.0.1:1/x",
    ],
)
def test_malformed_urls_and_unknown_drivers_are_one_line_without_the_password(url):
    r = _cli("audit", "--db", url)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "secret" not in r.stderr + r.stdout
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("password", ["o", "1"])
def test_a_short_password_does_not_garble_the_message(password):
    r = _cli("audit", "--db", f"postgresql+psycopg://u:{password}@127.0.0.1:1/x")
    assert r.returncode == 1
    assert "127.0.0.1" in r.stderr and "***@127.0.0.1:1/x" in r.stderr, r.stderr
    assert "connection" in r.stderr.lower()


def test_a_file_where_the_store_directory_should_be_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    url = f"sqlite:///{tmp_path / 'afile' / 'x.db'}"
    for args in (["db", "upgrade"], ["run", "--simulate", "1x2", "--duration", "5s", "--fast"]):
        r = _cli(*args, "--db", url)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "cannot create the directory" in r.stderr


@pytest.mark.parametrize("content", [None, b"\xff\xfe[agent]\n"])
def test_a_config_that_is_a_directory_or_not_utf8_is_a_clear_error(tmp_path, content):
    path = tmp_path / "cfg"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    r = _cli("status", "--config", str(path))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert ("is a directory" if content is None else "not UTF-8") in r.stderr
