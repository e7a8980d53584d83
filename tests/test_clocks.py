"""Clock locks that follow the binding caps (policies/clocks.py), and the agent that
applies them to the GPUs."""

from __future__ import annotations

import pytest

from wattkeeper.policies.clocks import ClockInput, ClockLocks


def gpu(
    target: float = 400.0,
    clock: float | None = 1400.0,
    capped: bool = True,
    limit: float | None = None,
    fresh: bool = True,
    ceiling: bool = True,
    uuid: str = "GPU-0",
    binds: bool = True,
    slowdown: bool = False,
    slack: bool = True,
    pressed: bool = False,
) -> ClockInput:
    in_force = target if limit is None else limit
    return ClockInput(
        uuid,
        200.0,
        700.0,
        target,
        in_force,
        clock,
        capped,
        fresh,
        ceiling,
        ceiling and binds,
        slowdown,
        slack,
        pressed,
    )


def test_a_binding_cap_locks_the_clock_it_holds_and_the_lock_only_follows_it_down():
    locks = ClockLocks()
    # Two periods in a row, at the higher of the two clocks: one reading is not enough.
    assert locks.update([gpu(clock=1405.2)]) == {}
    assert "locked there" in locks.update([gpu(clock=1412.6)])["GPU-0"]
    assert locks.current() == {"GPU-0": 1412}
    # A lull: the cap no longer binds and the clock would boost; the lock holds.
    assert locks.update([gpu(clock=1412.0, capped=False)]) == {}
    assert locks.current() == {"GPU-0": 1412}
    # Within 2% of the lock: the cap holds those few megahertz anyway.
    assert locks.update([gpu(clock=1400.0)]) == {} and locks.update([gpu(clock=1400.0)]) == {}
    # One reading at the bottom of a burst does not move it; two in a row do.
    locks.update([gpu(clock=1250.0)])
    locks.update([gpu(clock=1400.0)])
    assert locks.current() == {"GPU-0": 1412}
    locks.update([gpu(clock=1250.0)])
    locks.update([gpu(clock=1300.0)])
    assert locks.current() == {"GPU-0": 1300}


def lock(locks: ClockLocks, **reading) -> None:
    locks.update([gpu(**reading)])
    locks.update([gpu(**reading)])


def test_after_a_burst_the_lock_is_the_clock_its_cap_held_at_the_peak_not_the_lulls():
    """A burst with the latency ceiling pressed (no lock may be set): its cap binds at
    1300 MHz. As it ends, the same cap binds at the lull's higher clock, or not at all:
    the lock goes to the peak's 1300 MHz, where the cap would hold it at the next peak,
    and is lowered to it from a lock set higher; a peak under a lower cap, or one
    forgotten, does not count."""
    locks = ClockLocks()
    locks.update([gpu(clock=1300.0, pressed=True, slack=False)])
    locks.update([gpu(clock=1310.0, pressed=True, slack=False)])  # peak: 1310 MHz
    assert locks.current() == {}
    assert "last peak" in locks.update([gpu(clock=1700.0, capped=False)])["GPU-0"]
    assert locks.current() == {"GPU-0": 1310}
    # A lock set high in a lull is lowered to the peak's clock.
    other = ClockLocks()
    other.update([gpu(clock=1700.0)])
    other.update([gpu(clock=1700.0)])
    assert other.current() == {"GPU-0": 1700}
    other.update([gpu(clock=1300.0, pressed=True, slack=False)])  # releases it
    other.update([gpu(clock=1300.0, pressed=True, slack=False)])
    other.update([gpu(clock=1650.0, capped=False)])
    assert other.current() == {"GPU-0": 1300}
    # A lock held through a peak that bound lower (latency in its band, no slack): the
    # next lull lowers it to the peak's clock; a later lock found with slack never
    # goes above it; and a new leader's clear() forgets it.
    held = ClockLocks()
    held.update([gpu(clock=1700.0)])
    held.update([gpu(clock=1700.0)])
    held.update([gpu(clock=1350.0, slack=False)])
    held.update([gpu(clock=1360.0, slack=False)])
    assert held.current() == {"GPU-0": 1700}
    held.update([gpu(clock=1650.0, capped=False)])
    assert held.current() == {"GPU-0": 1360}
    fresh = ClockLocks()
    fresh.update([gpu(clock=1300.0, pressed=True, slack=False)])
    fresh.update([gpu(clock=1300.0, pressed=True, slack=False)])
    fresh.update([gpu(clock=1500.0)])
    fresh.update([gpu(clock=1500.0)])
    assert fresh.current() == {"GPU-0": 1300}
    fresh.clear()
    fresh.update([gpu(clock=1700.0, capped=False)])
    assert fresh.current() == {}
    # Found under a lower cap than today's: it says nothing about this cap's peak.
    low = ClockLocks()
    low.update([gpu(target=350.0, clock=1200.0, pressed=True, slack=False)])
    low.update([gpu(target=350.0, clock=1200.0, pressed=True, slack=False)])
    low.update([gpu(target=450.0, clock=1700.0, capped=False)])
    assert low.current() == {}
    # Forgotten after peak_periods.
    old = ClockLocks()
    old.update([gpu(clock=1300.0, pressed=True, slack=False)])
    old.update([gpu(clock=1300.0, pressed=True, slack=False)])
    for _ in range(old.settings.peak_periods):
        old.update([gpu(clock=1700.0, capped=False, slack=False)])
    old.update([gpu(clock=1700.0, capped=False)])
    assert old.current() == {}


def test_a_cap_raised_past_the_one_the_lock_was_found_under_releases_it():
    locks = ClockLocks()
    lock(locks, target=400.0, clock=1400.0)
    # Noise in the plan (under 2% of the 500 W range) keeps the lock...
    locks.update([gpu(target=409.0, clock=1400.0, capped=False)])
    assert locks.current() == {"GPU-0": 1400}
    # ...a step up of the latency ceiling, or more budget, releases it.
    why = locks.update([gpu(target=460.0, clock=1400.0, capped=False)])
    assert "released" in why["GPU-0"] and locks.current() == {}
    # and the cap, binding again at its new level, finds the next one.
    lock(locks, target=460.0, clock=1500.0)
    assert locks.current() == {"GPU-0": 1500}


def test_a_ceiling_that_rises_releases_the_lock_at_once_whatever_the_cap():
    """A queue or latency near the SLO: the boost between peaks is what drains it."""
    locks = ClockLocks()
    lock(locks, clock=1400.0)
    why = locks.update([gpu(clock=1400.0, capped=False, slack=False, pressed=True)])
    assert "released" in why["GPU-0"] and locks.current() == {}


def test_a_cap_at_the_top_of_the_range_locks_nothing():
    """No rise could release a lock found there: a TDP-bound burst under a ceiling at
    its top, or a GPU whose range is a point, stays on power limits alone."""
    locks = ClockLocks()
    lock(locks, target=700.0, clock=1500.0)
    lock(locks, target=695.0, clock=1500.0)
    assert locks.current() == {}
    pinned = ClockLocks()
    for _ in range(2):
        pinned.update([ClockInput("GPU-p", 500.0, 500.0, 500.0, 500.0, 1500.0, True, True, True)])
    assert pinned.current() == {}


def test_a_lock_is_found_under_the_lowest_cap_that_bound_at_its_clock():
    locks = ClockLocks()
    lock(locks, target=400.0, clock=1400.0)
    # The budget tightens to 350 W without the cap binding: back at 395 W, the lock is
    # still within what it was found under.
    locks.update([gpu(target=350.0, clock=1400.0, capped=False)])
    locks.update([gpu(target=395.0, clock=1400.0, capped=False)])
    assert locks.current() == {"GPU-0": 1400}
    # At 350 W the cap binds right at the locked clock: found under 350 W from then on,
    # and 395 W gives the GPU more than the lock lets it use.
    locks.update([gpu(target=350.0, clock=1400.0)])
    assert locks.current() == {"GPU-0": 1400}
    assert "released" in locks.update([gpu(target=395.0, capped=False)])["GPU-0"]


@pytest.mark.parametrize(
    "reading",
    [
        {"capped": False},
        {"fresh": False},
        {"clock": None},
        {"clock": 0.0},
        {"limit": 500.0},  # the limit in force is not (yet) the planned one
        {"ceiling": False},  # no latency reading to judge a lock by
        {"binds": False},  # the cap is a budget's share, which moves every period
        {"slowdown": True},  # a thermal or power-brake slowdown read the clock
        {"slack": False},  # latency has no room to give
        {"pressed": True},  # the ceiling is rising
    ],
)
def test_no_lock_without_a_cap_that_binds_now_and_a_latency_to_judge_it(reading):
    locks = ClockLocks()
    locks.update([gpu()])  # bound once...
    assert locks.update([gpu(**reading)]) == {}  # ...but not the second period
    assert locks.current() == {}


def test_a_node_that_loses_its_latency_reading_or_its_gpus_loses_its_locks():
    locks = ClockLocks()
    for _ in range(2):
        locks.update([gpu(uuid="GPU-0"), gpu(uuid="GPU-1")])
    assert set(locks.current()) == {"GPU-0", "GPU-1"}
    why = locks.update([gpu(uuid="GPU-0", ceiling=False)])
    assert "released" in why["GPU-0"] and locks.current() == {}


@pytest.fixture
def rt(sqlite_url):
    from wattkeeper.clock import SimClock
    from wattkeeper.config import load_config
    from wattkeeper.runtime import build_simulated, open_store
    from wattkeeper.simulator.facility import FacilitySpec
    from wattkeeper.store.db import make_engine, upgrade

    upgrade(make_engine(sqlite_url))
    cfg = load_config(None, environ={})
    runtime = build_simulated(cfg, open_store(cfg, sqlite_url), FacilitySpec(1, 2), SimClock(1e4))
    yield runtime
    runtime.store.engine.dispose()


def _agents_only(rt, seconds: int) -> None:
    for _ in range(seconds):
        rt.clock.set(rt.clock.now() + 1)
        rt.facility.advance_to(rt.clock.now())
        rt.tick_agents()


def _audited(rt, action: str) -> list:
    return [a for a in rt.store.audit_log(200) if a.action == action]


def test_the_agent_applies_a_clock_lock_once_and_releases_it_with_its_lease(rt):
    """A target's clock goes on as a lock from the lowest supported clock to the highest
    supported one at or below it (an idle GPU still clocks down); it is set once, not
    every tick; an expired lease releases it along with the fallback cap, and a clean
    stop puts the GPUs back as they were."""
    from wattkeeper.store.repository import TargetSpec

    f = rt.facility
    _agents_only(rt, 1)
    uuids = list(rt.agents[0].infos)
    now = rt.clock.now()
    rt.store.write_targets(
        [TargetSpec(uuids[0], 500.0, sm_clock_max_mhz=1207, reason="test lock")], now, 30.0
    )
    _agents_only(rt, 3)
    assert (f.clock_lock_min[0], f.clock_lock[0]) == (345, 1200)  # H100: 1980 - 52 x 15
    assert f.limit_requested[0] == 500.0 and f.clock_mhz[0] <= 1200
    assert [a.detail["max_mhz"] for a in _audited(rt, "sm_clock.lock")] == [1200]
    assert str(f.clock_lock[1]) == "nan", "no clock in its target: no lock"
    # The controller is gone: the lease runs out, the lock goes with it.
    _agents_only(rt, 30)
    assert str(f.clock_lock[0]) == "nan" and f.limit_requested[0] == pytest.approx(420.0)
    released = _audited(rt, "sm_clock.reset")
    assert [(a.detail["max_mhz"], a.detail["previous_mhz"]) for a in released] == [(None, 1200)]
    assert "lease expired" in released[0].detail["reason"]
    # A new lock, then a clean stop: everything as it was before the first change.
    now = rt.clock.now()
    rt.store.write_targets([TargetSpec(uuids[0], 600.0, sm_clock_max_mhz=1500)], now, 30.0)
    _agents_only(rt, 1)
    assert f.clock_lock[0] == 1500
    rt.shutdown()
    assert str(f.clock_lock[0]) == "nan" and f.limit_requested[0] == 700.0


def test_a_lock_the_gpu_refuses_is_said_once_and_the_cap_still_holds(
    sqlite_url, monkeypatch, caplog
):
    """Locking clocks needs root or CAP_SYS_ADMIN: without it the power limit, which
    keeps the budget, still goes on, and the refusal is logged and audited once."""
    import pynvml
    from nvml_fake import install_fake_pynvml

    from wattkeeper.agent import Agent
    from wattkeeper.collectors.nvml import NvmlBackend
    from wattkeeper.store.db import make_engine, upgrade
    from wattkeeper.store.repository import Store, TargetSpec

    _fake, state = install_fake_pynvml(monkeypatch, n_gpus=1)
    engine = make_engine(sqlite_url)
    upgrade(engine)
    store = Store(engine)
    agent = Agent("n1", NvmlBackend(clock=lambda: 1000.0), store)
    agent.tick(1000.0)
    uuid = state.gpus[0].uuid
    store.write_targets([TargetSpec(uuid, 450.0, sm_clock_max_mhz=1400)], 1000.0, 60.0)
    state.gpus[0].fail("nvmlDeviceSetGpuLockedClocks", pynvml.NVML_ERROR_NO_PERMISSION)
    for t in range(1001, 1005):
        agent.tick(float(t))
    assert state.gpus[0].limit_mw == 450_000 and state.gpus[0].locked_clocks_mhz is None
    assert sum("cannot lock at 1395 MHz" in r.message for r in caplog.records) == 1
    failed = [a for a in store.audit_log(50) if a.action == "sm_clock.failed"]
    assert len(failed) == 1 and "CAP_SYS_ADMIN" in failed[0].detail["error"]
    # Asked once, not at every tick: the next try comes a minute later.
    assert _fake.nvmlDeviceSetGpuLockedClocks.call_count == 1
    state.gpus[0].heal("nvmlDeviceSetGpuLockedClocks")  # given the capability: it goes on
    agent.tick(1030.0)
    assert state.gpus[0].locked_clocks_mhz is None
    store.write_targets([TargetSpec(uuid, 450.0, sm_clock_max_mhz=1400)], 1055.0, 60.0)
    agent.tick(1062.0)
    assert state.gpus[0].locked_clocks_mhz == (345, 1395)
    agent.shutdown(1063.0)
    assert state.gpus[0].locked_clocks_mhz is None and state.gpus[0].limit_mw == 700_000


@pytest.mark.parametrize("enabled", [True, False])
def test_a_run_with_an_slo_locks_the_clocks_its_caps_hold(sqlite_url, enabled):
    """The whole loop on the simulated clock: the latency ceilings walk the caps down
    until they bind, the controller writes the clock those caps hold as a lock with
    its reason, and the agents put it on the GPUs. controller.clock_locks = false keeps
    to power limits."""
    from sqlalchemy import select

    from wattkeeper.clock import SimClock
    from wattkeeper.config import load_config
    from wattkeeper.runtime import build_simulated, open_store, run_fast
    from wattkeeper.simulator.facility import FacilitySpec
    from wattkeeper.store.db import make_engine, upgrade
    from wattkeeper.store.models import Gpu, Target

    env = {
        "WATTKEEPER_SLO__TTFT_S": "2",
        "WATTKEEPER_SLO__TPOT_S": "0.06",
        "WATTKEEPER_CONTROLLER__CLOCK_LOCKS": str(enabled).lower(),
    }
    cfg = load_config(None, environ=env)
    upgrade(make_engine(sqlite_url))
    rt = build_simulated(cfg, open_store(cfg, sqlite_url), FacilitySpec(1, 2), SimClock(5e5))
    run_fast(rt, 300.0)
    with rt.store.engine.connect() as conn:
        stored = dict(conn.execute(select(Gpu.index, Target.sm_clock_max_mhz).join(Target)).all())
    f = rt.facility
    applied = {i: f.clock_lock[i] for i in range(2) if str(f.clock_lock[i]) != "nan"}
    from wattkeeper.exporter import WattkeeperCollector

    exported = {m.name: m for m in WattkeeperCollector(rt).collect()}
    series = {
        int(s.labels["gpu"]): s.value
        for s in exported["wattkeeper_gpu_sm_clock_lock_hertz"].samples
    }
    assert series == {i: mhz * 1e6 for i, mhz in applied.items()}
    if not enabled:
        assert stored == {0: None, 1: None} and applied == {}
        return
    assert set(applied) == {0, 1}, stored
    for i, mhz in applied.items():
        assert stored[i] - 15 < mhz <= stored[i] and f.limit_requested[i] < 700.0
    reasons = [a.detail.get("reason", "") for a in _audited(rt, "target.set")]
    assert any("clock locked there" in r for r in reasons)
    # and `explain` shows them beside the clock the GPU runs at
    import json

    from typer.testing import CliRunner

    from wattkeeper.cli import app

    cli = ["explain", "node", rt.agents[0].node, "--db", sqlite_url]
    shown = json.loads(CliRunner().invoke(app, [*cli, "-o", "json"]).stdout)["gpus"]
    assert {g["index"]: g["target_sm_clock_max_mhz"] for g in shown} == stored
    assert all(g["sm_clock_mhz"] <= g["target_sm_clock_max_mhz"] for g in shown)
    assert f"locked at or below {stored[0]} MHz" in CliRunner().invoke(app, cli).stdout


def test_a_lock_left_by_a_crashed_agent_is_undone_by_the_next_run(rt, tmp_path):
    """NVML cannot read a clock lock back, so the agent notes a lock in its originals
    file before setting it. A run killed with GPUs locked leaves the note; the next run
    resets the lock where its target holds none, and a clean stop leaves no note."""
    import json

    from wattkeeper.agent import Agent
    from wattkeeper.collectors.sim_gpu import SimGpuBackend
    from wattkeeper.store.repository import TargetSpec

    f = rt.facility
    first = rt.agents[0]
    first.originals_path = tmp_path / "originals.json"
    _agents_only(rt, 1)
    uuid = next(iter(first.infos))
    rt.store.write_targets([TargetSpec(uuid, 500.0, sm_clock_max_mhz=1300)], rt.clock.now(), 60)
    _agents_only(rt, 1)
    assert f.clock_lock[0] == 1290
    assert json.loads(first.originals_path.read_text())["sm_clock_locked"] == [uuid]
    # Killed: no shutdown. The controller drops the lock; a new process starts.
    rt.store.write_targets([TargetSpec(uuid, 500.0)], rt.clock.now(), 60)
    again = Agent(
        first.node,
        SimGpuBackend(f, 0, rt.clock.now),
        rt.store,
        originals_path=first.originals_path,
        agent_id=first.agent_id,
    )
    rt.clock.set(rt.clock.now() + 1)
    again.tick(rt.clock.now())
    assert str(f.clock_lock[0]) == "nan"
    assert json.loads(first.originals_path.read_text())["sm_clock_locked"] == []
    again.shutdown(rt.clock.now())
    assert f.limit_requested[0] == 700.0 and not first.originals_path.exists()


def test_a_lock_is_a_supported_clock_never_above_the_target_and_none_without_a_list():
    from wattkeeper.agent import clock_at_or_below
    from wattkeeper.collectors.gpu import GpuInfo, PowerLimitConstraints

    limits = PowerLimitConstraints(200.0, 700.0, 700.0)
    listed = GpuInfo("GPU-a", 0, "H100", "0:0", 1, limits, (1980, 1965, 1950, 345), 1980)
    assert clock_at_or_below(listed, 1960) == 1950
    assert clock_at_or_below(listed, 100) == 345  # below them all: the lowest
    assert clock_at_or_below(listed, 5000) == 1980
    assert clock_at_or_below(listed, None) is None and clock_at_or_below(listed, 0) is None
    # No list: no floor to lock from, so no lock (it would pin an idle GPU's clock).
    unlisted = GpuInfo("GPU-b", 1, "H100", "0:1", 1, limits, (), 1980)
    assert clock_at_or_below(unlisted, 1500) is None
