"""Store faults the agent must ride out, on a real PostgreSQL that the tests stop for real:
hung (SIGSTOP: connections open, nothing answers), down at the agent's first tick, down
while caps hold (they last their lease, then the safe cap), down or hung at a clean stop
(the GPUs are restored all the same), and back again (the samples and audit entries
taken meanwhile reach it, none lost).

The agents run on a simulated clock (leases, the spool and the timeouts are judged on
it) with their store calls on a thread of their own, as on the wall clock. No timing is
asserted: a tick that blocked on the hung store would never let the loop finish, which
the join below turns into a failure after a generous bound."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from conftest import started_pg
from pg import PgServer
from sqlalchemy import func, select

from wattkeeper.clock import SimClock
from wattkeeper.config import load_config
from wattkeeper.exporter import WattkeeperCollector
from wattkeeper.runtime import Runtime, build_simulated, make_agent, open_store
from wattkeeper.simulator.facility import FacilitySpec
from wattkeeper.store.db import make_engine, upgrade
from wattkeeper.store.models import GpuSampleRow

pytestmark = pytest.mark.postgres

BOUND_S = 120.0
"""Real seconds a loop of ticks may take before it counts as blocked (it takes about 1)."""


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    """A server of this module's own, since the tests stop it."""
    yield from started_pg()


def _threaded(rt: Runtime, timeout_s: float = 3.0) -> None:
    """Store calls on a thread of their own, as on the wall clock."""
    for agent in rt.agents:
        agent.store_timeout_s = timeout_s


def _step(rt: Runtime, t: float, controller: bool = False) -> None:
    rt.clock.set(t)
    rt.facility.advance_to(t)
    rt.tick_agents()
    if controller:
        rt.tick_controller()


def _run_bounded(fn) -> None:
    done = threading.Event()
    error: list[BaseException] = []

    def body() -> None:
        try:
            fn()
        except BaseException as exc:
            error.append(exc)
        finally:
            done.set()

    threading.Thread(target=body, daemon=True).start()
    if not done.wait(BOUND_S):
        pytest.fail("the agent loop blocked on the hung store")
    if error:
        raise error[0]


def test_a_hung_database_holds_up_neither_caps_nor_scrapes_and_loses_no_sample(pg):
    url = pg.create_database("hung")
    upgrade(make_engine(url))
    cfg = load_config(None, environ={"WATTKEEPER_CONTROLLER__LEASE_S": "15s"})
    rt = build_simulated(cfg, open_store(cfg, url), FacilitySpec(1, 4), SimClock(50_000.0))
    _threaded(rt)
    agent = rt.agents[0]
    rt.store.set_budget(1_000_000.0, "test", 50_000.0)
    t = 50_000.0
    for k in range(1, 11):
        t += 1
        _step(rt, t, controller=k % 5 == 0)
    leases = [x.lease_expires_at for x in rt.store.targets_for_node(agent.node).values()]
    assert len(leases) == 4 and agent.state.store_ok
    frozen_from = t + 1
    pg.freeze()
    try:

        def while_hung() -> None:
            nonlocal t
            while t < max(leases) + 2:
                t += 1
                _step(rt, t)
            # A scrape answers too, without the store's part.
            text = {m.name: m for m in WattkeeperCollector(rt).collect()}
            assert text["wattkeeper_store_up"].samples[0].value == 0.0

        _run_bounded(while_hung)
        assert not agent.state.store_ok
        fallback = 0.6 * 700.0
        assert list(rt.facility.limit_requested[:4]) == [pytest.approx(fallback)] * 4
        assert agent.state.spooled_ticks >= t - frozen_from
    finally:
        pg.thaw()
    frozen_to = t

    def after() -> None:
        nonlocal t
        # The hung round trip completes once the server resumes; the spool then empties.
        for _ in range(200):
            t += 1
            _step(rt, t, controller=int(t) % 5 == 0)
            if agent.state.store_ok and agent.state.spooled_ticks == 0:
                return
            threading.Event().wait(0.05)
        pytest.fail(f"spool never emptied: {agent.state.spooled_ticks} ticks left")

    _run_bounded(after)
    with rt.store.engine.connect() as conn:
        kept = conn.scalar(
            select(func.count())
            .select_from(GpuSampleRow)
            .where(GpuSampleRow.ts >= frozen_from, GpuSampleRow.ts <= frozen_to)
        )
    assert kept == 4 * (frozen_to - frozen_from + 1)
    assert agent.state.spool_dropped_ticks == 0
    # The backlog arrived after newer ticks; the node's last-seen time never went back.
    assert rt.store.node_claims()[agent.node][1] >= frozen_to
    rt.shutdown()


def test_an_agent_that_starts_while_the_database_is_down_caps_at_once_then_joins(pg):
    """No target was ever read: whatever the GPUs had is not a plan, so the safe cap
    applies from the first tick; once the database is back the node registers, its
    samples arrive, and the controller's targets take over."""
    url = pg.create_database("down_at_start")
    upgrade(make_engine(url))
    cfg = load_config(None, environ={})
    store = open_store(cfg, url)
    rt = build_simulated(cfg, store, FacilitySpec(1, 2), SimClock(60_000.0))
    # A second agent on the same facility node, started while the database is down.
    late = make_agent(cfg, store, "late-node", rt.agents[0].backend, None, [], wall_clock=True)
    late.store_timeout_s = 3.0
    rt.agents = [late]
    pg.halt()
    try:

        def down() -> None:
            for k in range(1, 4):
                _step(rt, 60_000.0 + k)

        _run_bounded(down)
        assert not late.state.store_ok and not late.gpu_ids
        assert list(rt.facility.limit_requested[:2]) == [pytest.approx(0.6 * 700.0)] * 2
        assert late.state.spooled_ticks == 3
    finally:
        pg.start_again()
    rt.store.engine.dispose()
    rt.store.set_budget(1_000_000.0, "test", 60_004.0)

    def back() -> None:
        t = 60_004.0
        for _ in range(200):
            t += 1
            _step(rt, t, controller=True)
            if late.gpu_ids and late.state.spooled_ticks == 0 and late._targets:
                return
            threading.Event().wait(0.05)
        pytest.fail("the agent never joined")

    _run_bounded(back)
    assert "late-node" in rt.store.node_backends()
    # The controller's target (1 MW budget: the maximum) replaced the safe cap.
    _step(rt, 60_300.0, controller=True)
    _step(rt, 60_301.0)
    assert list(rt.facility.limit_requested[:2]) == [pytest.approx(700.0)] * 2
    rt.shutdown()


def _capped(pg, name: str, budget_w: float, start: float) -> tuple[Runtime, float]:
    """One node of four 700 W GPUs on a database of its own, run as ``run --fast`` drives
    it (store calls inline, so which targets the agent last read is certain) until the
    controller's caps hold; the last targets written were read by the agent."""
    url = pg.create_database(name)
    upgrade(make_engine(url))
    cfg = load_config(None, environ={})
    rt = build_simulated(cfg, open_store(cfg, url), FacilitySpec(1, 4), SimClock(start))
    rt.store.set_budget(budget_w, "test", start)
    t = start
    for k in range(1, 13):  # the controller plans at k = 5 and 10; the agent reads at 11
        t += 1
        _step(rt, t, controller=k % 5 == 0)
    assert rt.agents[0].state.store_ok
    return rt, t


def _stop_in_the_fault(rt: Runtime, t: float) -> float:
    """Tick until the agent sees the store's fault (a hung round trip counts after 3 s),
    then stop it cleanly; returns the clock."""

    def stop() -> None:
        nonlocal t
        for _ in range(5):
            t += 1
            _step(rt, t)
        assert not rt.agents[0].state.store_ok
        rt.shutdown()

    _run_bounded(stop)
    return t


def test_a_stopped_database_keeps_each_cap_for_its_lease_then_the_safe_cap_on_every_gpu(pg):
    """The database stops while the controller's caps hold (so nothing renews them): the
    GPUs keep their caps for the rest of the lease, then all of them go to the safe cap
    (0.6 x the 700 W default) at the same tick and stay there. The changes are audited
    while the store is away; once it is back those entries land, dated when the changes
    were made, and the agent says the store is up again."""
    rt, t = _capped(pg, "outage_lease", 4500.0, 80_000.0)
    agent = rt.agents[0]
    caps = list(rt.facility.limit_requested[:4])
    fallback = 0.6 * 700.0
    # Neither the GPUs' own limit nor the safe cap: a change either way shows.
    assert all(fallback + 50 < cap < 650 for cap in caps), caps
    targets = rt.store.targets_for_node(agent.node)
    expires = max(x.lease_expires_at for x in targets.values())
    assert expires > t
    _threaded(rt)
    seen: dict[float, list[float]] = {}
    pg.halt()
    try:

        def outage() -> None:
            nonlocal t
            while t < expires + 10:
                t += 1
                _step(rt, t)
                seen[t] = list(rt.facility.limit_requested[:4])

        _run_bounded(outage)
        assert not agent.state.store_ok
    finally:
        pg.start_again()
    changed = [ts for ts, limits in seen.items() if limits != caps]
    assert changed, "the caps outlived their lease"
    fell_at = changed[0]
    # Kept while the lease the controller wrote is valid; the agent read it a tick after
    # it was written, and may hold it that much longer, no more.
    assert expires < fell_at <= expires + 2 * rt.cfg.agent.interval_s
    assert seen[fell_at] == [pytest.approx(fallback)] * 4  # every GPU, the same tick
    assert all(seen[ts] == seen[fell_at] for ts in changed)  # and it stays

    def back() -> list:
        nonlocal t
        for _ in range(200):
            t += 1
            _step(rt, t)
            entries = [
                e
                for e in rt.store.audit_log(200, action="power_limit.set")
                if "lease expired" in e.detail.get("reason", "")
            ]
            if agent.state.store_ok and entries:
                return entries
            threading.Event().wait(0.05)
        pytest.fail(f"the outage's audit entries never landed (store_ok={agent.state.store_ok})")

    landed: list = []
    _run_bounded(lambda: landed.extend(back()))
    assert agent.state.store_ok
    assert sorted(e.subject for e in landed) == sorted(targets)  # each GPU once
    for e in landed:
        assert e.ts == fell_at and e.actor == f"agent:{agent.node}"
        assert e.detail["power_limit_w"] == pytest.approx(fallback)
    rt.shutdown()


@pytest.mark.parametrize("fault", ["stopped", "hung"])
def test_a_clean_stop_restores_every_gpu_while_the_database_is_stopped_or_hung(pg, fault):
    """The database is stopped (or hung with SIGSTOP) while the GPUs are capped, and the
    agent is stopped: every GPU gets back the limit it had before wattkeeper (700 W)
    all the same; only the record of it is lost."""
    rt, t = _capped(pg, f"stop_{fault}", 3000.0, 100_000.0)
    assert all(lim < 700.0 for lim in rt.facility.limit_requested[:4])
    _threaded(rt)
    fail, mend = (pg.halt, pg.start_again) if fault == "stopped" else (pg.freeze, pg.thaw)
    fail()
    try:
        t = _stop_in_the_fault(rt, t)
        assert list(rt.facility.limit_requested[:4]) == [700.0] * 4
    finally:
        mend()


@pytest.mark.parametrize("restart_in_outage", [False, True])
def test_a_stop_the_store_did_not_hear_of_leaves_no_stale_original_behind(
    pg, tmp_path, restart_in_outage
):
    """The GPUs are restored at a stop while the database is down, so the store keeps
    their original limits. An administrator then sets another limit by hand. The next
    run must not take the store's stale originals for the truth: its own clean stop puts
    back what the administrator set, not what the GPUs had before the first run. Also
    when a run in between started and stopped while the database was still down (it
    never registered, so it cannot tell which originals the store holds)."""
    from wattkeeper.agent import Agent
    from wattkeeper.collectors.sim_gpu import SimGpuBackend
    from wattkeeper.runtime import build_on_facility

    rt, t = _capped(pg, f"stale_originals_{int(restart_in_outage)}", 3000.0, 110_000.0)
    rt.agents[0].originals_path = tmp_path / "originals.json"
    agent = rt.agents[0]
    f = rt.facility
    _step(rt, t + 1, controller=True)  # a change after the file was named: it has them
    t += 1
    _threaded(rt)
    pg.halt()
    try:
        t = _stop_in_the_fault(rt, t)
        assert list(f.limit_requested[:4]) == [700.0] * 4
        f.limit_requested[:4] = 650.0  # nvidia-smi -pl 650, by hand, between the runs
        if restart_in_outage:
            between = Agent(
                agent.node,
                SimGpuBackend(f, 0, rt.clock.now),
                rt.store,
                originals_path=agent.originals_path,
                store_timeout_s=3.0,
            )

            def run_between() -> None:
                nonlocal t
                for _ in range(3):
                    t += 1
                    rt.clock.set(t)
                    f.advance_to(t)
                    between.tick(t)
                assert all(lim < 650.0 for lim in f.limit_requested[:4])  # the safe cap
                between.shutdown(t)

            _run_bounded(run_between)
            assert list(f.limit_requested[:4]) == [650.0] * 4
    finally:
        pg.start_again()
    import json

    cleared = json.loads(agent.originals_path.read_text())["cleared"]
    assert sorted(cleared) == sorted(agent.infos)
    # The stopped process is gone (a pid no process can have): its name is free.
    from sqlalchemy import update

    from wattkeeper.agent import agent_identity
    from wattkeeper.store.models import Node

    dead = agent_identity().split()
    dead[2] = str(2**22 + 1)
    with rt.store.engine.begin() as conn:
        conn.execute(update(Node).values(agent_id=" ".join(dead)))
    assert set(rt.store.original_power_limits(agent.node).values()) == {700.0}  # stale
    cfg = load_config(None, environ={})
    again = build_on_facility(
        cfg, open_store(cfg, rt.store.engine.url.render_as_string(hide_password=False)), f, rt.clock
    )
    # The node's agent as `wattkeeper agent` makes it: with its originals file.
    first = again.agents[0]
    again.agents[0] = Agent(
        first.node, first.backend, first.store, originals_path=agent.originals_path
    )
    for _ in range(12):
        t += 1
        _step(again, t, controller=True)
    assert all(lim < 650.0 for lim in f.limit_requested[:4])  # capped again
    assert (
        not agent.originals_path.exists()
        or not json.loads(agent.originals_path.read_text())["cleared"]
    )
    again.shutdown()
    assert list(f.limit_requested[:4]) == [650.0] * 4


def test_run_on_a_real_node_starts_on_the_safe_cap_while_postgres_is_down(
    pg, monkeypatch, tmp_path
):
    """`wattkeeper run` on a node (NVML, here the fake driver) whose database server is
    down: not a configuration error, so it starts, caps every GPU at the safe cap, and
    restores them when it stops. A bad URL still fails before touching anything."""
    from nvml_fake import install_fake_pynvml
    from typer.testing import CliRunner

    from wattkeeper.cli import app

    fake, nvml = install_fake_pynvml(monkeypatch, n_gpus=2)
    url = pg.create_database("run_down")
    upgrade(make_engine(url))
    pg.halt()
    cfg = tmp_path / "wattkeeper.toml"
    cfg.write_text('[agent]\nnode = "gpu-node-7"\n[agent.host]\nuse_rapl = false\n')
    try:
        r = CliRunner().invoke(
            app,
            ["run", "--db", url, "--config", str(cfg), "--duration", "3s", "--no-metrics"],
        )
    finally:
        pg.start_again()
    assert r.exit_code == 0, r.output
    assert "safe cap until it answers" in r.stderr
    set_mw = [c.args[1] for c in fake.nvmlDeviceSetPowerManagementLimit.call_args_list]
    assert set_mw[:2] == [420_000, 420_000], set_mw  # 0.6 x the 700 W default, both GPUs
    assert [g.limit_mw for g in nvml.gpus] == [700_000, 700_000]  # restored at the stop
    fake.nvmlDeviceSetPowerManagementLimit.reset_mock()
    # Mistakes are not outages: an unknown driver, or a database name the running
    # server does not have, stop it before any GPU is touched.
    for wrong in ("postgresql+nope://u@127.0.0.1:1/x", pg.url("no_such_database")):
        bad = CliRunner().invoke(app, ["run", "--db", wrong, "--duration", "3s"])
        assert bad.exit_code == 1 and "Traceback" not in bad.output, bad.output
        assert "safe cap" not in bad.output
    assert fake.nvmlDeviceSetPowerManagementLimit.call_args_list == []


def _spooling(pg, name: str, cfg, tmp_path, start: float) -> tuple[Runtime, object]:
    """One node of two GPUs on a database of its own, its spool file under ``tmp_path``,
    store calls on their own thread, after three ticks with the store up."""
    url = pg.create_database(name)
    upgrade(make_engine(url))
    rt = build_simulated(cfg, open_store(cfg, url), FacilitySpec(1, 2), SimClock(start))
    spool = tmp_path / "spool-sim-node-0.jsonl"
    rt.agents[0].spool_path = spool
    _threaded(rt, timeout_s=2.0)
    for k in range(1, 4):
        _step(rt, start + k)
    return rt, spool


def test_an_agent_restarted_during_an_outage_loses_none_of_its_spool(pg, tmp_path):
    """The database is stopped; the agent spools, now on disk too; its process dies
    (nothing shut down, the object dropped) and a new one starts on the same node and
    state directory while the database is still down; when it comes back, every tick
    taken during the outage, by either process, is in the store, and the spool file
    is gone."""
    from dataclasses import replace

    cfg = load_config(None, environ={})
    rt, spool = _spooling(pg, "respool", cfg, tmp_path, 70_000.0)
    t = 70_003.0
    assert not spool.exists()  # the store answers: nothing goes to disk
    down_from = t + 1
    pg.halt()
    try:

        def outage(agent_rt: Runtime, ticks: int) -> None:
            nonlocal t
            for _ in range(ticks):
                t += 1
                _step(agent_rt, t)
                threading.Event().wait(0.05)  # let a failing round trip come back

        _run_bounded(lambda: outage(rt, 8))
        assert not rt.agents[0].state.store_ok and spool.exists()
        # The process dies. A new one, as systemd would start it, on the same files.
        old = rt.agents[0]
        new = make_agent(cfg, rt.store, old.node, old.backend, old.host, old.endpoints)
        new.spool_path = spool
        new._load_spool()
        assert new.state.spooled_ticks >= 7  # what the dead process had taken
        reborn = replace(rt, agents=[new])
        _threaded(reborn, timeout_s=2.0)
        _run_bounded(lambda: outage(reborn, 4))
    finally:
        pg.start_again()
    down_to = t

    def after() -> None:
        nonlocal t
        for _ in range(200):
            t += 1
            _step(reborn, t)
            if new.state.store_ok and new.state.spooled_ticks == 0:
                return
            threading.Event().wait(0.05)
        pytest.fail(f"spool never emptied: {new.state.spooled_ticks} ticks left")

    _run_bounded(after)
    with rt.store.engine.connect() as conn:
        kept = conn.scalar(
            select(func.count(func.distinct(GpuSampleRow.ts))).where(
                GpuSampleRow.ts >= down_from, GpuSampleRow.ts <= down_to
            )
        )
        rows = conn.scalar(
            select(func.count())
            .select_from(GpuSampleRow)
            .where(GpuSampleRow.ts >= down_from, GpuSampleRow.ts <= down_to)
        )
    assert kept == down_to - down_from + 1  # every second of the outage
    assert rows == 2 * kept  # two GPUs, each tick once
    assert not spool.exists()
    reborn.shutdown()


def test_a_stop_while_a_round_trip_hangs_keeps_its_ticks_on_disk(pg, tmp_path):
    """SIGSTOP on the database while a write is in flight, then a clean stop: the
    ticks of the hung round trip are neither in the store nor in the spool in memory;
    they must be in the spool file, with every later tick, for the next start."""
    import json

    rt, spool = _spooling(pg, "hungstop", load_config(None, environ={}), tmp_path, 90_000.0)
    t = 90_003.0
    first_hung = t + 1
    pg.freeze()
    try:

        def hung() -> None:
            nonlocal t
            for _ in range(5):
                t += 1
                _step(rt, t)
            rt.shutdown()  # restores the GPUs; the store does not answer

        _run_bounded(hung)
        kept = sorted(json.loads(line)["ts"] for line in spool.read_text().splitlines())
        assert kept == [first_hung + k for k in range(5)]
    finally:
        pg.thaw()
