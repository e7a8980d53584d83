"""How long the oracle takes per control period, and the reference figures it gives.

Facilities: steady-decode (4 DGX H100 x 8, Llama-3.1-8B per GPU), a heterogeneous one
(2 DGX H100 + 2 DGX A100, Llama-8B), a TP one (2 DGX H100 of two Llama-70B TP4
replicas, plus 2 of Llama-8B) and a disaggregated one (Llama-70B: 2 prefill nodes, 2
decode nodes). Each is solved with no budget, then at budgets from 95% down to 40% of
that draw, in both variants. "cold" is the first solve with an empty curve cache (curves
built), "warm" the median of ``--repeat`` re-solves (two MILPs and the mapping back:
what a 5 s control period pays). A number, not a pass/fail.

Run: ``.venv/bin/python bench/bench_oracle.py [--repeat 5] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

from wattkeeper.simulator import oracle
from wattkeeper.simulator.oracle import ModelDemand, NodeIn, ReplicaIn, Slo

CHAT = (250.0, 600.0)


def _steady() -> tuple[list[ReplicaIn], list[NodeIn], list[ModelDemand], Slo]:
    reps = [ReplicaIn(i, i // 8, "h100", "llama-8b", max_inflight=256) for i in range(32)]
    nodes = [NodeIn(n, "dgx-h100", 8) for n in range(4)]
    d = ModelDemand("llama-8b", 345 * CHAT[1], 345 * CHAT[0], *CHAT)
    return reps, nodes, [d], Slo(2.0, 0.05)


def _hetero() -> tuple[list[ReplicaIn], list[NodeIn], list[ModelDemand], Slo]:
    reps = [
        ReplicaIn(i, i // 8, "h100" if i < 16 else "a100", "llama-8b", max_inflight=256)
        for i in range(32)
    ]
    nodes = [NodeIn(n, "dgx-h100" if n < 2 else "dgx-a100", 8) for n in range(4)]
    d = ModelDemand("llama-8b", 150_000.0, 150_000.0 * CHAT[0] / CHAT[1], *CHAT)
    return reps, nodes, [d], Slo(2.0, 0.05)


def _tp() -> tuple[list[ReplicaIn], list[NodeIn], list[ModelDemand], Slo]:
    reps = [ReplicaIn(i, i // 2, "h100", "llama-70b", max_inflight=192) for i in range(4)]
    reps += [ReplicaIn(4 + i, 2 + i // 8, "h100", "llama-8b", max_inflight=256) for i in range(16)]
    nodes = [NodeIn(n, "dgx-h100", 8) for n in range(4)]
    demands = [
        ModelDemand("llama-70b", 6000.0, 6000.0 * 300 / 350, 300.0, 350.0),
        ModelDemand("llama-8b", 80_000.0, 80_000.0 * 300 / 350, 300.0, 350.0),
    ]
    return reps, nodes, demands, Slo(3.0, 0.08)


def _disaggregated() -> tuple[list[ReplicaIn], list[NodeIn], list[ModelDemand], Slo]:
    reps = [
        ReplicaIn(i, i // 2, "h100", "llama-70b", role="prefill" if i < 4 else "decode")
        for i in range(8)
    ]
    nodes = [NodeIn(n, "dgx-h100", 8) for n in range(4)]
    d = ModelDemand("llama-70b", 22 * 500.0, 22 * 1500.0, 1500.0, 500.0)
    return reps, nodes, [d], Slo(3.0, 0.08)


FACILITIES = {
    "steady-decode 32xH100": _steady,
    "hetero 16xH100+16xA100": _hetero,
    "tp 4x70B-TP4 + 16x8B": _tp,
    "disaggregated 70B 4P+4D": _disaggregated,
}


def _time(fn, repeat: int) -> tuple[float, object]:  # noqa: ANN001
    out = None
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for name, make in FACILITIES.items():
        reps, nodes, demands, slo = make()
        oracle.clear_cache()
        t = time.perf_counter()
        free = oracle.solve(reps, nodes, demands, slo, None)
        cold = time.perf_counter() - t
        for variant in ("full", "limits"):
            for share in (None, 0.95, 0.8, 0.6, 0.4):
                budget = None if share is None else share * free.facility_power_w
                first_t = time.perf_counter()
                oracle.solve(reps, nodes, demands, slo, budget, variant=variant)
                first = time.perf_counter() - first_t
                warm, res = _time(
                    lambda a=(reps, nodes, demands, slo, budget), v=variant: oracle.solve(
                        *a, variant=v
                    ),
                    args.repeat,
                )
                rows.append(
                    {
                        "facility": name,
                        "variant": variant,
                        "budget_share": share,
                        "cold_s": cold if (share is None and variant == "full") else first,
                        "warm_s": warm,
                        "good_tokens_per_s": res.good_tokens_per_s,
                        "facility_power_w": res.facility_power_w,
                        "tokens_per_j": res.good_tokens_per_s / max(res.facility_power_w, 1.0),
                        "drained": len(res.drained_nodes),
                        "status": res.status,
                    }
                )
    ref = {}
    for inflight in (256, 512):
        reps, nodes, demands, slo = _steady()
        reps = [ReplicaIn(r.replica, r.node, r.kind, r.model, max_inflight=inflight) for r in reps]
        res = oracle.solve(reps, nodes, demands, slo, None)
        ref[f"inflight_{inflight}"] = {
            "tokens_per_j": res.good_tokens_per_s / res.facility_power_w,
            "gpu_w_per_gpu": res.gpu_power_w / 32,
            "facility_power_w": res.facility_power_w,
            "limits_w": sorted({p.power_limit_w for p in res.replicas}),
        }
    doc = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "rows": rows,
        "reference_steady_decode": ref,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"cpus {doc['cpus']}, load {doc['loadavg'][0]:.2f}")
    print(f"{'facility':26} {'variant':7} {'budget':>6} {'cold ms':>8} {'warm ms':>8} "
          f"{'tokens/s':>10} {'power W':>9} {'tok/J':>6} {'drained':>7}")  # fmt: skip
    for r in rows:
        share = "none" if r["budget_share"] is None else f"{r['budget_share']:.2f}"
        print(
            f"{r['facility']:26} {r['variant']:7} {share:>6} {1e3 * r['cold_s']:8.1f} "
            f"{1e3 * r['warm_s']:8.1f} {r['good_tokens_per_s']:10.0f} "
            f"{r['facility_power_w']:9.0f} {r['tokens_per_j']:6.2f} {r['drained']:7d}"
        )
    for key, v in ref.items():
        print(
            f"steady-decode {key}: {v['tokens_per_j']:.2f} tokens/J, "
            f"{v['gpu_w_per_gpu']:.0f} W per GPU, limits {v['limits_w']}"
        )


if __name__ == "__main__":
    main()
