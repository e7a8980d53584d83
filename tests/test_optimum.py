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
    r: ReplicaState, limit_w: float, lock_mhz: int | None, count: str = "generated"
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


def useful_point(
    r: ReplicaState, limit_w: float, lock_mhz: int | None, count: str = "generated"
) -> tuple[float, float]:
    """(whole-replica power, tokens/s that count): capped where the demand is met."""
    p, t = true_point(r, limit_w, lock_mhz, count)
    cap = replica_curve(r, count=count).cap_tokens_per_s  # type: ignore[arg-type]
    return p, t if cap is None else min(t, cap)


def check_mapping(
    replicas: list[ReplicaState], res: OptimumResult, count: str = "generated"
) -> None:
    """Each setting, run through physics, stays within its predicted power and (but for the
    one replica an LP basis can leave inside the stall stretch, where the envelope's chord
    is no setting's) within 2% of its predicted tokens."""
    short, short_gap = 0, 0.0
    for r, d in zip(replicas, res.replicas, strict=True):
        assert d.replica == r.replica
        if d.power_w == 0.0:  # drained or dead
            assert d.tokens_per_s == 0.0
            continue
        p, t = useful_point(r, d.power_limit_w, d.clock_lock_mhz, count)
        assert p <= d.power_w + 1e-9
        assert p == pytest.approx(d.realised_power_w, rel=1e-12)
        assert t == pytest.approx(d.realised_tokens_per_s, rel=1e-9, abs=1e-9)
        if t < 0.98 * d.tokens_per_s:
            short += 1
            short_gap = d.tokens_per_s - t
    assert short <= 1
    assert res.realised_tokens_per_s >= 0.98 * res.tokens_per_s - short_gap
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


@pytest.mark.parametrize("count", ["generated", "all"])
@pytest.mark.parametrize(("gpu", "model", "batch", "pf"), CASES)
def test_curve_concave_monotone_from_the_floor(
    gpu: str, model: str, batch: float, pf: float, count: str
):
    r = ReplicaState(0, 0, gpu, model, batch, pf)
    c = replica_curve(r, count=count)  # type: ignore[arg-type]
    if pf == 1.0 and count == "generated":  # a prefill pool generates nothing
        assert len(c.power_w) == 1
        assert c.floor_w == pytest.approx(c.sample_power_w.min())
        assert c.peak_tokens_per_s == 0.0
        return
    assert len(c.power_w) >= 3
    assert np.all(np.diff(c.power_w) > 0)
    assert np.all(np.diff(c.tokens_per_s) > 0)
    slopes = c.slopes
    assert np.all(np.diff(slopes) <= 1e-9 * slopes.max())
    # The first vertex is the least any sampled setting draws; the last is peak throughput.
    assert c.floor_w == pytest.approx(c.sample_power_w.min())
    assert c.peak_tokens_per_s == pytest.approx(c.sample_tokens_per_s.max())
    # Default settings (max limit, no lock) cannot beat the peak, and reach it.
    _, t_default = true_point(r, physics.GPU_KINDS[gpu].power_max_w, None, count)
    assert c.peak_tokens_per_s == pytest.approx(t_default, rel=1e-9)
    # Every vertex is a real setting: physics gives back its power and tokens.
    for p, t, limit, lock in zip(
        c.power_w, c.tokens_per_s, c.power_limit_w, c.clock_lock_mhz, strict=True
    ):
        assert true_point(r, limit, lock, count) == pytest.approx((p, t), rel=1e-12)


def test_idle_replica_is_a_single_point_at_idle_power():
    c = replica_curve(ReplicaState(0, 0, "h100", "llama-70b", 0.0, 0.0))
    assert len(c.power_w) == 1
    assert c.floor_w == pytest.approx(4 * H100.idle_w)
    assert c.peak_tokens_per_s == 0.0


def test_the_floor_is_below_the_min_limit_with_a_clock_lock():
    """A prefill replica locked at the lowest clock draws less than the min limit allows."""
    r = ReplicaState(0, 0, "h100", "llama-8b", 64, 1.0)
    locked = replica_curve(r, count="all")
    unlocked = replica_curve(r, allow_clock_lock=False, count="all")
    assert locked.floor_w < unlocked.floor_w
    assert locked.clock_lock_mhz[0] == H100.min_sm_clock_mhz
    assert unlocked.power_limit_w[0] == H100.power_min_w


def best_single_knob(
    r: ReplicaState, power_w: float, locks: bool = True, count: str = "generated"
) -> float:
    """Most tokens/s any limit alone (1 W steps) or any lock alone reaches within power_w."""
    kind, model = physics.GPU_KINDS[r.gpu_kind], physics.MODELS[r.model]
    best = 0.0
    ops = (
        physics.operating_point(
            kind,
            model,
            batch=r.batch,
            prefill_fraction=r.prefill_fraction,
            power_limit_w=np.arange(kind.power_min_w, kind.power_max_w + 1, 1.0),
        ),
        physics.operating_point(
            kind,
            model,
            batch=r.batch,
            prefill_fraction=r.prefill_fraction,
            clock_cap_mhz=np.asarray(kind.supported_sm_clocks_mhz(), dtype=float),
        ),
    )
    for op in ops if locks else ops[:1]:
        p = np.asarray(op.power_w) * model.tensor_parallel
        ok = p <= power_w + 1e-9
        if ok.any():
            tokens = op.tokens_per_s if count == "all" else op.decode_tokens_per_s
            best = max(best, float(np.asarray(tokens)[ok].max()))
    return best


@pytest.mark.parametrize(("count", "gain"), [("generated", 1.015), ("all", 1.04)])
def test_decode_heavy_curves_gain_from_clock_locks_at_low_power(count: str, gain: float):
    """At the facility's usual mix (12% prefill), a limit lets the cool decode phase run a
    faster clock than the hot prefill phase, a lock holds both at one clock, and decode
    barely feels the clock (calibration README): at low power locked vertices beat the
    limit-only curve (by ~2% in generated tokens, ~5% counting prompt tokens too), and
    the optimum uses them."""
    r = ReplicaState(0, 0, "h100", "llama-8b", 16, 0.12)
    c = replica_curve(r, count=count)  # type: ignore[arg-type]
    limit_only = replica_curve(r, allow_clock_lock=False, count=count)  # type: ignore[arg-type]
    gains = [
        t / limit_only.tokens_at(p)
        for p, t, lock in zip(c.power_w, c.tokens_per_s, c.clock_lock_mhz, strict=True)
        if lock is not None and limit_only.floor_w <= p < 0.85 * c.peak_w
    ]
    assert max(gains) > gain
    best_p = c.power_w[
        int(
            np.argmax(
                [
                    t / limit_only.tokens_at(p) if p >= limit_only.floor_w else 0
                    for p, t in zip(c.power_w, c.tokens_per_s, strict=True)
                ]
            )
        )
    ]
    nodes = [NodeState(0, "dgx-h100", 1)]
    host = physics.HOST_KINDS["dgx-h100"]
    res = solve(
        [r],
        nodes,
        best_p + float(physics.host_power_w(host, best_p / 700.0)),
        count=count,  # type: ignore[arg-type]
    )
    d = res.replicas[0]
    assert d.clock_lock_mhz is not None
    assert d.tokens_per_s > gain * limit_only.tokens_at(d.power_w)
    assert d.realised_tokens_per_s > gain * best_single_knob(r, d.power_w, False, count)


def test_pure_decode_gains_nothing_from_a_lock():
    """In this physics a single-phase replica reaches the same clock at the same power by
    either knob (the limit's controller lowers F until P fits): for pure decode every
    vertex of the lock-and-limit envelope is matched, within 1%, by a limit alone. The
    calibration README's decode saving from a lock is against no cap at all, which a
    limit at the same power gives too."""
    r = ReplicaState(0, 0, "h100", "llama-8b", 16, 0.0)
    c = replica_curve(r)
    for p, t in zip(c.power_w, c.tokens_per_s, strict=True):
        assert t <= best_single_knob(r, p, locks=False) * 1.01


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
    replicas: list[ReplicaState],
    nodes: list[NodeState],
    budget_w: float,
    limits: np.ndarray,
    count: str,
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
            t = op.tokens_per_s if count == "all" else op.decode_tokens_per_s
            tok = (tok[:, None] + np.asarray(t)[None, :]).ravel()
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


@pytest.mark.parametrize("count", ["generated", "all"])
@pytest.mark.parametrize("budget_w", [5200.0, 4300.0, 3300.0, 2200.0])
def test_milp_matches_brute_force_on_two_small_nodes(budget_w: float, count: str):
    """2 nodes x 2 GPUs, limits on a 1 W grid and both drains, against the MILP with
    locks off (the grid has none). At 2200 W node 0 runs in the stall stretch, where the
    prediction may run ahead of any setting (module docstring); the settings do not."""
    nodes = [NodeState(0, "dgx-h100", 2), NodeState(1, "dgx-h100", 2)]
    reps = [
        ReplicaState(0, 0, "h100", "llama-8b", 48, 0.0),
        ReplicaState(1, 0, "h100", "llama-8b", 256, 0.12),
        ReplicaState(2, 1, "h100", "llama-8b", 128, 0.12),
        ReplicaState(3, 1, "h100", "llama-8b", 64, 1.0),
    ]
    grid = brute_force(reps, nodes, budget_w, np.arange(200.0, 700.0 + 1, 1.0), count)
    res = solve(reps, nodes, budget_w, allow_clock_lock=False, count=count)  # type: ignore[arg-type]
    assert res.status == "optimal"
    assert res.power_w <= budget_w + 1e-6
    # Prediction and settings (by physics) both match or beat every grid point, up to the
    # curves' sampling and thinning (0.1%), and what the settings do is within 1% of the
    # best grid point: the grid misses nothing and the MILP claims nothing it cannot do.
    assert res.tokens_per_s >= grid * (1 - 1e-3)
    assert grid * (1 - 1e-3) <= res.realised_tokens_per_s <= grid * 1.01
    check_mapping(reps, res, count)


def identical(pf: float) -> tuple[list[ReplicaState], list[NodeState]]:
    nodes = [NodeState(0, "dgx-h100", 4), NodeState(1, "dgx-h100", 4)]
    return [ReplicaState(i, i // 4, "h100", "llama-8b", 160, pf) for i in range(8)], nodes


@pytest.mark.parametrize("ratio", [0.9, 0.75, 0.6])
def test_identical_replicas_split_the_budget_evenly(ratio: float):
    reps, nodes = identical(0.0)
    top = solve(reps, nodes, 1e7)
    res = solve(reps, nodes, ratio * top.power_w, allow_drain=False)
    assert res.status == "optimal"
    powers = [d.power_w for d in res.replicas]
    assert max(powers) - min(powers) <= 1e-6 * max(powers)
    assert len({(d.power_limit_w, d.clock_lock_mhz) for d in res.replicas}) == 1
    assert res.power_w == pytest.approx(ratio * top.power_w, rel=1e-5)
    check_mapping(reps, res)


@pytest.mark.parametrize("ratio", [0.9, 0.75, 0.6])
def test_identical_mixed_replicas_share_one_marginal(ratio: float):
    """With 12% prefill the envelope alternates between lock and limit vertices, and a
    setting between two of them can sit a hair (<0.1%) under the chord: the optimum
    then keeps the LP's split over the two vertices, which physics rewards. Either way
    every replica sits on the same segment (equal marginal tokens per watt), and the
    prediction is the even split's on the envelope."""
    reps, nodes = identical(0.12)
    top = solve(reps, nodes, 1e7)
    res = solve(reps, nodes, ratio * top.power_w, allow_drain=False)
    c = replica_curve(reps[0])
    powers = np.asarray([d.power_w for d in res.replicas])
    seg = np.searchsorted(c.power_w, powers.min() + 1e-6, side="right") - 1
    assert powers.max() <= c.power_w[seg + 1] + 1e-6
    assert res.tokens_per_s == pytest.approx(8 * c.tokens_at(powers.mean()), rel=1e-9)
    check_mapping(reps, res)


@pytest.mark.parametrize("ratio", [0.85, 0.75])
def test_mixed_replicas_meet_at_equal_marginal_tokens_per_watt(ratio: float):
    """KKT for a concave allocation: no replica's next watt is worth more than another's
    last one (host cost per watt is the same on identical nodes). Budgets where no
    replica is left in the stall stretch, so no dive restricts a curve."""
    reps, nodes = small_facility()
    top = solve(reps, nodes, 1e7)
    res = solve(reps, nodes, ratio * top.power_w, allow_drain=False)
    curves = [replica_curve(r) for r in reps]
    left, right = [], []
    for c, d in zip(curves, res.replicas, strict=True):
        if len(c.power_w) == 1:
            continue
        s = np.concatenate([[np.inf], c.slopes, [0.0]])  # s[i + 1]: slope from vertex i to i+1
        i = int(np.searchsorted(c.power_w, d.power_w + 1e-6, side="right")) - 1
        if abs(c.power_w[i] - d.power_w) <= 1e-6:  # at vertex i
            left.append(s[i])
            right.append(s[i + 1])
        else:  # inside segment i..i+1
            left.append(s[i + 1])
            right.append(s[i + 1])
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


def least_power_for(r: ReplicaState, generated: float) -> float:
    """Independent check: the least power any limit (1 W steps) or lock (at max limit,
    every supported clock) needs to generate ``generated`` tokens/s."""
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
        ok = np.asarray(op.decode_tokens_per_s) >= generated
        if ok.any():
            best = min(best, float(np.asarray(op.power_w)[ok].min()))
    return best * model.tensor_parallel


@pytest.mark.parametrize(("pf", "tight"), [(0.0, False), (0.0, True), (0.12, False), (0.12, True)])
def test_demand_capped_replica_gets_no_more_power_than_it_needs(pf: float, tight: bool):
    """Demand is in generated tokens/s; the capped replica gets the least power that
    generates it (checked against an independent 1 W / every-clock search) and its
    setting really generates it."""
    nodes = [NodeState(0, "dgx-h100", 2)]
    free = ReplicaState(0, 0, "h100", "llama-8b", 200, pf)
    _, peak_generated = true_point(free, H100.power_max_w, None, "generated")
    demand = 0.6 * peak_generated
    capped = ReplicaState(1, 0, "h100", "llama-8b", 200, pf, demand_tokens_per_s=demand)
    top = solve([free, capped], nodes, 1e7)
    budget = 0.85 * top.power_w if tight else 1e7
    res = solve([free, capped], nodes, budget)
    d_free, d_cap = res.replicas
    _, generated = true_point(capped, d_cap.power_limit_w, d_cap.clock_lock_mhz, "generated")
    assert generated >= demand * (1 - 1e-9)
    assert d_cap.realised_tokens_per_s == pytest.approx(d_cap.tokens_per_s, rel=1e-6)
    if pf == 0.0:
        assert d_cap.tokens_per_s == pytest.approx(demand, rel=1e-9)
    assert d_cap.power_w <= least_power_for(capped, demand) + 1e-6
    curve = replica_curve(capped)
    assert d_cap.power_w == pytest.approx(curve.peak_w)  # the curve ends where demand is met
    assert d_cap.power_w < d_free.power_w
    if tight:  # the other replica takes what the capped one leaves
        assert res.power_w == pytest.approx(budget, rel=1e-5)
    check_mapping([free, capped], res)


def test_demand_is_in_generated_tokens():
    """Demand is what the load asks to be generated. With prompt tokens counted too, the
    curve stops where the cheapest setting generates the demand; a prefill pool, which
    generates nothing, is not capped by it; a zero demand makes a replica worth nothing."""
    r = ReplicaState(0, 0, "h100", "llama-8b", 200, 0.12, demand_tokens_per_s=4000.0)
    c = replica_curve(r)
    assert c.cap_tokens_per_s == pytest.approx(4000.0)
    _, generated = true_point(r, c.power_limit_w[-1], c.clock_lock_mhz[-1], "generated")
    assert generated == pytest.approx(4000.0, rel=1e-6)
    counted = replica_curve(r, count="all")
    assert counted.cap_tokens_per_s == pytest.approx(counted.peak_tokens_per_s)
    assert counted.cap_tokens_per_s > 4000.0  # the prompt tokens of those requests count too
    pool = ReplicaState(1, 0, "h100", "llama-8b", 64, 1.0, demand_tokens_per_s=0.0)
    assert replica_curve(pool, count="all").cap_tokens_per_s is None
    idle = ReplicaState(2, 1, "h100", "llama-8b", 64, 0.0, demand_tokens_per_s=0.0)
    nodes = [NodeState(0, "dgx-h100", 2), NodeState(1, "dgx-h100", 1)]
    res = solve([r, pool, idle], nodes, 1e7, allow_drain=False, count="all")
    assert res.replicas[1].tokens_per_s == pytest.approx(
        replica_curve(pool, count="all").peak_tokens_per_s
    )
    assert res.replicas[2].tokens_per_s == 0.0
    assert res.replicas[2].power_w == pytest.approx(replica_curve(idle, count="all").floor_w)


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
    ("seed", "ratio", "drain"), list(itertools.product([0, 1], [0.8, 0.5], [True, False]))
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
    with pytest.raises(ValueError, match="span"):
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


def single_knob_options(r: ReplicaState) -> tuple[np.ndarray, np.ndarray]:
    """(whole-replica power, tokens/s) of every limit alone (1 W steps) and every lock alone."""
    kind, model = physics.GPU_KINDS[r.gpu_kind], physics.MODELS[r.model]
    ops = [
        physics.operating_point(
            kind,
            model,
            batch=r.batch,
            prefill_fraction=r.prefill_fraction,
            power_limit_w=np.arange(kind.power_min_w, kind.power_max_w + 1, 1.0),
        ),
        physics.operating_point(
            kind,
            model,
            batch=r.batch,
            prefill_fraction=r.prefill_fraction,
            clock_cap_mhz=np.asarray(kind.supported_sm_clocks_mhz(), dtype=float),
        ),
    ]
    p = np.concatenate([np.asarray(op.power_w) for op in ops]) * model.tensor_parallel
    t = np.concatenate([np.asarray(op.tokens_per_s) for op in ops])
    return p, t


def test_in_the_stall_stretch_the_settings_are_still_the_best_real_ones():
    """Two A100 decode replicas with room for barely more than their floors: the envelope
    bridges the stall stretch with a chord no setting reaches, so the prediction runs
    ahead of physics; what the settings realise is still as good as an exhaustive search
    over both replicas' single-knob settings."""
    nodes = [NodeState(0, "dgx-a100", 2)]
    reps = [
        ReplicaState(0, 0, "a100", "llama-8b", 126, 0.0),
        ReplicaState(1, 0, "a100", "llama-8b", 266, 0.0),
    ]
    host = physics.HOST_KINDS["dgx-a100"]
    gpu_w = 226.0
    budget = gpu_w + float(physics.host_power_w(host, gpu_w / 800.0))
    res = solve(reps, nodes, budget, allow_drain=False)
    assert res.status == "optimal"
    check_mapping(reps, res)
    (pa, ta), (pb, tb) = single_knob_options(reps[0]), single_knob_options(reps[1])
    gpu = pa[:, None] + pb[None, :]
    total = gpu + np.asarray(physics.host_power_w(host, gpu / 800.0))
    best = float(np.where(total <= budget, ta[:, None] + tb[None, :], 0.0).max())
    assert res.realised_tokens_per_s >= best * (1 - 1e-3)
    assert res.tokens_per_s > 1.2 * res.realised_tokens_per_s  # the chord, not a setting


def test_diving_off_an_unreachable_chord_only_helps(monkeypatch: pytest.MonkeyPatch):
    reps, nodes = small_facility()
    top = solve(reps, nodes, 1e7)
    budget = 0.65 * top.power_w
    dived = solve(reps, nodes, budget, allow_drain=False)
    monkeypatch.setattr(optimum, "MAX_DIVES", 0)
    plain = solve(reps, nodes, budget, allow_drain=False)
    assert plain.realised_tokens_per_s < 0.98 * plain.tokens_per_s  # one replica falls short
    assert dived.realised_tokens_per_s > plain.realised_tokens_per_s
    assert dived.realised_tokens_per_s >= 0.99 * dived.tokens_per_s
    check_mapping(reps, dived)
