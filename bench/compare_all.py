"""Every built-in scenario through ``wattkeeper simulate NAME --compare``.

Writes ``bench/results/compare/NAME.json`` (the CLI's JSON) and ``summary.md`` (one table
per scenario, and how long each took), the tables quoted in the README and issue notes.

    .venv/bin/python bench/compare_all.py [--duration 1h] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from wattkeeper.simulator.scenario import list_scenarios

OUT = Path(__file__).parent / "results" / "compare"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", default=None, help="override each scenario's duration")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    names = args.only or [name for name, _ in list_scenarios()]
    sections = []
    for name in names:
        cmd = [
            sys.executable,
            "-m",
            "wattkeeper",
            "simulate",
            name,
            "--compare",
            "-o",
            "json",
            "--report",
            str(OUT / name),
        ]
        if args.duration:
            cmd += ["--duration", args.duration]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        data = json.loads(proc.stdout)
        (OUT / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
        table = (OUT / name / "report.md").read_text().split("\n\n")
        rows = next(part for part in table if part.startswith("| policy"))
        shown = " ".join(cmd[3:]).replace(str(OUT / name), f"bench/results/compare/{name}")
        sections.append(f"## {name}\n\n`wattkeeper {shown}` ({wall:.0f} s wall)\n\n{rows}\n")
        print(f"{name}: {wall:.0f} s", file=sys.stderr, flush=True)
    (OUT / "summary.md").write_text("# Policy comparison, every scenario\n\n" + "\n".join(sections))


if __name__ == "__main__":
    main()
