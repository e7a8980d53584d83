"""The oracle bounds: brute force agrees with it, no static setting beats it, it is sane.

The brute force and the static policies below call ``physics.operating_point`` directly
(never the oracle's helpers): settings on grids, batches on an integer grid, dithering
between neighbouring settings by explicit time shares, and the budget split over
replicas and nodes by max-plus convolution on a fine power grid.
"""

from __future__ import annotations

import itertools
import math
from functools import cache

import numpy as np
import pytest

from wattkeeper.simulator import oracle, physics
from wattkeeper.simulator.oracle import ModelDemand, NodeIn, ReplicaIn, Slo

RHO = oracle.PREFILL_UTILISATION_MAX
MARGIN = oracle.DEFAULT_MARGIN
CHAT = 250 / 600  # steady-decode's prompt:output ratio
SLO = Slo(ttft_s=2.0, tpot_s=0.05)


# --------------------------------------------------------------------------------------
# Physics, straight: one replica at a setting and batch, its prompts served
# --------------------------------------------------------------------------------------


def served(kind, model, k, slo, batch, limit, lock):
    """Physics at (batch, setting) with the prefill share that makes k prompt tokens per
    generated token: the busy decode rate at pf 0 and the prefill rate at pf 1 fix pf,
    then one more call gives what the replica does."""
    kw = {"clock_cap_mhz": lock, "power_limit_w": limit}
    g = physics.operating_point(kind, model, batch=np.maximum(batch, 1.0), **kw)
    p = physics.operating_point(kind, model, batch=1.0, prefill_fraction=1.0, **kw)
    kg = k * np.asarray(g.decode_tokens_per_s)
    pf = np.where(kg > 0, kg / (np.asarray(p.prefill_tokens_per_s) + kg), 0.0)
    op = physics.operating_point(kind, model, batch=batch, prefill_fraction=pf, **kw)
    tokens = np.asarray(op.decode_tokens_per_s)
    np.testing.assert_allclose(op.prefill_tokens_per_s, k * tokens, rtol=1e-9, atol=1e-9)
    ok = (np.asarray(op.tpot_s) <= slo.tpot_s) & (pf <= RHO + 1e-12)
    return tokens, np.asarray(op.power_w) * model.tensor_parallel, ok


def settings(kind, locks=True):
    """Limits on a 1 W grid, then every supported lock at the max limit; families."""
    limits = np.arange(kind.power_min_w, kind.power_max_w + 0.5, 1.0)
    lock = np.full(limits.shape, np.nan)
    fam = np.zeros(limits.shape, int)
    if locks:
        clocks = np.sort(np.array(kind.supported_sm_clocks_mhz(), float))
        limits = np.concatenate([limits, np.full(clocks.shape, kind.power_max_w)])
        lock = np.concatenate([lock, clocks])
        fam = np.concatenate([fam, np.ones(clocks.shape, int)])
    return limits, lock, fam


def feasible_end(kind, model, k, slo, cap, limits, lock):
    """Each setting's largest feasible batch (feasibility only falls as the batch grows),
    by bisection on physics; NaN where batch 1 is already infeasible."""
    _, _, ok1 = served(kind, model, k, slo, np.ones(limits.size), limits, lock)
    lo, hi = np.ones(limits.size), np.full(limits.size, float(cap))
    _, _, ok_top = served(kind, model, k, slo, hi, limits, lock)
    lo = np.where(ok_top, hi, lo)
    for _ in range(40):
        mid = (lo + hi) / 2
        _, _, ok = served(kind, model, k, slo, mid, limits, lock)
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
    return np.where(ok1, lo, np.nan)


@cache
def replica_points(kind_name, model_name, k, slo, cap, locks=True, share=math.inf):
    """Every operating point of one replica: each setting at each batch on a grid (below
    one in hundredths, then integers up to the cap, and its exact feasible end), plus
    dithering between the feasible ends of neighbouring settings in 1.25% time shares.
    Rates capped at ``share``."""
    kind, model = physics.GPU_KINDS[kind_name], physics.MODELS[model_name]
    limits, lock, fam = settings(kind, locks)
    batch = np.concatenate([np.arange(0.01, 1.0, 0.01), np.arange(1.0, cap + 1.0)])
    tok, pw, ok = served(kind, model, k, slo, batch[None, :], limits[:, None], lock[:, None])
    end = feasible_end(kind, model, k, slo, cap, limits, lock)
    has = ~np.isnan(end)
    end_t, end_p, end_ok = served(kind, model, k, slo, np.nan_to_num(end, nan=1.0), limits, lock)
    assert np.all(end_ok[has])
    end_t, end_p = np.where(has, end_t, np.nan), np.where(has, end_p, np.nan)
    ok &= has[:, None] & (batch[None, :] <= np.nan_to_num(end, nan=0.0)[:, None])
    pair = has[:-1] & has[1:] & (fam[:-1] == fam[1:])
    theta = np.linspace(0.0, 1.0, 81)[None, :]
    dt = (end_t[:-1][pair, None] * theta + end_t[1:][pair, None] * (1 - theta)).ravel()
    dp = (end_p[:-1][pair, None] * theta + end_p[1:][pair, None] * (1 - theta)).ravel()
    idle = model.tensor_parallel * kind.idle_w
    t = np.concatenate([[0.0], tok[ok], end_t[has], dt])
    p = np.concatenate([[idle], pw[ok], end_p[has], dp])
    return p, np.minimum(t, share)


def pareto(p, t):
    """Most rate for at most each power: sorted powers and running maxima."""
    order = np.argsort(p, kind="stable")
    return p[order], np.maximum.accumulate(t[order])


def on_grid(p, t, delta, top):
    """The Pareto step function on a grid of ``delta`` W (a point's power rounded up)."""
    f = np.full(math.ceil(top / delta) + 2, -np.inf)
    np.maximum.at(f, np.ceil(p / delta - 1e-9).astype(int), t)
    return np.maximum.accumulate(f)


def rises(f):
    """Where a step function goes up (comparisons only: -inf stays -inf)."""
    return f > np.concatenate([[-np.inf], f[:-1]])


def maxplus(f, g):
    """Best total rate for each total power bin over two independent parts."""
    out = np.full(f.size + g.size - 1, -np.inf)
    steps = np.flatnonzero(rises(f))
    for i in steps:
        np.maximum(out[i : i + g.size], f[i] + g, out=out[i : i + g.size])
    return np.maximum.accumulate(out)


def best_rate(point_sets, gpu_budget_w, delta):
    """Most total rate with the replicas' power at most the budget: all but the last
    replica convolved on the grid, the last one searched exactly."""
    if not point_sets:
        return 0.0
    *head, last = point_sets
    lp, lt = pareto(*last)
    if not head:
        i = np.searchsorted(lp, gpu_budget_w + 1e-9, side="right") - 1
        return float(lt[i]) if i >= 0 else -np.inf
    f = None
    for p, t in head:
        g = on_grid(p, t, delta, p.max())
        f = g if f is None else maxplus(f, g)
    bins = np.flatnonzero(rises(f))
    rest = gpu_budget_w - bins * delta
    j = np.searchsorted(lp, rest + 1e-9, side="right") - 1
    total = np.where(j >= 0, f[bins] + lt[np.maximum(j, 0)], -np.inf)
    return float(total.max()) if total.size else -np.inf


def node_parts(node: NodeIn, reps):
    """(fixed watts when on, facility watts per replica GPU watt, watts when drained)."""
    host = physics.HOST_KINDS[node.host_kind]
    kind = physics.GPU_KINDS[reps[0].kind]
    gpu_max = node.gpus * kind.power_max_w
    slope = 1 + (host.serving_w - host.idle_w) / gpu_max
    spare = (node.gpus - len(reps)) * kind.idle_w
    return host.idle_w + slope * spare, slope, node.standby_w


def brute_force(reps, nodes, demand, slo, budgets, *, variant="full", delta=0.02, cap=256):
    """Most good tokens/s at each effective budget: every on/off choice of the nodes, the
    GPU budget left split over the replicas of the nodes that are on."""
    k = demand.prompt_per_output
    share = math.inf if variant == "full" else demand.output_tokens_per_s / len(reps)
    locks = variant == "full"
    parts = {n.node: node_parts(n, [r for r in reps if r.node == n.node]) for n in nodes}
    slopes = {round(s, 12) for _, s, _ in parts.values()}
    assert len(slopes) == 1, "the brute force needs one host slope for all nodes"
    slope = slopes.pop()
    choices = (
        itertools.product([True, False], repeat=len(nodes))
        if variant == "full"
        else [(True,) * len(nodes)]
    )
    best = np.full(len(budgets), -np.inf)
    for on in choices:
        up = {n.node for n, o in zip(nodes, on, strict=True) if o}
        fixed = sum(parts[n][0] if n in up else parts[n][2] for n in parts)
        sets = [
            replica_points(r.kind, r.model, k, slo, cap, locks, share) for r in reps if r.node in up
        ]
        for i, b in enumerate(budgets):
            gpu = (b - fixed) / slope
            if gpu < 0:
                continue
            best[i] = max(best[i], best_rate(sets, gpu, delta) if sets else 0.0)
    return np.minimum(best, demand.output_tokens_per_s)


def capacity(kind, model, k, slo, cap):
    """Most a replica serves within the SLO at any setting."""
    return float(replica_points(kind, model, k, slo, cap)[1].max())


# --------------------------------------------------------------------------------------
# 1. Brute force
# --------------------------------------------------------------------------------------

INSTANCES = {
    "2xH100": (
        [ReplicaIn(0, 0, "h100", "llama-8b", max_inflight=256),
         ReplicaIn(1, 0, "h100", "llama-8b", max_inflight=256)],
        [NodeIn(0, "dgx-h100", 2)],
        1.0,
    ),
    "3xA100": (
        [ReplicaIn(i, 0, "a100", "llama-8b", max_inflight=256) for i in range(3)],
        [NodeIn(0, "dgx-a100", 3)],
        0.7,
    ),
    "2x1xH100": (
        [ReplicaIn(i, i, "h100", "llama-8b", max_inflight=256) for i in range(2)],
        [NodeIn(0, "dgx-h100", 1), NodeIn(1, "dgx-h100", 1)],
        0.45,
    ),
    "4xH100": (
        [ReplicaIn(i, 0, "h100", "llama-8b", max_inflight=256) for i in range(4)],
        [NodeIn(0, "dgx-h100", 4)],
        0.8,
    ),
}  # fmt: skip


def _instance(name):
    reps, nodes, load = INSTANCES[name]
    cap_tps = sum(capacity(r.kind, r.model, CHAT, SLO, 256) for r in reps)
    out = load * cap_tps
    demand = ModelDemand("llama-8b", out, CHAT * out)
    return reps, nodes, demand


def _budgets(reps, nodes, demand, variant):
    """Ten effective budgets from the floor to the peak (and, where a node can drain,
    some below the all-on floor)."""
    floor_on = sum(
        node_parts(n, [r for r in reps if r.node == n.node])[0]
        + node_parts(n, [r for r in reps if r.node == n.node])[1]
        * sum(physics.GPU_KINDS[r.kind].idle_w for r in reps if r.node == n.node)
        for n in nodes
    )
    peak = oracle.solve(reps, nodes, [demand], SLO, None, variant=variant).facility_power_w
    low = floor_on if len(nodes) == 1 or variant == "limits" else 0.55 * floor_on
    return np.linspace(low, peak * 1.01, 10)


@pytest.mark.parametrize(
    ("name", "variant"),
    [
        ("2xH100", "full"),
        ("3xA100", "full"),
        ("2x1xH100", "full"),
        ("4xH100", "full"),
        ("2xH100", "limits"),
    ],
)
def test_brute_force_agrees(name, variant):
    reps, nodes, demand = _instance(name)
    effective = _budgets(reps, nodes, demand, variant)
    delta = 0.05 if len(reps) > 3 else 0.02  # the power grid of the convolution
    brute = brute_force(reps, nodes, demand, SLO, effective, variant=variant, delta=delta)
    for b, want in zip(effective, brute, strict=True):
        res = oracle.solve(reps, nodes, [demand], SLO, b / (1 - MARGIN), variant=variant)
        got = res.good_tokens_per_s
        assert res.status == "optimal"
        assert res.facility_power_w <= b * (1 + 1e-9)
        scale = max(want, 1.0)
        assert got >= want - 0.005 * scale, (b, got, want)
        assert got <= want + 0.005 * scale, (b, got, want)


# --------------------------------------------------------------------------------------
# 2. Dominance over every static cap and every static clock lock
# --------------------------------------------------------------------------------------


def static_serve(kind_name, model_name, k, slo, cap, limits, lock, lam_each):
    """Every replica at one setting (per row) serving ``lam_each`` or as much as it can
    within the SLO: (served tokens/s, group power) per setting."""
    kind, model = physics.GPU_KINDS[kind_name], physics.MODELS[model_name]
    end = feasible_end(kind, model, k, slo, cap, limits, lock)
    has = ~np.isnan(end)
    end = np.nan_to_num(end, nan=1.0)
    top, _, _ = served(kind, model, k, slo, end, limits, lock)
    target = np.where(has, np.minimum(lam_each, top), 0.0)
    lo, hi = np.zeros(limits.size), end.copy()
    for _ in range(50):
        mid = (lo + hi) / 2
        t, _, _ = served(kind, model, k, slo, mid, limits, lock)
        lo, hi = np.where(t >= target, lo, mid), np.where(t >= target, mid, hi)
    t, p, ok = served(kind, model, k, slo, hi, limits, lock)
    assert np.all(ok[has & (target > 0)])
    idle = model.tensor_parallel * kind.idle_w
    return np.where(has, t, 0.0), np.where(has, p, idle)


DOMINANCE = {
    # steady-decode-like: chat, demand 85% of uncapped capacity; budgets a quarter under
    # the uncapped draw (as the scenario) and half of it (the budget binds the oracle)
    "steady": (CHAT, Slo(2.0, 0.05), 0.85, (0.75, 0.5)),
    # prefill-heavy mix (mixed.toml's chat plus 3,000-token summaries)
    "prefill-heavy": (2.37, Slo(3.0, 0.08), 0.85, (0.8, 0.55)),
}


@pytest.mark.parametrize("name", sorted(DOMINANCE))
def test_no_static_setting_dominates(name):
    k, slo, load, budget_shares = DOMINANCE[name]
    n, cap = 4, 256
    node = NodeIn(0, "dgx-h100", n)
    reps = [ReplicaIn(i, 0, "h100", "llama-8b", max_inflight=cap) for i in range(n)]
    fixed, slope, _ = node_parts(node, reps)
    no_lock = np.array([np.nan])
    top, _ = static_serve("h100", "llama-8b", k, slo, cap, np.array([700.0]), no_lock, np.inf)
    out = load * n * float(top[0])
    each = out / n
    _, p0 = static_serve("h100", "llama-8b", k, slo, cap, np.array([700.0]), no_lock, each)
    demand = ModelDemand("llama-8b", out, k * out)

    clocks = np.sort(np.array(physics.H100_SXM.supported_sm_clocks_mhz(), float))
    limits = np.concatenate([np.arange(200.0, 701.0, 10.0), np.full(clocks.size, 700.0)])
    lock = np.concatenate([np.full(51, np.nan), clocks])
    tok, pw = static_serve("h100", "llama-8b", k, slo, cap, limits, lock, each)
    total, facility = n * tok, fixed + slope * n * pw

    # goodput under the budget, one that leaves the oracle room and one that binds it
    for share in budget_shares:
        budget_eff = share * (fixed + slope * n * float(p0[0]))
        best = oracle.solve(reps, [node], [demand], slo, budget_eff / (1 - MARGIN))
        assert best.facility_power_w <= budget_eff * (1 + 1e-9)
        fits = facility <= budget_eff
        assert fits.any() and (~fits).any()  # the budget rules some settings out
        assert np.all(total[fits] <= best.good_tokens_per_s * (1 + 1e-3))
    assert best.good_tokens_per_s < out * 0.99  # the tighter budget binds

    # energy: the oracle serves what each setting serves, for no more power
    for goal in np.unique(np.round(total[total > 0], 3)):
        same = np.isclose(total, goal, rtol=1e-6)
        d = ModelDemand("llama-8b", float(goal), k * float(goal))
        res = oracle.solve(reps, [node], [d], slo, None)
        assert res.good_tokens_per_s >= goal * (1 - 2e-4)
        assert res.facility_power_w <= facility[same].min() * (1 + 1e-3), goal


# --------------------------------------------------------------------------------------
# 3. Sanity
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "k", "role"),
    [("h100", CHAT, "mixed"), ("a100", CHAT, "mixed"), ("h100", 2.37, "mixed"),
     ("h100", 0.0, "decode"), ("h100", 0.0, "prefill")],
)  # fmt: skip
def test_w_r_rises_with_the_rate(kind, k, role):
    c = oracle.replica_curve(kind, "llama-8b", SLO, role=role, prompt_per_output=k, batch_cap=256)
    assert c.grid_tokens_per_s[0] == 0.0
    assert c.grid_power_w[0] == pytest.approx(physics.GPU_KINDS[kind].idle_w)
    assert np.all(np.diff(c.grid_tokens_per_s) > 0)
    assert np.all(np.diff(c.grid_power_w) >= -1e-9)  # never cheaper to serve more
    assert c.grid_power_w[-1] > c.grid_power_w[0]
    # the MILP's pieces: convex, left to right, within tolerance below W_r, never above
    assert 0.0 <= c.piece_gap_w <= oracle.PIECE_TOLERANCE_W + 1e-9
    assert np.all(
        c.power_at(c.grid_tokens_per_s) <= c.grid_power_w + oracle.THIN_TOLERANCE_W + 1e-9
    )
    for x, y in c.pieces:
        assert np.all(np.diff(x) > 0)
        slopes = np.diff(y) / np.diff(x)
        assert np.all(np.diff(slopes) >= -1e-9)


def test_w_r_is_not_convex_so_pieces_are_needed():
    """Busy costs a floor (memory power), so W_r jumps from idle: a convex envelope
    would claim a replica serves thousands of tokens/s for a few watts over idle."""
    c = oracle.replica_curve("h100", "llama-8b", SLO, prompt_per_output=CHAT, batch_cap=256)
    assert len(c.pieces) > 1
    lam = 0.1 * c.max_tokens_per_s
    chord = c.idle_w + (c.grid_power_w[-1] - c.idle_w) * 0.1
    assert float(c.power_at(lam)) > chord + 50.0


def test_budget_none_serves_all_feasible_demand():
    reps, nodes, _ = _instance("4xH100")
    cap_tps = sum(oracle.replica_curve(r.kind, r.model, SLO, prompt_per_output=CHAT,
                                       batch_cap=256).max_tokens_per_s for r in reps)  # fmt: skip
    for load in (0.3, 0.9):
        d = ModelDemand("llama-8b", load * cap_tps, CHAT * load * cap_tps)
        res = oracle.solve(reps, nodes, [d], SLO, None)
        assert res.good_tokens_per_s == pytest.approx(d.output_tokens_per_s, rel=2e-4)
        assert res.shed_tokens_per_s == pytest.approx(0.0, abs=2e-4 * d.output_tokens_per_s)
    over = ModelDemand("llama-8b", 3 * cap_tps, CHAT * 3 * cap_tps)
    res = oracle.solve(reps, nodes, [over], SLO, None)
    assert res.good_tokens_per_s == pytest.approx(cap_tps, rel=2e-4)
    assert res.shed_tokens_per_s == pytest.approx(2 * cap_tps, rel=1e-3)


def test_below_the_floor_full_drains_limits_sheds():
    reps = [ReplicaIn(i, i // 2, "h100", "llama-8b", max_inflight=256) for i in range(4)]
    nodes = [NodeIn(0, "dgx-h100", 2), NodeIn(1, "dgx-h100", 2)]
    d = ModelDemand("llama-8b", 8000.0, CHAT * 8000.0)
    one_on = node_parts(nodes[0], reps[:2])[0] + node_parts(nodes[0], reps[:2])[1] * 2 * 75.0
    all_on = 2 * one_on
    budget = (one_on + 150.0 + 300.0) / (1 - MARGIN)  # under every GPU idle, over one node's
    assert budget * (1 - MARGIN) < all_on
    full = oracle.solve(reps, nodes, [d], SLO, budget)
    assert full.status == "optimal"
    assert len(full.drained_nodes) == 1
    assert full.good_tokens_per_s > 0
    assert full.facility_power_w <= budget * (1 - MARGIN) + 1e-6
    limits = oracle.solve(reps, nodes, [d], SLO, budget, variant="limits")
    assert limits.status == "over_budget"
    assert limits.good_tokens_per_s == 0.0
    assert limits.shed_tokens_per_s == pytest.approx(8000.0)
    assert not limits.drained_nodes
    # below even standby: nothing fits anywhere
    tiny = oracle.solve(reps, nodes, [d], SLO, 200.0)
    assert tiny.status == "over_budget" and tiny.drained_nodes == {0, 1}


@pytest.mark.parametrize("name", ["2xH100", "2x1xH100", "4xH100"])
def test_limits_variant_never_beats_full(name):
    reps, nodes, demand = _instance(name)
    for b in np.linspace(1500, 3300, 7):
        full = oracle.solve(reps, nodes, [demand], SLO, b)
        limits = oracle.solve(reps, nodes, [demand], SLO, b, variant="limits")
        # (stage 2 may give up STAGE2_TOKEN_SLACK of the tokens for power)
        slack = 1 + 2 * oracle.STAGE2_TOKEN_SLACK
        assert limits.good_tokens_per_s <= full.good_tokens_per_s * slack
        if limits.good_tokens_per_s >= full.good_tokens_per_s * (1 - 1e-4):
            assert full.facility_power_w <= limits.facility_power_w * (1 + 1e-4)
        for p in limits.replicas:
            assert p.clock_lock_mhz is None


def _check_plans(res, reps, slo, k):
    """What physics says each plan's setting does: what the oracle says it does."""
    by_id = {r.replica: r for r in reps}
    for p in res.replicas:
        r = by_id[p.replica]
        kind, model = physics.GPU_KINDS[r.kind], physics.MODELS[r.model]
        if p.power_limit_w is None:
            assert p.served_tokens_per_s == 0.0 and p.prompt_tokens_per_s == 0.0
            continue
        op = physics.operating_point(
            kind,
            model,
            batch=p.batch,
            prefill_fraction=p.prefill_fraction,
            clock_cap_mhz=p.clock_lock_mhz,
            power_limit_w=p.power_limit_w,
        )
        assert float(op.decode_tokens_per_s) == pytest.approx(p.served_tokens_per_s, rel=1e-6)
        assert float(op.prefill_tokens_per_s) == pytest.approx(p.prompt_tokens_per_s, rel=1e-6)
        assert float(op.power_w) * model.tensor_parallel == pytest.approx(p.setting_power_w)
        if r.role == "mixed":
            assert p.prompt_tokens_per_s == pytest.approx(k * p.served_tokens_per_s, rel=6e-3)
        if r.role != "prefill":
            assert p.tpot_s <= slo.tpot_s * (1 + 1e-9)
            assert p.prefill_fraction <= RHO + 1e-9
            assert p.batch <= p.inflight_limit + 1e-9
            if r.max_inflight is not None:
                assert p.inflight_limit <= r.max_inflight
        # the oracle's watts: its piece of W_r; one setting may need a little more
        tol = oracle.PIECE_TOLERANCE_W + 1e-6
        assert p.power_w <= p.setting_power_w + tol
        assert p.setting_power_w <= p.power_w + 3.0 * model.tensor_parallel


@pytest.mark.parametrize("budget", [None, 24000.0, 15000.0])
def test_plans_are_what_physics_does(budget):
    reps = [ReplicaIn(i, i // 8, "h100", "llama-8b") for i in range(16)]
    nodes = [NodeIn(0, "dgx-h100", 8), NodeIn(1, "dgx-h100", 8)]
    d = ModelDemand("llama-8b", 100_000.0, CHAT * 100_000.0, 250.0, 600.0)
    res = oracle.solve(reps, nodes, [d], SLO, budget)
    _check_plans(res, reps, SLO, CHAT)
    assert res.good_tokens_per_s == pytest.approx(sum(p.served_tokens_per_s for p in res.replicas))
    assert res.gpu_power_w == pytest.approx(sum(p.power_w for p in res.replicas))
    assert res.facility_power_w == pytest.approx(res.gpu_power_w + res.host_power_w)


def test_tensor_parallel_groups_in_lockstep():
    reps = [ReplicaIn(i, 0, "h100", "llama-70b") for i in range(2)]
    nodes = [NodeIn(0, "dgx-h100", 8)]
    slo = Slo(3.0, 0.08)
    d = ModelDemand("llama-70b", 3000.0, 3 * 3000.0)
    res = oracle.solve(reps, nodes, [d], slo, None)
    assert res.good_tokens_per_s == pytest.approx(3000.0, rel=2e-4)
    _check_plans(res, reps, slo, 3.0)
    m = physics.MODELS["llama-70b"]
    for p in res.replicas:
        if p.power_limit_w is None:
            continue
        group = physics.group_operating_point(
            physics.H100_SXM,
            m,
            batch=np.full(m.tensor_parallel, p.batch),
            prefill_fraction=p.prefill_fraction,
            clock_cap_mhz=p.clock_lock_mhz,
            power_limit_w=np.full(m.tensor_parallel, p.power_limit_w),
        )
        assert float(np.sum(group.power_w)) == pytest.approx(p.setting_power_w)
        assert float(group.decode_tokens_per_s[0]) == pytest.approx(p.served_tokens_per_s)


def test_disaggregated_prefill_feeds_decode():
    slo = Slo(3.0, 0.08)
    reps = [
        ReplicaIn(0, 0, "h100", "llama-70b", role="prefill"),
        ReplicaIn(1, 0, "h100", "llama-70b", role="prefill"),
        ReplicaIn(2, 1, "h100", "llama-70b", role="decode"),
        ReplicaIn(3, 1, "h100", "llama-70b", role="decode"),
    ]
    nodes = [NodeIn(0, "dgx-h100", 8), NodeIn(1, "dgx-h100", 8)]
    k = 3.0
    d = ModelDemand("llama-70b", 5000.0, k * 5000.0)
    res = oracle.solve(reps, nodes, [d], slo, None)
    assert res.good_tokens_per_s == pytest.approx(5000.0, rel=2e-4)
    _check_plans(res, reps, slo, k)
    prompts = sum(p.prompt_tokens_per_s for p in res.replicas if p.role == "prefill")
    decoded = sum(p.served_tokens_per_s for p in res.replicas if p.role == "decode")
    assert prompts >= k * decoded * (1 - 6e-3)
    assert all(p.served_tokens_per_s == 0.0 for p in res.replicas if p.role == "prefill")
    # no prefill pool: the decoders get nothing to decode
    alone = oracle.solve(reps[2:], nodes[1:], [d], slo, None)
    assert alone.good_tokens_per_s == pytest.approx(0.0, abs=1e-6)
    # a tight budget: the prompt pool still covers what is decoded
    tight = oracle.solve(reps, nodes, [d], slo, 0.6 * res.facility_power_w / (1 - MARGIN))
    pre = sum(p.prompt_tokens_per_s for p in tight.replicas if p.role == "prefill")
    dec = sum(p.served_tokens_per_s for p in tight.replicas if p.role == "decode")
    assert 0 < dec < 5000.0 and pre >= k * dec * (1 - 6e-3)


def test_kv_cache_caps_the_batch():
    long = ModelDemand("llama-8b", 1000.0, 20_000.0, 3000.0, 150.0)
    kv = oracle.kv_capacity_seqs("h100", "llama-8b", long)
    assert 100 < kv < 200  # ~465k tokens of KV over 3,075 per request
    cap = oracle.batch_cap(ReplicaIn(0, 0, "h100", "llama-8b"), long)
    assert kv <= cap <= kv * 2 ** (1 / 16) + 1e-9
    assert oracle.batch_cap(ReplicaIn(0, 0, "h100", "llama-8b", max_inflight=64), long) == 64
    assert oracle.batch_cap(ReplicaIn(0, 0, "h100", "llama-8b"), None) == 1024


def test_dead_nodes_draw_and_serve_nothing():
    reps = [ReplicaIn(i, i // 2, "h100", "llama-8b", max_inflight=256) for i in range(4)]
    nodes = [NodeIn(0, "dgx-h100", 2), NodeIn(1, "dgx-h100", 2, alive=False)]
    d = ModelDemand("llama-8b", 50_000.0, CHAT * 50_000.0)
    res = oracle.solve(reps, nodes, [d], SLO, None)
    assert all(p.served_tokens_per_s == 0 and p.power_w == 0 for p in res.replicas[2:])
    assert res.drained_nodes == frozenset()
    one = oracle.solve(reps[:2], nodes[:1], [d], SLO, None)
    assert res.facility_power_w == pytest.approx(one.facility_power_w)
    assert res.good_tokens_per_s == pytest.approx(one.good_tokens_per_s)


def test_re_solving_uses_the_curve_cache():
    reps = [ReplicaIn(i, i // 8, "h100", "llama-8b", max_inflight=256) for i in range(32)]
    nodes = [NodeIn(n, "dgx-h100", 8) for n in range(4)]
    d = ModelDemand("llama-8b", 200_000.0, CHAT * 200_000.0)
    oracle.solve(reps, nodes, [d], SLO, 24_000.0)
    size = oracle.cache_size()
    for b in (20_000.0, 24_000.0, 28_000.0):
        for scale in (0.9, 1.0):
            dd = ModelDemand("llama-8b", scale * 200_000.0, CHAT * scale * 200_000.0)
            oracle.solve(reps, nodes, [dd], SLO, b)
    assert oracle.cache_size() == size


def test_bad_inputs_are_refused():
    d = ModelDemand("llama-8b", 1.0, 1.0)
    with pytest.raises(ValueError, match="variant"):
        oracle.solve([], [], [d], SLO, None, variant="other")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not given"):
        oracle.solve([ReplicaIn(0, 9, "h100", "llama-8b")], [], [d], SLO, None)
    with pytest.raises(ValueError, match="GPUs"):
        oracle.solve([ReplicaIn(0, 0, "h100", "llama-70b")], [NodeIn(0, "dgx-h100", 2)], [d],
                     SLO, None)  # fmt: skip
    with pytest.raises(ValueError, match="not modelled"):
        oracle.replica_curve("a100", "llama-405b-fp8", SLO)


# --------------------------------------------------------------------------------------
# Reference figures (an outside check of this physics): steady-decode, 32 H100
# --------------------------------------------------------------------------------------


def _steady_decode(max_inflight):
    reps = [ReplicaIn(i, i // 8, "h100", "llama-8b", max_inflight=max_inflight) for i in range(32)]
    nodes = [NodeIn(n, "dgx-h100", 8) for n in range(4)]
    d = ModelDemand("llama-8b", 345 * 600.0, 345 * 250.0, 250.0, 600.0)
    return reps, nodes, d


def test_reference_figures_steady_decode():
    """About 405 W per GPU, 10.2 tokens/J at in-flight 256, 10.8 at 512, 6.56 uncapped."""
    reps, nodes, d = _steady_decode(256)
    at256 = oracle.solve(reps, nodes, [d], SLO, None)
    at512 = oracle.solve(*_steady_decode(512)[:2], [d], SLO, None)
    assert at256.good_tokens_per_s == pytest.approx(d.output_tokens_per_s, rel=2e-4)
    assert 385.0 <= at256.gpu_power_w / 32 <= 415.0
    assert 10.2 * 0.96 <= at256.good_tokens_per_s / at256.facility_power_w <= 10.2 * 1.04
    assert 10.8 * 0.96 <= at512.good_tokens_per_s / at512.facility_power_w <= 10.8 * 1.04
    each = d.output_tokens_per_s / 32
    t, p = static_serve("h100", "llama-8b", CHAT, SLO, 256, np.array([700.0]),
                        np.array([np.nan]), each)  # fmt: skip
    assert float(t[0]) == pytest.approx(each)
    fixed, slope, _ = node_parts(nodes[0], reps[:8])
    uncapped = d.output_tokens_per_s / (4 * (fixed + slope * 8 * float(p[0])))
    assert 6.56 * 0.96 <= uncapped <= 6.56 * 1.04
