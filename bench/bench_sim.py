"""Simulator speed and the scenarios' uncapped behaviour: numbers, never pass/fail.

Speed: wall time to advance one simulated hour of a facility with no agents attached
(``--simulate 4x8`` by default), i.e. the floor under every benchmark run.

Scenarios (``--scenarios``): each packaged scenario run uncapped (default limits, no
policy) for its whole duration, with what the comparison harness cares about: how far
the uncapped draw exceeds the budget and for how long, tokens, SLO attainment, the
longest router queue. ``--floor`` adds a run with every GPU at its minimum limit, the
best that capping alone can do for power (the tight-budget check).

Run: ``.venv/bin/python bench/bench_sim.py [--spec 4x8] [--hours 1] [--scenarios] [--floor]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from wattkeeper.simulator.facility import STEP_S, FacilitySpec, SimFacility
from wattkeeper.simulator.scenario import list_scenarios, load_scenario


def bench_speed(spec: str, hours: float, seed: int) -> None:
    facility = SimFacility.simple(FacilitySpec.parse(spec, seed=seed), start_ts=0.0)
    t0 = time.perf_counter()
    facility.advance_to(hours * 3600.0)
    wall = time.perf_counter() - t0
    steps = round(hours * 3600.0 / STEP_S)
    power = np.array(facility.stats.second_power_w)
    print(
        f"{spec} ({facility.n_gpus} GPUs, {facility.n_replicas} replicas): "
        f"{hours:g} h simulated in {wall:.2f} s wall ({steps} steps of {STEP_S} s, "
        f"{wall / steps * 1e6:.0f} us/step); mean {power.mean() / 1e3:.1f} kW, "
        f"{facility.stats.generated_tokens / (hours * 3600):,.0f} tokens/s"
    )


def run_scenario(name: str, floor: bool) -> None:
    scenario = load_scenario(name)
    facility = SimFacility(scenario, start_ts=0.0)
    if floor:
        facility.limit_requested[:] = [
            facility.gpu_kind(g).power_min_w for g in range(facility.n_gpus)
        ]
    queue_max = 0.0
    t0 = time.perf_counter()
    t = 0.0
    while t < scenario.duration_s:
        t = min(t + 10.0, scenario.duration_s)
        facility.advance_to(t)
        queue_max = max(queue_max, sum(facility.router_queue.values()))
    wall = time.perf_counter() - t0
    st = facility.stats
    power = np.array(st.second_power_w)
    budget = np.array([np.nan if b is None else b for b in st.second_budget_w])
    over = power > budget
    slo = st.requests_within_slo / st.requests_finished if st.requests_finished else float("nan")
    label = f"{name}{' @floor' if floor else ''}"
    print(
        f"{label:26s} {wall:5.1f} s | power {power.min() / 1e3:5.1f}-{power.max() / 1e3:5.1f} kW "
        f"(mean {power.mean() / 1e3:5.1f}) | budget {np.nanmin(budget) / 1e3:5.1f}-"
        f"{np.nanmax(budget) / 1e3:5.1f} kW | over {int(over.sum()):4d} s | "
        f"{st.generated_tokens / len(power):8,.0f} tok/s | SLO {slo:6.1%} | "
        f"queue max {queue_max:8,.0f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="4x8")
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenarios", action="store_true", help="run every packaged scenario")
    ap.add_argument("--floor", action="store_true", help="also run them floor-capped")
    args = ap.parse_args()
    bench_speed(args.spec, args.hours, args.seed)
    if args.scenarios:
        for name, _ in list_scenarios():
            run_scenario(name, floor=False)
            if args.floor:
                run_scenario(name, floor=True)


if __name__ == "__main__":
    main()
