"""A thousand nodes on one PostgreSQL: ingest sustained, the leader's period, failover.

``--nodes`` simulated nodes of 8 GPUs (default 1,000) write to one PostgreSQL (a
throwaway server from ``tests/pg.py``, ``fsync=off``) on the
wall clock for ``--duration`` seconds, while two controllers (leader and standby, each
a process built as ``wattkeeper controller`` builds it, planning every second under a
binding facility budget) run beside them. Near the end the leader is killed
(SIGKILL) and the time until the standby holds the lease is measured.

The nodes are driven from ``--writers`` processes, one connection each, and do per
second what an agent does with the store: one ``Store.write_ticks`` of the node's
ticks (every tick, or every ``--write-interval`` seconds with that many ticks in one
transaction, as ``agent.write_interval_s`` does), then ``Store.orders_for_node`` (its
targets and drain mark, one statement). Their GPUs draw a little under the target the
controller set. What is not measured here: the simulated physics and NVML reads
(``bench_agent.py`` measures an agent's own tick).

Reported: GPU samples per second offered and sustained, rows in the store against rows
written (none may be lost), how late the writers' rounds ran (a round that takes more
than a second means the store is saturated), the controller's period (whole tick:
snapshot, plan, write) p50/p95/p99/max on the leader, failover time, and the CPU seconds
each party used (writers, controllers, PostgreSQL), to say what saturates first.

Run: ``.venv/bin/python bench/bench_load.py [--nodes 1000] [--duration 600]
[--writers 4] [--write-interval 1] [--json]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import random
import signal
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from wattkeeper.collectors.gpu import GpuSample

ROOT = Path(__file__).resolve().parent.parent
GPUS_PER_NODE = 8
CAP_W = 700.0


def _module(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _writer(
    url: str,
    fleet: list[tuple[str, dict[str, int]]],
    duration_s: float,
    write_every: int,
    start_at: float,
    log_path: str,
) -> None:
    """The store side of ``len(fleet)`` agents: every second, each node's tick and its
    targets; written in one transaction every ``write_every`` seconds. One line of JSON
    per round to ``log_path``."""
    from wattkeeper.store.db import StoreError, make_engine
    from wattkeeper.store.repository import NodeTick, Store

    store = Store(make_engine(url))
    rng = random.Random(hash(fleet[0][0]) if fleet else 0)
    targets: dict[str, dict[str, float]] = {}
    waiting: dict[str, list[NodeTick]] = {node: [] for node, _ in fleet}
    templates = {
        node: [
            GpuSample(
                uuid=u,
                timestamp=0.0,
                power_w=0.0,
                energy_j=1e9,
                sm_clock_mhz=1755.0,
                mem_clock_mhz=2619.0,
                utilization_gpu_ratio=0.9,
                temperature_c=60.0,
                power_limit_w=CAP_W,
            )
            for u in ids
        ]
        for node, ids in fleet
    }
    with open(log_path, "a") as log:
        time.sleep(max(0.0, start_at - time.time()))
        k = 0
        while time.time() < start_at + duration_s:
            due = start_at + k
            k += 1
            t0 = time.time()
            rows = errors = 0
            for node, ids in fleet:
                caps = targets.get(node, {})
                samples = tuple(
                    replace(
                        s,
                        timestamp=t0,
                        power_w=min(caps.get(s.uuid, CAP_W), 660.0) * rng.uniform(0.93, 0.99),
                        power_limit_w=caps.get(s.uuid, CAP_W),
                    )
                    for s in templates[node]
                )
                waiting[node].append(NodeTick(t0, samples, (0.3, 1100.0, "model")))
                try:
                    if len(waiting[node]) >= write_every:
                        store.write_ticks(node, ids, waiting[node])
                        rows += GPUS_PER_NODE * len(waiting[node])
                        waiting[node] = []
                    orders = store.orders_for_node(node).targets
                    targets[node] = {
                        u: t.power_limit_w for u, t in orders.items() if t.power_limit_w is not None
                    }
                except StoreError:
                    errors += 1
            done = time.time()
            log.write(
                json.dumps({"due": due, "start": t0, "end": done, "rows": rows, "errors": errors})
                + "\n"
            )
            log.flush()
            time.sleep(max(0.0, start_at + k - time.time()))
        for node, ids in fleet:  # what waits at the end is written, as a clean stop does
            if waiting[node]:
                store.write_ticks(node, ids, waiting[node])
                log.write(json.dumps({"final_rows": GPUS_PER_NODE * len(waiting[node])}) + "\n")
        log.write(json.dumps({"cpu_s": time.process_time()}) + "\n")
    store.engine.dispose()


def _controller(url: str, name: str, duration_s: float, log_path: str) -> None:
    """A controller process as ``wattkeeper controller`` builds it (planning every
    second), with each period's duration appended to ``log_path`` as it ends, so a
    SIGKILL loses nothing already measured."""
    from wattkeeper.clock import WallClock
    from wattkeeper.config import load_config
    from wattkeeper.runtime import Runtime, make_controller, open_store, run_realtime

    cfg = load_config(
        None,
        environ={
            "WATTKEEPER_CONTROLLER__INTERVAL_S": "1s",
            "WATTKEEPER_CONTROLLER__NAME": name,
        },
    )
    store = open_store(cfg, url)
    controller = make_controller(cfg, store)
    rt = Runtime(cfg, store, WallClock(), [], controller)
    tick = controller.tick
    log = open(log_path, "a")

    def timed(now: float) -> Any:
        t0 = time.perf_counter()
        try:
            return tick(now)
        finally:
            log.write(
                json.dumps(
                    {
                        "at": time.time(),
                        "s": time.perf_counter() - t0,
                        "leading": controller.leading,
                    }
                )
                + "\n"
            )
            log.flush()

    controller.tick = timed  # type: ignore[method-assign]
    run_realtime(rt, duration_s)
    rt.shutdown()


def _read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> dict:
    from sqlalchemy import func, insert, select

    from wattkeeper.store.db import make_engine, upgrade
    from wattkeeper.store.models import Budget, GpuSampleRow
    from wattkeeper.store.repository import Store

    store_bench = _module("bench_store", ROOT / "bench" / "bench_store.py")
    pg = _module("pg", ROOT / "tests" / "pg.py")
    bindir = pg.find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL binaries not found (/usr/lib/postgresql/*/bin)")
    server = pg.PgServer(bindir)
    server.start()
    work = Path(server.root) / "bench-load"
    work.mkdir()
    procs: list[multiprocessing.Process] = []
    try:
        os.chmod(work, 0o777)
        url = server.create_database("load")
        engine = make_engine(url)
        upgrade(engine)
        now = time.time()
        fleet = sorted(store_bench.register_fleet(engine, args.nodes, now).items())
        gpus = args.nodes * GPUS_PER_NODE
        budget_w = gpus * 520.0  # binds: the GPUs ask for about 640 W each
        with engine.begin() as conn:
            conn.execute(
                insert(Budget),
                [
                    {
                        "scope": "facility",
                        "limit_w": budget_w,
                        "updated_at": now,
                        "updated_by": "bench",
                    }
                ],
            )
        ctx = multiprocessing.get_context("spawn")
        start_at = time.time() + 5.0 + 0.002 * args.nodes
        for c in ("ctl-a", "ctl-b"):
            p = ctx.Process(
                target=_controller,
                args=(url, c, args.duration + 30, str(work / f"{c}.jsonl")),
                daemon=True,
            )
            p.start()
            procs.append(p)
        writers = []
        for w in range(args.writers):
            p = ctx.Process(
                target=_writer,
                args=(
                    url,
                    fleet[w :: args.writers],
                    args.duration,
                    args.write_interval,
                    start_at,
                    str(work / f"writer{w}.jsonl"),
                ),
                daemon=True,
            )
            p.start()
            writers.append(p)
        procs.extend(writers)
        time.sleep(max(0.0, start_at - time.time()))
        controllers = [psutil.Process(p.pid) for p in procs[:2]]
        ctl_cpu0 = _cpu_s(controllers)
        ctl_cpu_killed = 0.0
        pg_seen: dict[int, float] = {}
        pg_cpu0 = store_bench.server_cpu_s(str(server.root), pg_seen)
        wall0 = time.time()
        kill_at = start_at + args.kill_at * args.duration
        store = Store(engine)
        failover: dict[str, Any] = {}
        pg_cpu_last = pg_cpu0
        while time.time() < start_at + args.duration:
            if not failover and time.time() >= kill_at:
                leader = store.leader()
                if leader is not None:
                    ctl_cpu_killed = _cpu_s([c for c in controllers if c.pid == leader.pid])
                    os.kill(leader.pid, signal.SIGKILL)
                    killed = time.time()
                    failover = {"killed": leader.name, "epoch_before": leader.epoch}
                    while time.time() < killed + 60:
                        now_leader = store.leader()
                        if now_leader is not None and now_leader.epoch > leader.epoch:
                            failover.update(
                                taken_by=now_leader.name,
                                epoch_after=now_leader.epoch,
                                seconds=time.time() - killed,
                            )
                            break
                        time.sleep(0.05)
            pg_cpu_last = store_bench.server_cpu_s(str(server.root), pg_seen)
            time.sleep(0.5)
        ctl_cpu = _cpu_s([c for c in controllers if c.is_running()]) + ctl_cpu_killed - ctl_cpu0
        for p in writers:
            p.join(timeout=120)
        wall = time.time() - wall0
        with engine.connect() as conn:
            stored = conn.scalar(select(func.count()).select_from(GpuSampleRow))
        rounds = [r for w in range(args.writers) for r in _read_lines(work / f"writer{w}.jsonl")]
        written = sum(r.get("rows", 0) + r.get("final_rows", 0) for r in rounds)
        writers_cpu = sum(r.get("cpu_s", 0.0) for r in rounds)
        errors = sum(r.get("errors", 0) for r in rounds)
        timed = [r for r in rounds if "due" in r]
        late = [max(0.0, r["end"] - (r["due"] + 1.0)) for r in timed]
        round_s = [r["end"] - r["start"] for r in timed]
        periods = [
            r for c in ("ctl-a", "ctl-b") for r in _read_lines(work / f"{c}.jsonl") if r["leading"]
        ]
        period_s = [r["s"] for r in periods]
        offered = args.nodes * GPUS_PER_NODE
        return {
            "bench": "load",
            "python": platform.python_version(),
            "cpus_visible": os.cpu_count(),
            "nodes": args.nodes,
            "gpus": gpus,
            "writers": args.writers,
            "write_interval_s": args.write_interval,
            "duration_s": args.duration,
            "wall_s": wall,
            "budget_w": budget_w,
            "samples_offered_per_s": offered,
            "samples_sustained_per_s": sum(r["rows"] for r in timed)
            / max(1e-9, max((r["end"] for r in timed), default=start_at) - start_at),
            "rows_written": written,
            "rows_stored": stored,
            "rows_lost": written - stored,
            "store_errors": errors,
            "round_s_p50": _pct(round_s, 0.5),
            "round_s_p99": _pct(round_s, 0.99),
            "rounds_late_share": sum(1 for x in late if x > 0) / max(1, len(late)),
            "late_s_max": max(late, default=0.0),
            "controller_periods": len(period_s),
            "controller_period_s_p50": statistics.median(period_s) if period_s else None,
            "controller_period_s_p95": _pct(period_s, 0.95) if period_s else None,
            "controller_period_s_p99": _pct(period_s, 0.99) if period_s else None,
            "controller_period_s_max": max(period_s, default=None),
            "failover": failover,
            "cpu_share_postgresql": (pg_cpu_last - pg_cpu0) / wall,
            "cpu_share_writers": writers_cpu / wall,
            "cpu_share_controllers": ctl_cpu / wall,
            "load_average_1m_end": os.getloadavg()[0],
        }
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000, help="8 GPUs each")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds")
    parser.add_argument("--writers", type=int, default=4, help="processes driving the nodes")
    parser.add_argument(
        "--write-interval", type=int, default=1, help="seconds of ticks per transaction"
    )
    parser.add_argument(
        "--kill-at", type=float, default=0.8, help="kill the leader at this share of the run"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for k, v in out.items():
        print(f"{k:<28} {v}")


if __name__ == "__main__":
    sys.exit(main())
