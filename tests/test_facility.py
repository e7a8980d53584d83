"""The simulated facility behaves like an inference facility: physics, router, requests,
failures, drains, budgets, counters and the pages the agent reads."""

from __future__ import annotations

import math
import tomllib

import numpy as np
import pytest

from wattkeeper.collectors.gpu import GpuLostError
from wattkeeper.collectors.sim_gpu import SimGpuBackend
from wattkeeper.collectors.tokens import detect_kind, parse_page
from wattkeeper.simulator.facility import (
    STEP_S,
    FacilitySpec,
    SimFacility,
    water_fill,
)
from wattkeeper.simulator.scenario import parse_scenario
from wattkeeper.simulator.server import make_server
from wattkeeper.simulator.sim_host import SimHost

T0 = 1_000_000.0


def scenario(
    *,
    nodes: int = 1,
    gpus: int = 8,
    model: str = "llama-8b",
    gpu: str = "h100",
    rate: float = 100.0,
    max_inflight: int = 256,
    server: str = "vllm",
    ttft_s: float = 2.0,
    tpot_s: float = 0.05,
    extra: str = "",
    seed: int = 1,
):
    text = f"""
seed = {seed}
duration_s = 600
[slo]
ttft_s = {ttft_s}
tpot_s = {tpot_s}
[[fleet]]
count = {nodes}
gpus_per_node = {gpus}
gpu = "{gpu}"
model = "{model}"
max_inflight = {max_inflight}
server = "{server}"
[[workload]]
model = "{model}"
rate_per_s = {rate}
prompt = {{ mean = 250, sigma = 0.8 }}
output = {{ mean = 500, sigma = 0.7 }}
{extra}
"""
    return parse_scenario(tomllib.loads(text), "test", "test")


def facility(**kw) -> SimFacility:
    return SimFacility(scenario(**kw), start_ts=T0)


def window(f: SimFacility, seconds: int) -> tuple[float, float]:
    """Mean facility power and generated tokens/s over the last ``seconds``."""
    st = f.stats
    return float(np.mean(st.second_power_w[-seconds:])), float(np.mean(st.second_tokens[-seconds:]))


# -- the CLI's simple facility ------------------------------------------------------------
def test_simulate_4x8_draws_about_30_kw_uncapped():
    f = SimFacility.simple(FacilitySpec.parse("4x8"), start_ts=T0)
    f.advance_to(T0 + 60)
    power, tokens = window(f, 30)
    assert 27_000 < power < 34_000
    assert tokens > 100_000
    assert f.n_gpus == 32 and f.n_replicas == 32 and f.n_nodes == 4
    assert set(f.replica_model) == {"llama-8b"} and set(f.gpu_kind_names) == {"h100"}
    assert sum(f.router_queue.values()) < 1.0, "load below capacity: nobody queues"


def test_facility_spec_parse_refuses_nonsense():
    with pytest.raises(ValueError, match="NODESxGPUS"):
        FacilitySpec.parse("4by8")
    with pytest.raises(ValueError, match="multiple"):
        SimFacility.simple(FacilitySpec(1, 6, model="llama-70b"), start_ts=T0)


# -- physics through the facility ---------------------------------------------------------
def test_power_limit_lowers_power_and_then_throughput():
    base = facility(rate=90)
    mild = facility(rate=90)
    hard = facility(rate=90)
    mild.limit_requested[:] = 450.0
    hard.limit_requested[:] = 220.0
    for f in (base, mild, hard):
        f.advance_to(T0 + 120)
    p0, t0 = window(base, 30)
    p1, t1 = window(mild, 30)
    p2, t2 = window(hard, 30)
    assert p2 < p1 < p0
    # Decode keeps its throughput at a moderate cap: the batch grows instead (Little's law).
    assert t1 == pytest.approx(t0, rel=0.05)
    assert mild.replica_batch.mean() > base.replica_batch.mean()
    assert mild.replica_tpot_s.mean() > base.replica_tpot_s.mean()
    # At a hard cap the replicas saturate: fewer tokens, a growing router queue.
    assert t2 < 0.8 * t0
    assert hard.router_queue["llama-8b"] > 100
    assert np.all(hard.power_true <= 220.0 * 1.001)
    assert hard.power_capped.all()


def test_clock_lock_caps_the_clock_and_lowers_power():
    free = facility(rate=90)
    locked = facility(rate=90)
    locked.clock_lock[:] = 1200.0
    locked.clock_lock_min[:] = 345.0
    free.advance_to(T0 + 60)
    locked.advance_to(T0 + 60)
    assert np.all(locked.clock_mhz <= 1200.0 + 1e-6)
    assert window(locked, 20)[0] < window(free, 20)[0]
    assert locked.replica_tpot_s.mean() > free.replica_tpot_s.mean()
    assert not locked.power_capped.any(), "the lock, not the power limit, sets the clock"


def test_tensor_parallel_group_runs_at_its_slowest_gpu():
    # Two Llama-70B TP4 replicas, both saturated at 32 in flight with a queue behind them.
    f = facility(model="llama-70b", rate=40, max_inflight=32)
    f.limit_requested[0] = 200.0  # one GPU of replica 0
    f.advance_to(T0 + 90)
    g0 = list(range(0, 4))
    g1 = list(range(4, 8))
    assert f.replica_of[g0].tolist() == [0] * 4 and f.replica_of[g1].tolist() == [1] * 4
    assert np.ptp(f.clock_mhz[g0]) < 1e-6, "lockstep: one clock for the whole group"
    assert f.clock_mhz[0] < f.clock_mhz[4]
    assert f.power_true[1:4].mean() < f.power_true[g1].mean(), "its partners idle waiting"
    assert f.power_capped[0] and not f.power_capped[1:4].any()
    assert f.replica_batch.tolist() == pytest.approx([32, 32], abs=1.5)
    generated_before = f.replica_generated.copy()
    f.advance_to(T0 + 120)
    rate = f.replica_generated - generated_before
    assert rate[0] < 0.7 * rate[1], "the capped GPU slows its whole group's tokens"


# -- the router ---------------------------------------------------------------------------
def test_lower_in_flight_limit_lowers_batch_and_tpot_and_queues():
    wide = facility(rate=95)
    narrow = facility(rate=95)
    narrow.max_inflight[:] = 48
    wide.advance_to(T0 + 90)
    narrow.advance_to(T0 + 90)
    assert narrow.replica_batch.max() <= 48 + 1e-6
    assert wide.replica_batch.mean() > 60
    assert narrow.replica_tpot_s.mean() < wide.replica_tpot_s.mean()
    # The queue holds at most a TTFT SLO's worth of arrivals: the rest is shed.
    assert 95 * 1.0 < narrow.router_queue["llama-8b"] <= 95 * 2.0 * 1.2
    assert narrow.stats.requests_shed > 1000 and wide.stats.requests_shed == 0
    assert wide.router_queue["llama-8b"] < 5
    # Raised again at run time, the queue drains.
    narrow.max_inflight[:] = 256
    narrow.advance_to(T0 + 240)
    assert narrow.router_queue["llama-8b"] < 5


def test_router_fills_the_least_loaded_first():
    level = np.array([10.0, 0.0, 5.0, 30.0])
    cap = np.array([40.0, 40.0, 40.0, 20.0])
    got = water_fill(level, cap, 12.0)
    assert got.sum() == pytest.approx(12.0)
    assert (level + got).tolist() == pytest.approx([10.0, 8.5, 8.5, 30.0])
    assert water_fill(level, cap, 1e6).tolist() == pytest.approx([30.0, 40.0, 35.0, 0.0])


@pytest.mark.parametrize("seed", range(5))
def test_weighted_router_matches_a_brute_force_fill(seed):
    """Weighted least-in-flight: each small increment goes to the replica with the
    lowest in-flight per unit of weight that still has room (HAProxy's leastconn)."""
    rng = np.random.default_rng(seed)
    n = 6
    level = rng.uniform(0, 20, n)
    cap = level + rng.uniform(0, 30, n)
    weight = rng.choice([0.0, 0.5, 1.0, 2.0, 3.0], n)
    amount = float(rng.uniform(1, 60))
    got = water_fill(level, cap, amount, weight)
    cur = level.copy()
    left = amount
    room_total = float(np.where(weight > 0, cap - level, 0).sum())
    step = 1e-3
    while left > 1e-9 and (cur - level).sum() < room_total - 1e-9:
        ok = (weight > 0) & (cur < cap - 1e-12)
        key = np.where(ok, cur / np.where(weight > 0, weight, 1), np.inf)
        i = int(np.argmin(key))
        d = min(step, left, cap[i] - cur[i])
        cur[i] += d
        left -= d
    np.testing.assert_allclose(got, cur - level, atol=0.02)
    assert got[weight == 0].sum() == 0.0


def test_tight_tpot_slo_is_missed_at_high_batch():
    loose = facility(rate=90, tpot_s=0.05)
    tight = facility(rate=90, tpot_s=0.012)
    for f in (loose, tight):
        f.advance_to(T0 + 90)
    assert loose.replica_tpot_s.mean() > 0.012
    assert loose.stats.requests_finished == pytest.approx(tight.stats.requests_finished)
    assert loose.stats.requests_within_slo > 0.95 * loose.stats.requests_finished
    assert tight.stats.requests_within_slo < 0.1 * tight.stats.requests_finished
    # A small batch meets the same tight SLO.
    small = facility(rate=5, tpot_s=0.012)
    small.advance_to(T0 + 90)
    assert small.stats.requests_within_slo > 0.9 * small.stats.requests_finished


def test_ttft_counts_the_queue_wait():
    f = facility(rate=95, ttft_s=1.0)
    f.max_inflight[:] = 40
    f.advance_to(T0 + 120)
    st = f.stats
    # Twice the load the in-flight limit lets through: requests wait in the router up to
    # the TTFT SLO, and the router sheds those that would wait longer.
    assert st.ttft_sum_s / st.first_tokens > 0.5
    assert st.requests_shed > 0.3 * st.requests_arrived


# -- failures, drains, budgets ------------------------------------------------------------
def test_node_failure_requeues_stops_tokens_and_recovery_resets():
    f = facility(
        nodes=2,
        rate=200,
        extra="[[events]]\nat_s = 30\nnode = 1\nkind = 'fail'\n"
        "[[events]]\nat_s = 90\nnode = 1\nkind = 'recover'\n",
    )
    node1 = f.replica_node == 1
    gpus1 = slice(8, 16)
    f.limit_requested[gpus1] = 400.0
    backend = SimGpuBackend(f, 1, lambda: f.now)
    server = make_server(f, 1, lambda: f.now)
    f.advance_to(T0 + 29)
    assert f.replica_batch[node1].sum() > 100
    f.advance_to(T0 + 31)
    assert not f.node_alive[1]
    assert f.stats.requests_requeued > 100
    assert f.power_true[gpus1].sum() == 0 and f.host_power[1] == 0
    frozen = f.replica_generated[node1].copy()
    f.advance_to(T0 + 60)
    assert f.replica_generated[node1].tolist() == frozen.tolist()
    assert f.replica_batch[node1].sum() == 0
    with pytest.raises(ConnectionRefusedError, match="failed"):
        server.render()
    with pytest.raises(GpuLostError):
        backend.sample(f.uuids[8])
    with pytest.raises(OSError):
        SimHost(f, 1).sample(f.now)
    # The survivor serves the re-queued requests and runs saturated.
    assert f.replica_batch[~node1].mean() > 150
    f.advance_to(T0 + 95)
    assert f.node_alive[1]
    assert f.limit_requested[gpus1].tolist() == [700.0] * 8, "limits do not survive a reboot"
    reading = parse_page(server.render(), "vllm")
    assert 0 < sum(s.generation_tokens_total for s in reading.series) < frozen.sum()
    assert f.replica_batch[node1].sum() > 10


def test_drained_node_finishes_its_requests_then_sleeps_at_standby_power():
    f = facility(nodes=2, rate=100)
    node0 = f.replica_node == 0
    f.advance_to(T0 + 10)
    f.set_drained(0, True)
    assert f.node_state(0) == "draining"
    arrived = f.stats.requests_arrived
    f.advance_to(T0 + 12)
    assert f.replica_batch[node0].sum() > 10, "in-flight requests finish, not dropped"
    f.advance_to(T0 + 150)
    assert f.node_state(0) == "standby"
    assert f.power_true[:8].sum() == 0
    assert f.host_power[0] == pytest.approx(f.scenario.standby_w)
    assert f.stats.requests_requeued < 1.0, "only a fluid remainder goes back"
    assert f.stats.requests_arrived > arrived and f.replica_batch[~node0].mean() > 0
    assert f.demand_tokens_per_s()[node0].sum() == 0
    # Back into service: it wakes at idle power first, then serves.
    f.set_drained(0, False)
    f.advance_to(T0 + 160)
    assert f.node_state(0) == "waking"
    assert f.power_true[:8] == pytest.approx(np.full(8, f.gpu_kind(0).idle_w))
    assert f.replica_batch[node0].sum() == 0
    f.advance_to(T0 + 150 + f.scenario.wake_s + 30)
    assert f.node_state(0) == "serving"
    assert f.replica_batch[node0].sum() > 10


def test_budget_schedule():
    f = facility(extra="[budget]\nschedule = [[0, 9000], [20, 5000], [40, 9000]]")
    assert f.budget_at(T0) == 9000 and f.budget_at(T0 + 19.9) == 9000
    assert f.budget_at(T0 + 20) == 5000 and f.budget_at(T0 + 45) == 9000
    f.advance_to(T0 + 60)
    budgets = f.stats.second_budget_w
    assert len(budgets) == 60
    assert budgets[:20] == [9000] * 20 and budgets[20:40] == [5000] * 20
    assert budgets[40:] == [9000] * 20
    assert facility().budget_at(T0) is None


def test_energy_counters_are_the_integral_of_power():
    f = facility(nodes=2, rate=150)
    gpu_start = f.energy_j.copy()
    integral = np.zeros(f.n_gpus)
    facility_w: list[float] = []

    def observe(fac: SimFacility) -> None:
        integral[:] += fac.power_true * STEP_S
        facility_w.append(fac.facility_power_w())

    f.observers.append(observe)
    f.limit_requested[:4] = 300.0  # make the power move
    f.advance_to(T0 + 30)
    assert f.energy_j - gpu_start == pytest.approx(integral, rel=1e-9)
    assert f.stats.energy_j == pytest.approx(sum(facility_w) * STEP_S, rel=1e-9)
    assert f.stats.energy_j == pytest.approx(sum(f.stats.second_power_w), rel=1e-9)
    assert f.stats.gpu_energy_j == pytest.approx(float(integral.sum()), rel=1e-9)
    assert f.stats.energy_j == pytest.approx(f.stats.gpu_energy_j + f.stats.host_energy_j)


def test_nvml_power_is_the_one_second_average():
    f = facility(rate=90)
    f.advance_to(T0 + 20)
    seen = []
    f.observers.append(lambda fac: seen.append(fac.power_true.copy()))
    f.limit_requested[:] = 250.0
    f.advance_to(T0 + 20.5)
    assert f.power_avg_1s()[0] > f.power_true[0] + 50, "the average lags a new limit"
    f.advance_to(T0 + 22)
    steps = round(1.0 / STEP_S)
    assert f.power_avg_1s() == pytest.approx(np.mean(seen[-steps:], axis=0))


def test_same_seed_same_run_other_seed_other_run():
    def run(seed: int) -> tuple:
        f = facility(nodes=2, rate=150, seed=seed)
        f.limit_requested[:8] = 350.0
        f.advance_to(T0 + 60)
        st = f.stats
        return (st.energy_j, st.generated_tokens, st.requests_finished, tuple(st.second_power_w))

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_demand_is_what_the_uncapped_facility_serves():
    f = SimFacility.simple(FacilitySpec(2, 8), start_ts=T0)
    f.advance_to(T0 + 120)
    served = np.mean(f.stats.second_tokens[-60:])
    assert f.demand_tokens_per_s().sum() == pytest.approx(served, rel=0.05)
    assert f.demand_batch().mean() == pytest.approx(f.replica_batch.mean(), rel=0.1)
    f.limit_requested[:] = 250.0
    f.advance_to(T0 + 180)
    assert f.demand_tokens_per_s().sum() == pytest.approx(served, rel=0.05), (
        "uncapped, whatever the caps"
    )
    assert f.demand_power_w() > f.facility_power_w()


def test_disaggregated_prefill_and_decode_pools():
    text = """
[slo]
ttft_s = 3.0
tpot_s = 0.08
[[fleet]]
count = 1
model = "llama-70b"
role = "prefill"
max_inflight = 64
[[fleet]]
count = 1
model = "llama-70b"
role = "decode"
max_inflight = 192
server = "sglang"
[[workload]]
model = "llama-70b"
rate_per_s = 8
prompt = { mean = 1500, sigma = 0.7 }
output = { mean = 500, sigma = 0.7 }
"""
    f = SimFacility(parse_scenario(tomllib.loads(text), "test", "t"), start_ts=T0)
    f.advance_to(T0 + 120)
    pre = np.array([r == "prefill" for r in f.replica_role])
    dec = ~pre
    assert f.replica_prefill_fraction[pre].tolist() == [1.0, 1.0]
    assert f.replica_prefill_fraction[dec].tolist() == [0.0, 0.0]
    assert f.replica_generated[pre].sum() == 0 and f.replica_prompt[dec].sum() == 0
    assert f.replica_generated[dec].sum() > 0 and f.replica_prompt[pre].sum() > 0
    assert f.stats.requests_finished > 0.8 * 8 * 100
    assert f.stats.requests_within_slo > 0.9 * f.stats.requests_finished
    assert f.power_true[:8].mean() > f.power_true[8:].mean(), "prefill runs hot"
    assert f.demand_tokens_per_s()[pre].sum() == 0 and f.demand_tokens_per_s()[dec].sum() > 0


# -- the pages the agent reads ------------------------------------------------------------
@pytest.mark.parametrize("server", ["vllm", "sglang"])
def test_pages_parse_with_the_real_parser_and_match_the_facility(server):
    f = facility(nodes=2, rate=150, server=server)
    f.advance_to(T0 + 45)
    total = {"generation": 0.0, "prompt": 0.0, "requests": 0.0, "ttft": 0.0, "running": 0.0}
    for node in range(2):
        page = make_server(f, node, lambda: f.now).render()
        assert page.endswith("\n") and "np." not in page and "nan" not in page.lower()
        assert detect_kind(page) == server
        reading = parse_page(page, server)
        assert reading.errors == ()
        assert len(reading.series) == (8 if server == "vllm" else 1)
        for s in reading.series:
            assert s.model == "meta-llama/Llama-3.1-8B-Instruct"
            total["generation"] += s.generation_tokens_total
            total["prompt"] += s.prompt_tokens_total
            total["requests"] += s.requests_total
            total["running"] += s.requests_running
            total["ttft"] += s.ttft_seconds.count
            assert 0 < s.kv_cache_usage_ratio < 1
            assert s.tpot_seconds.count > 0 and s.tpot_seconds.sum > 0
    st = f.stats
    assert total["generation"] == pytest.approx(st.generated_tokens, rel=1e-9)
    assert total["prompt"] == pytest.approx(st.prompt_tokens, rel=1e-9)
    assert total["requests"] == pytest.approx(st.requests_finished, rel=1e-9)
    assert total["ttft"] == pytest.approx(st.first_tokens, rel=1e-9)
    assert total["running"] == pytest.approx(f.replica_batch.sum(), rel=1e-9)


def test_gpu_backend_and_host_views():
    f = facility(nodes=2, gpu="a100", rate=60)
    backend = SimGpuBackend(f, 1, lambda: f.now)
    infos = backend.gpus()
    assert len(infos) == 8 and infos[0].name == "NVIDIA A100-SXM4-80GB"
    assert infos[0].power_limits.max_w == 400.0
    f.advance_to(T0 + 10)
    s = backend.sample(infos[0].uuid)
    assert 100 < s.power_w <= 400 and 0 < s.utilization_gpu_ratio <= 1
    assert s.mem_clock_mhz == 1593
    host = SimHost(f, 1).sample(f.now)
    assert host.non_gpu_power_w == pytest.approx(f.host_power[1])
    assert 900 <= host.non_gpu_power_w <= 1800
    assert math.isclose(f.facility_power_w(), f.power_true.sum() + f.host_power.sum())
