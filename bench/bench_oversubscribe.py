"""Oversubscription (``controller.oversubscribe``) on and off, on the simulator.

    .venv/bin/python bench/bench_oversubscribe.py [--scenarios bursty mixed demand-response]
        [--duration 600] [--json]

Runs the production policy (agents, store, controller on the simulated clock, as
``wattkeeper simulate SCENARIO --compare`` runs it) twice per scenario, with the option
off (the default) and on, and prints goodput, joules per good token, SLO attainment and
seconds over budget for each: what lending the watts light GPUs do not draw to the GPUs
held back buys, and what it costs in budget excursions. Numbers, not pass/fail. With
the option off the figures are the comparison's own ``wattkeeper`` row for the same
scenario and duration.
"""

from __future__ import annotations

import argparse
import json
import time

from wattkeeper.simulator.compare import PolicySpec, run_policy
from wattkeeper.simulator.scenario import load_scenario


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", nargs="+", default=["bursty", "mixed", "demand-response"])
    ap.add_argument("--duration", type=float, default=600.0, help="simulated seconds")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for name in args.scenarios:
        scenario = load_scenario(name)
        for on in (False, True):
            spec = PolicySpec("wattkeeper", settings=(("controller.oversubscribe", str(on)),))
            started = time.perf_counter()
            r = run_policy(scenario, spec, duration_s=args.duration)
            rows.append(
                {
                    "scenario": name,
                    "oversubscribe": on,
                    "duration_s": args.duration,
                    "goodput_tokens": r.goodput_tokens,
                    "joules_per_good_token": r.joules_per_good_token,
                    "slo_attainment": r.slo_attainment,
                    "over_budget_s": r.over_budget_s,
                    "max_excursion_s": r.max_excursion_s,
                    "wall_s": time.perf_counter() - started,
                }
            )
    if args.json:
        print(json.dumps({"bench": "oversubscribe", "runs": rows}, indent=2))
        return
    print(
        f"{'scenario':<16} {'oversub':<7} {'goodput tokens':>16} {'J/good token':>12} "
        f"{'SLO':>6} {'over s':>6} {'max exc s':>9}"
    )
    for r in rows:
        jpg = r["joules_per_good_token"]
        slo = r["slo_attainment"]
        print(
            f"{r['scenario']:<16} {'on' if r['oversubscribe'] else 'off':<7} "
            f"{r['goodput_tokens']:>16,.0f} {'-' if jpg is None else f'{jpg:.5f}':>12} "
            f"{'-' if slo is None else f'{slo:.4f}':>6} {r['over_budget_s']:>6} "
            f"{r['max_excursion_s']:>9}"
        )


if __name__ == "__main__":
    main()
