"""The true optimum: curves, the MILP against brute force, drains, demand and mapping back."""

from __future__ import annotations

import ast
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from wattkeeper.simulator import optimum, physics
from wattkeeper.simulator.optimum import (
    NodeState,
    OptimumResult,
    ReplicaState,
    replica_curve,
    solve,
)

H100 = physics.GPU_KINDS["h100"]
A100 = physics.GPU_KINDS["a100"]


def true_point(
    r: ReplicaState, limit_w: float, lock_mhz: int | None, count: str = "all"
) -> tuple[float, float]:
    """(whole-replica power, tokens/s) straight from physics, as the facility would run it."""
    op = physics.operating_point(
        physics.GPU_KINDS[r.gpu_kind],
        physics.MODELS[r.model],
        batch=r.batch,
        prefill_fraction=r.prefill_fraction,
        clock_cap_mhz=lock_mhz,
        power_limit_w=limit_w,
    )
    tokens = op.tokens_per_s if count == "all" else op.decode_tokens_per_s
    return float(op.power_w) * physics.MODELS[r.model].tensor_parallel, float(tokens)


def check_mapping(replicas: list[ReplicaState], res: OptimumResult) -> None:
    """Each setting, run through physics, stays within its predicted power and (but for the
    one replica an LP basis can leave between two vertices) within 2% of its tokens."""
    short = 0
    for r, d in zip(replicas, res.replicas, strict=True):
        assert d.replica == r.replica
        if d.power_w == 0.0:  # drained or dead
            assert d.tokens_per_s == 0.0
            continue
        p, t = true_point(r, d.power_limit_w, d.clock_lock_mhz)
        if r.demand_tokens_per_s is not None:
            t = min(t, r.demand_tokens_per_s)
        assert p <= d.power_w + 1e-9
        assert p == pytest.approx(d.realised_power_w, rel=1e-12)
        assert t == pytest.approx(d.realised_tokens_per_s, rel=1e-9, abs=1e-9)
        if t < 0.98 * d.tokens_per_s:
            short += 1
    assert short <= 1
    assert res.realised_tokens_per_s >= 0.98 * res.tokens_per_s
    assert res.realised_power_w <= res.power_w + 1e-6


# --------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------

CASES = [
    ("h100", "llama-8b", 16, 0.0),
    ("h100", "llama-8b", 256, 0.12),
    ("h100", "llama-8b", 64, 1.0),
    ("a100", "llama-8b", 128, 0.12),
    ("h100", "llama-70b", 96, 0.0),
    ("a100", "llama-70b", 32, 0.3),
    ("h100", "llama-405b-fp8", 64, 0.12),
    ("h100", "llama-8b", 0.4, 0.0),
]


@pytest.mark.parametrize(("gpu", "model", "batch", "pf"), CASES)
def test_curve_concave_monotone_from_the_floor(gpu: str, model: str, batch: float, pf: float):
    r = ReplicaState(0, 0, gpu, model, batch, pf)
    c = replica_curve(r)
    assert len(c.power_w) >= 3
    assert np.all(np.diff(c.power_w) > 0)
    assert np.all(np.diff(c.tokens_per_s) > 0)
    slopes = c.slopes
    assert np.all(np.diff(slopes) <= 1e-9 * slopes.max())
    # The first vertex is the least any sampled setting draws; the last is peak throughput.
    assert c.floor_w == pytest.approx(c.sample_power_w.min())
    assert c.peak_tokens_per_s == pytest.approx(c.sample_tokens_per_s.max())
    # Default settings (max limit, no lock) cannot beat the peak, and reach it.
    _, t_default = true_point(r, physics.GPU_KINDS[gpu].power_max_w, None)
    assert c.peak_tokens_per_s == pytest.approx(t_default, rel=1e-9)
    # Every vertex is a real setting: physics gives back its power and tokens.
    for p, t, limit, lock in zip(c.power_w, c.tokens_per_s, c.power_limit_w, c.clock_lock_mhz):
        assert true_point(r, limit, lock) == pytest.approx((p, t), rel=1e-12)


def test_idle_replica_is_a_single_point_at_idle_power():
    c = replica_curve(ReplicaState(0, 0, "h100", "llama-70b", 0.0, 0.0))
    assert len(c.power_w) == 1
    assert c.floor_w == pytest.approx(4 * H100.idle_w)
    assert c.peak_tokens_per_s == 0.0


def test_the_floor_is_below_the_min_limit_with_a_clock_lock():
    """A prefill replica locked at the lowest clock draws less than the min limit allows."""
    r = ReplicaState(0, 0, "h100", "llama-8b", 64, 1.0)
    locked, unlocked = replica_curve(r), replica_curve(r, allow_clock_lock=False)
    assert locked.floor_w < unlocked.floor_w
    assert locked.clock_lock_mhz[0] == H100.min_sm_clock_mhz
    assert unlocked.power_limit_w[0] == H100.power_min_w


def test_decode_gains_from_clock_locks_at_low_power():
    """Decode is nearly flat in clock (calibration README): a lock trims the clock without
    the power controller's overshoot, so a locked vertex beats every limit-only setting at
    the same power, checked against a 1 W sweep of limits through physics."""
    r = ReplicaState(0, 0, "h100", "llama-8b", 16, 0.0)
    c = replica_curve(r)
    limits = np.arange(H100.power_min_w, H100.power_max_w + 1, 1.0)
    op = physics.operating_point(H100, physics.MODELS["llama-8b"], batch=16, power_limit_w=limits)
    p_lim, t_lim = np.asarray(op.power_w), np.asarray(op.tokens_per_s)
    gains = []
    for p, t, lock in zip(c.power_w, c.tokens_per_s, c.clock_lock_mhz):
        if lock is not None and p < 0.6 * c.peak_w:
            best_limit_only = t_lim[p_lim <= p + 1e-9].max()
            gains.append(t / best_limit_only)
    assert gains and max(gains) > 1.02
    # And the optimum uses a lock there.
    nodes = [NodeState(0, "dgx-h100", 1)]
    mid = 272.0 + optimum._node_models([r], nodes)[0].host.idle_w
    res = solve([r], nodes, mid + (2400 - 1200) * 272.0 / 700.0)
    assert res.replicas[0].clock_lock_mhz is not None


# --------------------------------------------------------------------------------------
# The facility problem
# --------------------------------------------------------------------------------------


def small_facility() -> tuple[list[ReplicaState], list[NodeState]]:
    nodes = [NodeState(0, "dgx-h100", 4), NodeState(1, "dgx-h100", 4)]
    reps = [
        ReplicaState(0, 0, "h100", "llama-8b", 32, 0.0),
        ReplicaState(1, 0, "h100", "llama-8b", 200, 0.12),
        ReplicaState(2, 0, "h100", "llama-8b", 96, 1.0),
        ReplicaState(3, 0, "h100", "llama-8b", 0.0, 0.0),
        ReplicaState(4, 1, "h100", "llama-70b", 128, 0.12),
    ]
    return reps, nodes


def test_generous_budget_runs_everyone_flat_out_or_at_demand():
    reps, nodes = small_facility()
    reps[0] = ReplicaState(0, 0, "h100", "llama-8b", 32, 0.0, demand_tokens_per_s=1000.0)
    res = solve(reps, nodes, 1e7)
    assert res.status == "optimal"
    assert res.drained_nodes == frozenset()
    for r, d in zip(reps, res.replicas, strict=True):
        _, peak = true_point(r, H100.power_max_w, None)
        want = min(peak, r.demand_tokens_per_s or math.inf)
        assert d.tokens_per_s == pytest.approx(want, rel=1e-9)
        assert d.realised_tokens_per_s == pytest.approx(want, rel=1e-9)
    check_mapping(reps, res)


def test_result_lists_every_replica_and_stays_under_budget():
    reps, nodes = small_facility()
    top = solve(reps, nodes, 1e7)
    for ratio in (0.9, 0.7, 0.5):
        res = solve(reps, nodes, ratio * top.power_w)
        assert res.status == "optimal"
        assert [d.replica for d in res.replicas] == [r.replica for r in reps]
        assert res.power_w <= ratio * top.power_w + 1e-6
        check_mapping(reps, res)


def brute_force(
    replicas: list[ReplicaState], nodes: list[NodeState], budget_w: float, limits: np.ndarray
) -> float:
    """Best tokens/s over a grid of per-GPU limits (no locks) and every drain choice,
    with the facility's power computed from physics directly."""
    options: list[tuple[np.ndarray, np.ndarray]] = []
    for n in nodes:
        host = physics.HOST_KINDS[n.host_kind]
        mine = [r for r in replicas if r.node == n.node]
        per = [
            physics.operating_point(
                physics.GPU_KINDS[r.gpu_kind],
                physics.MODELS[r.model],
                batch=r.batch,
                prefill_fraction=r.prefill_fraction,
                power_limit_w=limits,
            )
            for r in mine
        ]
        tok = np.zeros(1)
        gpu = np.zeros(1)
        for op in per:  # every combination of the node's replicas' limits
            tok = (tok[:, None] + np.asarray(op.tokens_per_s)[None, :]).ravel()
            gpu = (gpu[:, None] + np.asarray(op.power_w)[None, :]).ravel()
        load = gpu / (n.gpus * H100.power_max_w)
        power = gpu + np.asarray(physics.host_power_w(host, load))
        options.append((np.append(tok, 0.0), np.append(power, n.standby_w)))  # last: drained
    (ta, pa), (tb, pb) = options
    order = np.argsort(pb)
    pb, best_b = pb[order], np.maximum.accumulate(tb[order])
    k = np.searchsorted(pb, budget_w - pa, side="right") - 1
    fits = k >= 0
    return float((ta[fits] + best_b[k[fits]]).max())


@pytest.mark.parametrize("budget_w", [5200.0, 4300.0, 3300.0, 2200.0])
def test_milp_matches_brute_force_on_two_small_nodes(budget_w: float):
    """2 nodes x 2 GPUs, limits on a 5 W grid and both drains: the MILP is at least as
    good as every grid point and within 1% of the best (the grid misses nothing)."""
    nodes = [NodeState(0, "dgx-h100", 2), NodeState(1, "dgx-h100", 2)]
    reps = [
        ReplicaState(0, 0, "h100", "llama-8b", 48, 0.0),
        ReplicaState(1, 0, "h100", "llama-8b", 256, 0.12),
        ReplicaState(2, 1, "h100", "llama-8b", 128, 0.12),
        ReplicaState(3, 1, "h100", "llama-8b", 64, 1.0),
    ]
    grid = brute_force(reps, nodes, budget_w, np.arange(200.0, 700.0 + 1, 5.0))
    res = solve(reps, nodes, budget_w, allow_clock_lock=False)
    assert res.status == "optimal"
    assert res.power_w <= budget_w + 1e-6
    # What the settings really do, by physics, beats or matches the best grid point...
    assert res.realised_tokens_per_s >= grid * (1 - 1e-4)
    # ...and the prediction is not wildly above what a setting can reach.
    assert res.tokens_per_s <= grid * 1.01
    check_mapping(reps, res)


def test_identical_replicas_split_the_budget_evenly():
    nodes = [NodeState(0, "dgx-h100", 4), NodeState(1, "dgx-h100", 4)]
    reps = [ReplicaState(i, i // 4, "h100", "llama-8b", 160, 0.12) for i in range(8)]
    top = solve(reps, nodes, 1e7)
    for ratio in (0.9, 0.75, 0.6):
        res = solve(reps, nodes, ratio * top.power_w, allow_drain=False)
        assert res.status == "optimal"
        powers = [d.power_w for d in res.replicas]
        assert max(powers) - min(powers) <= 1e-6 * max(powers)
        assert len({(d.power_limit_w, d.clock_lock_mhz) for d in res.replicas}) == 1
        assert res.power_w == pytest.approx(ratio * top.power_w, rel=1e-5)
        check_mapping(reps, res)


def test_mixed_replicas_meet_at_equal_marginal_tokens_per_watt():
    """KKT for a concave allocation: no replica's next watt is worth more than another's
    last one (host cost per watt is the same on identical nodes)."""
    reps, nodes = small_facility()
    top = solve(reps, nodes, 1e7)
    res = solve(reps, nodes, 0.7 * top.power_w, allow_drain=False)
    curves = [replica_curve(r) for r in reps]
    left, right = [], []
    for c, d in zip(curves, res.replicas, strict=True):
        if len(c.power_w) == 1:
            continue
        k = int(np.searchsorted(c.power_w, d.power_w - 1e-6, side="right"))
        at_vertex = k > 0 and abs(c.power_w[k - 1] - d.power_w) < 1e-6
        s = np.concatenate([[np.inf], c.slopes, [0.0]])  # s[k]: slope of segment k-1..k
        left.append(s[k - 1] if at_vertex else s[k])
        right.append(s[k])
    assert max(right) <= min(left) * (1 + 1e-6)


def floor_power(replicas: list[ReplicaState], nodes: list[NodeState]) -> float:
    """Every node up, every GPU at the least it can draw at its batch."""
    total = 0.0
    for n in nodes:
        host = physics.HOST_KINDS[n.host_kind]
        mine = [r for r in replicas if r.node == n.node]
        gpu = sum(replica_curve(r).floor_w for r in mine)
        gpu += (n.gpus - len(mine)) * H100.idle_w
        total += gpu + float(physics.host_power_w(host, gpu / (n.gpus * H100.power_max_w)))
    return total


def test_tight_budget_drains_nodes_and_still_makes_tokens():
    nodes = [NodeState(n, "dgx-h100", 4) for n in range(4)]
    reps = [ReplicaState(i, i // 4, "h100", "llama-8b", 128, 0.12) for i in range(16)]
    floor = floor_power(reps, nodes)
    half = floor_power(reps[:8], nodes[:2]) + 2 * nodes[0].standby_w
    budget = 0.5 * (floor + half)
    assert half < budget < floor

    res = solve(reps, nodes, budget)
    assert res.status == "optimal"
    assert 1 <= len(res.drained_nodes) <= 2
    assert res.tokens_per_s > 0
    assert res.power_w <= budget + 1e-6
    for r, d in zip(reps, res.replicas, strict=True):
        assert (d.tokens_per_s == 0) == (r.node in res.drained_nodes)
    check_mapping(reps, res)

    stuck = solve(reps, nodes, budget, allow_drain=False)
    assert stuck.status == "infeasible"
    assert stuck.drained_nodes == frozenset()
    assert stuck.power_w == pytest.approx(floor, rel=1e-9)
    assert stuck.power_w > budget
    for r, d in zip(reps, stuck.replicas, strict=True):
        assert d.power_w == pytest.approx(replica_curve(r).floor_w)


def test_nothing_fits_drains_everything_and_says_so():
    nodes = [NodeState(n, "dgx-h100", 4) for n in range(3)]
    reps = [ReplicaState(i, i // 4, "h100", "llama-8b", 64, 0.0) for i in range(12)]
    res = solve(reps, nodes, 400.0)  # less than three standbys of 150 W
    assert res.status == "infeasible"
    assert res.drained_nodes == frozenset({0, 1, 2})
    assert res.tokens_per_s == 0.0
    assert res.power_w == pytest.approx(450.0)


def test_idle_nodes_are_drained_and_dead_nodes_cost_nothing():
    nodes = [
        NodeState(0, "dgx-h100", 4),
        NodeState(1, "dgx-h100", 4),  # no replica: only idle power, drained
        NodeState(2, "dgx-h100", 4, alive=False),
    ]
    reps = [
        ReplicaState(0, 0, "h100", "llama-8b", 64, 0.0),
        ReplicaState(1, 2, "h100", "llama-8b", 64, 0.0),
    ]
    res = solve(reps, nodes, 1e7)
    assert res.drained_nodes == frozenset({1})
    dead = res.replicas[1]
    assert (dead.tokens_per_s, dead.power_w) == (0.0, 0.0)
    host = physics.HOST_KINDS["dgx-h100"]
    gpu = res.replicas[0].power_w + 3 * H100.idle_w
    expected = gpu + float(physics.host_power_w(host, gpu / (4 * H100.power_max_w))) + 150.0
    assert res.power_w == pytest.approx(expected, rel=1e-9)
    # Without drains the empty node stays up at idle.
    kept = solve(reps, nodes, 1e7, allow_drain=False)
    assert kept.drained_nodes == frozenset()
    assert kept.power_w == pytest.approx(
        expected
        - 150.0
        + 4 * H100.idle_w
        + host.idle_w
        + (host.serving_w - host.idle_w) * 4 * H100.idle_w / 2800,
        rel=1e-9,
    )


def least_power_for(r: ReplicaState, tokens: float) -> float:
    """Independent check: the least power any limit (1 W steps) or lock (at max limit,
    every supported clock) needs for ``tokens``."""
    kind, model = physics.GPU_KINDS[r.gpu_kind], physics.MODELS[r.model]
    limits = np.arange(kind.power_min_w, kind.power_max_w + 1, 1.0)
    clocks = np.asarray(kind.supported_sm_clocks_mhz(), dtype=float)
    best = math.inf
    for op in (
        physics.operating_point(
            kind, model, batch=r.batch, prefill_fraction=r.prefill_fraction, power_limit_w=limits
        ),
        physics.operating_point(
            kind, model, batch=r.batch, prefill_fraction=r.prefill_fraction, clock_cap_mhz=clocks
        ),
    ):
        ok = np.asarray(op.tokens_per_s) >= tokens
        if ok.any():
            best = min(best, float(np.asarray(op.power_w)[ok].min()))
    return best * model.tensor_parallel


@pytest.mark.parametrize("tight", [False, True])
def test_demand_capped_replica_gets_no_more_power_than_it_needs(tight: bool):
    nodes = [NodeState(0, "dgx-h100", 2)]
    free = ReplicaState(0, 0, "h100", "llama-8b", 200, 0.12)
    peak = replica_curve(free).peak_tokens_per_s
    capped = ReplicaState(1, 0, "h100", "llama-8b", 200, 0.12, demand_tokens_per_s=0.6 * peak)
    top = solve([free, capped], nodes, 1e7)
    budget = 0.85 * top.power_w if tight else 1e7
    res = solve([free, capped], nodes, budget)
    d_free, d_cap = res.replicas
    assert d_cap.tokens_per_s == pytest.approx(0.6 * peak, rel=1e-9)
    assert d_cap.realised_tokens_per_s == pytest.approx(0.6 * peak, rel=1e-9)
    assert d_cap.power_w <= least_power_for(capped, 0.6 * peak) + 1e-6
    assert d_cap.power_w < d_free.power_w
    if tight:  # the other replica takes what the capped one leaves
        assert res.power_w == pytest.approx(budget, rel=1e-5)
    check_mapping([free, capped], res)


def test_demand_below_the_floor_leaves_the_replica_at_its_floor():
    nodes = [NodeState(0, "dgx-h100", 2)]
    r = ReplicaState(0, 0, "h100", "llama-8b", 200, 0.0, demand_tokens_per_s=10.0)
    res = solve([r], nodes, 1e7)
    assert res.replicas[0].power_w == pytest.approx(replica_curve(r).floor_w)
    assert res.replicas[0].tokens_per_s == pytest.approx(10.0)


def random_facility(seed: int) -> tuple[list[ReplicaState], list[NodeState]]:
    rng = np.random.default_rng(seed)
    nodes, reps = [], []
    for n in range(6):
        gpu = "a100" if n % 3 == 0 else "h100"
        nodes.append(NodeState(n, f"dgx-{gpu}", 8))
        model, tp = ("llama-70b", 4) if n % 2 else ("llama-8b", 1)
        for _ in range(8 // tp):
            demand = float(rng.uniform(300, 3000)) if rng.random() < 0.3 else None
            pf = float(rng.choice([0.0, 0.12, 1.0]))
            reps.append(
                ReplicaState(len(reps), n, gpu, model, float(rng.uniform(0, 300)), pf, demand)
            )
    return reps, nodes


@pytest.mark.parametrize(
    ("seed", "ratio", "drain"), itertools.product([0, 1], [0.8, 0.5], [True, False])
)
def test_mapped_settings_realise_the_prediction(seed: int, ratio: float, drain: bool):
    reps, nodes = random_facility(seed)
    top = solve(reps, nodes, 1e7)
    res = solve(reps, nodes, ratio * top.power_w, allow_drain=drain)
    if res.status == "infeasible":
        assert not drain
        return
    assert res.status == "optimal"
    assert res.power_w <= ratio * top.power_w + 1e-6
    check_mapping(reps, res)


def test_generated_tokens_only_starves_a_prefill_pool():
    nodes = [NodeState(0, "dgx-h100", 2)]
    reps = [
        ReplicaState(0, 0, "h100", "llama-8b", 128, 1.0),
        ReplicaState(1, 0, "h100", "llama-8b", 128, 0.0),
    ]
    top = solve(reps, nodes, 1e7)
    res = solve(reps, nodes, 0.7 * top.power_w, count="generated")
    assert res.replicas[0].tokens_per_s == 0.0
    assert res.replicas[0].power_w == pytest.approx(replica_curve(reps[0]).floor_w)


def test_bad_input_is_refused():
    nodes = [NodeState(0, "dgx-h100", 2)]
    with pytest.raises(ValueError, match="not listed"):
        solve([ReplicaState(0, 5, "h100", "llama-8b", 1, 0)], nodes, 1e4)
    with pytest.raises(ValueError, match="spans"):
        solve([ReplicaState(0, 0, "h100", "llama-70b", 1, 0)], nodes, 1e4)
    with pytest.raises(ValueError, match="not modelled"):
        solve([ReplicaState(0, 0, "a100", "llama-405b-fp8", 1, 0)], nodes, 1e4)
    with pytest.raises(ValueError, match="unique"):
        r = ReplicaState(0, 0, "h100", "llama-8b", 1, 0)
        solve([r, r], nodes, 1e4)


def test_optimum_does_not_import_the_policies():
    """The yardstick must not share code with what it measures."""
    tree = ast.parse(Path(optimum.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if "policies" in m]
