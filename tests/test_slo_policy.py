"""Latency ceilings (policies/slo.py): each rule on hand-made readings, then the whole
controller on the simulated facility, where it must save energy without losing goodput."""

from __future__ import annotations

import pytest

from wattkeeper.policies.slo import Ceilings, NodeLatency, Slo, SloSettings
from wattkeeper.simulator.compare import run_policy, with_budget
from wattkeeper.simulator.scenario import load_scenario

SLO = Slo(ttft_s=2.0, tpot_s=0.050)


def reading(
    tpot_mean: float = 0.030,
    tpot_p90: float | None = None,
    tpot_p90_floor: float | None = None,
    ttft_mean: float = 0.040,
    running: float | None = 100.0,
    observations: float = 50.0,
    age_s: float | None = 1.0,
    kv: float | None = 0.5,
) -> NodeLatency:
    return NodeLatency(
        name="n1",
        ttft_p90_s=ttft_mean * 1.5,
        tpot_p90_s=tpot_p90 if tpot_p90 is not None else tpot_mean * 1.2,
        ttft_mean_s=ttft_mean,
        tpot_mean_s=tpot_mean,
        ttft_p90_floor_s=ttft_mean,
        tpot_p90_floor_s=tpot_p90_floor if tpot_p90_floor is not None else tpot_mean,
        observations=observations,
        requests_running=running,
        kv_cache_usage_ratio=kv,
        age_s=age_s,
    )


def test_slack_lowers_the_ceiling_in_proportion_and_waits_for_the_batch_to_settle() -> None:
    c = Ceilings(SLO)
    first = c.update(reading(tpot_mean=0.020), 1.0, now=0.0).ratio  # 40% of the SLO
    assert first == pytest.approx(1.0 - 0.15)  # far below target: the largest step
    assert c.update(reading(tpot_mean=0.020), first, now=5.0).ratio == first  # settling
    second = c.update(reading(tpot_mean=0.040), first, now=25.0).ratio  # 80%: a small step
    assert first - second == pytest.approx(0.5 * (0.85 - 0.80))
    # At the target it holds.
    at_target = reading(tpot_mean=0.0435, tpot_p90=0.048)
    assert c.update(at_target, second, now=50.0).ratio == second


def test_bucket_coarse_p90_does_not_block_steps_and_a_tail_over_the_slo_raises() -> None:
    c = Ceilings(SLO)
    # vLLM's TPOT buckets put every request of 26-50 ms at p90 = 47.5 ms: the mean steers.
    coarse = reading(tpot_mean=0.030, tpot_p90=0.0475, tpot_p90_floor=0.025)
    lowered = c.update(coarse, 0.6, now=0.0).ratio
    assert lowered < 0.6
    # A 60 ms SLO inside SGLang's 50-75 ms bucket: p90 reads 72.5 ms. Whether a tenth of
    # the requests missed is not known; goodput first, so the ceiling goes up a step.
    sglang = Ceilings(Slo(ttft_s=2.0, tpot_s=0.060))
    inside = reading(tpot_mean=0.052, tpot_p90=0.0725, tpot_p90_floor=0.050)
    assert sglang.update(inside, 0.6, now=0.0).ratio == pytest.approx(0.6 + 0.1)
    # The p90's bucket starts at the SLO: a tenth of the requests certainly missed it.
    proven = reading(tpot_mean=0.040, tpot_p90=0.0625, tpot_p90_floor=0.050)
    raised = c.update(proven, lowered, now=5.0).ratio
    assert raised == pytest.approx(lowered + 2 * 0.1)
    # At the SLO but not over it (the top of the bucket it sits at): no raise.
    at_edge = reading(tpot_mean=0.040, tpot_p90=0.050, tpot_p90_floor=0.025)
    assert c.update(at_edge, raised, now=10.0).ratio == pytest.approx(raised)


def test_a_step_down_starts_from_the_limit_in_force() -> None:
    """A ceiling above a budget-bound limit does not first walk down to it."""
    c = Ceilings(SLO)
    c.update(reading(tpot_mean=0.0435, tpot_p90=0.048), 1.0, now=0.0)  # held at 1.0
    assert c.update(reading(tpot_mean=0.040), 0.5, now=30.0).ratio < 0.5


def test_queueing_raises_once_then_holds_and_learns_the_floor_and_the_batch_limit() -> None:
    c = Ceilings(SLO)
    c.update(reading(ttft_mean=0.040), 0.4, now=0.0)  # unqueued TTFT learned: 40 ms
    # A short queue, TTFT within half the SLO: no goodput at stake, no raise.
    short = reading(tpot_mean=0.038, ttft_mean=0.600, running=2000.0)
    assert c.update(short, 0.38, now=25.0).ratio <= 0.38
    queued = reading(tpot_mean=0.038, ttft_mean=1.100, running=2000.0)
    state = c.update(queued, 0.38, now=30.0)
    assert state.ratio == pytest.approx(0.38 + 0.1)
    assert state.floor == pytest.approx(0.39) and state.batch_limit == 2000.0
    # The backlog drains for a while with TTFT still high: no second raise.
    assert c.update(queued, 0.48, now=35.0).ratio == pytest.approx(0.48)
    # Slack again, but the batch is near the limit it queued at: held.
    near = reading(tpot_mean=0.030, running=1900.0)
    assert c.update(near, 0.48, now=60.0).ratio == pytest.approx(0.48)
    # A smaller batch: small probing steps, never below the floor.
    ratios = [
        c.update(reading(tpot_mean=0.030, running=1500.0), 0.48, now=t).ratio
        for t in (90.0, 120.0, 150.0)
    ]
    assert ratios[0] == pytest.approx(0.46) and min(ratios) >= 0.39
    # The floor is forgotten after a while: load changes, so does the point that queues.
    later = c.update(reading(tpot_mean=0.020, running=1500.0), 0.40, now=30.0 + 601.0)
    assert later.floor == 0.0


def test_a_queue_still_growing_after_a_step_gets_another_at_once() -> None:
    """A surge bigger than one step: mean TTFT keeps climbing after the raise, so the
    ceiling rises again at every period while it climbs (not after the 20 s settle)
    and holds once the queue stops growing."""
    c = Ceilings(SLO)
    c.update(reading(ttft_mean=0.040), 0.4, now=0.0)
    assert c.update(reading(ttft_mean=1.100), 0.38, now=30.0).ratio == pytest.approx(0.48)
    assert c.update(reading(ttft_mean=1.400), 0.48, now=35.0).ratio == pytest.approx(0.58)
    assert c.update(reading(ttft_mean=1.500), 0.58, now=40.0).ratio == pytest.approx(0.58)
    assert c.update(reading(ttft_mean=1.800), 0.58, now=45.0).ratio == pytest.approx(0.68)
    # Draining (TTFT falling but still queued): held until the settle time has passed.
    assert c.update(reading(ttft_mean=1.200), 0.68, now=50.0).ratio == pytest.approx(0.68)


def test_a_full_kv_cache_counts_as_a_missed_slo() -> None:
    c = Ceilings(SLO)
    assert c.update(reading(tpot_mean=0.020, kv=0.99), 0.5, now=0.0).ratio == pytest.approx(0.6)


def test_without_readings_the_ceiling_relaxes_and_a_restart_never_starts_above_the_gpus() -> None:
    c = Ceilings(SLO)
    assert c.update(reading(age_s=None), 0.3, now=0.0).ratio == 0.3  # starts where GPUs are
    assert c.update(reading(observations=1.0), 0.3, now=5.0).ratio == 0.3  # too few requests
    relaxed = [c.update(reading(age_s=120.0), 0.3, now=t).ratio for t in (40.0, 45.0, 50.0)]
    assert relaxed == pytest.approx([0.31, 0.32, 0.33])


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        SloSettings().target_ratio = 0.5  # type: ignore[misc]


# -- the controller on the simulated facility ---------------------------------------------
def test_latency_ceilings_save_energy_at_the_same_goodput_on_steady_load() -> None:
    """Eight minutes of steady decode with no budget: the production path (agents,
    store, controller) reads only the servers' pages and NVML, and must spend clearly
    less energy per good token than running uncapped, with every request in its SLO."""
    sc = with_budget(load_scenario("steady-decode"), None)
    nocap = run_policy(sc, "nocap", duration_s=480)
    ours = run_policy(sc, "wattkeeper", duration_s=480)
    assert ours.slo_attainment is not None and ours.slo_attainment >= 0.99
    assert ours.goodput_tokens >= 0.99 * nocap.goodput_tokens
    assert ours.joules_per_good_token < 0.85 * nocap.joules_per_good_token


def test_explain_shows_the_latency_and_why_each_target_was_set(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A two-minute simulated run with an SLO configured: `explain node` gives each GPU
    the reason its target was set, and the latency the controller read."""
    import json

    from typer.testing import CliRunner

    from wattkeeper.cli import app

    monkeypatch.setenv("WATTKEEPER_SLO__TTFT_S", "2s")
    monkeypatch.setenv("WATTKEEPER_SLO__TPOT_S", "50ms")
    runner = CliRunner()
    run = ["run", "--simulate", "1x4", "--duration", "2m", "--fast", "--db", sqlite_url]
    assert runner.invoke(app, [*run, "-o", "json"]).exit_code == 0
    r = runner.invoke(app, ["explain", "node", "sim-node-0", "--db", sqlite_url, "-o", "json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["latency"]["tpot_mean_s"] > 0 and data["latency"]["ttft_mean_s"] > 0
    assert len(data["gpus"]) == 4
    assert all("latency ceiling" in g["reason"] for g in data["gpus"]), data["gpus"]
    # The one node is the most efficient there is: full weight, and why it was set.
    assert data["route"]["weight"] == 256 and data["route"]["max_inflight"] is None
    assert "tokens/J" in data["route"]["reason"]  # brought up to date, not the first one
    # What the controller learned, from the store (the controller's process is gone).
    learned = data["learned"]
    assert 0.0 < learned["ceiling"]["ratio"] <= 1.0 and learned["tokens_per_joule"] > 0
    text = runner.invoke(app, ["explain", "node", "sim-node-0", "--db", sqlite_url]).stdout
    assert "router: weight 256/256" in text
    assert "latency ceiling at" in text and "tokens/J" in text
    uuid = data["gpus"][0]["uuid"]
    r = runner.invoke(app, ["explain", "gpu", uuid, "--db", sqlite_url, "-o", "json"])
    assert r.exit_code == 0 and [g["uuid"] for g in json.loads(r.stdout)["gpus"]] == [uuid]
    r = runner.invoke(app, ["explain", "node", "nope", "--db", sqlite_url])
    assert r.exit_code == 1 and "no node named 'nope'" in r.output
