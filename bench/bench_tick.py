"""The controller's whole tick at facility scale: snapshot, learn, plan, write, route.

One ``Controller.tick`` as production runs it (SLO ceilings, drains, routes and a
binding facility budget), on PostgreSQL (a throwaway server from ``tests/pg.py``, with
``fsync=off``) or SQLite, at ``--nodes`` x 8 GPUs with ``--history-s`` seconds of 1 Hz
GPU and host samples and a token row per node every 5 s (with latency) already stored.
The first tick writes a target for every GPU (all new); the later ones are the steady
state, where targets mostly renew their lease. Each tick's time is split into the
store's snapshot, the policy (ceilings, drains, plan, routes) and the writes (targets,
routes), by timing the store methods the tick calls.

One core: BLAS/OpenMP threads are set to 1 and the process pins itself to one CPU; the
database server runs on the other cores as it would on its own host. Numbers, not
pass/fail; the goal (under 1 s at 100k GPUs) is printed beside them.

Run: ``.venv/bin/python bench/bench_tick.py [--nodes 12500] [--history-s 300] [--ticks 4]
[--profile]``
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from sqlalchemy import insert, text  # noqa: E402

from wattkeeper.controller import Controller  # noqa: E402
from wattkeeper.policies.drain import DrainSettings  # noqa: E402
from wattkeeper.policies.plan import PlanSettings  # noqa: E402
from wattkeeper.policies.route import Routes  # noqa: E402
from wattkeeper.policies.slo import Ceilings, Slo  # noqa: E402
from wattkeeper.store.models import Budget  # noqa: E402
from wattkeeper.store.repository import Store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOAL_S = 1.0


def _bench_store() -> Any:
    """bench_store.py holds the fleet and history loaders; load it by path."""
    spec = importlib.util.spec_from_file_location("bench_store", ROOT / "bench" / "bench_store.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Timed:
    """Wraps store methods to add their time to a bucket."""

    def __init__(self, store: Store, buckets: dict[str, tuple[str, ...]]) -> None:
        self.spent: dict[str, float] = {}
        for bucket, names in buckets.items():
            for name in names:
                setattr(store, name, self._wrap(bucket, getattr(store, name)))

    def _wrap(self, bucket: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[bucket] = self.spent.get(bucket, 0.0) + time.perf_counter() - t0

        return call


def add_latency(engine: Any) -> None:
    """Latency in every token row, so ceilings and routes have something to act on."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE token_samples SET ttft_mean_s = 0.4, tpot_mean_s = 0.03,"
                " ttft_p90_s = 0.8, tpot_p90_s = 0.04, ttft_p90_floor_s = 0.5,"
                " tpot_p90_floor_s = 0.035, latency_requests = 50, kv_cache_usage_ratio = 0.5"
            )
        )


def run(
    backend: str, n_nodes: int, history_s: int, ticks: int, pin: bool, profile: bool = False
) -> dict[str, Any]:
    bs = _bench_store()
    now = bs.T0 + 10_000.0
    with bs.database(backend, "tick") as url:
        if pin and hasattr(os, "sched_setaffinity"):
            # After the server started, so that it keeps the other cores.
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        engine = bs.migrated_engine(url)
        fleet = bs.register_fleet(engine, n_nodes, now)
        t0 = time.perf_counter()
        rows = bs.load_history(engine, fleet, history_s, now)
        add_latency(engine)
        if backend == "postgresql":
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
        load_s = time.perf_counter() - t0
        n_gpus = sum(len(ids) for ids in fleet.values())
        # Demand is 400 W a GPU plus 1100 W a node: a budget at 90% of it binds.
        budget = 0.9 * (400.0 * n_gpus + 1100.0 * n_nodes)
        with engine.begin() as conn:
            conn.execute(
                insert(Budget),
                [{"scope": "facility", "limit_w": budget, "updated_at": now, "updated_by": "b"}],
            )
        store = Store(engine)
        timed = Timed(
            store,
            {
                "snapshot": ("snapshot", "budgets", "schedules", "recall"),
                "write": (
                    "write_targets",
                    "write_routes",
                    "routes",
                    "set_drained",
                    "audit",
                    "remember",
                ),
            },
        )
        controller = Controller(
            store,
            PlanSettings(),
            lease_s=30.0,
            ceilings=Ceilings(Slo(2.0, 0.05)),
            drains=DrainSettings(),
            routes=Routes(),
        )
        out = []
        for k in range(ticks):
            timed.spent.clear()
            # One second apart: every tick sees the history as fresh (stale after 10 s),
            # as a controller does whose agents keep writing.
            t = now + 1.0 * k
            profiler = None
            if profile and k == ticks - 1:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            start = time.perf_counter()
            plan = controller.tick(t)
            total = time.perf_counter() - start
            if profiler is not None:
                import pstats

                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            snap = timed.spent.get("snapshot", 0.0)
            write = timed.spent.get("write", 0.0)
            out.append(
                {
                    "tick": k,
                    "total_s": total,
                    "snapshot_s": snap,
                    "policy_s": total - snap - write,
                    "write_s": write,
                    "targets": 0 if plan is None else len(plan.targets),
                }
            )
            _say(
                f"{backend} tick {k}: "
                + ", ".join(f"{k2} {v:.3f}" for k2, v in out[-1].items() if k2.endswith("_s"))
            )
    steady = out[1:] or out
    return {
        "backend": backend,
        "nodes": n_nodes,
        "gpus": n_gpus,
        "history_s": history_s,
        "rows_loaded": rows,
        "load_s": load_s,
        "ticks": out,
        "steady_median_s": statistics.median(t["total_s"] for t in steady),
        "goal_s": GOAL_S,
    }


def _say(line: str) -> None:
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["postgresql"])
    parser.add_argument("--nodes", type=int, default=12_500, help="8 GPUs each")
    parser.add_argument("--history-s", type=int, default=300)
    parser.add_argument("--ticks", type=int, default=4)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="print cProfile's top functions for the last tick"
    )
    args = parser.parse_args()
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    results = []
    for b in args.backends:
        results.append(
            run(b, args.nodes, args.history_s, args.ticks, not args.no_pin, args.profile)
        )
        if cpus:
            os.sched_setaffinity(0, cpus)
    meta = {"python": platform.python_version(), "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=1))
        return
    for r in results:
        print(
            f"{r['backend']}: {r['gpus']:,} GPUs, {r['history_s']} s of history "
            f"({r['rows_loaded']:,} GPU rows, loaded in {r['load_s']:.0f} s): first tick "
            f"{r['ticks'][0]['total_s']:.2f} s, steady median {r['steady_median_s']:.2f} s "
            f"(goal {r['goal_s']:.0f} s)"
        )


if __name__ == "__main__":
    main()
