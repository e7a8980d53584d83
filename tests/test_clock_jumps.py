"""A wall clock stepped forwards or backwards, on an agent's host or the controller's,
neither relaxes a cap nor expires every lease at once: leases are timed on the agent's
monotonic clock. The clocks are injected: the facility runs on true time, the agent and
the controller are each given their own wall clock, and the agent its monotonic one."""

import pytest

from wattkeeper.clock import SimClock
from wattkeeper.config import load_config
from wattkeeper.runtime import build_simulated, open_store
from wattkeeper.simulator.facility import FacilitySpec
from wattkeeper.store.db import make_engine, upgrade

STEP = 600.0  # ten minutes: twenty leases
FALLBACK = 0.6 * 700


class Host:
    """True time, and what each machine believes it is."""

    def __init__(self, rt) -> None:
        self.rt = rt
        self.agent_wall = 0.0  # offsets from true time
        self.controller_wall = 0.0
        self.mono = 500.0
        rt.agents[0]._monotonic = lambda: self.mono

    def run(self, seconds: int, controller: bool = True, agent: bool = True) -> list[list[float]]:
        """Seconds of the loop; the GPUs' limits after each."""
        rt, seen = self.rt, []
        for _ in range(seconds):
            t = rt.clock.now() + 1
            rt.clock.set(t)
            rt.facility.advance_to(t)
            self.mono += 1
            if agent:
                rt.agents[0].tick(t + self.agent_wall)
            if controller and int(t) % 5 == 0:
                rt.controller.tick(t + self.controller_wall)
            seen.append(limits(rt))
        return seen


def limits(rt) -> list[float]:
    return [s.power_limit_requested_w for s in rt.agents[0].state.samples.values()]


@pytest.fixture
def host(sqlite_url):
    upgrade(make_engine(sqlite_url))
    cfg = load_config(None, environ={})
    store = open_store(cfg, sqlite_url)
    rt = build_simulated(cfg, store, FacilitySpec(1, 2), SimClock(10_000.0))
    yield Host(rt)
    rt.store.engine.dispose()


def _uncapped(host: Host) -> None:
    """A budget that caps nothing: every target at 700 W with a 30 s lease, so the safe
    cap (420 W) shows when a lease has run out."""
    host.rt.store.set_budget(100_000.0, "test", host.rt.clock.now())
    assert host.run(12)[-1] == [700.0] * 2


@pytest.mark.parametrize("step", [STEP, -STEP])
def test_an_agent_clock_step_keeps_renewed_leases(host, step):
    _uncapped(host)
    host.agent_wall = step
    seen = host.run(36)
    assert all(lims == [700.0] * 2 for lims in seen), "a clock step expired the leases"


@pytest.mark.parametrize("step", [STEP, -STEP])
def test_a_controller_clock_step_keeps_renewed_leases(host, step):
    _uncapped(host)
    host.controller_wall = step
    seen = host.run(36)
    assert all(lims == [700.0] * 2 for lims in seen), "a clock step expired the leases"


@pytest.mark.parametrize("who", ["agent", "controller"])
def test_a_clock_set_back_does_not_keep_a_dead_controllers_targets(host, who):
    """The agent's clock set back ten minutes, or the controller's set forward (its
    last leases run ten minutes too long by the agent's wall clock): once the controller
    stops, the safe cap comes within the lease's length all the same."""
    _uncapped(host)
    if who == "agent":
        host.agent_wall = -STEP
    else:
        host.controller_wall = STEP
    host.run(10)
    seen = host.run(36, controller=False)
    assert seen[-1] == [pytest.approx(FALLBACK)] * 2
    expired_after = next(k for k, lims in enumerate(seen) if lims[0] < 700.0)
    assert expired_after <= 31


def test_a_binding_budget_is_not_relaxed_by_a_step_on_either_side(host):
    host.rt.store.set_budget(2600.0, "test", host.rt.clock.now())
    capped = host.run(20)[-1]
    assert max(capped) < 700.0
    for agent_wall, controller_wall in [(STEP, 0.0), (-STEP, 0.0), (0.0, STEP), (0.0, -STEP)]:
        host.agent_wall, host.controller_wall = agent_wall, controller_wall
        seen = host.run(36)
        assert max(max(lims) for lims in seen) <= max(capped) + 1.0
        assert sum(seen[-1]) <= sum(capped) + 2.0


def test_a_renewal_read_after_the_lease_ran_out_gets_only_what_is_left_of_it(host):
    """The agent is cut off from the store for longer than a lease while the controller
    keeps renewing, and the controller dies before the agent is back: the last renewal
    it reads is a dead controller's, and runs out when the controller meant, not a
    whole lease after the agent read it."""
    _uncapped(host)
    host.run(40, agent=False)  # the controller renews; the agent reads nothing
    host.run(20, controller=False, agent=False)  # the controller dies 20 s before
    seen = host.run(15, controller=False)  # the agent is back: 10 s were left
    assert seen[-1] == [pytest.approx(FALLBACK)] * 2


def test_a_clock_stepped_back_does_not_stop_the_agents_own_timers(host: Host) -> None:
    """Token reads (every agent.tokens_interval_s) are timed on the monotonic clock too:
    timed on the wall clock, a step back of ten minutes would stop them for ten minutes
    and leave the controller with no latency and no token rates."""
    from sqlalchemy import func, select

    from wattkeeper.store.models import TokenSampleRow

    def token_rows() -> int:
        with host.rt.store.engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(TokenSampleRow))

    host.run(12)
    before = token_rows()
    assert before > 0
    host.agent_wall -= STEP
    host.run(21)
    assert token_rows() - before >= 4  # every 5 s, as before the step
