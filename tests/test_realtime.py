"""The real-time driver: the control period is never lost to the emergency check.

The emergency check runs every agent interval and the control period every controller
interval, so the two fall due at the same instants. They never run at once (both work
on the controller's state); each waits for the other and then does its own work.
"""

from __future__ import annotations

import threading

from wattkeeper.clock import WallClock
from wattkeeper.config import load_config
from wattkeeper.runtime import build_simulated, open_store, run_realtime
from wattkeeper.simulator.facility import FacilitySpec
from wattkeeper.store.db import make_engine, upgrade


def test_every_control_period_plans_though_the_emergency_check_falls_due_with_it(sqlite_url):
    upgrade(make_engine(sqlite_url))
    cfg = load_config(
        None,
        environ={
            "WATTKEEPER_AGENT__INTERVAL_S": "0.5",
            "WATTKEEPER_CONTROLLER__INTERVAL_S": "1",
            "WATTKEEPER_CONTROLLER__STALE_AFTER_S": "5",
        },
    )
    store = open_store(cfg, sqlite_url)
    rt = build_simulated(cfg, store, FacilitySpec(1, 2), WallClock())
    assert rt.controller is not None
    ticks: list[float] = []
    guards: list[float] = []
    inside = threading.Lock()
    overlapped: list[str] = []
    tick, guard = rt.controller.tick, rt.controller.guard

    def counted(fn, seen):
        def call(now: float):
            if not inside.acquire(blocking=False):
                overlapped.append(fn.__name__)
                return fn(now)
            try:
                seen.append(now)
                return fn(now)
            finally:
                inside.release()

        return call

    rt.controller.tick = counted(tick, ticks)
    rt.controller.guard = counted(guard, guards)
    store.set_budget(2500.0, "test", rt.clock.now())
    try:
        run_realtime(rt, 8.0)
    finally:
        rt.shutdown()
    # Eight seconds at one period a second; a busy machine may lose a few to lateness,
    # never most of them.
    assert len(ticks) >= 4, (len(ticks), len(guards))
    assert len(guards) >= 4
    assert not overlapped
