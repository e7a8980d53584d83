"""The budget-tree allocator against an independent reference, an LP, and the optimality
certificate of max-min fairness; seeded loops stand in for property-based tests."""

import numpy as np
import pytest
from scipy.optimize import linprog

from wattkeeper.policies.budget_tree import BudgetTree, allocate_tree


def water_fill(lower: np.ndarray, upper: np.ndarray, total: float) -> np.ndarray:
    """Reference for one budget: x_i = clip(level, lower_i, upper_i) summing to total."""
    if upper.sum() <= total:
        return upper.copy()
    if lower.sum() >= total:
        return lower.copy()
    lo, hi = float(lower.min()), float(upper.max())
    for _ in range(200):
        level = (lo + hi) / 2
        if np.clip(level, lower, upper).sum() > total:
            hi = level
        else:
            lo = level
    return np.clip(lo, lower, upper)


TOL = 1e-6


# -- an independent reference: event-driven progressive filling, one budget at a time --
def _piecewise_level(fixed, lows, ups, capacity):
    """Highest t with fixed + sum clip(t, lows, ups) <= capacity, exactly (breakpoints)."""
    if fixed + sum(ups) <= capacity:
        return np.inf
    points = sorted(set(lows) | set(ups))

    def total(t):
        return fixed + sum(min(max(t, lo), up) for lo, up in zip(lows, ups, strict=True))

    prev = points[0]
    if total(prev) >= capacity:  # full at the floors, up to rounding
        return prev
    for p in points[1:]:
        if total(p) > capacity:
            a, b = total(prev), total(p)
            return prev + (capacity - a) * (p - prev) / (b - a)
        prev = p
    raise AssertionError("unreachable: the last breakpoint sums to sum(ups)")


def reference(parents, limits, overhead, leaf_parent, lower, upper):
    n_nodes, n = len(parents), len(lower)

    def chain(v):
        out = []
        while v != -1:
            out.append(v)
            v = parents[v]
        return out

    members = [[] for _ in range(n_nodes)]
    for i in range(n):
        for v in chain(leaf_parent[i]):
            members[v].append(i)
    sub_ov = [0.0] * n_nodes
    for v in range(n_nodes):
        for a in chain(v):
            sub_ov[a] += overhead[v]
    capacity = [limits[v] - sub_ov[v] for v in range(n_nodes)]
    frozen = {}
    for v in range(n_nodes):
        if sum(lower[i] for i in members[v]) > capacity[v] + 1e-9:
            frozen.update({i: lower[i] for i in members[v]})
    bound = set()
    while True:
        best, best_v = np.inf, None
        for v in range(n_nodes):
            active = [i for i in members[v] if i not in frozen]
            if v in bound or not active:
                continue
            fixed = sum(frozen[i] for i in members[v] if i in frozen)
            t = _piecewise_level(
                fixed, [lower[i] for i in active], [upper[i] for i in active], capacity[v]
            )
            if t < best:
                best, best_v = t, v
        if best_v is None:
            break
        bound.add(best_v)
        for i in members[best_v]:
            if i not in frozen:
                frozen[i] = min(max(best, lower[i]), upper[i])
    return np.array([frozen.get(i, upper[i]) for i in range(n)])


# -- random laminar instances ------------------------------------------------------
def random_instance(rng, *, allow_infeasible=False):
    n_nodes = int(rng.integers(1, 14))
    order = rng.permutation(n_nodes)  # the root need not be entry 0
    parents = [-1] * n_nodes
    for k in range(1, n_nodes):
        parents[order[k]] = int(order[rng.integers(0, k)])
    n = int(rng.integers(1, 30))
    leaf_parent = rng.integers(0, n_nodes, n)  # GPUs may hang off any budget, not only leaves
    lower = rng.choice([100.0, 150.0, 200.0], n) + rng.uniform(0, 50, n).round(1)
    upper = lower + np.where(rng.random(n) < 0.2, 0.0, rng.uniform(0, 500, n))
    overhead = np.where(rng.random(n_nodes) < 0.5, 0.0, rng.uniform(0, 300, n_nodes))
    tree0 = BudgetTree.from_parents([f"b{v}" for v in range(n_nodes)], parents, [np.inf] * n_nodes)
    lo_sum = np.zeros(n_nodes)
    up_sum = np.zeros(n_nodes)
    for d in range(tree0.max_depth + 1):
        owner = tree0.ancestors[leaf_parent, d]
        has = owner >= 0
        np.add.at(lo_sum, owner[has], lower[has])
        np.add.at(up_sum, owner[has], upper[has])
    sub_ov = np.zeros(n_nodes)
    for v in range(n_nodes):
        for a in tree0.ancestors[v]:
            if a >= 0:
                sub_ov[a] += overhead[v]
    frac = rng.uniform(-0.2 if allow_infeasible else 0.0, 1.2, n_nodes)
    limits = sub_ov + lo_sum + frac * (up_sum - lo_sum)
    if allow_infeasible:
        limits = np.where(rng.random(n_nodes) < 0.15, limits - 50, limits)
    limits = np.maximum(limits, 0.0)
    limits = np.where(rng.random(n_nodes) < 0.25, np.inf, limits)
    return parents, limits, overhead, leaf_parent, lower, upper


def subtree_matrix(tree, leaf_parent):
    """A[v, i] = 1 when GPU i is under budget v."""
    a = np.zeros((tree.size, len(leaf_parent)))
    for d in range(tree.max_depth + 1):
        owner = tree.ancestors[leaf_parent, d]
        for i, v in enumerate(owner):
            if v >= 0:
                a[v, i] = 1.0
    return a


def assert_feasible(tree, res, a, lower, upper):
    x = res.limits_w
    assert np.all(x >= lower - TOL) and np.all(x <= upper + TOL)
    used = a @ x + tree.subtree_overhead_w
    assert np.allclose(used, res.node_allocated_w)
    bad = {int(b.index) for b in res.infeasible}
    for v in range(tree.size):
        if v not in bad and not any(w in bad for w in _descendants(tree, v)):
            assert used[v] <= tree.limits_w[v] + TOL, (v, used[v], tree.limits_w[v])


def _descendants(tree, v):
    return [w for w in range(tree.size) if w != v and v in tree.ancestors[w]]


def assert_max_min_fair(tree, res, a, lower, upper):
    """The exchange certificate: a GPU below its upper bound has a full budget above it,
    and nothing under the smallest such budget that could give up watts has more."""
    x = res.limits_w
    tight = res.node_allocated_w >= tree.limits_w - TOL
    for i in range(len(x)):
        if x[i] >= upper[i] - TOL:
            continue
        chain = [v for v in range(tree.size) if a[v, i] and tight[v]]
        assert chain, f"GPU {i} at {x[i]} < {upper[i]} with no full budget above it"
        smallest = min(chain, key=lambda v: a[v].sum())
        donors = (a[smallest] > 0) & (x > lower + TOL)
        assert not donors.any() or x[donors].max() <= x[i] + TOL


def test_random_trees_match_reference_lp_and_certificate():
    rng = np.random.default_rng(20240611)
    for _ in range(250):
        parents, limits, overhead, leaf_parent, lower, upper = random_instance(rng)
        names = [f"b{v}" for v in range(len(parents))]
        tree = BudgetTree.from_parents(names, parents, limits, overhead)
        res = allocate_tree(tree, leaf_parent, lower, upper)
        assert res.feasible
        a = subtree_matrix(tree, leaf_parent)
        assert_feasible(tree, res, a, lower, upper)
        assert_max_min_fair(tree, res, a, lower, upper)
        ref = reference(parents, limits, overhead, list(leaf_parent), lower, upper)
        np.testing.assert_allclose(res.limits_w, ref, atol=1e-6)
        finite = np.isfinite(limits)
        lp = linprog(
            -np.ones(len(lower)),
            A_ub=a[finite],
            b_ub=(limits - tree.subtree_overhead_w)[finite],
            bounds=list(zip(lower, upper, strict=True)),
            method="highs",
        )
        assert lp.status == 0
        assert res.limits_w.sum() == pytest.approx(-lp.fun, abs=1e-5)


def test_random_trees_with_infeasible_budgets_match_reference():
    rng = np.random.default_rng(7)
    seen_infeasible = 0
    for _ in range(200):
        parents, limits, overhead, leaf_parent, lower, upper = random_instance(
            rng, allow_infeasible=True
        )
        names = [f"b{v}" for v in range(len(parents))]
        tree = BudgetTree.from_parents(names, parents, limits, overhead)
        res = allocate_tree(tree, leaf_parent, lower, upper)
        a = subtree_matrix(tree, leaf_parent)
        assert_feasible(tree, res, a, lower, upper)
        ref = reference(parents, limits, overhead, list(leaf_parent), lower, upper)
        np.testing.assert_allclose(res.limits_w, ref, atol=1e-6)
        for bad in res.infeasible:
            seen_infeasible += 1
            under = a[bad.index] > 0
            np.testing.assert_array_equal(res.limits_w[under], lower[under])
            assert bad.floors_w + bad.overhead_w > bad.limit_w
    assert seen_infeasible > 10


def _rack_tree(rack_limits, node_overhead=0.0):
    """facility > racks > nodes of 8 GPUs; node budgets unlimited."""
    names, parents, limits, overhead = ["facility"], [-1], [np.inf], [0.0]
    nodes = []
    for r, lim in enumerate(rack_limits):
        names.append(f"rack{r}")
        parents.append(0)
        limits.append(lim)
        overhead.append(0.0)
        rack = len(names) - 1
        for k in range(2):
            names.append(f"rack{r}/node{k}")
            parents.append(rack)
            limits.append(np.inf)
            overhead.append(node_overhead)
            nodes.append(len(names) - 1)
    return names, parents, limits, overhead, nodes


def test_identical_gpus_split_equally():
    tree = BudgetTree.from_parents(["f", "n0", "n1"], [-1, 0, 0], [3000.0, np.inf, np.inf])
    leaf = np.array([1, 1, 1, 2, 2, 2])
    res = allocate_tree(tree, leaf, np.full(6, 200.0), np.full(6, 700.0))
    np.testing.assert_allclose(res.limits_w, 500.0)
    assert res.binding[0] and not res.binding[1:].any()
    np.testing.assert_array_equal(res.limited_by, 0)
    assert res.node_level_w[0] == pytest.approx(500.0)


def test_binding_rack_leaves_the_rest_to_others():
    names, parents, limits, overhead, nodes = _rack_tree([2000.0, np.inf], node_overhead=200.0)
    limits[0] = 7000.0
    tree = BudgetTree.from_parents(names, parents, limits, overhead)
    leaf = np.repeat(nodes, 4)  # 4 GPUs per node, 8 per rack
    res = allocate_tree(tree, leaf, np.full(16, 100.0), np.full(16, 700.0))
    rack0 = res.limits_w[:8]
    rack1 = res.limits_w[8:]
    # rack0: 2000 W - 2 x 200 W hosts = 1600 W over 8 GPUs
    np.testing.assert_allclose(rack0, 200.0)
    # facility: 7000 - 4 hosts (800) - rack0 (1600) = 4600 W over the other 8 GPUs
    np.testing.assert_allclose(rack1, 4600.0 / 8)
    assert res.binding[tree.index_of["rack0"]] and res.binding[0]
    assert not res.binding[tree.index_of["rack1"]]
    assert set(res.limited_by[:8]) == {tree.index_of["rack0"]}
    assert set(res.limited_by[8:]) == {0}
    assert res.node_allocated_w[0] == pytest.approx(7000.0)


def test_low_demand_gpus_keep_their_upper():
    tree = BudgetTree.from_parents(["f"], [-1], [1800.0])
    upper = np.array([250.0, 300.0, 700.0, 700.0])
    res = allocate_tree(tree, np.zeros(4, dtype=int), np.full(4, 200.0), upper)
    np.testing.assert_allclose(res.limits_w, [250.0, 300.0, 625.0, 625.0])
    np.testing.assert_array_equal(res.limited_by, [-1, -1, 0, 0])
    # the demand-fits case hands out exactly the upper bounds and binds nothing
    res = allocate_tree(tree, np.zeros(4, dtype=int), np.full(4, 200.0), np.full(4, 300.0))
    np.testing.assert_array_equal(res.limits_w, 300.0)
    assert not res.binding.any() and np.isinf(res.node_level_w[0])


def test_infeasible_subtree_is_reported_and_held_at_floor():
    names, parents, limits, overhead, nodes = _rack_tree([1500.0, np.inf], node_overhead=200.0)
    limits[0] = 6000.0
    tree = BudgetTree.from_parents(names, parents, limits, overhead)
    leaf = np.repeat(nodes, 4)
    res = allocate_tree(tree, leaf, np.full(16, 150.0), np.full(16, 700.0))
    assert not res.feasible
    (bad,) = res.infeasible
    assert bad.name == "rack0" and bad.gpus == 8
    assert bad.floors_w == pytest.approx(1200.0) and bad.overhead_w == pytest.approx(400.0)
    assert "rack0" in bad.reason and "1500 W" in bad.reason and "floors" in bad.reason
    np.testing.assert_array_equal(res.limits_w[:8], 150.0)
    assert np.isneginf(res.node_level_w[bad.index]) and not res.binding[bad.index]
    # the rest of the facility counts rack0 at its floors and shares what remains
    np.testing.assert_allclose(res.limits_w[8:], (6000.0 - 800.0 - 1200.0) / 8)


def test_floors_above_the_facility_hold_everyone_at_the_floor():
    tree = BudgetTree.from_parents(["f", "n"], [-1, 0], [1000.0, np.inf], [0.0, 300.0])
    res = allocate_tree(tree, np.ones(4, dtype=int), np.full(4, 200.0), np.full(4, 700.0))
    assert [b.name for b in res.infeasible] == ["f"]
    np.testing.assert_array_equal(res.limits_w, 200.0)


@pytest.mark.parametrize("seed", range(5))
def test_one_level_agrees_with_the_facility_water_fill(seed):
    rng = np.random.default_rng(seed)
    n = 64
    lower = rng.uniform(100, 250, n)
    upper = lower + rng.uniform(0, 500, n)
    for budget in (lower.sum() + 1.0, float(rng.uniform(lower.sum(), upper.sum())), 1e9):
        tree = BudgetTree.from_parents(["facility"], [-1], [budget])
        res = allocate_tree(tree, np.zeros(n, dtype=int), lower, upper)
        np.testing.assert_allclose(res.limits_w, water_fill(lower, upper, budget), atol=1e-6)


def test_validation_names_the_bad_entry():
    with pytest.raises(ValueError, match="cycle: 'b' -> 'c' -> 'b'"):
        BudgetTree.from_parents(["a", "b", "c"], [-1, 2, 1], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="cycle: 'b' -> 'b'"):
        BudgetTree.from_parents(["a", "b"], [-1, 1], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"2 roots \('a', 'c'\)"):
        BudgetTree.from_parents(["a", "b", "c"], [-1, 0, -1], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="no root"):
        BudgetTree.from_parents(["a", "b"], [1, 0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"'rack1' has limit -5\.0 W"):
        BudgetTree.from_parents(["f", "rack1"], [-1, 0], [1.0, -5.0])
    with pytest.raises(ValueError, match="'f' has limit nan"):
        BudgetTree.from_parents(["f"], [-1], [float("nan")])
    with pytest.raises(ValueError, match="'n' has overhead inf"):
        BudgetTree.from_parents(["f", "n"], [-1, 0], [1.0, 1.0], [0.0, np.inf])
    with pytest.raises(ValueError, match="'x' is used twice"):
        BudgetTree.from_parents(["x", "x"], [-1, 0], [1.0, 1.0])
    with pytest.raises(ValueError, match="'b' has parent index 7"):
        BudgetTree.from_parents(["a", "b"], [-1, 7], [1.0, 1.0])
    tree = BudgetTree.from_parents(["f"], [-1], [1.0])
    with pytest.raises(ValueError, match=r"GPU 1 has bounds 300\.0\.\.200\.0"):
        allocate_tree(tree, np.zeros(2, dtype=int), np.array([1.0, 300.0]), np.array([2.0, 200.0]))
    with pytest.raises(ValueError, match="GPU 0 has budget index 3"):
        allocate_tree(tree, np.array([3]), np.array([1.0]), np.array([2.0]))


def test_tree_arrays_are_indexed_and_read_only():
    tree = BudgetTree.from_parents(
        ["rack", "f", "node"], [1, -1, 0], [5.0, 10.0, np.inf], [1.0, 0.0, 2.0]
    )
    assert tree.root == 1 and tree.max_depth == 2
    np.testing.assert_array_equal(tree.depth, [1, 0, 2])
    np.testing.assert_array_equal(tree.ancestors[2], [1, 0, 2])
    np.testing.assert_array_equal(tree.subtree_overhead_w, [3.0, 3.0, 2.0])
    with pytest.raises(ValueError):
        tree.limits_w[0] = 1.0


def test_no_gpus_is_fine():
    tree = BudgetTree.from_parents(["f", "n"], [-1, 0], [100.0, np.inf], [0.0, 50.0])
    res = allocate_tree(tree, np.zeros(0, dtype=int), np.zeros(0), np.zeros(0))
    assert res.limits_w.size == 0 and res.feasible
    np.testing.assert_allclose(res.node_allocated_w, [50.0, 50.0])
