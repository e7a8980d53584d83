"""Budget domains below the facility (room, PDU, rack): the plan on hand-made inputs,
the configuration's refusals, the CLI, and a rack budget held on the simulated facility."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wattkeeper.cli import app
from wattkeeper.clock import SimClock
from wattkeeper.config import ConfigError, load_config
from wattkeeper.policies.plan import Domain, PlanGpu, PlanNode, PlanSettings, plan
from wattkeeper.runtime import build_simulated, open_store
from wattkeeper.simulator.facility import FacilitySpec
from wattkeeper.store.db import make_engine, upgrade

S = PlanSettings(margin_ratio=0.0, non_gpu_w_per_gpu_w=0.0)


def gpus(node: str, n: int = 4) -> list[PlanGpu]:
    return [
        PlanGpu(f"{node}-{i}", node, 200.0, 700.0, 690.0, 700.0, None, 1.0, True) for i in range(n)
    ]


def nodes(*names: str) -> list[PlanNode]:
    return [PlanNode(name, 1000.0, 1.0) for name in names]


def limits(p, node: str) -> list[float]:
    return [t.power_limit_w for t in p.targets if t.uuid.startswith(f"{node}-")]


def test_a_rack_budget_holds_its_nodes_and_the_facility_gives_the_rest_to_others() -> None:
    rack = [Domain("rack-a", "facility", 3000.0, ("a",))]
    p = plan(nodes("a", "b"), gpus("a") + gpus("b"), 8000.0, S, rack)
    # Rack a: 3 kW less its node's 1 kW of host = 500 W per GPU; the facility's 8 kW
    # less 2 kW of hosts and rack a's 2 kW leaves b 1 kW per GPU, capped at 700 W.
    assert limits(p, "a") == [500.0] * 4 and limits(p, "b") == [700.0] * 4
    assert all("rack-a" in t.reason for t in p.targets if t.uuid.startswith("a-"))
    # Without the rack both share evenly.
    even = plan(nodes("a", "b"), gpus("a") + gpus("b"), 8000.0, S)
    assert limits(even, "a") == limits(even, "b") == [750.0 - 50.0] * 4


def test_nested_domains_each_hold_and_a_hopeless_one_sits_at_the_floor() -> None:
    tree = [
        Domain("room", "facility", 5000.0, ()),
        Domain("rack-a", "room", None, ("a",)),
        Domain("rack-b", "room", 1500.0, ("b",)),
    ]
    p = plan(nodes("a", "b", "c"), gpus("a") + gpus("b") + gpus("c"), 20_000.0, S, tree)
    # rack-b: 1.5 kW cannot pay its 1 kW host and four 200 W floors: held at the floor.
    assert limits(p, "b") == [200.0] * 4 and not p.feasible
    assert "rack-b" in p.explanation
    # The room pays a's host, b's host and floors: a gets (5000 - 2000 - 800) / 4.
    # (whole watts, rounded down: never a fraction above what fits)
    assert limits(p, "a") == pytest.approx([(5000 - 2000 - 800) / 4] * 4, abs=1.0)
    assert sum(limits(p, "a")) <= 5000 - 2000 - 800
    assert limits(p, "c") == [700.0] * 4  # outside the room, under the roomy facility


def test_a_rack_pays_for_the_host_power_its_gpus_rise_brings() -> None:
    """Host power rises 0.2 W per watt the GPUs rise: the rack's limit holds after it."""
    k = 0.2
    settings = PlanSettings(margin_ratio=0.0, non_gpu_w_per_gpu_w=k)
    node = [PlanNode("a", 2000.0, 1.0)]
    light = [PlanGpu(f"a-{i}", "a", 200.0, 700.0, 375.0, 700.0, None, 1.0, False) for i in range(8)]
    p = plan(node, light, None, settings, [Domain("rack", "facility", 10_000.0, ("a",))])
    gpu_w = sum(limits(p, "a"))
    assert gpu_w + 2000.0 + k * (gpu_w - 3000.0) <= 10_000.0 + 1e-6
    assert gpu_w > 3000.0  # and it still gave them room to rise


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[[budget.domains]]\nname = "r1"\nparent = "room-9"\n', "unknown parent 'room-9'"),
        (
            '[[budget.domains]]\nname = "a"\nparent = "b"\n'
            '[[budget.domains]]\nname = "b"\nparent = "a"\n',
            "cycle",
        ),
        (
            '[[budget.domains]]\nname = "a"\nnodes = ["n1"]\n'
            '[[budget.domains]]\nname = "b"\nnodes = ["n1"]\n',
            "node 'n1' is in budget domains 'a' and 'b'",
        ),
        ('[[budget.domains]]\nname = "facility"\n', "root of the budget tree"),
        ('[[budget.domains]]\nname = "r1"\nlimit = "-4kW"\n', "limit"),
        ('[[budget.domains]]\nname = "r1"\nlimit = "40"\n', "give a unit"),
        ('[[budget.domains]]\nname = "r1"\nlimit = 40\n', "with a unit"),
    ],
)
def test_a_bad_tree_in_the_config_is_refused_by_name(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "wattkeeper.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=says):
        load_config(path, environ={})


TREE = """
[[budget.domains]]
name = "room-1"
limit = "30kW"

[[budget.domains]]
name = "rack-a"
parent = "room-1"
limit = "6kW"
nodes = ["sim-node-0"]
"""


@pytest.mark.parametrize("facility_w", [40_000.0, None])
def test_a_rack_budget_is_held_on_the_simulated_facility_and_shown_as_a_tree(
    tmp_path: Path, sqlite_url: str, facility_w: float | None
) -> None:
    """With or without a facility budget: a rack's limit alone is enforced too."""
    config = tmp_path / "wattkeeper.toml"
    config.write_text(TREE)
    cfg = load_config(config, environ={})
    upgrade(make_engine(sqlite_url))
    store = open_store(cfg, sqlite_url)
    start = 30_000.0
    rt = build_simulated(cfg, store, FacilitySpec(2, 8), SimClock(start))
    if facility_w is not None:
        store.set_budget(facility_w, "test", start)
    f = rt.facility
    node_w = []
    for k in range(1, 91):
        rt.advance(start + k)
        gpu = f.power_avg_1s()
        node_w.append(float(gpu[:8].sum() + f.host_power[0]))
    assert max(node_w[15:]) <= 6000.0  # after the first control periods
    assert max(node_w[:5]) > 6000.0  # it did have to be held
    runner = CliRunner()
    base = ["--db", sqlite_url, "--config", str(config)]
    r = runner.invoke(app, ["budget", "show", "-o", "json", *base])
    assert r.exit_code == 0, r.output
    rack = next(d for d in json.loads(r.stdout)["domains"] if d["name"] == "rack-a")
    assert rack["parent"] == "room-1" and rack["in_force_w"] == 6000.0
    assert 0 < rack["power_w"] <= 6000.0 and rack["headroom_w"] == pytest.approx(
        6000.0 - rack["power_w"], abs=0.2
    )
    r = runner.invoke(app, ["explain", "budget", "rack-a", "-o", "json", *base])
    assert r.exit_code == 0, r.output
    explained = json.loads(r.stdout)
    assert explained["from"] == "configuration" and explained["nodes"] == ["sim-node-0"]
    assert len(explained["gpus_held"]) == 8  # the rack holds every GPU of its node
    assert all(u.startswith("GPU-") for u in explained["gpus_held"])
    # What 100 W more or less on the rack would give: the planner run again on the
    # store's snapshot. Its GPUs take most of the watts (the rest is the host power they
    # bring and the margin), and the tokens follow at the node's measured tokens per J.
    more, less = explained["what_if"]
    assert more["budget_change_w"] == 100.0 and 60.0 <= more["gpu_limits_w"] <= 100.0
    assert -100.0 <= less["gpu_limits_w"] <= -60.0
    assert more["tokens_per_s"] > 0 > less["tokens_per_s"]
    facility = json.loads(runner.invoke(app, ["explain", "budget", "-o", "json", *base]).stdout)
    if facility_w is None:
        assert facility["what_if"] is None  # no budget to move
    else:  # 40 kW holds nothing: a watt more or less changes no limit
        assert [c["gpu_limits_w"] for c in facility["what_if"]] == [0.0, 0.0]
    text = runner.invoke(app, ["explain", "budget", "rack-a", *base]).stdout
    assert "+100 W: GPU limits +" in text and "tokens/s" in text
    r = runner.invoke(app, ["budget", "set", "rack-a", "5kW", *base])
    assert r.exit_code == 0 and "rack-a budget: 5.00 kW (was 6.00 kW)" in r.output
    assert store.budgets()["rack-a"] == 5000.0
    r = runner.invoke(app, ["budget", "set", "rack-z", "5kW", *base])
    assert r.exit_code == 1 and "unknown budget domain 'rack-z'" in r.output
    rt.store.engine.dispose()
