"""The long-running commands: ``run`` (agent and controller in one process), ``agent`` and
``controller``. They are the only commands that become a daemon, so what a daemon needs
(a /metrics listener, signal handling, the live table, the simulated-clock run, the NVML
check before start) lives with them rather than in what every command imports.
"""

from __future__ import annotations

import sys
import time
import zlib
from typing import Annotated, Any

import typer

from wattkeeper.cli.common import (
    ConfigOpt,
    DbOpt,
    Output,
    OutputOpt,
    _check_floor,
    _config,
    _emit_json,
    _live_table,
    _parse_duration,
    _parse_power,
    _status_moment,
    _store,
    fail,
)

SAFE_CAP = "this node's GPUs go to the safe cap until it answers"


DurationOpt = Annotated[
    str | None,
    typer.Option(
        help="Stop after this long (e.g. 90s, 10m); default: until Ctrl-C or SIGTERM.",
        show_default=False,
    ),
]
ListenOpt = Annotated[
    str | None,
    typer.Option(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="Serve Prometheus /metrics here (default 127.0.0.1:9847; config metrics.listen).",
        show_default=False,
    ),
]
NoMetricsOpt = Annotated[bool, typer.Option("--no-metrics", help="Serve no /metrics.")]


def _listen(cfg: Any, metrics_listen: str | None, no_metrics: bool) -> str | None:
    from wattkeeper.config import parse_listen

    if no_metrics and metrics_listen is not None:
        raise typer.BadParameter(
            "--metrics-listen and --no-metrics contradict each other", param_hint="--no-metrics"
        )
    if metrics_listen is not None:
        try:
            parse_listen(metrics_listen)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--metrics-listen") from None
    if no_metrics:
        return None
    return metrics_listen or (cfg.metrics.listen if cfg.metrics.enabled else None)


def run(
    simulate: Annotated[
        str | None,
        typer.Option(
            "--simulate",
            metavar="NODESxGPUS",
            help="Simulated facility instead of NVML, e.g. 4x8.",
            show_default=False,
        ),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            help="Facility power budget to set before starting (W, kW, MW).", show_default=False
        ),
    ] = None,
    duration: DurationOpt = None,
    fast: Annotated[
        bool,
        typer.Option(
            "--fast",
            help="Simulated clock, as fast as the CPU allows (needs --simulate and --duration).",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the simulated facility.")] = 0,
    metrics_listen: ListenOpt = None,
    no_metrics: NoMetricsOpt = False,
    output: OutputOpt = Output.table,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Run agent and controller in one process (SQLite by default)."""
    budget_w = _parse_power(budget, "--budget") if budget is not None else None
    duration_s = _parse_duration(duration, "--duration") if duration is not None else None
    if fast and (simulate is None or duration_s is None):
        raise typer.BadParameter(
            "--fast runs on a simulated clock: it needs --simulate and --duration",
            param_hint="--fast",
        )
    spec = None
    if simulate is not None:
        from wattkeeper.simulator.facility import FacilitySpec

        try:
            spec = FacilitySpec.parse(simulate, seed=seed)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--simulate") from None
    cfg = _config(config)
    listen = _listen(cfg, metrics_listen, no_metrics)
    if fast:
        listen = None  # a run on the simulated clock is over before anyone scrapes it
    if spec is None:
        _require_gpus()  # before a store is created for a run that cannot start
    # A real node's daemon rides out a database server that is down at start (safe cap
    # until it answers); a simulation has nothing to protect and wants its store now.
    store = _store(cfg, db, create=True, outage_ok=SAFE_CAP if spec is None and not fast else None)

    from wattkeeper.clock import SimClock, WallClock
    from wattkeeper.runtime import SetupError, build_local, build_simulated, claim_store
    from wattkeeper.store.db import StoreError

    if fast:
        assert duration_s is not None
        clock: SimClock | WallClock = SimClock(time.time() - duration_s)
    else:
        clock = WallClock()
    try:
        rt = build_simulated(cfg, store, spec, clock) if spec else build_local(cfg, store)
        if store.schema_checked:
            claim_store(rt)
    except (SetupError, StoreError) as exc:
        fail(str(exc))
    server = None
    try:
        # Everything that can fail on the way in fails before anything is changed.
        if listen:
            server = _serve_metrics(rt, listen)
        if budget_w is not None:
            _check_floor(
                budget_w,
                [g.power_limits.min_w for a in rt.agents for g in a.backend.gpus()],
                forcing="wattkeeper budget set --force sets it anyway",
            )
            store.set_budget(budget_w, "cli:run", clock.now())
        if fast:
            _run_fast(rt, duration_s or 0.0, output)
        else:
            _run_live(rt, duration_s, output)
    except StoreError as exc:
        fail(str(exc))
    finally:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut restore
        if server is not None:
            server.shutdown()
            server.server_close()
        rt.shutdown()


def _daemon(rt: Any, listen: str | None, duration_s: float | None) -> None:
    """Serve /metrics, run on the wall clock until stopped, restore on the way out."""
    import signal
    import threading

    from wattkeeper.runtime import run_realtime

    server = None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        if listen:
            server = _serve_metrics(rt, listen)
        run_realtime(rt, duration_s, stop=stop)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut restore
        if server is not None:
            server.shutdown()
            server.server_close()
        rt.shutdown()


def agent(
    simulate: Annotated[
        int | None,
        typer.Option(
            "--simulate",
            metavar="GPUS",
            min=1,
            max=72,
            help="One simulated node of this many H100s serving a steady Llama-3.1-8B load, "
            "in real time, instead of NVML.",
            show_default=False,
        ),
    ] = None,
    node: Annotated[
        str | None,
        typer.Option(
            help="This node's name (default: agent.node, else the hostname).", show_default=False
        ),
    ] = None,
    duration: DurationOpt = None,
    metrics_listen: ListenOpt = None,
    no_metrics: NoMetricsOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The node agent alone (a controller plans elsewhere).

    It samples this node, stores the samples and applies the targets a `wattkeeper
    controller` on the same PostgreSQL plans."""
    duration_s = _parse_duration(duration, "--duration") if duration is not None else None
    cfg = _config(config)
    if node is not None:
        if not node.strip():
            raise typer.BadParameter("a node needs a name", param_hint="--node")
        cfg = cfg.model_copy(update={"agent": cfg.agent.model_copy(update={"node": node})})
    listen = _listen(cfg, metrics_listen, no_metrics)
    if simulate is None:
        _require_gpus()
    store = _store(cfg, db, create=True, outage_ok=SAFE_CAP if simulate is None else None)

    from wattkeeper.clock import WallClock
    from wattkeeper.runtime import SetupError, build_local, build_on_facility, claim_store
    from wattkeeper.store.db import StoreError

    clock = WallClock()
    try:
        if simulate is not None:
            from wattkeeper.simulator.facility import FacilitySpec, SimFacility

            # GPU UUIDs follow the seed: one per node name, so that agents simulated
            # under different names never report the same GPUs.
            seed = zlib.crc32(cfg.agent.node.encode()) & 0x7FFFFFFF
            facility = SimFacility.simple(
                FacilitySpec(1, simulate, seed=seed), start_ts=clock.now()
            )
            rt = build_on_facility(
                cfg, store, facility, clock, names=[cfg.agent.node], with_controller=False
            )
        else:
            rt = build_local(cfg, store, with_controller=False)
        if store.schema_checked:
            claim_store(rt, remove_leftovers=False)
    except (SetupError, StoreError) as exc:
        fail(str(exc))
    _daemon(rt, listen, duration_s)


def controller(
    duration: DurationOpt = None,
    metrics_listen: ListenOpt = None,
    no_metrics: NoMetricsOpt = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The controller alone: plans every node's targets from the store.

    Run one or more on one PostgreSQL: one leads (status shows which), the others
    stand by and take over within controller.leader_lease_s when it stops or loses
    the database."""
    duration_s = _parse_duration(duration, "--duration") if duration is not None else None
    cfg = _config(config)
    listen = _listen(cfg, metrics_listen, no_metrics)
    store = _store(
        cfg, db, outage_ok="planning starts when it answers (the agents hold their caps)"
    )

    from wattkeeper.clock import WallClock
    from wattkeeper.runtime import Runtime, make_controller

    rt = Runtime(cfg, store, WallClock(), [], make_controller(cfg, store))
    _daemon(rt, listen, duration_s)


def _serve_metrics(rt: Any, listen: str) -> Any:
    from wattkeeper.config import parse_listen
    from wattkeeper.exporter import serve

    host, port = parse_listen(listen)
    try:
        server = serve(rt, host, port)
    except OSError as exc:
        fail(f"cannot serve /metrics on {listen}: {exc.strerror or exc}")
    typer.echo(f"metrics on http://{listen}/metrics", err=True)
    return server


def _run_fast(rt: Any, duration_s: float, output: Output) -> None:
    from wattkeeper.runtime import run_fast

    if output is Output.json or not sys.stderr.isatty():
        result = run_fast(rt, duration_s)
    else:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("simulating", total=1.0)
            result = run_fast(rt, duration_s, lambda x: bar.update(task, completed=x))
    if output is Output.json:
        _emit_json(result)
        return
    from rich.console import Console
    from rich.table import Table

    from wattkeeper.units import format_power

    t = Table(
        title=f"simulated run: {result['nodes']} nodes x "
        f"{result['gpus'] // result['nodes']} {result['gpu_kind']}, {duration_s:.0f} s"
    )
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("budget", format_power(result["budget_w"]))
    t.add_row(
        f"max 1-s power after {result['settle_s']:.0f} s", format_power(result["max_power_w"])
    )
    t.add_row("mean power", format_power(result["mean_power_w"]))
    t.add_row("seconds over budget", str(result["over_budget_s"]))
    t.add_row("tokens generated", f"{result['tokens']:,}")
    t.add_row("tokens/s", f"{result['tokens_per_s']:,.0f}")
    t.add_row("energy", f"{result['energy_j'] / 3.6e6:.2f} kWh")
    t.add_row("tokens per joule", f"{result['tokens_per_joule']:.3f}")
    Console().print(t)


def _run_live(rt: Any, duration_s: float | None, output: Output) -> None:
    """Real time until --duration, SIGTERM or Ctrl-C; both signals stop it the same way."""
    import signal
    import threading

    from wattkeeper.runtime import run_realtime
    from wattkeeper.summary import cost_options, facility_summary, in_force

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def snapshot() -> dict:
        # The same moment and clock as `status` on this store, so the two agree.
        as_of, clock = _status_moment(rt.store)
        return facility_summary(
            in_force(rt.store, rt.store.snapshot(as_of), as_of),
            stale_after_s=rt.cfg.controller.stale_after_s,
            clock=clock,
            **cost_options(rt.cfg, as_of),
        )

    from wattkeeper.store.db import StoreError

    def final() -> dict | None:
        """The closing summary; the store may be away or hung, which the run rode out."""
        from wattkeeper.bounded import Hung, call_within

        try:
            return call_within(snapshot, 5.0, "summary")
        except (StoreError, Hung) as exc:
            typer.echo(f"no closing summary: {exc}", err=True)
            return None

    if output is Output.json:
        run_realtime(rt, duration_s, stop=stop)
        if (summary := final()) is not None:
            _emit_json(summary)
        return
    if not sys.stdout.isatty():
        # Under systemd or a pipe a redrawn table is noise: print it once at the end.
        run_realtime(rt, duration_s, stop=stop)
        from rich.console import Console

        if (summary := final()) is not None:
            Console().print(_live_table(summary))
        return
    from rich.live import Live

    from wattkeeper.bounded import Hung, SingleFlight

    reads = SingleFlight("live-table")

    def view() -> Any:
        # Drawn by the loop that pings the watchdog: a hung store must not hold it.
        try:
            return _live_table(reads.call(snapshot, 1.0))
        except (StoreError, Hung) as exc:
            return f"store unavailable: {exc}"

    def refresh(live: Live) -> None:
        live.update(view())

    with Live(view(), refresh_per_second=2, transient=False) as live:
        run_realtime(rt, duration_s, lambda: refresh(live), stop=stop)


def _require_gpus() -> None:
    from wattkeeper.collectors.gpu import BackendUnavailableError
    from wattkeeper.collectors.nvml import NvmlBackend

    try:
        NvmlBackend().close()
    except BackendUnavailableError as exc:
        fail(str(exc))
