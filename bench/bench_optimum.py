"""How long the true optimum takes, so the benchmark knows what one control interval costs.

Random facilities of 32, 256 and 1024 replicas (DGX nodes of 8 GPUs: most serve
Llama-8B on single GPUs, some Llama-70B on TP4, a few Llama-405B-FP8 on TP8; H100 and
A100 nodes; batches, prefill shares and demands drawn at random) under a budget at a
fraction of their unconstrained power, solved with and without node drains. Curves
are cached by replica state, so the first ("cold") solve builds them and a second
("warm") one shows the MILP and the mapping back alone. A number, not a pass/fail.

Run: ``.venv/bin/python bench/bench_optimum.py [--sizes 32 256 1024] [--budget 0.6]
[--points 24] [--count generated|all]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from wattkeeper.simulator import optimum
from wattkeeper.simulator.optimum import NodeState, ReplicaState


def facility(replicas: int, seed: int = 0) -> tuple[list[ReplicaState], list[NodeState]]:
    """A mixed facility with exactly ``replicas`` replicas (the last node may be part-full)."""
    rng = np.random.default_rng(seed)
    reps: list[ReplicaState] = []
    nodes: list[NodeState] = []
    while len(reps) < replicas:
        n = len(nodes)
        gpu = "a100" if rng.random() < 0.3 else "h100"
        u = rng.random()
        model = (
            "llama-8b"
            if u < 0.7
            else ("llama-70b" if u < 0.9 or gpu == "a100" else "llama-405b-fp8")
        )
        tp = {"llama-8b": 1, "llama-70b": 4, "llama-405b-fp8": 8}[model]
        nodes.append(NodeState(n, f"dgx-{gpu}", 8))
        for _ in range(8 // tp):
            if len(reps) == replicas:
                break
            pf = float(rng.choice([0.0, 0.12, 0.12, 1.0]))
            demand = float(rng.uniform(200, 4000)) if rng.random() < 0.3 else None
            reps.append(
                ReplicaState(len(reps), n, gpu, model, float(rng.uniform(0, 320)), pf, demand)
            )
    return reps, nodes


def run(sizes: list[int], budget_ratio: float, points: int, count: optimum.TokenCount) -> None:
    print(
        f"budget = {budget_ratio:.0%} of unconstrained facility power, points = {points}, "
        f"count = {count}\n"
        f"{'replicas':>8} {'nodes':>5} {'drain':>5} {'cold s':>7} {'warm s':>7} {'highs s':>7} "
        f"{'status':>9} {'gap':>8} {'drained':>7} {'tokens/s':>10} {'real/pred':>9}"
    )
    for size in sizes:
        reps, nodes = facility(size)
        for drain in (True, False):
            optimum._CURVES.clear()  # cold: curves built inside the timing
            top = optimum.solve(reps, nodes, 1e12, points=points, count=count)
            optimum._CURVES.clear()
            budget = budget_ratio * top.power_w
            t0 = time.perf_counter()
            optimum.solve(reps, nodes, budget, allow_drain=drain, points=points, count=count)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = optimum.solve(reps, nodes, budget, allow_drain=drain, points=points, count=count)
            warm = time.perf_counter() - t0
            ratio = res.realised_tokens_per_s / res.tokens_per_s if res.tokens_per_s else 1.0
            print(
                f"{size:>8} {len(nodes):>5} {drain!s:>5} {cold:>7.3f} {warm:>7.3f} "
                f"{res.solver_s:>7.3f} {res.status:>9} {res.mip_gap:>8.1e} "
                f"{len(res.drained_nodes):>7} {res.tokens_per_s:>10.0f} {ratio:>9.4f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 256, 1024])
    ap.add_argument("--budget", type=float, default=0.6, help="fraction of unconstrained power")
    ap.add_argument("--points", type=int, default=24)
    ap.add_argument("--count", choices=["generated", "all"], default="generated")
    args = ap.parse_args()
    run(args.sizes, args.budget, args.points, args.count)


if __name__ == "__main__":
    main()
