"""Plan time against fleet size: the budget-tree allocator alone, and the controller's plan.

The controller plans once per tick, so this says how large a facility one controller
core can hold at a given tick. Each fleet is facility > 4 rooms > up to 40 PDUs >
racks of 10 nodes > nodes of 8 GPUs, with budgets at every level set a little under
their subtree's demand, so that every level has budgets that bind (the costly case)
and GPUs with a mix of idle, light and capped load. Timed, median of ``--repeat``:

- ``tree build``: ``BudgetTree.from_parents`` (validation and indexing, once per change),
- ``tree alloc``: one ``allocate_tree`` pass over the arrays,
- ``tree plan``: what a tree-aware ``plan`` would do each tick from ``PlanGpu`` objects:
  arrays from the objects, the demand estimate vectorised, then two passes (to demand,
  then what is left up to each GPU's maximum),
- ``facility plan``: ``policies.plan.plan`` on the same GPUs and one facility budget: the
  same tree allocation plus the stale/drained handling and a reason per GPU.

One core: BLAS/OpenMP threads are set to 1 before numpy loads and the process pins
itself to one CPU (``--no-pin`` to skip). Numbers, not pass/fail.

Run: ``.venv/bin/python bench/bench_plan.py [--sizes 1000 10000 100000] [--repeat 5] [--json]``
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402

from wattkeeper.policies.budget_tree import BudgetTree, allocate_tree  # noqa: E402
from wattkeeper.policies.plan import (  # noqa: E402  # noqa: E402
    CAPPED_RATIO,
    HEADROOM_RATIO,
    HEADROOM_W,
    PlanGpu,
    PlanNode,
    PlanSettings,
    plan,
)

GPUS_PER_NODE = 8
NODES_PER_RACK = 10
MIN_W, MAX_W = 200.0, 700.0


@dataclass
class Fleet:
    """One synthetic facility: the tree as parent arrays plus the controller's inputs."""

    names: list[str]
    parents: np.ndarray
    limits_w: np.ndarray
    overhead_w: np.ndarray
    leaf_parent: np.ndarray
    nodes: list[PlanNode]
    gpus: list[PlanGpu]
    budget_w: float


def build_fleet(n_gpus: int, seed: int = 0) -> Fleet:
    """facility > rooms > PDUs > racks > nodes > GPUs with budgets just under demand."""
    rng = np.random.default_rng(seed)
    n_nodes = max(1, n_gpus // GPUS_PER_NODE)
    n_racks = -(-n_nodes // NODES_PER_RACK)
    n_pdus = min(40, n_racks)
    n_rooms = min(4, n_pdus)
    names = ["facility"]
    parents = [-1]
    room = [len(names) + r for r in range(n_rooms)]
    names += [f"room{r}" for r in range(n_rooms)]
    parents += [0] * n_rooms
    pdu = [len(names) + p for p in range(n_pdus)]
    names += [f"pdu{p}" for p in range(n_pdus)]
    parents += [room[p % n_rooms] for p in range(n_pdus)]
    rack = [len(names) + k for k in range(n_racks)]
    names += [f"rack{k}" for k in range(n_racks)]
    parents += [pdu[k % n_pdus] for k in range(n_racks)]
    node = [len(names) + j for j in range(n_nodes)]
    names += [f"node{j}" for j in range(n_nodes)]
    parents += [rack[j // NODES_PER_RACK] for j in range(n_nodes)]
    par = np.array(parents)
    n_tree = len(names)

    n = n_nodes * GPUS_PER_NODE
    leaf_parent = np.repeat(np.array(node), GPUS_PER_NODE)
    # load: a quarter idle, a quarter light, half held back by their cap
    kind = rng.choice(3, n, p=[0.25, 0.25, 0.5])
    limit = rng.uniform(350.0, MAX_W, n)
    power = np.where(
        kind == 0,
        rng.uniform(60.0, 90.0, n),
        np.where(kind == 1, rng.uniform(150.0, 0.8 * limit), 0.99 * limit),
    )
    host_w = rng.uniform(800.0, 1500.0, n_nodes)
    overhead = np.zeros(n_tree)
    overhead[node] = host_w
    overhead[rack] = 300.0  # top-of-rack switch and fans
    overhead[room] = 5000.0  # cooling share charged to the room

    # budgets: floors and overhead plus 70-100 % of the headroom up to demand, so every
    # level has budgets that bind and none is infeasible; a third of nodes have a PSU limit
    demand = np.where(
        kind == 2, MAX_W, np.clip(power * (1 + HEADROOM_RATIO) + HEADROOM_W, MIN_W, MAX_W)
    )
    shape = BudgetTree.from_parents(names, par, np.full(n_tree, np.inf), overhead)
    wanted = np.zeros(n_tree)
    floors = np.zeros(n_tree)
    for d in range(shape.max_depth + 1):
        np.add.at(wanted, shape.ancestors[leaf_parent, d], demand)
        np.add.at(floors, shape.ancestors[leaf_parent, d], MIN_W)
    headroom = rng.uniform(0.7, 1.0, n_tree)
    limits = shape.subtree_overhead_w + floors + headroom * (wanted - floors)
    limits[node] = np.where(rng.random(n_nodes) < 1 / 3, limits[node], np.inf)

    nodes = [PlanNode(names[v], float(h), 1.0) for v, h in zip(node, host_w, strict=True)]
    gpus = [
        PlanGpu(
            uuid=f"GPU-{i:06d}",
            node=names[int(leaf_parent[i])],
            min_w=MIN_W,
            max_w=MAX_W,
            power_w=float(power[i]),
            limit_w=float(limit[i]),
            target_w=float(limit[i]),
            sample_age_s=1.0,
            power_capped=bool(kind[i] == 2),
        )
        for i in range(n)
    ]
    return Fleet(names, par, limits, overhead, leaf_parent, nodes, gpus, float(limits[0]))


def tree_plan(tree: BudgetTree, fleet: Fleet) -> np.ndarray:
    """What a tree-aware plan costs per tick, starting from the controller's objects."""
    gpus = fleet.gpus
    lo = np.fromiter((g.min_w for g in gpus), float, len(gpus))
    hi = np.fromiter((g.max_w for g in gpus), float, len(gpus))
    power = np.fromiter((np.nan if g.power_w is None else g.power_w for g in gpus), float)
    limit = np.fromiter((np.nan if g.limit_w is None else g.limit_w for g in gpus), float)
    capped = np.fromiter((g.power_capped for g in gpus), bool, len(gpus))
    unknown = np.isnan(power) | np.isnan(limit) | capped | (power >= CAPPED_RATIO * limit)
    demand = np.where(unknown, hi, np.clip(power * (1 + HEADROOM_RATIO) + HEADROOM_W, lo, hi))
    first = allocate_tree(tree, fleet.leaf_parent, lo, demand)
    second = allocate_tree(tree, fleet.leaf_parent, first.limits_w, hi)
    return np.floor(second.limits_w)


def median_s(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(sizes: list[int], repeat: int) -> list[dict]:
    rows = []
    for n in sizes:
        fleet = build_fleet(n)

        def build(f: Fleet = fleet) -> BudgetTree:
            return BudgetTree.from_parents(f.names, f.parents, f.limits_w, f.overhead_w)

        tree = build()
        lo = np.full(len(fleet.gpus), MIN_W)
        hi = np.full(len(fleet.gpus), MAX_W)
        res = allocate_tree(tree, fleet.leaf_parent, lo, hi)
        limits = tree_plan(tree, fleet)
        over = res.node_allocated_w - tree.limits_w
        settings = PlanSettings()
        rows.append(
            {
                "gpus": len(fleet.gpus),
                "budgets": tree.size,
                "levels": tree.max_depth + 1,
                "binding_budgets": int(res.binding.sum()),
                "binding_by_depth": np.bincount(
                    tree.depth[res.binding], minlength=tree.max_depth + 1
                ).tolist(),
                "infeasible_budgets": len(res.infeasible),
                "max_overrun_w": float(np.max(over[np.isfinite(over)])),
                "limits_sum_w": float(limits.sum()),
                "tree_build_s": median_s(build, repeat),
                "tree_alloc_s": median_s(
                    lambda t=tree, f=fleet, a=lo, b=hi: allocate_tree(t, f.leaf_parent, a, b),
                    repeat,
                ),
                "tree_plan_s": median_s(lambda t=tree, f=fleet: tree_plan(t, f), repeat),
                "facility_plan_s": median_s(
                    lambda f=fleet, s=settings: plan(f.nodes, f.gpus, f.budget_w, s), repeat
                ),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one CPU")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # other work on the machine skews every number here
    pinned = None
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        pinned = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {pinned})
    rows = run(args.sizes, args.repeat)
    meta = {
        "bench": "plan",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus_visible": os.cpu_count(),
        "load_average_1m_before": load_before,
        "pinned_cpu": pinned,
        "repeat": args.repeat,
    }
    if args.json:
        print(json.dumps({**meta, "results": rows}, indent=2))
        return
    print(
        f"{'GPUs':>8} {'budgets':>8} {'binding':>8} {'build ms':>9} {'alloc ms':>9} "
        f"{'tree plan ms':>13} {'facility plan ms':>17}"
    )
    for r in rows:
        print(
            f"{r['gpus']:>8} {r['budgets']:>8} {r['binding_budgets']:>8} "
            f"{1e3 * r['tree_build_s']:>9.1f} {1e3 * r['tree_alloc_s']:>9.1f} "
            f"{1e3 * r['tree_plan_s']:>13.1f} {1e3 * r['facility_plan_s']:>17.1f}"
        )
    print(f"(median of {args.repeat}; one core, pinned to CPU {pinned}; numpy {np.__version__})")


if __name__ == "__main__":
    main()
