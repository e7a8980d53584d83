"""Every built-in scenario through the comparison, and the headline ratios.

Writes ``bench/results/compare/NAME.json`` (what ``wattkeeper simulate NAME --compare -o
json`` prints), a report per scenario in ``bench/results/compare/NAME/`` and
``summary.md``: one table per scenario, how long each took, and the headlines, each
against ``nocap``, ``best-static`` and the oracle:

- H1, energy at SLO with no budget: steady-decode and diurnal with ``--budget none``,
  joules per good token;
- H2, goodput under a binding feasible budget: disaggregated and hetero;
- H3, demand response: seconds to comply after the step; goodput against the oracle's;
- H4, oversubscription: five nodes under a budget equal to the peak draw of four
  uncapped nodes on the same load; good tokens against those four uncapped nodes.

    .venv/bin/python bench/compare_all.py [--duration 1h] [--seeds 1] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from wattkeeper.simulator.compare import POLICIES, PolicyResult, compare, to_json, with_budget
from wattkeeper.simulator.report import markdown_table, write_report
from wattkeeper.simulator.scenario import Scenario, list_scenarios, load_scenario
from wattkeeper.units import parse_duration_s

OUT = Path(__file__).parent / "results" / "compare"
REFERENCES = ("nocap", "best-static", "oracle")


def run(
    sc: Scenario, label: str, duration_s: float | None, seeds: int, workers: int
) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    result = compare(sc, POLICIES, duration_s=duration_s, seeds=seeds, workers=workers)
    wall = time.perf_counter() - t0
    (OUT / f"{label}.json").write_text(json.dumps(to_json(result), indent=2) + "\n")
    write_report(result, OUT / label)
    print(f"{label}: {wall:.0f} s", file=sys.stderr, flush=True)
    return result, wall


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.3f}"


def headline_rows(result: dict[str, Any], key: str, label: str, better: str) -> list[str]:
    policies: dict[str, PolicyResult] = result["policies"]
    rows = []
    for name in ("wattkeeper", "best-static", "best-static-lock", "uniform", "proportional"):
        res = policies.get(name)
        if res is None:
            continue
        value = getattr(res, key)
        refs = [
            ratio(value, getattr(policies[r], key)) if r in policies else "-" for r in REFERENCES
        ]
        shown = "-" if value is None else f"{value:,.4g}"
        rows.append(f"| {label} | {name} | {shown} | " + " | ".join(refs) + f" | {better} |")
    return rows


LIMITS_ONLY = ("nocap", "uniform", "best-static", "proportional", "wattkeeper")
"""Policies that only set power limits: ``oracle-limits`` must bound them too."""


def bound_violations(label: str, result: dict[str, Any]) -> list[str]:
    """Every policy above its oracle by more than 1%: on goodput, or on energy per good
    token at goodput within 1%. Each is a bug in the oracle or the simulator to find."""
    policies: dict[str, PolicyResult] = result["policies"]
    out = []
    for oracle_name, members in (("oracle", tuple(policies)), ("oracle-limits", LIMITS_ONLY)):
        ref = policies.get(oracle_name)
        if ref is None:
            continue
        for name in members:
            res = policies.get(name)
            if res is None or name.startswith("oracle") or res.over_budget_s > 5:
                continue
            if res.goodput_tokens > ref.goodput_tokens * 1.01:
                out.append(
                    f"- {label}: {name} goodput {res.goodput_tokens / ref.goodput_tokens:.3f}"
                    f" of {oracle_name}'s"
                )
            elif (
                res.goodput_tokens >= ref.goodput_tokens * 0.99
                and res.joules_per_good_token is not None
                and ref.joules_per_good_token is not None
                and res.joules_per_good_token < ref.joules_per_good_token * 0.99
            ):
                ratio_j = res.joules_per_good_token / ref.joules_per_good_token
                out.append(
                    f"- {label}: {name} J per good token {ratio_j:.3f} of {oracle_name}'s"
                    " at the same goodput"
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", default=None, help="override each scenario's duration")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    duration = parse_duration_s(args.duration) if args.duration else None
    OUT.mkdir(parents=True, exist_ok=True)
    names = args.only or [name for name, _ in list_scenarios()]
    sections = []
    results: dict[str, dict[str, Any]] = {}
    violations: list[str] = []
    for name in names:
        result, wall = run(load_scenario(name), name, duration, args.seeds, args.jobs)
        results[name] = result
        violations += bound_violations(name, result)
        shown = f"simulate {name} --compare" + (f" --duration {args.duration}" if duration else "")
        sections.append(
            f"## {name}\n\n`wattkeeper {shown} --seeds {args.seeds}` ({wall:.0f} s wall, "
            f"{args.jobs} jobs)\n\n{markdown_table(result)}\n"
        )
    head = [
        "| headline | policy | value | vs nocap | vs best-static | vs oracle | better |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name in ("steady-decode", "diurnal"):
        if args.only and name not in args.only:
            continue
        sc = with_budget(load_scenario(name), None)
        result, _ = run(sc, f"{name}-nobudget", duration, args.seeds, args.jobs)
        violations += bound_violations(f"{name}, no budget", result)
        head += headline_rows(result, "joules_per_good_token", f"H1 {name}, no budget", "lower")
    for name in ("disaggregated", "hetero"):
        if name in results:
            head += headline_rows(results[name], "goodput_tokens", f"H2 {name}", "higher")
    if "demand-response" in results:
        res = results["demand-response"]
        head += headline_rows(res, "time_to_comply_s", "H3 time to comply (s)", "lower")
        head += headline_rows(res, "goodput_tokens", "H3 goodput", "higher")
    if "oversubscription" in results:
        sc = load_scenario("oversubscription")
        four = with_budget(replace(sc, fleet=(replace(sc.fleet[0], count=4),)), None)
        ref = compare(four, ("nocap",), duration_s=duration, seeds=args.seeds)
        four_good = ref["policies"]["nocap"].goodput_tokens
        for pname, res in results["oversubscription"]["policies"].items():
            head.append(
                f"| H4 five nodes in four's budget | {pname} | {res.goodput_tokens:,.4g} | "
                f"{ratio(res.goodput_tokens, four_good)} (vs four uncapped) | - | - | higher |"
            )
    checks = (
        "\n".join(violations) if violations else "None: every policy is within 1% of its oracle."
    )
    (OUT / "summary.md").write_text(
        "# Policy comparison, every scenario\n\n## Headlines\n\n"
        + "\n".join(head)
        + "\n\n## Policies above their oracle by more than 1%\n\n"
        + checks
        + "\n\n"
        + "\n".join(sections)
    )


if __name__ == "__main__":
    main()
