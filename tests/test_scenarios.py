"""The packaged scenarios load, run, need capping, and the loader refuses bad files clearly."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from wattkeeper.collectors.tokens import parse_page
from wattkeeper.simulator.facility import SimFacility
from wattkeeper.simulator.scenario import list_scenarios, load_scenario, parse_scenario
from wattkeeper.simulator.server import make_server

T0 = 2_000_000.0
NAMES = [name for name, _ in list_scenarios()]


def test_the_standard_set_is_there_and_says_why():
    expected = {
        "steady-decode",
        "mixed",
        "disaggregated",
        "diurnal",
        "demand-response",
        "hetero",
        "node-failure",
        "tight-budget",
        "bursty",
        "oversubscription",
    }
    assert expected <= set(NAMES)
    for name, description in list_scenarios():
        assert len(description) > 80, name


@pytest.mark.parametrize("name", NAMES)
def test_scenario_loads_runs_and_serves(name):
    scenario = load_scenario(name)
    assert scenario.name == name
    assert scenario.duration_s == 3600
    assert 24 <= scenario.n_gpus <= 40
    assert scenario.budget_schedule, "every standard scenario has a budget"
    f = SimFacility(scenario, start_ts=T0)
    f.advance_to(T0 + 30)
    assert f.stats.generated_tokens > 0 and f.stats.requests_finished > 0
    assert len(f.stats.second_power_w) == 30
    for node in range(f.n_nodes):
        server = make_server(f, node, lambda: f.now)
        reading = parse_page(server.render(), server.kind)
        assert reading.errors == ()
        assert sum(s.requests_running for s in reading.series) > 0


@pytest.mark.parametrize("name", NAMES)
def test_uncapped_demand_exceeds_the_budget_for_part_of_the_run(name):
    scenario = load_scenario(name)
    f = SimFacility(scenario, start_ts=T0)
    times = np.arange(0.0, scenario.duration_s, 150.0)
    over = [f.demand_power_w(T0 + t) - f.budget_at(T0 + t) for t in times]
    assert max(over) > 1000.0, f"{name}: the budget never binds"


def test_oversubscription_budget_is_the_peak_of_four_uncapped_nodes():
    """The scenario's claim: its budget is what four uncapped nodes draw at their peak on
    the same load, which five nodes then have to share."""
    from dataclasses import replace

    sc = load_scenario("oversubscription")
    four = replace(sc, fleet=(replace(sc.fleet[0], count=4),), budget_schedule=())
    f = SimFacility(four, start_ts=T0)
    f.advance_to(T0 + 60)
    peak = max(f.stats.second_power_w)
    assert sc.budget_at(0.0) == pytest.approx(peak, rel=0.005)
    assert sc.fleet[0].count == 5


def test_tight_budget_needs_a_drain():
    """Floor caps everywhere still break the budget; one node drained and the rest capped
    to fit stays under it with more tokens than the floor-capped four."""
    scenario = load_scenario("tight-budget")
    budget = scenario.budget_at(0.0)
    floor = SimFacility(scenario, start_ts=T0)
    floor.limit_requested[:] = 200.0
    drained = SimFacility(scenario, start_ts=T0)
    drained.set_drained(3, True)
    drained.limit_requested[:] = 275.0
    floor.advance_to(T0 + 150)
    drained.advance_to(T0 + 150)
    assert drained.node_state(3) == "standby"
    floor_w = np.mean(floor.stats.second_power_w[-30:])
    drained_w = np.mean(drained.stats.second_power_w[-30:])
    assert floor_w > budget
    assert drained_w <= budget
    floor_tokens = np.mean(floor.stats.second_tokens[-30:])
    drained_tokens = np.mean(drained.stats.second_tokens[-30:])
    assert drained_tokens > 1.5 * floor_tokens


def test_node_failure_scenario_fails_the_node_on_time():
    scenario = load_scenario("node-failure")
    f = SimFacility(scenario, start_ts=T0)
    f.advance_to(T0 + 899)
    assert f.node_alive.all()
    f.advance_to(T0 + 901)
    assert not f.node_alive[1] and f.stats.requests_requeued > 100


def test_demand_response_budget_drops_and_recovers():
    scenario = load_scenario("demand-response")
    assert [scenario.budget_at(t) for t in (0, 1199, 1200, 2399, 2400)] == [
        32000,
        32000,
        18000,
        18000,
        32000,
    ]


def test_a_scenario_file_by_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        'description = "x"\n[slo]\nttft_s = 1\ntpot_s = 0.05\n'
        "[[fleet]]\ncount = 1\ngpus_per_node = 2\n"
        '[[workload]]\nmodel = "llama-8b"\nrate_per_s = 5\n'
        "prompt = { mean = 100 }\noutput = { mean = 100 }\n"
    )
    scenario = load_scenario(path)
    assert scenario.name == "mine" and scenario.n_gpus == 2
    assert scenario.budget_at(10.0) is None
    assert scenario.fleet[0].host == "dgx-h100" and scenario.fleet[0].server == "vllm"


# -- strict loading ----------------------------------------------------------------------
GOOD = """
[slo]
ttft_s = 1.0
tpot_s = 0.05
[budget]
watts = 9000
[[fleet]]
count = 1
gpus_per_node = 8
model = "llama-70b"
[[workload]]
model = "llama-70b"
rate_per_s = 5
prompt = { mean = 500 }
output = { mean = 200 }
"""


def parse(text: str):
    return parse_scenario(tomllib.loads(text), "bad.toml", "bad")


def test_good_text_parses():
    s = parse(GOOD)
    assert s.fleet[0].model == "llama-70b" and s.budget_at(0) == 9000


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("rate_per_s = 5", "rate_per_s = 5\nrate_per_sec = 5"),
            "workload[0].rate_per_sec: unknown key",
        ),
        (("count = 1", "count = 1\ngpu_per_node = 8"), "fleet[0].gpu_per_node: unknown key"),
        (("[budget]", "budgte = 1\n[budget]"), "budgte: unknown key"),
        (("count = 1", 'count = "one"'), "fleet[0].count: expected an integer, got a string"),
        (("rate_per_s = 5", "rate_per_s = true"), "workload[0].rate_per_s: expected a number"),
        (("ttft_s = 1.0", 'ttft_s = "fast"'), "slo.ttft_s: expected a number"),
        (("prompt = { mean = 500 }", "prompt = { mean = 500, sd = 1 }"), "prompt.sd: unknown key"),
        (
            ("gpus_per_node = 8", "gpus_per_node = 6"),
            "fleet[0].gpus_per_node: llama-70b runs on groups of 4",
        ),
        (
            ('model = "llama-70b"\n[[workload]]', 'model = "llama-7b"\n[[workload]]'),
            "fleet[0].model: unknown value",
        ),
        (("watts = 9000", "watts = -1"), "budget.watts: must be above 0"),
        (
            ("watts = 9000", "schedule = [[0, 9000], [0, 8000]]"),
            "budget.schedule[1]: times must increase",
        ),
        (
            ("watts = 9000", "schedule = [[0, 9000, 1]]"),
            "budget.schedule[0]: expected [time_s, watts]",
        ),
        (
            ("[slo]", "[[events]]\nat_s = 5\nnode = 3\nkind = 'fail'\n[slo]"),
            "events[0].node: the fleet has nodes 0..0",
        ),
        (
            ("[slo]", "[[events]]\nat_s = 5\nnode = 0\nkind = 'explode'\n[slo]"),
            "events[0].kind: unknown value",
        ),
        (("output = { mean = 200 }", ""), "workload[0].output: missing"),
        (("[slo]", "[cost]\npue = 1.2\n[slo]"), "cost.price_per_kwh: set price_per_kwh or"),
        (
            ("[slo]", "[cost]\nhourly_price_per_kwh = [0.1, 0.2]\n[slo]"),
            "cost.hourly_price_per_kwh: 24 prices",
        ),
        (("[slo]", "[cost]\nprice_per_kwh = 0.1\npue = 0.5\n[slo]"), "cost.pue: must be at"),
        (("[slo]", "[cost]\nprice_per_kwh = 0.1\ntax = 2\n[slo]"), "tax"),
    ],
)
def test_bad_files_name_the_key(change, message):
    old, new = change
    assert old in GOOD
    with pytest.raises(ValueError) as err:
        parse(GOOD.replace(old, new, 1))
    assert str(err.value).startswith("bad.toml: ")
    assert message in str(err.value)


def test_unknown_scenario_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown scenario 'steady'.*steady-decode"):
        load_scenario("steady")


def test_a_workload_for_a_model_nobody_serves():
    with pytest.raises(ValueError, match="no node group of the fleet serves llama-8b"):
        parse(GOOD.replace('model = "llama-70b"\nrate_per_s', 'model = "llama-8b"\nrate_per_s'))


def test_disaggregated_needs_both_pools():
    with pytest.raises(ValueError, match="no decode node group"):
        parse(GOOD.replace("count = 1\n", 'count = 1\nrole = "prefill"\n', 1))
