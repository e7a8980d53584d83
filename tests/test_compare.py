"""The policy comparison on short runs: the same arrivals for every policy, honest scores."""

import json

import pytest
from typer.testing import CliRunner

from wattkeeper.cli import app
from wattkeeper.simulator.compare import POLICIES, compare, run_policy, to_json
from wattkeeper.simulator.scenario import load_scenario

runner = CliRunner()


@pytest.fixture(scope="module")
def steady():
    return compare(load_scenario("steady-decode"), POLICIES, duration_s=120)


def test_json_contract(steady):
    data = to_json(steady)
    assert data["scenario"] == "steady-decode"
    assert data["budget_w"] == 24000.0
    assert set(data["policies"]) == set(POLICIES)
    for res in data["policies"].values():
        for key in (
            "tokens",
            "tokens_per_s",
            "energy_j",
            "tokens_per_joule",
            "over_budget_s",
            "max_excursion_s",
            "slo_attainment",
            "fraction_of_optimum",
        ):
            assert key in res
    assert data["policies"]["optimum"]["fraction_of_optimum"] == 1.0
    json.dumps(data)


def test_uncapped_breaks_the_budget_and_the_policies_do_not(steady):
    p = steady["policies"]
    assert p["nocap"].over_budget_s > 100
    for name in ("wattkeeper", "optimum", "proportional"):
        assert p[name].over_budget_s <= 2, name
        assert p[name].tokens_per_joule > p["nocap"].tokens_per_joule


def test_policies_see_the_same_arrivals():
    sc = load_scenario("steady-decode")
    a = run_policy(sc, "nocap", duration_s=30)
    b = run_policy(sc, "nocap", duration_s=30)
    assert a.tokens == b.tokens and a.energy_j == b.energy_j


def test_tight_budget_draining_beats_capping_everyone():
    res = compare(load_scenario("tight-budget"), ("uniform", "optimum"), duration_s=400)
    p = res["policies"]
    # every GPU at its floor is still over this budget: only draining can meet it
    assert p["uniform"].over_budget_s == 400
    assert p["optimum"].over_budget_s < 200
    assert p["optimum"].tokens > p["uniform"].tokens


def test_cli_compare_json_and_report(tmp_path):
    r = runner.invoke(
        app,
        [
            "simulate",
            "hetero",
            "--compare",
            "--duration",
            "60s",
            "--policy",
            "uniform",
            "--policy",
            "wattkeeper",
            "-o",
            "json",
            "--report",
            str(tmp_path / "rep"),
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert set(data["policies"]) == {"uniform", "wattkeeper"}
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| wattkeeper |" in report
    for png in ("power.png", "tokens.png", "tokens_per_joule.png", "policies.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000


def test_cli_list_and_bad_input():
    r = runner.invoke(app, ["simulate", "list"])
    assert r.exit_code == 0 and "tight-budget" in r.stdout
    r = runner.invoke(app, ["simulate", "run", "no-such-scenario"])
    assert r.exit_code == 2 and "no-such-scenario" in r.output
    r = runner.invoke(app, ["simulate", "run", "hetero", "--policy", "greedy"])
    assert r.exit_code == 2 and "unknown policy" in r.output
