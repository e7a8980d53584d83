"""The policy comparison on short runs: the same arrivals and rules for every policy,
measures that can tell policies apart, and an oracle that bounds them."""

import json
import tomllib
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from wattkeeper.cli import app
from wattkeeper.simulator.compare import (
    POLICIES,
    PolicySpec,
    compare,
    compliance,
    interval,
    measure_window,
    pick_static,
    run_policy,
    to_json,
    with_budget,
)
from wattkeeper.simulator.scenario import load_scenario, parse_scenario

runner = CliRunner()

REQUIRED_KEYS = (
    "goodput_tokens",
    "tokens",
    "slo_attainment",
    "shed_requests",
    "ttft_p99_s",
    "tpot_p99_s",
    "energy_j",
    "joules_per_good_token",
    "good_tokens_per_joule",
    "over_budget_s",
    "over_budget_ws",
    "max_excursion_s",
)


def small(rate: float, *, tpot_s: float = 0.05, budget: float | None = None, nodes: int = 1):
    text = f"""
seed = 3
duration_s = 600
[slo]
ttft_s = 2.0
tpot_s = {tpot_s}
[[fleet]]
count = {nodes}
gpus_per_node = 8
gpu = "h100"
model = "llama-8b"
max_inflight = 256
server = "vllm"
[[workload]]
model = "llama-8b"
rate_per_s = {rate}
prompt = {{ mean = 250, sigma = 0.9 }}
output = {{ mean = 600, sigma = 0.8 }}
"""
    if budget is not None:
        text += f"[budget]\nwatts = {budget}\n"
    return parse_scenario(tomllib.loads(text), "small", "test")


@pytest.fixture(scope="module")
def steady():
    names = ("nocap", "uniform", "proportional", "wattkeeper")
    return compare(load_scenario("steady-decode"), names, duration_s=120)


def test_json_contract(steady):
    data = to_json(steady)
    assert data["scenario"] == "steady-decode"
    assert data["budget_w"] == 24000.0
    assert data["window_s"] == [12.0, 114.0]
    for res in data["policies"].values():
        for key in REQUIRED_KEYS:
            assert key in res, key
    json.dumps(data)


def test_uncapped_breaks_the_budget_and_the_policies_do_not(steady):
    p = steady["policies"]
    assert p["nocap"].over_budget_s > 100 and p["nocap"].over_budget_ws > 100 * 1000
    for name in ("wattkeeper", "uniform", "proportional"):
        assert p[name].over_budget_s <= 2, name
        assert p[name].good_tokens_per_joule > p["nocap"].good_tokens_per_joule
    # the load is below capacity: every request meets its SLO, none is shed
    assert p["nocap"].slo_attainment == pytest.approx(1.0, abs=1e-3)
    assert p["nocap"].shed_requests == 0


def test_goodput_is_the_output_of_requests_within_slo(steady):
    r = steady["policies"]["nocap"]
    assert 0 < r.goodput_tokens <= r.tokens * 1.05
    # one request's output is about the scenario's mean output (600 tokens)
    assert r.goodput_tokens / r.requests_within_slo == pytest.approx(600, rel=0.1)
    assert r.joules_per_good_token == pytest.approx(r.energy_j / r.goodput_tokens)
    assert 0 < r.ttft_p50_s <= r.ttft_p99_s < 2.0
    assert 0 < r.tpot_p50_s <= r.tpot_p99_s < 0.05


def test_policies_see_the_same_arrivals():
    sc = load_scenario("steady-decode")
    a = run_policy(sc, "nocap", duration_s=30)
    b = run_policy(sc, "nocap", duration_s=30)
    assert a.tokens == b.tokens and a.energy_j == b.energy_j


def test_overload_is_shed_and_attainment_does_not_drift_with_the_run_length():
    """Twice the load one node serves: without the admission rule the router queue grew
    for ever and attainment fell with every minute of the run."""
    sc = small(rate=200.0)
    short = run_policy(sc, "nocap", duration_s=300)
    long = run_policy(sc, "nocap", duration_s=900)
    assert short.shed_requests > 0.3 * 200 * 300
    assert short.slo_attainment == pytest.approx(long.slo_attainment, abs=0.03)
    assert short.goodput_tokens_per_s == pytest.approx(long.goodput_tokens_per_s, rel=0.03)
    assert short.ttft_p99_s <= 2.5


def test_no_goodput_means_null_per_good_token_figures():
    res = run_policy(small(rate=50.0, tpot_s=0.001), "nocap", duration_s=60)
    assert res.goodput_tokens == 0 and res.tokens > 0
    assert res.joules_per_good_token is None
    assert res.good_tokens_per_joule == 0.0
    assert json.loads(json.dumps(res.to_json()))["joules_per_good_token"] is None


def test_a_one_minute_run_has_a_window():
    w0, w1 = measure_window(60.0)
    assert 0 < w0 < w1 < 60.0
    res = run_policy(load_scenario("steady-decode"), "uniform", duration_s=60)
    assert res.goodput_tokens > 0 and res.window_s == (w0, w1)


def test_compliance_counts_seconds_watt_seconds_and_time_to_comply():
    budget = np.array([100.0] * 5 + [50.0] * 10)
    power = np.array([90, 90, 120, 130, 90, 95, 80, 60, 45, 45, 55, 45, 45, 45, 45.0])
    over_s, over_ws, longest, excess, comply = compliance(power, budget)
    assert over_s == 6 and longest == 3
    assert over_ws == pytest.approx(20 + 30 + 45 + 30 + 10 + 5)
    assert excess == 45
    assert comply == 3.0


def test_budget_override_and_none():
    sc = load_scenario("steady-decode")
    assert with_budget(sc, None).budget_at(10.0) is None
    assert with_budget(sc, 30_000.0).budget_at(10.0) == 30_000.0
    res = run_policy(with_budget(sc, None), "uniform", duration_s=30)
    assert res.over_budget_s == 0 and res.time_to_comply_s is None


def test_uniform_counts_measured_host_power_with_the_common_margin():
    sc = with_budget(load_scenario("steady-decode"), 24_000.0)
    res = run_policy(sc, "uniform", duration_s=60)
    # planned on measured power with a 2% margin: close to, never over, the budget
    assert res.over_budget_s == 0
    assert 24_000 * 0.96 < res.mean_power_w < 24_000


def test_static_pick_is_the_most_goodput_then_the_least_energy():
    sc = load_scenario("steady-decode")
    runs = {
        r: run_policy(sc, PolicySpec("static", limit_ratio=r), duration_s=60)
        for r in (0.3, 0.4, 0.5, 0.6, 0.75, 1.0)
    }
    best = pick_static(runs)
    assert runs[1.0].over_budget_s > 10  # uncapped breaks the budget: not eligible
    assert runs[0.75].over_budget_s > 10  # 0.75 x 700 W does not fit 24 kW either
    # 210 and 280 W cannot keep up with the load: they lose goodput
    assert runs[0.3].goodput_tokens < 0.5 * runs[0.6].goodput_tokens
    assert runs[0.4].goodput_tokens < 0.9 * runs[0.6].goodput_tokens
    assert best == 0.5  # as much goodput as 420 W, for less energy
    chosen = runs[best]
    for _r, res in runs.items():
        if res.over_budget_s > 1:
            continue
        assert res.goodput_tokens <= chosen.goodput_tokens * 1.005 + 1
        if res.goodput_tokens >= chosen.goodput_tokens * 0.995:
            assert res.energy_j >= chosen.energy_j


def test_static_lock_sets_a_supported_clock_on_every_gpu():
    sc = load_scenario("hetero")
    from wattkeeper.simulator.compare import START_TS, Static
    from wattkeeper.simulator.facility import SimFacility

    f = SimFacility(sc, start_ts=START_TS)
    Static(PolicySpec("static", lock_ratio=0.6)).step(f, START_TS)
    for g in range(f.n_gpus):
        kind = f.gpu_kind(g)
        assert int(f.clock_lock[g]) in kind.supported_sm_clocks_mhz()
        assert abs(f.clock_lock[g] - 0.6 * kind.max_sm_clock_mhz) <= kind.clock_step_mhz


def test_seeds_give_a_mean_and_a_95_percent_interval():
    res = compare(small(rate=60.0, budget=6000.0), ("uniform",), duration_s=60, seeds=3)
    r = res["policies"]["uniform"]
    assert r.seeds == 3 and res["seeds"] == 3
    lo, hi = r.ci95["goodput_tokens"]
    assert lo <= r.goodput_tokens <= hi and lo < hi
    assert interval([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_runs_in_parallel_give_the_same_numbers():
    sc = small(rate=60.0, budget=6000.0)
    serial = compare(sc, ("nocap", "uniform"), duration_s=40, workers=1)
    parallel = compare(sc, ("nocap", "uniform"), duration_s=40, workers=2)
    for name in ("nocap", "uniform"):
        assert serial["policies"][name].to_json() == parallel["policies"][name].to_json()


def test_demand_response_time_to_comply_is_reported():
    sc = load_scenario("demand-response")
    sc = replace(sc, budget_schedule=((0.0, 32_000.0), (60.0, 18_000.0)))
    fast = run_policy(sc, "uniform", duration_s=120)
    slow = run_policy(sc, "nocap", duration_s=120)
    assert fast.time_to_comply_s is not None and fast.time_to_comply_s <= 6
    assert slow.time_to_comply_s == 60.0  # never complied before the run ended


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
            "--jobs",
            "1",
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
    for png in ("power.png", "goodput.png", "energy_per_good_token.png", "ttft.png", "tpot.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000


def test_cli_budget_override(tmp_path):
    args = ["simulate", "steady-decode", "--policy", "nocap", "--duration", "30s", "-o", "json"]
    none = json.loads(runner.invoke(app, [*args, "--budget", "none"]).stdout)
    assert none["budget_w"] is None and none["policies"]["nocap"]["over_budget_s"] == 0
    low = json.loads(runner.invoke(app, [*args, "--budget", "20kW"]).stdout)
    assert low["budget_w"] == 20_000.0 and low["policies"]["nocap"]["over_budget_s"] == 30
    bad = runner.invoke(app, [*args, "--budget", "20"])
    assert bad.exit_code == 2
    short = runner.invoke(app, [*args[:-4], "--duration", "10s"])
    assert short.exit_code == 2 and "at least 30s" in short.output
    (tmp_path / "afile").write_text("x")
    clash = runner.invoke(app, [*args, "--report", str(tmp_path / "afile")])
    assert clash.exit_code == 2 and "not a directory" in clash.output


def test_cli_list_and_bad_input():
    r = runner.invoke(app, ["simulate", "list"])
    assert r.exit_code == 0 and "tight-budget" in r.stdout and "oversubscription" in r.stdout
    r = runner.invoke(app, ["simulate", "run", "no-such-scenario"])
    assert r.exit_code == 2 and "no-such-scenario" in r.output
    r = runner.invoke(app, ["simulate", "run", "hetero", "--policy", "greedy"])
    assert r.exit_code == 2 and "unknown policy" in r.output
    r = runner.invoke(app, ["simulate", "run", "hetero", "--seeds", "0"])
    assert r.exit_code == 2
    assert set(POLICIES) >= {"nocap", "uniform", "best-static", "best-static-lock", "oracle"}


# -- the oracle in the simulator ---------------------------------------------------------------
@pytest.fixture(scope="module")
def bounded():
    """steady-decode for three minutes: the oracles and a coarse grid of static settings."""
    sc = load_scenario("steady-decode")
    runs = {name: run_policy(sc, name, duration_s=180) for name in ("oracle", "oracle-limits")}
    for r in (0.45, 0.55, 0.65):
        runs[f"limit {r}"] = run_policy(sc, PolicySpec("static", limit_ratio=r), duration_s=180)
    for r in (0.55, 0.7):
        runs[f"lock {r}"] = run_policy(sc, PolicySpec("static", lock_ratio=r), duration_s=180)
    return runs


def test_no_static_setting_beats_the_oracle(bounded):
    best = bounded["oracle"]
    assert best.over_budget_s <= 1
    for name, res in bounded.items():
        if not name.startswith(("limit", "lock")) or res.over_budget_s > 1:
            continue
        assert res.goodput_tokens <= best.goodput_tokens * 1.01, name
        if res.goodput_tokens >= best.goodput_tokens * 0.99:
            assert best.joules_per_good_token <= res.joules_per_good_token * 1.01, name


def test_the_full_oracle_is_at_least_the_limits_only_one(bounded):
    full, limits = bounded["oracle"], bounded["oracle-limits"]
    assert full.goodput_tokens >= limits.goodput_tokens * 0.99
    assert full.joules_per_good_token <= limits.joules_per_good_token * 1.01


def test_the_oracle_realises_what_it_predicts_on_steady_load():
    """Its plan applied to the facility, on a steady load, serves the goodput and draws
    the power it predicted (within 1%)."""
    from wattkeeper.simulator.compare import START_TS, score
    from wattkeeper.simulator.facility import SimFacility
    from wattkeeper.simulator.oracle_policy import OraclePolicy

    sc = load_scenario("steady-decode")
    f = SimFacility(sc, start_ts=START_TS)
    f.measure_from = START_TS + 60
    f.window = (START_TS + 60, START_TS + 234)
    policy = OraclePolicy()
    for k in range(241):
        f.advance_to(START_TS + k)
        policy.step(f, START_TS + k)
    res = score(f, 240.0)
    plan = policy.last
    assert plan is not None and plan.status == "optimal"
    seconds = 234 - 60
    assert res.goodput_tokens / seconds == pytest.approx(plan.good_tokens_per_s, rel=0.01)
    power = np.mean(f.stats.second_power_w[60:234])
    assert power == pytest.approx(plan.facility_power_w, rel=0.01)
    assert res.slo_attainment > 0.99


def test_cost_per_million_good_tokens_follows_the_hourly_price():
    """An hourly tariff: the run starts at 00:00, so a run of under an hour pays hour 0's
    price; the cost is IT energy x PUE x price, per million good tokens, also over seeds
    and for the oracle's bound. Without a price there is no cost figure."""
    from wattkeeper.simulator.scenario import EnergyPrice

    price = EnergyPrice(tuple([0.3] + [9.0] * 23), pue=1.25)
    assert list(price.at(np.array([0, 3599, 3600, 86400 + 10]))) == [0.3, 0.3, 9.0, 0.3]
    sc = replace(small(rate=40.0, budget=6000.0), price=price)
    res = compare(sc, ("uniform", "oracle-limits"), duration_s=60, seeds=2)
    for name in ("uniform", "oracle-limits"):
        r = res["policies"][name]
        expected = r.energy_j * 1.25 * 0.3 / 3.6e6
        assert r.energy_cost == pytest.approx(expected, rel=1e-6)
        assert r.cost_per_million_good_tokens == pytest.approx(
            expected / r.goodput_tokens * 1e6, rel=1e-6
        )
    plain = run_policy(small(rate=40.0), "nocap", duration_s=60)
    assert plain.energy_cost is None and plain.cost_per_million_good_tokens is None


def test_a_policy_spec_passes_configuration_to_the_production_policy():
    """``PolicySpec.settings`` reach the controller's configuration on top of the
    scenario's own (its SLO stays), and a wrong key is refused like a wrong config file."""
    from wattkeeper.config import ConfigError
    from wattkeeper.simulator.compare import START_TS, make_policy
    from wattkeeper.simulator.facility import SimFacility

    sc = load_scenario("mixed")
    spec = PolicySpec("wattkeeper", settings=(("controller.oversubscribe", "true"),))
    pol = make_policy(spec, SimFacility(sc, start_ts=START_TS))
    try:
        assert pol.rt.cfg.controller.oversubscribe is True
        assert pol.rt.cfg.slo.tpot_s == sc.slo.tpot_s
    finally:
        pol.close()
    plain = make_policy(PolicySpec("wattkeeper"), SimFacility(sc, start_ts=START_TS))
    try:
        assert plain.rt.cfg.controller.oversubscribe is False
    finally:
        plain.close()
    with pytest.raises(ConfigError, match="oversubscrib"):
        make_policy(
            PolicySpec("wattkeeper", settings=(("controller.oversubscribe", "maybe"),)),
            SimFacility(sc, start_ts=START_TS),
        )
