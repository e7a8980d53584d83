"""Drains: the decision rule, the command actuator against real processes, a person's
drain through the CLI, and the controller draining on the simulated facility."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wattkeeper.cli import app
from wattkeeper.collectors.drain import CommandDrain, DrainError
from wattkeeper.policies.drain import DrainNode, DrainSettings, decide, need_w
from wattkeeper.simulator.compare import run_policy
from wattkeeper.simulator.scenario import load_scenario

S = DrainSettings(serve_share=0.15, hold_s=300.0, drained_node_w=150.0)


def node(name: str, tps: float = 1000.0, drained: bool = False, person: bool = False) -> DrainNode:
    # 8 GPUs of 200-700 W: serving usefully needs 8 x 275 W + 2 kW of host = 4.2 kW.
    return DrainNode(name, drained, person, 1600.0, 5600.0, 2000.0, tps, 4000.0)


def test_a_budget_that_cannot_serve_everyone_drains_the_least_efficient_first() -> None:
    nodes = [node("a", 1200), node("b", 800), node("c", 1000), node("d", 1100)]
    assert need_w(nodes, {"a", "b", "c", "d"}, S) == pytest.approx(4 * 4200)
    # Three serving and one in standby need 3 x 4.2 kW + 150 W = 12.75 kW.
    out = decide(nodes, 12_800.0, now=0.0, last_change_ts=float("-inf"), s=S)
    assert [(d.name, d.drain) for d in out] == [("b", True)]
    out = decide(nodes, 12_000.0, now=0.0, last_change_ts=float("-inf"), s=S)
    assert [d.name for d in out] == ["b", "c"]
    assert decide(nodes, 17_000.0, now=0.0, last_change_ts=float("-inf"), s=S) == []


def test_a_node_whose_tokens_are_unknown_is_drained_last() -> None:
    nodes = [node("blind", tps=0.0), node("slow", 500.0), node("fast", 1500.0)]
    nodes[0] = DrainNode("blind", False, False, 1600.0, 5600.0, 2000.0, None, 4000.0)
    out = decide(nodes, 8_600.0, now=0.0, last_change_ts=float("-inf"), s=S)
    assert [d.name for d in out] == ["slow"]


def test_a_node_too_big_to_return_does_not_block_one_that_fits() -> None:
    big = DrainNode("a-big", True, False, 3200.0, 11200.0, 4000.0, 1.0, 1.0)
    nodes = [node("serving"), big, node("b-small", drained=True)]
    usable = 1.1 * need_w(nodes, {"serving", "b-small"}, S) + 1.0
    out = decide(nodes, usable, now=400.0, last_change_ts=0.0, s=S)
    assert [(d.name, d.drain) for d in out] == [("b-small", False)]


def test_the_last_serving_node_is_never_drained() -> None:
    nodes = [node("a"), node("b", drained=True)]
    assert decide(nodes, 100.0, now=0.0, last_change_ts=float("-inf"), s=S) == []


def test_undrain_waits_for_the_hold_and_headroom_and_never_undoes_a_person() -> None:
    nodes = [node("a"), node("b", drained=True), node("c", drained=True, person=True)]
    roomy = 20_000.0
    assert decide(nodes, roomy, now=100.0, last_change_ts=0.0, s=S) == []  # within the hold
    out = decide(nodes, roomy, now=400.0, last_change_ts=0.0, s=S)
    assert [(d.name, d.drain) for d in out] == [("b", False)]  # one at a time, not c
    # b fits only without the 10% headroom: it stays drained.
    tight = 1.05 * need_w(nodes, {"a", "b"}, S)
    assert decide(nodes, tight, now=400.0, last_change_ts=0.0, s=S) == []
    only_person = [node("a"), node("c", drained=True, person=True)]
    assert decide(only_person, roomy, now=400.0, last_change_ts=0.0, s=S) == []


def _recorder(tmp_path: Path, what: str, code: int = 0) -> str:
    log = tmp_path / "calls.log"
    script = (
        f"import sys; open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n'); "
        f"sys.exit({code})"
    )
    return shlex.join([sys.executable, "-c", script, what, "NodeName={node}"])


def test_command_drain_runs_the_templates_with_the_node_name(tmp_path: Path) -> None:
    drain = CommandDrain("gpu-17", _recorder(tmp_path, "DRAIN"), _recorder(tmp_path, "RESUME"))
    drain.set_drained(True)
    drain.set_drained(False)
    assert (tmp_path / "calls.log").read_text().splitlines() == [
        "DRAIN NodeName=gpu-17",
        "RESUME NodeName=gpu-17",
    ]


def test_a_failing_drain_command_says_what_ran_and_how_it_failed(tmp_path: Path) -> None:
    drain = CommandDrain("n1", _recorder(tmp_path, "DRAIN", code=3), "true")
    with pytest.raises(DrainError, match=r"exited 3"):
        drain.set_drained(True)
    missing = CommandDrain("n1", "/nonexistent/scontrol update", "true")
    with pytest.raises(DrainError, match="/nonexistent/scontrol"):
        missing.set_drained(True)


def test_a_person_drains_and_resumes_through_the_cli(sqlite_url: str) -> None:
    from wattkeeper.store.db import make_engine, upgrade
    from wattkeeper.store.repository import Store

    upgrade(make_engine(sqlite_url))
    store = Store(make_engine(sqlite_url))
    store.register_node("gpu-3", "sim", [], 1000.0)
    runner = CliRunner()
    r = runner.invoke(app, ["node", "drain", "gpu-3", "--db", sqlite_url])
    assert r.exit_code == 0 and "gpu-3: drained" in r.stdout
    view = store.snapshot(1000.0).nodes[0]
    assert view.drained and view.drained_by not in (None, "controller")
    r = runner.invoke(app, ["node", "drain", "nope", "--db", sqlite_url])
    assert r.exit_code == 1 and "no node named 'nope'" in r.output
    r = runner.invoke(app, ["node", "resume", "gpu-3", "--db", sqlite_url])
    assert r.exit_code == 0 and not store.snapshot(1000.0).nodes[0].drained
    assert [e.action for e in store.audit_log(5)][:2] == ["node.undrain", "node.drain"]


def test_the_controller_drains_to_meet_a_budget_capping_cannot() -> None:
    """Four busy nodes under a budget below their floors: capping alone is over budget
    all the time (the policy before drains); with drains the facility complies within
    the time a node takes to empty, and serves."""
    sc = load_scenario("tight-budget")
    res = run_policy(sc, "wattkeeper", duration_s=360)
    # Capping alone cannot comply, and letting the drained nodes' requests finish kept
    # the facility over for 97 s: their drains end now. Over for the first control
    # period only (the caps and drains of t=0 reach the GPUs a sample later).
    assert res.max_excursion_s <= 2 and res.over_budget_s <= 2
    assert res.goodput_tokens > 0


def test_a_hung_drain_command_never_holds_up_the_agent(tmp_path: Path, sqlite_url: str) -> None:
    """The drain command blocks until the test lets it go: meanwhile the agent keeps
    ticking (sampling, reconciling); once it finishes, the next tick records it. A
    failing command is said once, however many ticks retry it."""
    import time

    from wattkeeper.clock import SimClock
    from wattkeeper.config import load_config
    from wattkeeper.runtime import build_simulated, open_store
    from wattkeeper.simulator.facility import FacilitySpec
    from wattkeeper.store.db import make_engine, upgrade

    upgrade(make_engine(sqlite_url))
    cfg = load_config(None, environ={})
    store = open_store(cfg, sqlite_url)
    rt = build_simulated(cfg, store, FacilitySpec(1, 2), SimClock(1000.0))
    agent = rt.agents[0]
    gate = tmp_path / "go"
    wait = f"import os, sys, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.05)\n"
    agent.drain = CommandDrain(
        agent.node, shlex.join([sys.executable, "-c", wait]), "true", timeout_s=120
    )
    t = 1000.0
    agent.tick(t)
    store.set_drained(agent.node, True, "cli:root", t)
    for _ in range(3):
        t += 1
        agent.tick(t)  # returns although the command is still waiting
    assert agent.state.tick_ts == t and agent._drain_job is not None
    assert "node.drain.applied" not in [e.action for e in store.audit_log(50)]
    gate.touch()
    deadline = time.monotonic() + 60
    while agent._drain_job is not None and time.monotonic() < deadline:
        t += 1
        agent.tick(t)
        time.sleep(0.05)
    t += 1
    agent.tick(t)  # the outcome is audited with the next store round trip
    assert [e.action for e in store.audit_log(50)].count("node.drain.applied") == 1

    agent.drain = CommandDrain(agent.node, "true", _recorder(tmp_path, "RESUME", code=2))
    store.set_drained(agent.node, False, "cli:root", t)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        t += 40  # past the retry wait each time: the command runs again
        agent.tick(t)
        time.sleep(0.05)
        if (tmp_path / "calls.log").exists() and len(
            (tmp_path / "calls.log").read_text().splitlines()
        ) >= 3:
            break
    agent.tick(t + 1)
    assert len((tmp_path / "calls.log").read_text().splitlines()) >= 3  # retried
    assert [e.action for e in store.audit_log(100)].count("node.drain.failed") == 1  # said once
    agent.shutdown(t + 2)
    rt.store.engine.dispose()


def test_a_drain_made_now_is_marked_for_its_agent_and_cleared_with_the_drain(
    sqlite_url: str,
) -> None:
    """`node drain --now` marks the drain; the agent reads the mark with its orders; the
    controller never hurries a person's drain nor a node in service; a resume clears it."""
    from wattkeeper.store.db import make_engine, upgrade
    from wattkeeper.store.repository import Store

    upgrade(make_engine(sqlite_url))
    store = Store(make_engine(sqlite_url))
    store.register_node("gpu-3", "sim", [], 1000.0)
    store.register_node("gpu-4", "sim", [], 1000.0)
    assert not store.drain_now("gpu-4", "controller", 1000.0)  # in service: nothing to hurry
    runner = CliRunner()
    r = runner.invoke(app, ["node", "drain", "gpu-3", "--now", "--db", sqlite_url])
    assert r.exit_code == 0 and "gpu-3: drained, marked to end now" in r.stdout
    assert store.orders_for_node("gpu-3") == ({}, True, True)
    assert store.snapshot(1000.0).nodes[0].drain_now
    import json

    shown = runner.invoke(app, ["explain", "node", "gpu-3", "--db", sqlite_url, "-o", "json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["drain_now"] is True
    shown = runner.invoke(app, ["explain", "node", "gpu-3", "--db", sqlite_url])
    assert "(drain now)" in shown.stdout
    assert [e.action for e in store.audit_log(2)] == ["node.drain.now", "node.drain"]
    store.set_drained("gpu-4", True, "cli:root", 1000.0)
    assert not store.drain_now("gpu-4", "controller", 1000.0, only_own=True)  # a person's
    assert not store.orders_for_node("gpu-4").drain_now
    r = runner.invoke(app, ["node", "resume", "gpu-3", "--db", sqlite_url])
    assert r.exit_code == 0
    assert store.orders_for_node("gpu-3") == ({}, False, False)
    store.set_drained("gpu-3", True, "controller", 1001.0)
    assert not store.orders_for_node("gpu-3").drain_now  # a new drain starts at its pace


def test_the_agent_runs_the_drain_now_command_once_after_the_drain(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Against real processes: the drain command, then (marked now) the drain-now command
    once however many ticks follow; a resume and a plain drain run only theirs. An
    actuator that cannot end a drain now says so once and leaves the drain to finish."""
    import time

    from wattkeeper.clock import SimClock
    from wattkeeper.config import load_config
    from wattkeeper.runtime import build_simulated, open_store
    from wattkeeper.simulator.facility import FacilitySpec
    from wattkeeper.store.db import make_engine, upgrade

    upgrade(make_engine(sqlite_url))
    cfg = load_config(None, environ={})
    store = open_store(cfg, sqlite_url)
    rt = build_simulated(cfg, store, FacilitySpec(1, 2), SimClock(1000.0))
    agent = rt.agents[0]
    agent.drain = CommandDrain(
        agent.node,
        _recorder(tmp_path, "DRAIN"),
        _recorder(tmp_path, "RESUME"),
        drain_now=_recorder(tmp_path, "NOW"),
    )
    calls = tmp_path / "calls.log"
    t = [1000.0]

    def ticks_until(n_calls: int) -> list[str]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            t[0] += 1
            agent.tick(t[0])
            lines = calls.read_text().splitlines() if calls.exists() else []
            if len(lines) >= n_calls and agent._drain_job is None:
                break
            time.sleep(0.02)
        for _ in range(3):  # and nothing more runs
            t[0] += 1
            agent.tick(t[0])
        while agent._drain_job is not None and time.monotonic() < deadline:
            time.sleep(0.02)
            t[0] += 1
            agent.tick(t[0])
        return calls.read_text().splitlines()

    agent.tick(t[0])
    store.set_drained(agent.node, True, "controller", t[0])
    store.drain_now(agent.node, "controller", t[0])
    assert ticks_until(2) == ["DRAIN NodeName=sim-node-0", "NOW NodeName=sim-node-0"]
    # Resumed and drained again between two of its reads: the agent sees a drain not
    # (yet) marked now, and hurries it afresh when it is.
    store.set_drained(agent.node, False, "controller", t[0])
    store.set_drained(agent.node, True, "controller", t[0])
    assert len(ticks_until(2)) == 2
    store.drain_now(agent.node, "controller", t[0])
    assert ticks_until(3)[2:] == ["NOW NodeName=sim-node-0"]
    store.set_drained(agent.node, False, "controller", t[0])
    assert ticks_until(4)[3:] == ["RESUME NodeName=sim-node-0"]
    store.set_drained(agent.node, True, "controller", t[0])  # a drain at its own pace
    assert ticks_until(5)[4:] == ["DRAIN NodeName=sim-node-0"]
    actions = [e.action for e in store.audit_log(100)]
    assert actions.count("node.drain.now.applied") == 2

    agent.drain = CommandDrain(agent.node, "true", "true")  # no drain-now command
    store.drain_now(agent.node, "controller", t[0])
    for _ in range(4):
        t[0] += 1
        agent.tick(t[0])
    actions = [e.action for e in store.audit_log(100)]
    assert actions.count("node.drain.now.unsupported") == 1
    assert actions.count("node.drain.now.applied") == 2
    agent.shutdown(t[0] + 1)
    rt.store.engine.dispose()


def test_the_controller_ends_its_own_drains_now_and_never_a_persons(tmp_path: Path) -> None:
    """Tight-budget's four busy nodes, one drained by a person first (at its own pace):
    the budget is still out of reach with every serving GPU at its floor, so the
    controller drains more and ends its own drains at once; the person's drain is
    never hurried, and once the facility complies no drain is hurried again."""
    from wattkeeper.simulator.compare import START_TS, Wattkeeper
    from wattkeeper.simulator.facility import SimFacility

    sc = load_scenario("tight-budget")
    f = SimFacility(sc, start_ts=START_TS)
    policy = Wattkeeper(f, store_dir=tmp_path)
    store = policy.rt.store
    try:
        f.advance_to(START_TS)
        policy.step(f, START_TS)
        person = "sim-node-3"
        store.set_drained(person, True, "cli:root", START_TS)
        for k in range(1, 40):
            f.advance_to(START_TS + k)
            policy.step(f, START_TS + k)
        nodes = {v.name: v for v in store.snapshot(START_TS + 40).nodes}
        hurried = [e for e in store.audit_log(500) if e.action == "node.drain.now"]
        assert hurried and person not in {e.subject for e in hurried}
        assert not nodes[person].drain_now and nodes[person].drained_by == "cli:root"
        for e in hurried:
            assert nodes[e.subject].drained_by == "controller" and nodes[e.subject].drain_now
        assert len({e.subject for e in hurried}) == len(hurried)  # each once
        power = f.stats.second_power_w
        assert max(power[10:40]) <= 12000.0  # complying since, the person's node included
    finally:
        policy.close()


def test_a_rack_too_tight_for_its_nodes_drains_one_of_its_own() -> None:
    """Under a budget tree a node drains for the budget that cannot serve it (the least
    efficient of the rack's nodes, not of the facility's), and returns only when every
    budget over it has room: the facility's spare watts do not undo the rack's drain."""
    from wattkeeper.policies.drain import decide_tree

    fleet = [node("a", tps=900.0), node("b", tps=1000.0), node("c", tps=100.0)]
    rack = ("rack-1", 5000.0, {"a", "b"})
    out = decide_tree(fleet, [("facility", 100_000.0, None), rack], 0.0, -1e9, S)
    assert [(d.name, d.drain) for d in out] == [("a", True)]
    assert "budget 'rack-1' 5000 W" in out[0].reason
    drained = [node("a", tps=900.0, drained=True), *fleet[1:]]
    later = 1000.0
    assert decide_tree(drained, [("facility", 100_000.0, None), rack], later, 0.0, S) == []
    wider = ("rack-1", 10_000.0, {"a", "b"})  # both serve at 8.4 kW, with 10% to spare
    back = decide_tree(drained, [("facility", 100_000.0, None), wider], later, 0.0, S)
    assert [(d.name, d.drain) for d in back] == [("a", False)]
    # The rack's own drain first: it alone brings the facility within its budget too,
    # so the facility's pick (c, the least efficient anywhere) is not drained as well.
    both = decide_tree(fleet, [("facility", 12_000.0, None), rack], 0.0, -1e9, S)
    assert [(d.name, d.drain) for d in both] == [("a", True)]
    # Without a facility budget, a node under no limited domain is held by nothing.
    loose = [node("c", drained=True), *fleet[:2]]
    free = decide_tree(loose, [wider], later, 0.0, S)
    assert [(d.name, d.drain) for d in free] == [("c", False)]
    none = decide_tree(loose, [], later, 0.0, S)  # every budget removed
    assert [(d.name, d.drain) for d in none] == [("c", False)]
    assert decide_tree(loose, [], 100.0, 0.0, S) == []  # after the hold only


def test_the_controller_drains_for_a_rack_budget_on_the_simulated_facility(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A rack budget below its node's floors plus host power: capping cannot meet it, so
    the controller drains that node (ending the drain now, since the rack is over) and the
    rack complies; the other node keeps serving."""
    from wattkeeper.clock import SimClock
    from wattkeeper.config import load_config
    from wattkeeper.runtime import build_simulated, open_store
    from wattkeeper.simulator.facility import FacilitySpec
    from wattkeeper.store.db import make_engine, upgrade

    config = tmp_path / "wattkeeper.toml"
    config.write_text(
        '[controller]\ndrain_nodes = true\ndrained_node_w = "150W"\n\n'
        '[[budget.domains]]\nname = "rack-a"\nlimit = "2kW"\nnodes = ["sim-node-0"]\n'
    )
    cfg = load_config(config, environ={})
    upgrade(make_engine(sqlite_url))
    store = open_store(cfg, sqlite_url)
    start = 50_000.0
    rt = build_simulated(cfg, store, FacilitySpec(2, 8), SimClock(start))
    f = rt.facility
    rack_w = []
    for k in range(1, 61):
        rt.advance(start + k)
        rack_w.append(float(f.power_avg_1s()[:8].sum() + f.host_power[0]))
    nodes = {v.name: v for v in store.snapshot(start + 60).nodes}
    assert nodes["sim-node-0"].drained and nodes["sim-node-0"].drained_by == "controller"
    assert not nodes["sim-node-1"].drained
    assert max(rack_w[:3]) > 2000.0  # it had to act
    assert max(rack_w[15:]) <= 2000.0
    reasons = [e.detail.get("reason", "") for e in store.audit_log(200)]
    assert any("budget 'rack-a'" in r for r in reasons)
    rt.store.engine.dispose()
