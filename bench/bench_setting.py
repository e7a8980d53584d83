"""One configuration setting of the production policy, value by value, on the simulator.

    .venv/bin/python bench/bench_setting.py controller.clock_locks false true
        [--scenarios bursty mixed demand-response] [--duration 1800] [--jobs 2] [--json]
    .venv/bin/python bench/bench_setting.py controller.oversubscribe false true

Runs the production policy (agents, store, controller on the simulated clock, as
``wattkeeper simulate SCENARIO --compare`` runs it) once per scenario and value, on the
same arrivals, and prints goodput, joules per good token, SLO attainment and seconds
over budget for each: what the setting buys, and what it costs. Numbers, not
pass/fail. At a setting's default value the figures are the comparison's own
``wattkeeper`` row for the same scenario, duration and seed.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any

from wattkeeper.simulator.compare import PolicySpec, run_policy
from wattkeeper.simulator.scenario import load_scenario


def run_one(job: tuple[str, str, str, float, int]) -> dict[str, Any]:
    name, setting, value, duration, offset = job
    spec = PolicySpec("wattkeeper", settings=((setting, value),))
    scenario = load_scenario(name)
    scenario = replace(scenario, seed=scenario.seed + offset)
    started = time.perf_counter()
    r = run_policy(scenario, spec, duration_s=duration)
    return {
        "scenario": name,
        "seed": scenario.seed,
        "setting": setting,
        "value": value,
        "duration_s": duration,
        "goodput_tokens": r.goodput_tokens,
        "joules_per_good_token": r.joules_per_good_token,
        "slo_attainment": r.slo_attainment,
        "over_budget_s": r.over_budget_s,
        "max_excursion_s": r.max_excursion_s,
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("setting", help="a configuration key, e.g. controller.clock_locks")
    ap.add_argument("values", nargs="+", help="the values to run, e.g. false true")
    ap.add_argument("--scenarios", nargs="+", default=["bursty", "mixed", "demand-response"])
    ap.add_argument("--duration", type=float, default=1800.0, help="simulated seconds")
    ap.add_argument("--seeds", type=int, default=1, help="each run on this many seeds")
    ap.add_argument("--jobs", type=int, default=2, help="simulations run in parallel")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    jobs = [
        (s, args.setting, v, args.duration, k)
        for s in args.scenarios
        for v in args.values
        for k in range(args.seeds)
    ]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(run_one, jobs))
    if args.json:
        print(json.dumps({"bench": "setting", "setting": args.setting, "runs": rows}, indent=2))
        return
    print(f"{args.setting}, {args.duration:.0f} simulated s per run")
    print(
        f"{'scenario':<18} {'seed':>5} {'value':<8} {'goodput tokens':>16} {'J/good token':>12} "
        f"{'SLO':>6} {'over s':>6} {'max exc s':>9}"
    )
    for r in rows:
        jpg = r["joules_per_good_token"]
        slo = r["slo_attainment"]
        print(
            f"{r['scenario']:<18} {r['seed']:>5} {r['value']:<8} "
            f"{r['goodput_tokens']:>16,.0f} {'-' if jpg is None else f'{jpg:.5f}':>12} "
            f"{'-' if slo is None else f'{slo:.4f}':>6} {r['over_budget_s']:>6} "
            f"{r['max_excursion_s']:>9}"
        )
    if args.seeds > 1:
        print(f"\nmeans over {args.seeds} seeds")
        for name in args.scenarios:
            for value in args.values:
                mine = [r for r in rows if r["scenario"] == name and r["value"] == value]
                good = sum(r["goodput_tokens"] for r in mine) / len(mine)
                per = [r["joules_per_good_token"] for r in mine]
                jpg = sum(per) / len(per) if None not in per else None
                print(
                    f"{name:<18} {'':>5} {value:<8} {good:>16,.0f} "
                    f"{'-' if jpg is None else f'{jpg:.5f}':>12}"
                )


if __name__ == "__main__":
    main()
