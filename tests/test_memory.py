"""What the controller learned outlives it: the leader keeps its latency ceilings,
in-flight limits, routing efficiencies and host power coupling in the store, fenced by
its epoch, and a controller that starts or takes the lease takes them back."""

from __future__ import annotations

import math

import pytest

from wattkeeper.clock import SimClock
from wattkeeper.config import load_config
from wattkeeper.controller import MEMORY_KEY
from wattkeeper.policies.route import Routes
from wattkeeper.policies.slo import Ceilings, CeilingState, Slo
from wattkeeper.runtime import build_simulated, make_controller, open_store
from wattkeeper.simulator.facility import FacilitySpec
from wattkeeper.store.db import make_engine, upgrade
from wattkeeper.store.repository import NotLeaderError, Store

SLO_ENV = {"WATTKEEPER_SLO__TTFT_S": "2s", "WATTKEEPER_SLO__TPOT_S": "50ms"}


def test_ceilings_and_routes_survive_json_and_bad_entries_are_skipped() -> None:
    c = Ceilings(Slo(2.0, 0.05))
    c.nodes["a"] = CeilingState(ratio=0.4, floor=0.3, batch_limit=180.0, unqueued_ttft_s=0.04)
    c.nodes["b"] = CeilingState(ratio=1.0)  # never stepped: infinite timestamps
    kept = c.to_memory()
    assert kept["b"]["last_down_ts"] is None  # JSON has no infinity
    back = Ceilings(Slo(2.0, 0.05))
    bad = {"ratio": "x"}, {"ratio": 7.0}, "nonsense", {"nope": 1}
    memory = {**kept, **{f"bad{k}": v for k, v in enumerate(bad)}}
    assert back.restore(memory) == 2
    assert back.nodes == c.nodes
    assert math.isinf(back.nodes["b"].last_down_ts)

    r = Routes()
    r.restore({"a": {"efficiency": 1.5, "latency_share": 0.8, "inflight": 120.0}, "z": {"x": []}})
    assert r.to_memory() == {"a": {"efficiency": 1.5, "latency_share": 0.8, "inflight": 120.0}}


def test_memory_is_fenced_by_the_leaders_epoch(db_url: str) -> None:
    upgrade(make_engine(db_url))
    store = Store(make_engine(db_url))
    assert store.recall(MEMORY_KEY) is None
    epoch = store.lead("ctl-1 h 1 x", "ctl-1", "h", 1, 100.0, 10.0)
    assert epoch is not None
    store.remember(MEMORY_KEY, {"coupling": 0.3}, 100.0, epoch=epoch)
    store.remember(MEMORY_KEY, {"coupling": 0.4}, 101.0, epoch=epoch)
    assert store.recall(MEMORY_KEY) == ({"coupling": 0.4}, 101.0)
    later = store.lead("ctl-2 h 2 y", "ctl-2", "h", 2, 200.0, 10.0)  # the lease ran out
    assert later == epoch + 1
    with pytest.raises(NotLeaderError):
        store.remember(MEMORY_KEY, {"coupling": 9.9}, 201.0, epoch=epoch)  # deposed
    assert store.recall(MEMORY_KEY) == ({"coupling": 0.4}, 101.0)


def old_memory(controller) -> dict:
    return {
        "ceilings": controller.ceilings.to_memory(),
        "routes": controller.routes.to_memory(),
        "coupling": controller.state.coupling,
    }


def test_a_restarted_controller_takes_back_what_its_predecessor_learned(sqlite_url) -> None:
    upgrade(make_engine(sqlite_url))
    cfg = load_config(None, environ=SLO_ENV)
    store = open_store(cfg, sqlite_url)
    rt = build_simulated(cfg, store, FacilitySpec(1, 4), SimClock(10_000.0))
    for k in range(1, 181):
        rt.advance(10_000.0 + k)
    old = rt.controller
    assert old.ceilings is not None and old.ceilings.nodes
    kept = store.recall(MEMORY_KEY)
    assert kept is not None  # kept every 30 s by the periods themselves
    memory, kept_at = kept
    assert rt.clock.now() - kept_at <= 30.0
    learned = memory["ceilings"]

    # A controller that never read the memory back does not write over it.
    idle = make_controller(cfg, store)
    idle._remember(rt.clock.now(), None)
    assert store.recall(MEMORY_KEY) == kept
    # Stepping down, the leader keeps its newest; then the lease is free.
    old.resign(rt.clock.now())
    memory, kept_at = store.recall(MEMORY_KEY)
    assert kept_at == rt.clock.now()
    learned = memory["ceilings"]

    fresh = make_controller(cfg, store)
    fresh.tick(rt.clock.now())
    assert fresh.ceilings is not None and fresh.routes is not None
    for name, kept in learned.items():
        now = fresh.ceilings.nodes[name]
        # What takes minutes to learn came back, not relearned from nothing.
        assert now.floor == kept["floor"] and now.batch_limit == kept["batch_limit"]
        assert now.unqueued_ttft_s == pytest.approx(kept["unqueued_ttft_s"], rel=0.02)
    assert fresh.routes.nodes.keys() == old.routes.nodes.keys()
    assert memory["coupling"] is not None  # learned over minutes of power moves
    assert fresh.state.coupling == memory["coupling"]
    fresh.resign(rt.clock.now())
    cold = make_controller(load_config(None, environ=SLO_ENV), Store(make_engine(sqlite_url)))
    store.remember(MEMORY_KEY, old_memory(old), rt.clock.now() - 7200)  # two hours old
    cold.tick(rt.clock.now())
    assert cold.leading
    assert cold.state.coupling is None  # not taken back: the fleet has moved on
    rt.shutdown()
