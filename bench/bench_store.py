"""Store throughput: GPU samples ingested per second and the controller's snapshot time.

Every agent writes one transaction per tick (8 GPU rows, a host row) and the controller
reads the newest sample of every GPU each tick, so these two numbers bound how many GPUs
one store can carry at a 1 s agent interval. Measured on SQLite (temporary file, WAL, the
pragmas of ``store.db.make_engine``) and on PostgreSQL (a throwaway server from
``tests/pg.py``; note that it runs with ``fsync=off``, so commit cost is CPU and round
trips, not disk flushes). The schema comes from the Alembic migrations, as in production.

- ``tick``: ``Store.write_ticks`` exactly as the agent calls it, cycling over the
  fleet's nodes (one transaction: the node claimed and touched by one ``UPDATE ...
  RETURNING``, 8 GPU rows, a host row); rate in GPU rows per second, from ``--writers``
  processes (1 and 4).
- ``ticksK``: the same with K ticks of a node per transaction (``--ticks-per-write``,
  default 5): an agent with ``agent.write_interval_s`` of K seconds, or replaying a
  backlog.
- ``batch``: the same insert as ``write_ticks`` (``insert_rows``: one ``INSERT ... SELECT
  FROM unnest`` on PostgreSQL, skipping stored rows) with ``--batch`` rows (1000) per
  transaction: what a batching ingester could reach.
- ``copy`` (PostgreSQL only): ``COPY gpu_samples FROM STDIN`` through psycopg, the
  upper bound for a bulk path.
- ``snapshot``: ``Store.snapshot(now, 60)`` at 1250 nodes x 8 GPUs with ``--history-s``
  seconds of 1 Hz samples already stored (bulk-loaded), targets for every GPU and a
  token row per node every 5 s; median of ``--repeat`` calls. Reported beside it: the
  same SQL run raw through the driver (so the rest is ORM and Python), ``EXPLAIN`` of
  the newest-sample query, and the time of the GPU half of the snapshot as proposed in
  ``bench/README.md`` (one index probe per GPU, plain columns), checked to return the
  same ``GpuView`` values; and ``Store.write_targets`` for every GPU, unchanged (lease
  refresh only) and all changed (one audit row each). Snapshot measured before and
  after ``ANALYZE``: a store that grew from empty may have no statistics yet, and the
  plans differ.

Numbers, not pass/fail; the goals (20k rows/s SQLite, 100k rows/s PostgreSQL) are
printed beside them.

Run: ``.venv/bin/python bench/bench_store.py [--backends sqlite postgresql] [--json]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Select, event, insert, select, text, true
from sqlalchemy.engine import make_url

from wattkeeper.collectors.gpu import GpuSample
from wattkeeper.store.db import insert_rows, make_engine, upgrade
from wattkeeper.store.models import Budget, Gpu, GpuSampleRow, Node, Target
from wattkeeper.store.repository import GpuView, NodeTick, Store, TargetSpec

ROOT = Path(__file__).resolve().parent.parent
GPUS_PER_NODE = 8
GOALS = {"sqlite": 20_000, "postgresql": 100_000}
SAMPLE_COLUMNS = (
    "gpu_id",
    "ts",
    "power_w",
    "power_instant_w",
    "energy_j",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "utilization_gpu_ratio",
    "temperature_c",
    "power_limit_w",
    "throttle_reasons",
)
T0 = 1_700_000_000.0


def proposed_gpu_statement(dialect: str, now: float, window_s: float) -> Select:
    """The GPU query of ``Store.snapshot`` as proposed in bench/README.md.

    The newest sample is found by one backward probe of ``ix_gpu_samples_gpu_ts`` per GPU
    (``ORDER BY ts DESC LIMIT 1``), so the cost follows the GPU count, not the rows in
    the window or the retention; plain columns instead of ORM entities, so no identity
    map is built for 30,000 objects that are thrown away at once. PostgreSQL needs the
    probe as a LATERAL subquery: as a correlated scalar in the join condition its
    planner, once it has statistics, hashes the whole sample table instead. SQLite has
    no LATERAL, but its planner only does nested loops, so the correlated form probes.
    """
    window = (
        GpuSampleRow.gpu_id == Gpu.id,
        GpuSampleRow.ts >= now - window_s,
        GpuSampleRow.ts <= now,
    )
    if dialect == "postgresql":
        sample = (
            select(
                GpuSampleRow.ts,
                GpuSampleRow.power_w,
                GpuSampleRow.energy_j,
                GpuSampleRow.sm_clock_mhz,
                GpuSampleRow.utilization_gpu_ratio,
                GpuSampleRow.power_limit_w,
                GpuSampleRow.throttle_reasons,
            )
            .where(*window)
            .order_by(GpuSampleRow.ts.desc())
            .limit(1)
            .lateral("newest")
        )
        on = true()
    else:
        sample = GpuSampleRow.__table__
        newest = (
            select(GpuSampleRow.id)
            .where(*window)
            .order_by(GpuSampleRow.ts.desc())
            .limit(1)
            .correlate(Gpu)
            .scalar_subquery()
        )
        on = sample.c.id == newest
    return (
        select(
            Gpu.uuid,
            Node.name,
            Gpu.index,
            Gpu.name,
            Gpu.power_min_w,
            Gpu.power_max_w,
            Gpu.power_default_w,
            sample.c.ts,
            sample.c.power_w,
            sample.c.energy_j,
            sample.c.sm_clock_mhz,
            sample.c.utilization_gpu_ratio,
            sample.c.power_limit_w,
            sample.c.throttle_reasons,
            Target.power_limit_w,
            Target.lease_expires_at,
        )
        .join(Node, Node.id == Gpu.node_id)
        .outerjoin(sample, on)
        .outerjoin(Target, Target.gpu_id == Gpu.id)
        .order_by(Node.name, Gpu.index)
    )


def proposed_gpu_views(engine: Engine, now: float, window_s: float) -> list[GpuView]:
    """The proposed query, turned into the same ``GpuView`` values the snapshot returns."""
    with engine.connect() as conn:
        rows = conn.execute(proposed_gpu_statement(engine.dialect.name, now, window_s)).all()
    return [
        GpuView(
            uuid=r[0],
            node=r[1],
            index=r[2],
            name=r[3],
            power_min_w=r[4],
            power_max_w=r[5],
            power_default_w=r[6],
            sample_ts=r[7],
            power_w=r[8],
            energy_j=r[9],
            sm_clock_mhz=r[10],
            utilization_gpu_ratio=r[11],
            power_limit_w=r[12],
            throttle_reasons=tuple(filter(None, (r[13] or "").split(","))),
            target_power_limit_w=r[14],
            target_lease_expires_at=r[15],
        )
        for r in rows
    ]


def _load_pg_helper() -> Any:
    """tests/pg.py is not a package module; load it by path so the bench reuses it."""
    spec = importlib.util.spec_from_file_location("wattkeeper_bench_pg", ROOT / "tests" / "pg.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def server_cpu_s(marker: str, seen: dict[int, float]) -> float:
    """CPU seconds of every process of the PostgreSQL server whose postmaster's command
    line holds ``marker`` (its data directory or port), each kept at its last reading so
    a backend that exits still counts. Reading it before and after a measurement says
    how much of the machine the server itself used: on a machine it shares with its
    clients, rows per server CPU second is what carries over to a server of its own."""
    import psutil

    for p in psutil.process_iter(["pid", "name"]):
        try:
            if p.info["name"] != "postgres":
                continue
            if p.pid not in seen:
                parent = p.parent()
                lines = [p.cmdline(), parent.cmdline() if parent is not None else []]
                if not any(marker in part for line in lines for part in line):
                    continue
            t = p.cpu_times()
            seen[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return sum(seen.values())


class ServerCpu:
    """The server's CPU seconds over a ``with`` block, polled every 0.1 s on a thread:
    a backend's CPU time is readable only while it lives, and the writers' backends
    end with their connections, before the block does."""

    def __init__(self, marker: str | None) -> None:
        self.marker = marker
        self.seen: dict[int, float] = {}
        self.seconds: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        assert self.marker is not None
        while not self._stop.wait(0.1):
            server_cpu_s(self.marker, self.seen)

    def __enter__(self) -> ServerCpu:
        if self.marker is not None:
            self._start = server_cpu_s(self.marker, self.seen)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.marker is None:
            return
        self._stop.set()
        self._thread.join()
        self.seconds = server_cpu_s(self.marker, self.seen) - self._start


def _port(url: str) -> str:
    return str(make_url(url).port)


@contextmanager
def database(backend: str, name: str) -> Iterator[str]:
    """A fresh, migrated database URL for one measurement."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="wattkeeper-bench-") as tmp:
            yield f"sqlite:///{tmp}/{name}.db"
        return
    pg = _load_pg_helper()
    bindir = pg.find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL binaries not found (/usr/lib/postgresql/*/bin)")
    server = pg.PgServer(bindir)
    server.start()
    try:
        yield server.create_database(name)
    finally:
        server.stop()


def migrated_engine(url: str) -> Engine:
    engine = make_engine(url)
    upgrade(engine)
    return engine


def register_fleet(engine: Engine, n_nodes: int, now: float) -> dict[str, dict[str, int]]:
    """Nodes and GPUs in bulk (register_node is per node and not what is measured)."""
    with engine.begin() as conn:
        conn.execute(
            insert(Node),
            [
                {
                    "name": f"node{j:05d}",
                    "registered_at": now,
                    "last_seen_at": now,
                    "drained": False,
                    "backend": "sim",
                }
                for j in range(n_nodes)
            ],
        )
        node_ids = dict(conn.execute(text("SELECT name, id FROM nodes")).all())
        conn.execute(
            insert(Gpu),
            [
                {
                    "uuid": f"GPU-{j:05d}-{k}",
                    "node_id": node_ids[f"node{j:05d}"],
                    "index": k,
                    "name": "NVIDIA H100 80GB HBM3",
                    "pci_bus_id": f"0000:{k:02x}:00.0",
                    "memory_total_bytes": 80 * 2**30,
                    "power_min_w": 200.0,
                    "power_max_w": 700.0,
                    "power_default_w": 700.0,
                }
                for j in range(n_nodes)
                for k in range(GPUS_PER_NODE)
            ],
        )
        rows = conn.execute(
            text("SELECT g.uuid, g.id, n.name FROM gpus g JOIN nodes n ON n.id = g.node_id")
        ).all()
    fleet: dict[str, dict[str, int]] = {}
    for uuid, gpu_id, node in rows:
        fleet.setdefault(node, {})[uuid] = gpu_id
    return fleet


def _sample(uuid: str, ts: float, k: int) -> GpuSample:
    return GpuSample(
        uuid=uuid,
        timestamp=ts,
        power_w=400.0 + k,
        power_instant_w=410.0 + k,
        energy_j=1e9 + ts,
        sm_clock_mhz=1755.0,
        mem_clock_mhz=2619.0,
        utilization_gpu_ratio=0.9,
        temperature_c=60.0,
        power_limit_w=500.0,
        throttle_reasons=("sw_power_cap",),
    )


def _row(gpu_id: int, ts: float) -> tuple:
    return (gpu_id, ts, 400.0, 410.0, 1e9 + ts, 1755.0, 2619.0, 0.9, 60.0, 500.0, "sw_power_cap")


def _tick_writer(
    url: str, fleet: list[tuple[str, dict[str, int]]], seconds: float, per_write: int
) -> tuple[int, float]:
    """One agent-like writer over its share of the nodes, each write carrying
    ``per_write`` ticks of a node as ``Store.write_ticks`` (an agent with
    ``agent.write_interval_s`` of that many seconds); (node ticks written, seconds)."""
    engine = make_engine(url)
    store = Store(engine)
    host = (0.3, 1100.0, "model")
    fleet_ticks = [
        (node, ids, [_sample(u, T0, k) for k, u in enumerate(ids)]) for node, ids in fleet
    ]

    def ticks(samples: list[GpuSample], first: float) -> list[NodeTick]:
        return [
            NodeTick(
                first + j,
                tuple(replace(s, timestamp=first + j) for s in samples),
                host,
            )
            for j in range(per_write)
        ]

    for node, ids, samples in fleet_ticks[:20]:  # warm-up: connections, statement caches
        store.write_ticks(node, ids, ticks(samples, T0))
    done = 0
    started = time.perf_counter()
    deadline = started + seconds
    now = T0
    while time.perf_counter() < deadline:
        now += per_write
        for node, ids, samples in fleet_ticks:
            store.write_ticks(node, ids, ticks(samples, now))
            done += per_write
            if done % 50 < per_write and time.perf_counter() >= deadline:
                break
    elapsed = time.perf_counter() - started
    engine.dispose()
    return done, elapsed


def bench_ticks(backend: str, n_nodes: int, seconds: float, writers: int, per_write: int) -> dict:
    """Agent writes from ``writers`` processes (agents are separate processes, each with
    its own connection); the rate counts only the measured window of each writer."""
    with database(backend, "ingest_tick") as url:
        engine = migrated_engine(url)
        fleet = sorted(register_fleet(engine, n_nodes, T0).items())
        engine.dispose()
        shares = [fleet[w::writers] for w in range(writers)]
        with ServerCpu(_port(url) if backend == "postgresql" else None) as cpu:
            if writers == 1:
                results = [_tick_writer(url, shares[0], seconds, per_write)]
            else:
                ctx = multiprocessing.get_context("spawn")
                with ctx.Pool(writers) as pool:
                    results = pool.starmap(
                        _tick_writer, [(url, sh, seconds, per_write) for sh in shares]
                    )
        server_s = cpu.seconds
    rows = sum(done for done, _ in results) * GPUS_PER_NODE
    elapsed = max(e for _, e in results)
    return {
        "mode": f"{'tick' if per_write == 1 else f'ticks{per_write}'} x{writers}",
        "writers": writers,
        "ticks_per_write": per_write,
        "rows": rows,
        "seconds": elapsed,
        "rows_per_s": rows / elapsed,
        # Includes the writers' warm-up: slightly pessimistic per row.
        "server_cpu_s": server_s,
        "rows_per_server_cpu_s": rows / server_s if server_s else None,
    }


def bench_batches(backend: str, batch: int, seconds: float) -> dict:
    """The same Core insert, ``batch`` rows per transaction."""
    n_nodes = max(1, batch // GPUS_PER_NODE)
    with database(backend, "ingest_batch") as url:
        engine = migrated_engine(url)
        fleet = register_fleet(engine, n_nodes, T0)
        gpu_ids = [i for ids in fleet.values() for i in ids.values()][:batch]
        template = [dict(zip(SAMPLE_COLUMNS, _row(g, T0), strict=True)) for g in gpu_ids]
        with engine.begin() as conn:
            insert_rows(conn, GpuSampleRow, template)
        done = 0
        seen: dict[int, float] = {}
        pg = backend == "postgresql"
        cpu0 = server_cpu_s(_port(url), seen) if pg else 0.0
        started = time.perf_counter()
        now = T0
        while time.perf_counter() - started < seconds:
            now += 1.0
            for r in template:
                r["ts"] = now
            with engine.begin() as conn:
                insert_rows(conn, GpuSampleRow, template)
            done += len(template)
        elapsed = time.perf_counter() - started
        server_s = server_cpu_s(_port(url), seen) - cpu0 if pg else None
        engine.dispose()
    return {
        "mode": f"batch{batch}",
        "rows": done,
        "seconds": elapsed,
        "rows_per_s": done / elapsed,
        "server_cpu_s": server_s,
        "rows_per_server_cpu_s": done / server_s if server_s else None,
    }


def bench_copy(batch: int, seconds: float) -> dict:
    """PostgreSQL COPY of ``batch`` rows per transaction: the ceiling for a bulk path."""
    with database("postgresql", "ingest_copy") as url:
        engine = migrated_engine(url)
        fleet = register_fleet(engine, max(1, batch // GPUS_PER_NODE), T0)
        gpu_ids = [i for ids in fleet.values() for i in ids.values()][:batch]
        done = 0
        seen: dict[int, float] = {}
        cpu0 = server_cpu_s(_port(url), seen)
        started = time.perf_counter()
        now = T0
        raw = engine.raw_connection()
        try:
            while time.perf_counter() - started < seconds:
                now += 1.0
                with raw.cursor() as cur:
                    with cur.copy(
                        f"COPY gpu_samples ({', '.join(SAMPLE_COLUMNS)}) FROM STDIN"
                    ) as cp:
                        for g in gpu_ids:
                            cp.write_row(_row(g, now))
                raw.commit()
                done += len(gpu_ids)
        finally:
            raw.close()
        elapsed = time.perf_counter() - started
        server_s = server_cpu_s(_port(url), seen) - cpu0
        engine.dispose()
    return {
        "mode": f"copy{batch}",
        "rows": done,
        "seconds": elapsed,
        "rows_per_s": done / elapsed,
        "server_cpu_s": server_s,
        "rows_per_server_cpu_s": done / server_s if server_s else None,
    }


def load_history(engine: Engine, fleet: dict, history_s: int, now: float) -> int:
    """``history_s`` seconds of 1 Hz samples ending at ``now``, generated inside the
    database (a Python loop would take minutes at millions of rows), a minute per
    statement, in time order as agents would have written them; a token row per node
    every 5 s."""
    n_gpus = sum(len(ids) for ids in fleet.values())
    gpu_cols = ", ".join(SAMPLE_COLUMNS)
    first = now - history_s + 1
    for chunk_start in range(0, history_s, 60):
        chunk = min(60, history_s - chunk_start)
        secs = (
            "(WITH RECURSIVE secs(k) AS"
            f" (SELECT 0 UNION ALL SELECT k + 1 FROM secs WHERE k < {chunk - 1})"
            f" SELECT {first + chunk_start} + k AS ts FROM secs) t"
        )
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL statement_timeout = 0"))
            conn.execute(
                text(
                    f"INSERT INTO gpu_samples ({gpu_cols}) SELECT g.id, t.ts, 400.0, 410.0,"
                    " 1e9 + t.ts, 1755.0, 2619.0, 0.9, 60.0, 500.0, 'sw_power_cap'"
                    f" FROM {secs} CROSS JOIN gpus g ORDER BY t.ts, g.id"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO host_samples (node_id, ts, cpu_util_ratio, non_gpu_power_w,"
                    " power_source) SELECT n.id, t.ts, 0.3, 1100.0, 'model'"
                    f" FROM {secs} CROSS JOIN nodes n ORDER BY t.ts, n.id"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO token_samples (node_id, ts, endpoint, model, up,"
                    " prompt_tokens_total, generation_tokens_total, generation_tokens_per_s,"
                    " requests_running, requests_waiting) SELECT n.id, t.ts,"
                    " 'http://127.0.0.1:8000/metrics', 'llama', true, 1e6, 2e6, 5000.0, 8.0, 0.0"
                    f" FROM {secs} CROSS JOIN nodes n"
                    " WHERE CAST(t.ts AS INTEGER) % 5 = 0 ORDER BY t.ts, n.id"
                )
            )
    return n_gpus * history_s


def explain(engine: Engine, backend: str, sql: str, params: Any) -> list[str]:
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if backend == "sqlite":
            cur.execute("EXPLAIN QUERY PLAN " + sql, params)
            return [f"{r[0]}|{r[1]}| {r[3]}" for r in cur.fetchall()]
        cur.execute("EXPLAIN (ANALYZE, BUFFERS, TIMING OFF) " + sql, params)
        return [r[0] for r in cur.fetchall()]
    finally:
        raw.close()


def _median_time(fn: Any, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_snapshot(backend: str, n_nodes: int, history_s: int, repeat: int) -> dict:
    now = T0 + 10_000.0
    with database(backend, "snapshot") as url:
        engine = migrated_engine(url)
        fleet = register_fleet(engine, n_nodes, now)
        t0 = time.perf_counter()
        stored = load_history(engine, fleet, history_s, now)
        load_s = time.perf_counter() - t0
        store = Store(engine)
        with engine.begin() as conn:
            conn.execute(
                insert(Budget),
                [{"scope": "facility", "limit_w": 6e6, "updated_at": now, "updated_by": "bench"}],
            )
            conn.execute(
                text(
                    "INSERT INTO targets (gpu_id, power_limit_w, issued_at, lease_expires_at,"
                    " reason) SELECT id, 500.0, :now, :exp, 'bench' FROM gpus"
                ),
                {"now": now, "exp": now + 30},
            )
        statements: list[tuple[str, Any]] = []

        def record(_conn: Any, _cur: Any, stmt: str, params: Any, _ctx: Any, _many: bool) -> None:
            statements.append((stmt, params))

        event.listen(engine, "before_cursor_execute", record)
        snap = store.snapshot(now, window_s=60.0)
        event.remove(engine, "before_cursor_execute", record)
        fresh = sum(1 for g in snap.gpus if g.sample_ts == now)
        gpu_stmt = next(s for s in statements if "gpu_samples" in s[0])
        result: dict[str, Any] = {
            "backend": backend,
            "gpus": len(snap.gpus),
            "gpus_with_fresh_sample": fresh,
            "history_s": history_s,
            "gpu_sample_rows": stored,
            "bulk_load_s": load_s,
        }

        def analyze() -> None:
            with engine.begin() as conn:
                conn.execute(text("ANALYZE"))

        def run_raw(only: str | None = None) -> None:
            raw = engine.raw_connection()
            try:
                cur = raw.cursor()
                for stmt, params in statements:
                    if only is None or only in stmt:
                        cur.execute(stmt, params)
                        cur.fetchall()
            finally:
                raw.close()

        def proposed() -> list[GpuView]:
            return proposed_gpu_views(engine, now, 60.0)

        proposal = proposed()
        current = {g.uuid: g for g in snap.gpus}
        result["proposal_matches_snapshot"] = len(proposal) == len(current) and all(
            current[g.uuid] == g for g in proposal
        )
        proposed_sql = _driver_sql(engine, proposed_gpu_statement(backend, now, 60.0))

        phases = ["as_loaded", "analyzed"]
        for phase in phases:
            if phase == "analyzed":
                analyze()
            result[phase] = {
                "snapshot_s": _median_time(lambda: store.snapshot(now, window_s=60.0), repeat),
                "raw_sql_s": _median_time(run_raw, repeat),
                "raw_gpu_sql_s": _median_time(lambda: run_raw("gpu_samples"), repeat),
                "proposed_gpu_part_s": _median_time(proposed, repeat),
                "explain_newest_gpu": explain(engine, backend, *gpu_stmt),
                "explain_proposed": explain(engine, backend, *proposed_sql),
            }
        # The controller's other half of a tick: one target per GPU with a fresh lease.
        same = [TargetSpec(g.uuid, 500.0, reason="bench") for g in snap.gpus]
        changed = [TargetSpec(g.uuid, 450.0, reason="bench") for g in snap.gpus]
        result["write_targets_unchanged_s"] = _median_time(
            lambda: store.write_targets(same, now, 30.0), max(1, repeat // 2)
        )
        t0 = time.perf_counter()
        result["write_targets_changed_count"] = store.write_targets(changed, now, 30.0)
        result["write_targets_changed_s"] = time.perf_counter() - t0
        engine.dispose()
    return result


def _driver_sql(engine: Engine, stmt: Select) -> tuple[str, Any]:
    """The SQL and parameters the driver receives for ``stmt``, for EXPLAIN."""
    compiled = stmt.compile(engine)
    if engine.dialect.name == "sqlite":
        return str(compiled), tuple(compiled.params[k] for k in compiled.positiontup or ())
    return str(compiled), compiled.params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--seconds", type=float, default=5.0, help="per ingest measurement")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument(
        "--writers", type=int, nargs="+", default=[1, 4], help="agent processes for tick mode"
    )
    parser.add_argument(
        "--ticks-per-write",
        type=int,
        nargs="+",
        default=[1, 5],
        help="ticks of a node per transaction (agent.write_interval_s in seconds)",
    )
    parser.add_argument("--nodes", type=int, default=1250, help="8 GPUs each")
    parser.add_argument("--history-s", type=int, nargs="+", default=[60])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], choices=["ingest", "snapshot"])
    parser.add_argument("--explain", action="store_true", help="print the query plans")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # other work on the machine skews every number here
    ingest: list[dict] = []
    snapshots: list[dict] = []
    for backend in args.backends:
        if "ingest" not in args.skip:
            for res in (
                *(
                    bench_ticks(backend, args.nodes, args.seconds, w, k)
                    for k in args.ticks_per_write
                    for w in args.writers
                ),
                bench_batches(backend, args.batch, args.seconds),
            ):
                ingest.append({"backend": backend, **res, "goal_rows_per_s": GOALS[backend]})
                _progress(ingest[-1])
            if backend == "postgresql":
                ingest.append(
                    {
                        "backend": backend,
                        **bench_copy(args.batch, args.seconds),
                        "goal_rows_per_s": GOALS[backend],
                    }
                )
                _progress(ingest[-1])
        if "snapshot" not in args.skip:
            for history in args.history_s:
                snapshots.append(bench_snapshot(backend, args.nodes, history, args.repeat))
                print(f"  {backend} snapshot, {history} s stored: done", file=sys.stderr)
    meta = {
        "bench": "store",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus_visible": os.cpu_count(),
        "load_average_1m_before": load_before,
    }
    if args.json:
        print(json.dumps({**meta, "ingest": ingest, "snapshot": snapshots}, indent=2))
        return
    if ingest:
        print(
            f"{'backend':<11} {'mode':<10} {'rows':>9} {'rows/s':>10} {'goal':>9} "
            f"{'rows/server CPU s':>18}"
        )
    for r in ingest:
        per_cpu = r.get("rows_per_server_cpu_s")
        print(
            f"{r['backend']:<11} {r['mode']:<10} {r['rows']:>9} {r['rows_per_s']:>10,.0f} "
            f"{r['goal_rows_per_s']:>9,} {'' if per_cpu is None else f'{per_cpu:,.0f}':>18}"
        )
    print()
    print(
        f"{'backend':<11} {'GPUs':>6} {'stored s':>8} {'rows':>9} {'stats':<10} "
        f"{'snapshot ms':>11} {'raw SQL ms':>10} {'GPU part':>8} {'proposed ms':>11}"
    )
    for s in snapshots:
        for phase in ("as_loaded", "analyzed"):
            p = s[phase]
            print(
                f"{s['backend']:<11} {s['gpus']:>6} {s['history_s']:>8} {s['gpu_sample_rows']:>9} "
                f"{phase:<10} {1e3 * p['snapshot_s']:>11.1f} {1e3 * p['raw_sql_s']:>10.1f} "
                f"{1e3 * p['raw_gpu_sql_s']:>8.1f} {1e3 * p['proposed_gpu_part_s']:>11.1f}"
            )
            if args.explain:
                print("    newest-sample query:")
                print("\n".join("      " + line for line in p["explain_newest_gpu"]))
                print("    proposed per-GPU probe query:")
                print("\n".join("      " + line for line in p["explain_proposed"]))
    if snapshots:
        print()
        print(
            f"{'backend':<11} {'GPUs':>6} {'write_targets unchanged ms':>27} {'all changed ms':>15}"
        )
    for s in snapshots:
        print(
            f"{s['backend']:<11} {s['gpus']:>6} {1e3 * s['write_targets_unchanged_s']:>27.1f} "
            f"{1e3 * s['write_targets_changed_s']:>15.1f}"
        )


def _progress(r: dict) -> None:
    print(f"  {r['backend']} {r['mode']}: {r['rows_per_s']:,.0f} rows/s", file=sys.stderr)


if __name__ == "__main__":
    main()
