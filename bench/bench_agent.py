"""What one agent costs its node: CPU and wall time per sampling tick, and memory.

The agent shares a GPU server with the inference engines it measures, so its overhead
must be small next to a 1 s tick. This runs the real agent (simulated GPUs through the
same backend interface, the real token parser, the real SQLite store) on a simulated
clock: 8 GPUs and 2 token endpoints (the node's simulated vLLM server and a static
vLLM page), 600 ticks (10 minutes at 1 s), with the controller capping under a budget
so reconciliation does real work. Only ``agent.tick`` is timed: the facility physics
and the controller run between ticks, outside the measurement. A number, not a
pass/fail.

Run: ``.venv/bin/python bench/bench_agent.py [--ticks 600] [--page fixture|full] [--json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from wattkeeper.agent import TokenEndpoint
from wattkeeper.clock import SimClock
from wattkeeper.config import Config
from wattkeeper.runtime import build_simulated, open_store
from wattkeeper.simulator.facility import FacilitySpec
from wattkeeper.store.db import make_engine, upgrade

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "metrics"
START = 1_700_000_000.0


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile: with 600 ticks p99 is the 6th-slowest, not an interpolation."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _ms_median(seconds: list[float]) -> float | None:
    return 1e3 * statistics.median(seconds) if seconds else None


def _fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f} ms"


def _second_page(kind: str) -> str:
    if kind == "full":
        from bench_parser import full_size_page  # same folder; run as a script

        return full_size_page()
    return (FIXTURE / "vllm_metrics.txt").read_text()


def run(
    ticks: int, gpus: int, budget_w: float, tokens_interval_s: float, page: str
) -> dict[str, Any]:
    """Drive one agent for ``ticks`` simulated seconds; return the measurements."""
    proc = psutil.Process()
    with tempfile.TemporaryDirectory(prefix="wk-bench-") as tmp:
        db = Path(tmp) / "bench.db"
        url = f"sqlite:///{db}"
        upgrade(make_engine(url))
        cfg = Config.model_validate({"agent": {"tokens_interval_s": tokens_interval_s}})
        store = open_store(cfg, url)
        clock = SimClock(START)
        rt = build_simulated(cfg, store, FacilitySpec(1, gpus), clock)
        agent = rt.agents[0]
        static = _second_page(page)
        agent.endpoints.append(
            TokenEndpoint("http://127.0.0.1:8001/metrics", "vllm", lambda: static)
        )
        store.set_budget(budget_w, "bench", START)
        rss_before = proc.memory_info().rss

        cpu_s: list[float] = []
        wall_s: list[float] = []
        per_collector: dict[str, list[float]] = {}
        token_ticks = 0
        token_wall: list[float] = []
        plain_wall: list[float] = []
        next_controller = START
        for k in range(ticks):
            t = START + k * cfg.agent.interval_s
            clock.set(t)
            rt.facility.advance_to(t)
            before = dict(agent.state.collectors)
            c0, w0 = time.process_time(), time.perf_counter()
            rt.tick_agents()
            w1, c1 = time.perf_counter(), time.process_time()
            cpu_s.append(c1 - c0)
            wall_s.append(w1 - w0)
            read_tokens = False
            for name, entry in agent.state.collectors.items():
                if entry is before.get(name):
                    continue  # did not run this tick (token servers are read less often)
                read_tokens |= name.startswith("tokens:")
                per_collector.setdefault(name, []).append(entry[0])
            (token_wall if read_tokens else plain_wall).append(w1 - w0)
            token_ticks += read_tokens
            if t >= next_controller:
                rt.tick_controller()
                next_controller += cfg.controller.interval_s
        rss_after = proc.memory_info().rss
        db_bytes = sum(p.stat().st_size for p in Path(tmp).glob("bench.db*"))
        actuations = agent.state.actuations
        errors = agent.state.errors
        rt.shutdown()

    steady = wall_s[1:]  # the first tick registers the node: a one-off
    return {
        "ticks": ticks,
        "gpus": gpus,
        "endpoints": len(agent.endpoints),
        "second_page": page,
        "tokens_interval_s": tokens_interval_s,
        "ticks_reading_tokens": token_ticks,
        "cpu_ms_per_tick_mean": 1e3 * statistics.fmean(cpu_s),
        "cpu_ms_total": 1e3 * sum(cpu_s),
        "wall_ms_median": 1e3 * statistics.median(steady),
        "wall_ms_p99": 1e3 * _pct(steady, 99),
        "wall_ms_max": 1e3 * max(steady),
        "wall_ms_median_without_token_read": _ms_median(plain_wall),
        "wall_ms_median_with_token_read": _ms_median(token_wall[1:]),
        "wall_ms_first_tick": 1e3 * wall_s[0],
        "collector_ms_mean": {
            name: 1e3 * statistics.fmean(v) for name, v in sorted(per_collector.items())
        },
        "rss_mib_after": rss_after / 2**20,
        "rss_mib_growth": (rss_after - rss_before) / 2**20,
        "sqlite_mib": db_bytes / 2**20,
        "power_limit_changes": actuations,
        "errors": errors,
        "cpu_share_of_1s_tick": statistics.fmean(cpu_s) / cfg.agent.interval_s,
    }


def _table(r: dict[str, Any]) -> str:
    rows = [
        ("setup", f"{r['gpus']} GPUs, {r['endpoints']} token endpoints, {r['ticks']} ticks"),
        (
            "token reads",
            f"every {r['tokens_interval_s']:g} s ({r['ticks_reading_tokens']} ticks read them)",
        ),
        ("CPU per tick (mean)", f"{r['cpu_ms_per_tick_mean']:.2f} ms"),
        ("CPU share of a 1 s tick", f"{100 * r['cpu_share_of_1s_tick']:.2f} %"),
        ("wall per tick, median", f"{r['wall_ms_median']:.2f} ms"),
        ("wall per tick, p99", f"{r['wall_ms_p99']:.2f} ms"),
        ("wall per tick, max", f"{r['wall_ms_max']:.2f} ms"),
        ("  median, ticks reading tokens", _fmt_ms(r["wall_ms_median_with_token_read"])),
        ("  median, ticks not reading", _fmt_ms(r["wall_ms_median_without_token_read"])),
        ("first tick (registers node)", f"{r['wall_ms_first_tick']:.2f} ms"),
    ]
    rows += [
        (f"collector {name} (mean when run)", f"{ms:.3f} ms")
        for name, ms in r["collector_ms_mean"].items()
    ]
    rows += [
        ("RSS after", f"{r['rss_mib_after']:.1f} MiB (grew {r['rss_mib_growth']:.1f} MiB)"),
        ("SQLite files", f"{r['sqlite_mib']:.2f} MiB"),
        ("power limit changes", str(r["power_limit_changes"])),
        ("errors", str(r["errors"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=600, help="agent ticks (default 600)")
    parser.add_argument("--gpus", type=int, default=8, help="simulated GPUs (default 8)")
    parser.add_argument(
        "--budget", type=float, default=6000.0, help="facility budget in W (default 6000)"
    )
    parser.add_argument(
        "--tokens-interval",
        type=float,
        default=Config().agent.tokens_interval_s,
        help="seconds between token-server reads (default: the config default)",
    )
    parser.add_argument(
        "--page",
        choices=("fixture", "full"),
        default="fixture",
        help="second endpoint's page: the vLLM docs fixture or a full-size generated page",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    result = run(args.ticks, args.gpus, args.budget, args.tokens_interval, args.page)
    print(json.dumps(result, indent=2) if args.json else _table(result))


if __name__ == "__main__":
    main()
