"""Whole-process cost of a simulated run: wall time, CPU time and peak memory.

    .venv/bin/python bench/bench_run.py [--simulate 32x8] [--duration 1h] [--budget 140kW]

Runs ``wattkeeper run --simulate ... --fast -o json`` as a child process on a fresh
SQLite store and reads the child's resource usage, so the numbers include start-up,
imports, migrations and the store, as an operator would see them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulate", default="32x8")
    ap.add_argument("--duration", default="1h")
    ap.add_argument("--budget", default="140kW")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{Path(tmp) / 'bench.db'}"
        wk = [sys.executable, "-m", "wattkeeper"]
        subprocess.run([*wk, "db", "upgrade", "--db", db], check=True, capture_output=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                *wk,
                "run",
                "--simulate",
                args.simulate,
                "--budget",
                args.budget,
                "--duration",
                args.duration,
                "--fast",
                "-o",
                "json",
                "--db",
                db,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        db_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir())
    run = json.loads(proc.stdout)
    out = {
        "command": f"wattkeeper run --simulate {args.simulate} --budget {args.budget} "
        f"--duration {args.duration} --fast -o json",
        "wall_s": round(wall, 1),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
        "peak_rss_mib": round(after.ru_maxrss / 1024, 1),
        "store_mib": round(db_bytes / 2**20, 1),
        "simulated_s": run["duration_s"],
        "gpus": run["gpus"],
        "over_budget_s": run["over_budget_s"],
        "tokens_per_joule": run["tokens_per_joule"],
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for key, value in out.items():
            print(f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
