"""Consolidation: the trial, its judgement and the return, as a rule and on the simulated
facility through the real agents, store, controller and router."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from wattkeeper.cli import app
from wattkeeper.config import ConfigError, load_config
from wattkeeper.policies.consolidate import ConsolidateSettings, Consolidation, PoolNode

S = ConsolidateSettings(trial_s=60.0, lookback_s=300.0, hold_s=120.0, smoothing_s=10.0)
STANDBY = {f"n{i}": 150.0 for i in range(4)}


def pool(
    tps: float = 1000.0,
    gpu_w: float = 1700.0,
    steer: float = 0.6,
    can_rise: bool = True,
    drained: tuple[str, ...] = (),
    held: tuple[str, ...] = (),
    n: int = 4,
    **per_node: dict,
) -> list[PoolNode]:
    """``n`` nodes of 8 GPUs (floor 1.6 kW, max 5.6 kW) with 2 kW of host each."""
    out = []
    for i in range(n):
        name = f"n{i}"
        over = per_node.get(name, {})
        off = name in drained
        out.append(
            PoolNode(
                name=name,
                pool="llama",
                serving=not off,
                drained=off,
                held=name in held,
                tokens_per_s=None if off else over.get("tps", tps),
                gpu_power_w=None if off else over.get("gpu_w", gpu_w),
                gpu_floor_w=1600.0,
                gpu_max_w=5600.0,
                power_w=None if off else over.get("gpu_w", gpu_w) + 2000.0,
                steer=None if off else over.get("steer", steer),
                power_can_rise=can_rise,
            )
        )
    return out


def settle(c: Consolidation, nodes: list[PoolNode], start: float, until: float) -> list:
    """Feed the same period every 5 s; every decision made."""
    out = []
    t = start
    while t <= until:
        out += [(t, d) for d in c.update(nodes, t, float("-inf"), STANDBY)]
        t += 5.0
    return out


def test_a_calm_pool_at_its_floors_tries_its_least_efficient_node_then_drains_it() -> None:
    c = Consolidation(S)
    nodes = pool(n2={"tps": 800.0})
    said = settle(c, nodes, 0.0, 150.0)
    assert [(d.kind, d.node) for _, d in said] == [("trial", "n2")]
    assert said[0][0] >= 0.5 * S.lookback_s  # not before half the lookback was seen
    assert c.held_off() == "n2"
    # The rest carried it: its GPUs rose, still within room, and the pool's power per
    # token fell with n2 at standby.
    rest = pool(drained=(), n2={"tps": 0.0, "gpu_w": 1600.0}, tps=1267.0, gpu_w=2000.0)
    said = settle(c, rest, 155.0, 150.0 + S.trial_s)
    assert [(d.kind, d.node) for _, d in said] == [("drain", "n2")]
    assert "returns above" in said[0][1].reason
    assert c.held_off() is None and "n2" in c.drained


@pytest.mark.parametrize(
    ("why", "nodes"),
    [
        ("GPUs well above their floors", pool(gpu_w=3000.0)),
        ("latency near the SLO", pool(steer=0.97)),
        ("a budget holds the power", pool(can_rise=False)),
        ("a prefill node among decode nodes", pool(n3={"tps": 20.0})),
        ("one node left", pool(n=1)),
    ],
)
def test_no_trial_where_the_pool_needs_its_nodes(why: str, nodes: list[PoolNode]) -> None:
    c = Consolidation(S)
    assert settle(c, nodes, 0.0, 400.0) == [], why


def test_a_pool_keeps_the_serving_nodes_it_is_told_to() -> None:
    two = replace(S, min_serving=2)
    assert settle(Consolidation(two), pool(n=2), 0.0, 400.0) == []
    said = settle(Consolidation(two), pool(n=3), 0.0, 400.0)
    assert [d.kind for _, d in said][:1] == ["trial"]


def test_no_trial_after_a_burst_or_while_the_load_rises() -> None:
    c = Consolidation(S)
    settle(c, pool(tps=3000.0), 0.0, 60.0)  # a burst
    assert settle(c, pool(), 65.0, 300.0) == []  # it is still in the lookback
    rising = Consolidation(S)
    t, said = 0.0, []
    while t < 400.0:
        said += rising.update(pool(tps=500.0 + 5.0 * t), t, float("-inf"), STANDBY)
        t += 5.0
    assert said == []


def test_a_trial_ends_at_once_when_the_rest_strains_and_is_not_retried_at_that_load() -> None:
    c = Consolidation(S)
    settle(c, pool(), 0.0, 150.0)
    trial = c.held_off()
    assert trial is not None
    strained = pool(steer=0.99, can_rise=False)
    said = settle(c, strained, 155.0, 165.0)
    assert [(d.kind, d.node) for _, d in said] == [("end", trial)]  # two periods in a row
    assert "near its SLO" in said[0][1].reason
    assert c.held_off() is None
    assert settle(c, pool(), 170.0, 400.0) == []  # the same load: no second trial
    said = settle(c, pool(tps=800.0), 405.0, 900.0)  # a fifth less: worth another try
    assert [d.kind for _, d in said][:1] == ["trial"]


def test_a_trial_that_saves_nothing_or_leaves_no_room_fails() -> None:
    for rest_w, why in ((4500.0, "range above"), (3400.0, "J per token")):
        c = Consolidation(S)
        settle(c, pool(), 0.0, 150.0)
        trial = c.held_off()
        assert trial == "n0"
        said = settle(c, pool(gpu_w=rest_w, n0={"tps": 0.0}, tps=4000.0 / 3), 155.0, 230.0)
        assert [(d.kind, d.node) for _, d in said] == [("end", trial)], rest_w
        assert why in said[0][1].reason


def test_a_consolidated_node_returns_when_the_load_grows_or_the_rest_strains() -> None:
    c = Consolidation(S)
    c.drained["n3"] = ("llama", 3000.0, 0.0, 3)
    c.last_change_ts = 0.0
    steady = pool(drained=("n3",))
    assert settle(c, steady, 10.0, 100.0) == []
    grown = pool(drained=("n3",), tps=1200.0)  # 3,600 tokens/s > 1.15 x 3,000
    said = settle(c, grown, 105.0, 200.0)
    assert [(d.kind, d.node) for _, d in said] == [("return", "n3")]
    assert "demand" in said[0][1].reason and "n3" not in c.drained

    c = Consolidation(S)
    c.drained.update({"n2": ("llama", 3000.0, 0.0, 3), "n3": ("llama", 3000.0, 50.0, 2)})
    strained = pool(drained=("n2", "n3"), n=4, steer=0.99, can_rise=False)
    said = settle(c, strained, 60.0, 200.0)
    # The last drained first, and one at a time: n2 waits while n3 wakes.
    assert [(d.kind, d.node) for _, d in said] == [("return", "n3")]
    assert "near its SLO" in said[0][1].reason


def test_a_persons_or_a_budgets_drain_is_never_returned() -> None:
    c = Consolidation(S)
    c.drained.update({"n2": ("llama", 100.0, 0.0, 3), "n3": ("llama", 100.0, 0.0, 2)})
    nodes = pool(drained=("n2", "n3"), held=("n2", "n3"), tps=5000.0, steer=0.99, can_rise=False)
    assert settle(c, nodes, 10.0, 200.0) == []


def test_what_it_drained_survives_a_controller_restart() -> None:
    c = Consolidation(S)
    c.drained["n3"] = ("llama", 3000.0, 12.0, 2)
    again = Consolidation(S)
    assert again.restore(c.to_memory()) == 1
    assert again.drained == c.drained
    assert again.restore({"bad": ["llama", "x", 1.0], "short": []}) == 0
    assert again.restore({"older": ["llama", 10.0, 1.0]}) == 1  # no count: one kept
    assert again.drained["older"][3] == 1


def test_consolidation_needs_drains_and_the_slo(tmp_path: Path) -> None:
    config = tmp_path / "wattkeeper.toml"
    config.write_text("[controller]\nconsolidate = true\n")
    with pytest.raises(ConfigError, match=r"controller.consolidate needs .*drain_nodes.*slo"):
        load_config(config, environ={})
    config.write_text(
        "[controller]\nconsolidate = true\ndrain_nodes = true\n\n"
        '[slo]\nttft_s = "2s"\ntpot_s = "50ms"\n'
    )
    assert load_config(config, environ={}).controller.consolidate


SCENARIO = """
description = "two nodes at a low load, then a surge"
duration_s = 1200
seed = 3
[slo]
ttft_s = 2.0
tpot_s = 0.05
[[fleet]]
name = "h100"
count = 2
gpus_per_node = 2
gpu = "h100"
model = "llama-8b"
role = "mixed"
max_inflight = 256
server = "vllm"
[[workload]]
model = "llama-8b"
rate_per_s = 4
prompt = { mean = 250, sigma = 0.9 }
output = { mean = 600, sigma = 0.8 }
spikes = [{ at_s = 700, length_s = 500, ratio = 8.0 }]
"""


def consolidating(
    tmp_path: Path, sqlite_url: str, start: float, settings: ConsolidateSettings
) -> tuple[Any, Any, Any]:
    """The SCENARIO's two nodes with agents, a store and a consolidating controller."""
    from wattkeeper.clock import SimClock
    from wattkeeper.runtime import build_simulated, open_store
    from wattkeeper.simulator.scenario import parse_scenario
    from wattkeeper.store.db import make_engine, upgrade

    config = tmp_path / "wattkeeper.toml"
    config.write_text(
        '[controller]\ndrain_nodes = true\nconsolidate = true\ndrained_node_w = "150W"\n\n'
        '[slo]\nttft_s = "2s"\ntpot_s = "50ms"\n'
    )
    cfg = load_config(config, environ={})
    upgrade(make_engine(sqlite_url))
    store = open_store(cfg, sqlite_url)
    scenario = parse_scenario(tomllib.loads(SCENARIO), "test", "surge")
    rt = build_simulated(cfg, store, scenario, SimClock(start))
    assert rt.controller is not None and rt.controller.consolidation is not None
    rt.controller.consolidation.settings = settings
    return cfg, store, rt


def test_the_controller_consolidates_a_light_load_and_brings_the_node_back(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Two simulated nodes at a low load: the controller holds one out of the router
    (weight 0), sees the other carry the load, drains it (powered down to standby) and
    returns it when the load surges, all through the store; at least 99% of the requests
    meet their SLO over the run, the surge's minutes included."""
    from wattkeeper.runtime import make_controller

    start = 80_000.0
    settings = ConsolidateSettings(trial_s=60.0, lookback_s=200.0, hold_s=60.0)
    cfg, store, rt = consolidating(tmp_path, sqlite_url, start, settings)
    assert rt.controller is not None
    restarted_at, asleep = 0, -1
    f = rt.facility
    states: dict[int, list[str]] = {0: [], 1: []}
    held: list[tuple[str, int]] = []
    explained = ""
    for k in range(1, 1101):
        rt.advance(start + k)
        for node in (0, 1):
            states[node].append(f.node_state(node))
            if not explained and states[node][-1] == "standby" and k % 60 == 0:
                r = CliRunner().invoke(
                    app, ["explain", "node", f"sim-node-{node}", "--db", sqlite_url]
                )
                assert r.exit_code == 0, r.output
                explained = r.stdout
                restarted_at, asleep = k, node
                # The controller restarts: the new one must know this drain is
                # consolidation's (a drain with no budget over it would be returned).
                rt.controller = make_controller(
                    cfg, store, routers=rt.controller.routers, configured_routers=False
                )
                assert rt.controller.consolidation is not None
                rt.controller.consolidation.settings = settings
        if k % 5 == 0:
            held += [(r.node, r.weight) for r in store.routes() if "trial" in r.reason]
    actions = [e.action for e in reversed(store.audit_log(100_000))]
    assert "consolidate.trial" in actions
    assert held and all(weight == 0 for _, weight in held)  # published to the router
    # One node reached standby while the other served, then woke for the surge.
    st = f.stats
    assert st.requests_finished > 1000
    assert st.requests_within_slo >= 0.99 * st.requests_finished
    standby = [k for k in range(1100) if "standby" in (states[0][k], states[1][k])]
    assert standby, "no node was powered down"
    assert min(standby) < 700
    assert states[0][-1] == "serving" and states[1][-1] == "serving"
    # A person asking why the node is off hears it from the controller's memory.
    assert "drained by controller" in explained
    assert "consolidated at" in explained and "returns above" in explained, explained
    # The restarted controller kept it asleep until the surge, then returned it.
    assert restarted_at < 640
    assert all(st == "standby" for st in states[asleep][restarted_at : restarted_at + 60])
    reasons = [e.detail.get("reason", "") for e in store.audit_log(100_000)]
    assert any(r.startswith("consolidation ends") for r in reasons)
    assert any(r.startswith("low load") for r in reasons)
    rt.store.engine.dispose()


def test_a_trial_is_judged_once_its_load_moved_and_fails_if_it_never_does() -> None:
    c = Consolidation(S)
    settle(c, pool(), 0.0, 150.0)
    assert c.held_off() == "n0"
    # Long requests still running on n0 at the end of trial_s: not judged yet.
    still = pool(n0={"tps": 400.0}, gpu_w=2000.0)
    assert settle(c, still, 155.0, 150.0 + S.trial_s) == []
    assert c.held_off() == "n0"
    # A router that ignores the weight: the load never moves, and the trial says so.
    said = settle(c, still, 215.0, 150.0 + S.max_trial_ratio * S.trial_s)
    assert [(d.kind, d.node) for _, d in said] == [("end", "n0")]
    assert "never moved" in said[0][1].reason


def test_a_trial_fails_when_the_demand_grows_or_the_budget_moves_a_node() -> None:
    c = Consolidation(S)
    settle(c, pool(), 0.0, 150.0)
    said = settle(c, pool(tps=2000.0, n0={"tps": 0.0}), 155.0, 200.0)
    assert [d.kind for _, d in said] == ["end"] and "demand grew" in said[0][1].reason
    c = Consolidation(S)
    settle(c, pool(), 0.0, 150.0)
    said = c.update(pool(), 155.0, float("-inf"), STANDBY, busy=True)
    assert [d.kind for d in said] == ["end"] and "budget" in said[0].reason
    assert c.held_off() is None


def test_a_return_in_the_pool_ends_its_trial() -> None:
    c = Consolidation(S)
    settle(c, pool(drained=("n3",), n=4), 0.0, 150.0)
    assert c.held_off() == "n0"
    c.drained["n3"] = ("llama", 2000.0, 0.0, 3)  # drained at 2,000 tokens/s
    said = settle(c, pool(drained=("n3",), tps=900.0, n0={"tps": 0.0}), 155.0, 160.0)
    kinds = [(d.kind, d.node) for _, d in said]
    assert ("return", "n3") in kinds and ("end", "n0") in kinds
    assert c.held_off() is None


def test_a_pool_left_with_fewer_nodes_than_it_kept_gets_one_back_at_once() -> None:
    c = Consolidation(S)
    c.drained.update({"n2": ("llama", 3000.0, 0.0, 2), "n3": ("llama", 3000.0, 10.0, 1)})
    c.last_change_ts = 10.0
    # The one node it kept serving fails: nothing measures a demand or a strain.
    dead = pool(drained=("n1", "n2", "n3"), held=("n1",))
    dead = [n if n.name != "n0" else PoolNode(**{**n.__dict__, "serving": False}) for n in dead]
    said = settle(c, dead, 20.0, 25.0)
    assert [(d.kind, d.node) for _, d in said] == [("return", "n3")]
    assert "0 nodes of its pool serve" in said[0][1].reason
    # n3 wakes with its servers silent (no pool of their own yet): n2 waits for it.
    waking = [
        PoolNode(**{**n.__dict__, "pool": "", "drained": False}) if n.name == "n3" else n
        for n in dead
    ]
    assert settle(c, waking, 30.0, 120.0) == []


def test_a_budget_holding_the_power_is_no_reason_to_return_a_node() -> None:
    c = Consolidation(S)
    c.drained["n3"] = ("llama", 3000.0, 0.0, 3)
    c.last_change_ts = 0.0
    held = [
        PoolNode(**{**n.__dict__, "budget_held": True})
        for n in pool(drained=("n3",), steer=0.99, can_rise=False)
    ]
    assert settle(c, held, 10.0, 200.0) == []


def test_a_controller_that_stops_during_a_trial_gives_the_node_its_weight_back(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Routers keep the last weights they were given: a trial's weight 0 left behind by a
    stopped controller would keep a healthy node out of service."""
    start = 90_000.0
    _, store, rt = consolidating(tmp_path, sqlite_url, start, ConsolidateSettings(lookback_s=200.0))
    assert rt.controller is not None and rt.controller.consolidation is not None
    on_trial = None
    for k in range(1, 600):
        rt.advance(start + k)
        on_trial = rt.controller.consolidation.held_off()
        if on_trial is not None:
            break
    assert on_trial is not None
    rt.advance(start + k + 5)  # the weight 0 reaches the store and the router
    assert {r.node: r.weight for r in store.routes()}[on_trial] == 0
    rt.controller.resign(start + k + 6)
    route = {r.node: r for r in store.routes()}[on_trial]
    assert route.weight > 0 and "trial" not in route.reason
    rt.store.engine.dispose()


def test_the_config_sets_how_many_nodes_a_pool_keeps(tmp_path: Path) -> None:
    from wattkeeper.runtime import make_controller, open_store

    config = tmp_path / "wattkeeper.toml"
    config.write_text(
        "[controller]\nconsolidate = true\ndrain_nodes = true\nconsolidate_min_nodes = 2\n\n"
        '[slo]\nttft_s = "2s"\ntpot_s = "50ms"\n\n[router]\nfile = "'
        + str(tmp_path / "routes.json")
        + '"\n'
    )
    cfg = load_config(config, environ={})
    url = f"sqlite:///{tmp_path / 'w.db'}"
    from wattkeeper.store.db import make_engine, upgrade

    upgrade(make_engine(url))
    controller = make_controller(cfg, open_store(cfg, url))
    assert controller.consolidation is not None
    assert controller.consolidation.settings.min_serving == 2
    config.write_text(
        config.read_text().replace("consolidate_min_nodes = 2", "consolidate_min_nodes = 0")
    )
    with pytest.raises(ConfigError, match="consolidate_min_nodes"):
        load_config(config, environ={})
