"""The store's size per GPU with retention on, and how fast the leader rolls samples up.

Size: a simulated facility (``--sim-nodes`` x 8 H100s with their servers) runs on the
simulated clock for ``--minutes`` with short windows (raw ``--raw-min`` minutes,
rollups ``--rollup-min``), so the store reaches its steady state within the run. The
store's size (tables with their indexes: ``pg_total_relation_size`` on PostgreSQL,
``dbstat`` on SQLite) is printed every ten minutes, to show that it stops growing. From
the steady state come the bytes per raw GPU sample and per rollup GPU-minute (host and
token rows counted with the GPUs of their node), and from those the size per GPU with
the default windows (1 day raw at the agent's interval, 30 days of minutes).

Speed: ``--nodes`` x 8 GPUs with ``--history-s`` of 1 Hz samples loaded straight into
PostgreSQL (as bench_store.py does), then rolled up as the leader would: raw rows per
second. A facility needs ``GPUs x 60`` rows a minute rolled up to keep up.

Run: ``.venv/bin/python bench/bench_retention.py [--backend postgresql|sqlite|both]``
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from sqlalchemy import func, select, text

from wattkeeper.clock import SimClock
from wattkeeper.config import Config
from wattkeeper.runtime import build_simulated, run_fast
from wattkeeper.simulator.facility import FacilitySpec
from wattkeeper.store import retention
from wattkeeper.store.models import Gpu, GpuRollupRow, GpuSampleRow
from wattkeeper.store.repository import Store

RAW = ("gpu_samples", "host_samples", "token_samples")
ROLLUPS = ("gpu_samples_1m", "host_samples_1m", "token_samples_1m")
DEFAULT_RAW_S = 86400.0
DEFAULT_ROLLUP_S = 30 * 86400.0


def _bench_store() -> Any:
    """The fleet and history loaders of bench_store.py, beside this script (its folder
    is on the path when the script runs)."""
    import bench_store

    return bench_store


def table_bytes(store: Store, tables: tuple[str, ...]) -> int:
    """Bytes on disk of ``tables`` with their indexes."""
    with store.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            return sum(
                conn.scalar(text("SELECT pg_total_relation_size(:t)"), {"t": t}) for t in tables
            )
        # dbstat names each index by itself: count the indexes of the tables too.
        owned = conn.execute(
            text("SELECT name, tbl_name FROM sqlite_schema WHERE type IN ('table', 'index')")
        ).all()
        names = [name for name, tbl in owned if tbl in tables]
        return sum(
            conn.scalar(
                text("SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name = :n"), {"n": n}
            )
            for n in names
        )


def rows(store: Store, table: str) -> int:
    with store.engine.connect() as conn:
        return conn.scalar(text(f"SELECT count(*) FROM {table}"))


def size_run(url: str, n_nodes: int, minutes: int, raw_min: int, rollup_min: int) -> dict:
    cfg = Config.model_validate(
        {"retention": {"raw_s": raw_min * 60.0, "rollup_s": rollup_min * 60.0}}
    )
    bs = _bench_store()
    store = Store(bs.migrated_engine(url))
    clock = SimClock(1_800_000_000.0)
    rt = build_simulated(cfg, store, FacilitySpec.parse(f"{n_nodes}x8", seed=1), clock)
    growth = []
    t0 = time.perf_counter()
    for minute in range(1, minutes + 1):
        run_fast(rt, 60.0)
        if store.engine.dialect.name == "postgresql":
            # A real deployment runs autovacuum; here it runs every minute, so that the
            # sizes measure the rows kept, not how lazily the vacuum was scheduled.
            with store.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                for table in (*RAW, *ROLLUPS):
                    conn.execute(text(f"VACUUM {table}"))
        if minute % 10:
            continue
        growth.append(
            {
                "minute": minute,
                "raw_bytes": table_bytes(store, RAW),
                "rollup_bytes": table_bytes(store, ROLLUPS),
                "raw_gpu_rows": rows(store, "gpu_samples"),
                "rollup_gpu_rows": rows(store, "gpu_samples_1m"),
            }
        )
        print(json.dumps(growth[-1]), flush=True)
    rt.shutdown()
    wall = time.perf_counter() - t0
    end = growth[-1]
    n_gpus = n_nodes * 8
    per_raw = end["raw_bytes"] / end["raw_gpu_rows"]
    # Rollup tables are small in a short run, so their first pages weigh: the bytes a
    # rollup row adds are measured between the first and last checkpoints holding any.
    held = [g for g in growth if g["rollup_gpu_rows"]]
    first, last = held[0], held[-1]
    added = last["rollup_gpu_rows"] - first["rollup_gpu_rows"]
    per_minute = (
        (last["rollup_bytes"] - first["rollup_bytes"]) / added
        if added > 0
        else last["rollup_bytes"] / last["rollup_gpu_rows"]
    )
    interval = cfg.agent.interval_s
    steady = (
        DEFAULT_RAW_S / interval * per_raw + (DEFAULT_ROLLUP_S - DEFAULT_RAW_S) / 60 * per_minute
    )
    return {
        "gpus": n_gpus,
        "simulated_minutes": minutes,
        "wall_s": round(wall, 1),
        "growth": growth,
        "bytes_per_raw_gpu_sample": round(per_raw, 1),
        "bytes_per_rollup_gpu_minute": round(per_minute, 1),
        "agent_interval_s": interval,
        "default_windows_bytes_per_gpu": round(steady),
        "raw_bytes_per_gpu_day": round(DEFAULT_RAW_S / interval * per_raw),
        "rollup_bytes_per_gpu_day": round(1440 * per_minute),
    }


def speed_run(url: str, n_nodes: int, history_s: int) -> dict:
    bs = _bench_store()
    engine = bs.migrated_engine(url)
    now = bs.T0 + 10_000.0
    fleet = bs.register_fleet(engine, n_nodes, now)
    t0 = time.perf_counter()
    loaded = bs.load_history(engine, fleet, history_s, now)
    load_s = time.perf_counter() - t0
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
        n_gpus = conn.scalar(select(func.count()).select_from(Gpu))
    t0 = time.perf_counter()
    minutes = raw_rows = 0
    while True:
        done = retention.roll_up(engine, now + 120.0, 60.0, 86400.0)
        minutes += done.minutes
        raw_rows += done.raw_rows
        if done.caught_up:
            break
    spent = time.perf_counter() - t0
    with engine.connect() as conn:
        left = conn.scalar(select(func.count()).select_from(GpuSampleRow))
        rolled = conn.scalar(select(func.count()).select_from(GpuRollupRow))
    return {
        "gpus": n_gpus,
        "rows_loaded": loaded,
        "load_s": round(load_s, 1),
        "minutes_rolled_per_table": minutes // 3,
        "raw_rows_rolled": raw_rows,
        "gpu_rows_left": left,
        "gpu_rollup_rows": rolled,
        "seconds": round(spent, 2),
        "raw_rows_per_s": round(raw_rows / spent),
        "share_of_a_minute_at_1hz": round(spent / (minutes // 3) / 60.0, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["postgresql", "sqlite", "both"], default="both")
    ap.add_argument("--sim-nodes", type=int, default=2)
    ap.add_argument("--minutes", type=int, default=40)
    ap.add_argument("--raw-min", type=int, default=10)
    ap.add_argument("--rollup-min", type=int, default=20)
    ap.add_argument("--nodes", type=int, default=1000, help="speed run: nodes of 8 GPUs")
    ap.add_argument("--history-s", type=int, default=300)
    ap.add_argument("--no-speed", action="store_true")
    args = ap.parse_args()
    bs = _bench_store()
    backends = ["postgresql", "sqlite"] if args.backend == "both" else [args.backend]
    out: dict[str, Any] = {}
    for backend in backends:
        with bs.database(backend, "retention") as url:
            out[f"size_{backend}"] = size_run(
                url, args.sim_nodes, args.minutes, args.raw_min, args.rollup_min
            )
        print(json.dumps({backend: out[f"size_{backend}"]}, indent=1), flush=True)
        if backend == "postgresql" and not args.no_speed:
            with bs.database(backend, "retention_speed") as url:
                out["speed_postgresql"] = speed_run(url, args.nodes, args.history_s)
            print(json.dumps(out["speed_postgresql"], indent=1), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
