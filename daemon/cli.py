"""The admin CLI. Heavy modules are imported inside commands so ``--help`` is instant.

Data goes to stdout (a table on a terminal, ``-o json`` for machines), diagnostics to
stderr; exit 0 ok, 1 error, 2 usage.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import zlib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from wattkeeper import __version__

app = typer.Typer(
    help="Keep a GPU inference facility inside its power budget at the best tokens per joule.",
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    add_completion=False,
)
budget_app = typer.Typer(
    help="Show or set power budgets: the facility, its domains (room, PDU, rack), schedules.",
    no_args_is_help=True,
)
db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)


class _ScenarioGroup(TyperGroup):
    """``wattkeeper simulate SCENARIO --compare`` is ``simulate run SCENARIO --compare``:
    a first word that is not a subcommand names a scenario."""

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


simulate_app = typer.Typer(
    cls=_ScenarioGroup,
    help="Run scenarios (simulate SCENARIO --compare) and ask the calibrated simulator "
    "what-if questions.",
    no_args_is_help=True,
)
node_app = typer.Typer(help="Take a node out of service or put it back.", no_args_is_help=True)
app.add_typer(budget_app, name="budget")
app.add_typer(node_app, name="node")
app.add_typer(db_app, name="db")
app.add_typer(simulate_app, name="simulate")


class Output(StrEnum):
    table = "table"
    json = "json"


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="TOML config file (default: $WATTKEEPER_CONFIG).", show_default=False
    ),
]
DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Database URL (sqlite:///PATH or postgresql+psycopg://...).",
        show_default=False,
    ),
]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table or json.")]


def _reason(value: str | None) -> str | None:
    """One line of why, kept with the change in the audit log; blank or overlong text is
    refused rather than stored, since the log is what a person reads after an incident."""
    if value is None:
        return None
    text = " ".join(value.split())
    if not text:
        raise typer.BadParameter("say why in a few words, or leave --reason out")
    if len(text) > 500:
        raise typer.BadParameter(f"{len(text)} characters: keep it to 500 (a ticket link helps)")
    return text


ReasonOpt = Annotated[
    str | None,
    typer.Option(
        "--reason",
        "-r",
        callback=_reason,
        help="Why, for the audit log (e.g. a ticket: 'CHG-1234 PDU maintenance').",
        show_default=False,
    ),
]


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _config(path: Path | None) -> Any:
    from wattkeeper.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        fail(str(exc), 2)


def _store(cfg: Any, db: str | None, *, create: bool = False, outage_ok: str | None = None) -> Any:
    from wattkeeper.runtime import open_store
    from wattkeeper.store.db import StoreError

    try:
        return open_store(
            cfg,
            db,
            create=create,
            announce=lambda m: typer.echo(m, err=True),
            outage_ok=outage_ok,
        )
    except StoreError as exc:
        fail(str(exc))


def _actor() -> str:
    try:
        user = os.getlogin()
    except OSError:
        import getpass

        user = getpass.getuser()
    return f"cli:{user}"


def _emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def _parse_power(value: str, option: str) -> float:
    from wattkeeper.units import parse_power_w

    try:
        return parse_power_w(value, require_unit=True)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _parse_duration(value: str, option: str) -> float:
    from wattkeeper.units import parse_duration_s

    try:
        return parse_duration_s(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wattkeeper {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")
    ] = 0,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    # Alembic narrates every migration step at INFO: only worth reading at -vv.
    logging.getLogger("alembic").setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
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


# -- run ------------------------------------------------------------------------------------
@app.command()
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


@app.command()
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


@app.command()
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


def _live_table(s: dict) -> Any:
    from rich.table import Table

    from wattkeeper.units import format_power

    budget = s["budget_w"]
    used = s["budget_used_ratio"]
    title = (
        f"facility {format_power(s['facility_power_w'])} of {format_power(budget)}"
        + (f" ({used:.0%})" if used is not None else "")
        + (f" | {s['tokens_per_s']:,.0f} tok/s" if s["tokens_per_s"] is not None else " | - tok/s")
        + (f" | {s['tokens_per_joule']:.3f} tok/J" if s["tokens_per_joule"] else " | - tok/J")
        + (
            f" | {s['cost_per_million_tokens']:.4g} per M tokens"
            if s.get("cost_per_million_tokens") is not None
            else ""
        )
        + (f" | {s['stale_nodes']} node(s) silent, not counted" if s["stale_nodes"] else "")
    )
    t = Table(title=title)
    for col in ("node", "GPUs", "power", "GPU power", "non-GPU", "tok/s", "tok/J", "age"):
        t.add_column(col, justify="left" if col == "node" else "right")
    for n in s["nodes"]:
        t.add_row(
            n["name"],
            str(n["gpus"]),
            format_power(n["power_w"]),
            format_power(n["gpu_power_w"]),
            format_power(n["non_gpu_power_w"]),
            "-" if n["tokens_per_s"] is None else f"{n['tokens_per_s']:,.0f}",
            "-" if n["tokens_per_joule"] is None else f"{n['tokens_per_joule']:.3f}",
            ("-" if n["sample_age_s"] is None else f"{n['sample_age_s']:.0f}s")
            + (" drained" if n["drained"] else " stale" if n["stale"] else ""),
            style="dim" if n["stale"] or n["drained"] else None,
        )
    return t


# -- status -----------------------------------------------------------------------------------
@app.command()
def status(
    gpus: Annotated[bool, typer.Option("--gpus", help="One row per GPU too.")] = False,
    output: OutputOpt = Output.table,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Facility power against budget, tokens/s and tokens/J, per node (and per GPU)."""
    from wattkeeper.store.db import StoreError
    from wattkeeper.summary import cost_options, facility_summary, in_force

    cfg = _config(config)
    store = _store(cfg, db)
    try:
        as_of, clock = _status_moment(store)
        s = facility_summary(
            in_force(store, store.snapshot(as_of, window_s=cfg.store.retention_s), as_of),
            with_gpus=gpus,
            stale_after_s=cfg.controller.stale_after_s,
            clock=clock,
            **cost_options(cfg, as_of),
        )
        leader = store.leader()
    except StoreError as exc:
        fail(str(exc))
    s["leader"] = (
        None
        if leader is None
        else {
            "name": leader.name,
            "host": leader.host,
            "pid": leader.pid,
            "epoch": leader.epoch,
            "since": leader.acquired_at,
            "lease_expires_at": leader.expires_at,
            "live": leader.expires_at >= time.time(),
        }
    )
    if output is Output.json:
        _emit_json(s)
        return
    from rich.console import Console
    from rich.table import Table

    from wattkeeper.units import format_power

    console = Console()
    console.print(_live_table(s))
    if leader is not None:
        state = "leading" if s["leader"]["live"] else "lease expired (no controller planning)"
        console.print(
            f"controller: {leader.name} on {leader.host} (pid {leader.pid}), epoch "
            f"{leader.epoch}, {state}"
        )
    age = s["newest_sample_age_s"]
    if s["clock"] == "simulated":
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["ts"]))
        console.print(f"simulated facility, as of its last samples ({when})")
    else:
        console.print(f"newest sample: {'none' if age is None else f'{age:.0f} s ago'}")
    if gpus:
        t = Table(title="GPUs")
        for col in (
            "node",
            "idx",
            "name",
            "power",
            "limit",
            "target",
            "range",
            "SM MHz",
            "throttle",
            "age",
        ):
            t.add_column(col)
        for n in s["nodes"]:
            for g in n["gpu_list"]:
                t.add_row(
                    n["name"],
                    str(g["index"]),
                    g["name"],
                    format_power(g["power_w"]),
                    format_power(g["power_limit_w"]),
                    format_power(g["target_power_limit_w"]),
                    f"{g['power_min_w']:.0f}-{g['power_max_w']:.0f} W",
                    "-" if g["sm_clock_mhz"] is None else f"{g['sm_clock_mhz']:.0f}",
                    ",".join(g["throttle_reasons"]) or "-",
                    "-" if g["sample_age_s"] is None else f"{g['sample_age_s']:.0f}s",
                )
        console.print(t)


explain_app = typer.Typer(
    help="Why a node or GPU has the settings it has: targets, reasons, latency, audit.",
    no_args_is_help=True,
)
app.add_typer(explain_app, name="explain")


@explain_app.command("node")
def explain_node(
    name: Annotated[str, typer.Argument(help="The node, as `status` lists it.")],
    output: OutputOpt = Output.table,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The node's latency as the controller read it, each GPU's target and the reason it
    was set, and the newest audit entries about the node and its GPUs."""
    _explain(name, None, output, db, config)


@explain_app.command("budget")
def explain_budget(
    domain: Annotated[str, typer.Argument(help="facility, or a configured domain.")] = "facility",
    output: OutputOpt = Output.table,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """A budget: the limit in force and where it comes from (set, configured or a
    schedule's window), the power drawn under it, its headroom, and the GPUs whose
    targets it holds down."""
    from wattkeeper.policies.schedule import effective_budget
    from wattkeeper.store.db import StoreError
    from wattkeeper.units import format_power

    cfg = _config(config)
    _check_domain(cfg, domain)
    store = _store(cfg, db)
    try:
        as_of, _ = _status_moment(store)
        snap = store.snapshot(as_of, window_s=max(60.0, 3 * cfg.controller.stale_after_s))
        stored = store.budgets()
        schedules = [s for s in store.schedules() if s.scope == domain]
        under = _domain_nodes(cfg, domain)
        nodes = [n.name for n in snap.nodes if under is None or n.name in under]
        reasons = {
            uuid: t.reason for node in nodes for uuid, t in store.targets_for_node(node).items()
        }
    except StoreError as exc:
        fail(str(exc))
    configured = _configured_limit(cfg, domain)
    standing = stored.get(domain, configured)
    in_force, source = effective_budget(standing, schedules, time.time(), 0.0)
    power = sum(n.non_gpu_power_w or 0.0 for n in snap.nodes if n.name in nodes) + sum(
        g.power_w or 0.0 for g in snap.gpus if g.node in nodes
    )
    held = sorted(u for u, why in reasons.items() if f"budget {domain} " in why)
    data = {
        "format_version": 1,
        "domain": domain,
        "in_force_w": in_force,
        "from": (
            f"schedule {source.id}"
            if source is not None
            else "set at run time"
            if domain in stored
            else "configuration"
            if configured is not None
            else None
        ),
        "nodes": nodes,
        "power_w": round(power, 1),
        "headroom_w": None if in_force is None else round(in_force - power, 1),
        "gpus_held": held,
        "schedules": [s.id for s in schedules],
    }
    if output is Output.json:
        _emit_json(data)
        return
    origin = f" ({data['from']})" if data["from"] else ""
    typer.echo(
        f"{domain}: {format_power(in_force)}{origin}, drawing {format_power(power)} over "
        f"{len(nodes)} node(s)"
        + ("" if in_force is None else f", headroom {format_power(in_force - power)}")
    )
    typer.echo(f"holds {len(held)} GPU target(s) below what they would get otherwise")
    if schedules:
        typer.echo(f"schedules: {', '.join(str(s.id) for s in schedules)}")


@explain_app.command("gpu")
def explain_gpu(
    uuid: Annotated[str, typer.Argument(help="The GPU's UUID, as `status --gpus` lists it.")],
    output: OutputOpt = Output.table,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """One GPU: its limit, target and the reason for it, and its audit entries."""
    _explain(None, uuid, output, db, config)


def _explain(
    node: str | None, uuid: str | None, output: Output, db: str | None, config: Path | None
) -> None:
    from wattkeeper.store.db import StoreError

    cfg = _config(config)
    store = _store(cfg, db)
    try:
        now, _ = _status_moment(store)
        snap = store.snapshot(now, window_s=max(60.0, 3 * cfg.controller.stale_after_s))
        if uuid is not None:
            gpu = next((g for g in snap.gpus if g.uuid == uuid), None)
            if gpu is None:
                fail(f"no GPU {uuid!r} in the store (wattkeeper status --gpus lists them)")
            node = gpu.node
        view = next((n for n in snap.nodes if n.name == node), None)
        if view is None:
            fail(f"no node named {node!r} in the store (wattkeeper status lists them)")
        assert node is not None
        targets = store.targets_for_node(node)
        gpus = [g for g in snap.gpus if g.node == node and (uuid is None or g.uuid == uuid)]
        subjects = [g.uuid for g in gpus] + ([node] if uuid is None else [])
        entries = store.audit_log(20, subjects=subjects)
        route = next((r for r in store.routes() if r.node == node), None)
    except StoreError as exc:
        fail(str(exc))
    latency = {
        key: getattr(view, key)
        for key in ("ttft_mean_s", "tpot_mean_s", "ttft_p90_s", "tpot_p90_s", "requests_running")
    }
    data = {
        "format_version": 1,
        "node": node,
        "drained": view.drained,
        "drained_by": view.drained_by,
        "budget_w": snap.budget_w,
        "generation_tokens_per_s": view.generation_tokens_per_s,
        "latency": latency,
        "route": None
        if route is None
        else {
            "weight": route.weight,
            "max_inflight": route.max_inflight,
            "updated_at": route.updated_at,
            "reason": route.reason,
        },
        "gpus": [
            {
                "uuid": g.uuid,
                "index": g.index,
                "power_w": g.power_w,
                "power_limit_w": g.power_limit_w,
                "range_w": [g.power_min_w, g.power_max_w],
                "target_power_limit_w": g.target_power_limit_w,
                "reason": targets[g.uuid].reason if g.uuid in targets else None,
            }
            for g in gpus
        ],
        "audit": [
            {"ts": e.ts, "actor": e.actor, "action": e.action, "subject": e.subject, **e.detail}
            for e in entries
        ],
    }
    if output is Output.json:
        _emit_json(data)
        return
    from wattkeeper.units import format_power

    state = f"drained by {view.drained_by}" if view.drained else "in service"
    typer.echo(f"node {node}: {state}; budget {format_power(snap.budget_w)}")
    shown = ", ".join(
        f"{k.removesuffix('_s')} {v * 1e3:.1f} ms" if k.endswith("_s") else f"{k} {v:.0f}"
        for k, v in latency.items()
        if v is not None
    )
    typer.echo(f"servers since the agent's previous read: {shown or 'no latency reading'}")
    if route is not None:
        inflight = "the servers' own" if route.max_inflight is None else route.max_inflight
        typer.echo(
            f"router: weight {route.weight}/256, in flight per server {inflight} - {route.reason}"
        )
    for g in data["gpus"]:
        typer.echo(
            f"  GPU {g['index']} {g['uuid']}: draws {format_power(g['power_w'])}, limit "
            f"{format_power(g['power_limit_w'])}, target {format_power(g['target_power_limit_w'])}"
            f" - {g['reason'] or 'no target'}"
        )
    for e in data["audit"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"]))
        typer.echo(f"  {when} {e['actor']} {e['action']} {e['subject']}")


def _status_moment(store: Any) -> tuple[float, str]:
    """The moment ``status`` describes, and on which clock.

    Real nodes are judged now, on the wall clock: a silent node is stale. A store that
    only simulated nodes report to is described as of its newest sample: a ``--fast``
    run simulates the minutes that end when it started, so on the wall clock its
    samples are as old as the run took to compute, and every node would look stale
    on a slow machine. A simulation shows what it last did, and says it is one.
    """
    now = time.time()
    backends = store.node_backends()
    if not backends or any(b != "sim" for b in backends.values()):
        return now, "wall"
    newest = store.newest_sample_ts()
    return (now if newest is None else min(newest, now)), "simulated"


# -- budget ------------------------------------------------------------------------------------
@budget_app.command("set", context_settings={"ignore_unknown_options": True})
def budget_set(
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="[DOMAIN] VALUE",
            help="The domain (default: the facility) and a power with a unit (e.g. 18kW).",
        ),
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Set a budget below the GPUs' hardware floor anyway.")
    ] = False,
    reason: ReasonOpt = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Set a budget; the running controller picks it up on its next tick."""
    cfg = _config(config)
    domain, watts = _domain_and_power(args, cfg)
    store = _store(cfg, db)
    from wattkeeper.store.db import StoreError
    from wattkeeper.units import format_power

    try:
        now = time.time()
        snap = store.snapshot(now, window_s=cfg.controller.forget_after_s)
        live = {n.name for n in snap.nodes if now - n.last_seen_at <= cfg.controller.forget_after_s}
        under = _domain_nodes(cfg, domain)
        floors = [
            g.power_min_w
            for g in snap.gpus
            if g.node in live and (under is None or g.node in under)
        ]
        if not force:
            _check_floor(watts, floors)
        previous = store.set_budget(watts, _actor(), now, scope=domain, reason=reason)
    except StoreError as exc:
        fail(str(exc))
    if previous is None:  # never set at run time: the configured limit was in force
        previous = _configured_limit(cfg, domain)
    typer.echo(f"{domain} budget: {format_power(watts)} (was {format_power(previous)})")
    # Set, since draining can meet it; but say what capping alone cannot do.
    host_w = sum(
        n.non_gpu_power_w or 0.0
        for n in snap.nodes
        if n.name in live and (under is None or n.name in under) and not n.drained
    )
    if floors and host_w and watts < sum(floors) + host_w:
        typer.echo(
            f"warning: with every GPU at its floor ({format_power(sum(floors))}) and the "
            f"nodes' non-GPU power ({format_power(host_w)}), the nodes draw "
            f"{format_power(sum(floors) + host_w)}: only draining nodes can meet "
            f"{format_power(watts)} (controller.drain_nodes)",
            err=True,
        )


def _require_gpus() -> None:
    from wattkeeper.collectors.gpu import BackendUnavailableError
    from wattkeeper.collectors.nvml import NvmlBackend

    try:
        NvmlBackend().close()
    except BackendUnavailableError as exc:
        fail(str(exc))


def _domain_and_power(args: list[str], cfg: Any) -> tuple[str, float]:
    if len(args) == 2 and args[1].strip().lower() in ("w", "kw", "mw"):
        args = [f"{args[0]}{args[1]}"]  # budget set 18 kW, unquoted
    if len(args) not in (1, 2):
        raise typer.BadParameter("give [DOMAIN] VALUE, e.g. '18kW' or 'rack-4 40kW'")
    domain = args[0] if len(args) == 2 else "facility"
    _check_domain(cfg, domain)
    return domain, _parse_power(args[-1], "VALUE")


def _check_domain(cfg: Any, domain: str) -> None:
    known = ["facility", *(d.name for d in cfg.budget.domains)]
    if domain not in known:
        fail(f"unknown budget domain {domain!r}: expected one of {', '.join(known)}")


def _configured_limit(cfg: Any, domain: str) -> float | None:
    return next((d.limit for d in cfg.budget.domains if d.name == domain), None)


def _domain_nodes(cfg: Any, domain: str) -> set[str] | None:
    """Nodes under ``domain`` (None: the facility, every node)."""
    if domain == "facility":
        return None
    from wattkeeper.policies.plan import domain_members
    from wattkeeper.runtime import config_domains

    return domain_members(config_domains(cfg))[domain]


@node_app.command("drain")
def node_drain(
    name: Annotated[str, typer.Argument(help="The node, as `status` lists it.")],
    reason: ReasonOpt = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Drain a node: its agent runs its drain command, its GPUs are held at their floor,
    and the controller never puts it back; only `node resume` does."""
    _set_drained(name, True, reason, db, config)


@node_app.command("resume")
def node_resume(
    name: Annotated[str, typer.Argument(help="The node, as `status` lists it.")],
    reason: ReasonOpt = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Put a drained node back in service (whoever drained it)."""
    _set_drained(name, False, reason, db, config)


def _set_drained(
    name: str, drained: bool, reason: str | None, db: str | None, config: Path | None
) -> None:
    from wattkeeper.store.db import StoreError

    store = _store(_config(config), db)
    try:
        changed = store.set_drained(name, drained, _actor(), time.time(), reason=reason)
    except KeyError:
        fail(f"no node named {name!r} in the store (wattkeeper status lists them)")
    except StoreError as exc:
        fail(str(exc))
    state = "drained" if drained else "in service"
    typer.echo(f"{name}: {state}" + ("" if changed else " (already)"))


def _check_floor(
    watts: float, floors: list[float], forcing: str = "--force sets it anyway"
) -> None:
    """A budget below what the GPUs draw at their lowest limits cannot be met by capping:
    refuse it, unless forced (then the controller holds every GPU at its floor)."""
    from wattkeeper.units import format_power

    floor = sum(floors)
    if watts < floor:
        fail(
            f"budget {format_power(watts)} is below the hardware floor: {len(floors)} GPUs at "
            f"their lowest power limits draw {format_power(floor)}, before any non-GPU power; "
            f"only draining nodes could meet it ({forcing})"
        )


schedule_app = typer.Typer(
    help="Budgets that hold during a window: once (--at) or on a cron schedule.",
    no_args_is_help=True,
)
budget_app.add_typer(schedule_app, name="schedule")


@schedule_app.command("add")
def schedule_add(
    args: Annotated[
        list[str],
        typer.Argument(metavar="[DOMAIN] VALUE", help="The domain (facility) and a power."),
    ],
    cron: Annotated[
        str | None, typer.Option("--cron", help="Recurring start, e.g. '0 17 * * 1-5'.")
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(
            "--at", help="One start, ISO 8601 (e.g. 2026-12-24T17:00).", show_default=False
        ),
    ] = None,
    for_: Annotated[str, typer.Option("--for", help="How long each window lasts (e.g. 3h).")] = "",
    force: Annotated[
        bool, typer.Option("--force", help="Add a budget below what draining could reach.")
    ] = False,
    reason: ReasonOpt = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Add a budget for a window; the controller applies it ahead by its reaction time so
    it is met when the window opens, and the lowest budget in force holds."""
    from wattkeeper.policies.schedule import Schedule, ScheduleError, cron_trigger, next_start
    from wattkeeper.store.db import StoreError
    from wattkeeper.units import format_power

    cfg = _config(config)
    domain, watts = _domain_and_power(args, cfg)
    if (cron is None) == (at is None):
        raise typer.BadParameter("give exactly one of --cron and --at", param_hint="--cron/--at")
    if not for_:
        raise typer.BadParameter("say how long the window lasts, e.g. --for 3h", param_hint="--for")
    duration = _parse_duration(for_, "--for")
    zone = cfg.controller.timezone
    at_ts = None
    try:
        if cron is not None:
            cron_trigger(cron, zone)
        else:
            assert at is not None
            at_ts = _parse_at(at, zone)
            if at_ts + duration <= time.time():
                raise typer.BadParameter(
                    f"{at} + {for_} is over already: give a time to come", param_hint="--at"
                )
    except ScheduleError as exc:
        raise typer.BadParameter(str(exc), param_hint="--cron") from None
    store = _store(cfg, db)
    schedule = Schedule(0, domain, watts, duration, cron=cron, at_ts=at_ts, timezone=zone)
    try:
        now = time.time()
        if not force:
            snap = store.snapshot(now, window_s=cfg.controller.forget_after_s)
            _check_reachable(watts, cfg, snap, _domain_nodes(cfg, domain), domain)
        new_id = store.add_schedule(schedule, _actor(), now, reason=reason)
    except StoreError as exc:
        fail(str(exc))
    start = next_start(schedule, time.time())
    when = "-" if start is None else time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(start))
    typer.echo(f"schedule {new_id}: {domain} {format_power(watts)} for {for_}, next from {when}")


def _parse_at(value: str, zone: str) -> float:
    """ISO 8601; without an offset it is read in the configured time zone."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not an ISO 8601 time (e.g. 2026-12-24T17:00)", param_hint="--at"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(zone))
    return moment.timestamp()


def _check_reachable(
    watts: float, cfg: Any, snap: Any, under: set[str] | None, domain: str = "facility"
) -> None:
    """A budget below what its nodes draw with every node it may drain drained (one
    node left at its GPUs' floors and its host power) cannot be met: refuse it."""
    from wattkeeper.units import format_power

    now = snap.ts
    live = [
        n
        for n in snap.nodes
        if now - n.last_seen_at <= cfg.controller.forget_after_s
        and (under is None or n.name in under)
    ]
    if not live:
        return
    host_default = cfg.agent.host.idle_w + cfg.agent.host.per_cpu_util_w
    floors = {n.name: 0.0 for n in live}
    for g in snap.gpus:
        if g.node in floors:
            floors[g.node] += g.power_min_w
    serving = {n.name: floors[n.name] + (n.non_gpu_power_w or host_default) for n in live}
    drained = {
        n.name: cfg.controller.drained_node_w or (n.non_gpu_power_w or host_default) for n in live
    }
    if cfg.controller.drain_nodes and under is None:  # the controller drains for the facility
        need = min(serving[k] + sum(drained.values()) - drained[k] for k in serving)
        how = "with every node but one drained"
    else:
        need = sum(serving.values())
        how = "with every GPU at its floor (controller.drain_nodes is off)"
    if watts < need:
        fail(
            f"budget {format_power(watts)} cannot be met: {domain} draws "
            f"{format_power(need)} {how} (--force adds it anyway)"
        )


@schedule_app.command("list")
def schedule_list(
    output: OutputOpt = Output.table, db: DbOpt = None, config: ConfigOpt = None
) -> None:
    """Every budget schedule, with its next window and whether it is in force now."""
    from wattkeeper.policies.schedule import ScheduleError, next_start, window_start
    from wattkeeper.store.db import StoreError
    from wattkeeper.units import format_power

    store = _store(_config(config), db)
    try:
        schedules = store.schedules()
    except StoreError as exc:
        fail(str(exc))
    now = time.time()

    def row(s: Any) -> dict[str, Any]:
        data = {
            "id": s.id,
            "domain": s.scope,
            "budget_w": s.limit_w,
            "duration_s": s.duration_s,
            "cron": s.cron,
            "at_ts": s.at_ts,
            "timezone": s.timezone,
            "in_force": False,
            "next_start_ts": None,
            "error": None,
        }
        try:
            data["in_force"] = window_start(s, now) is not None
            data["next_start_ts"] = next_start(s, now)
        except ScheduleError as exc:  # kept in the store, ignored by the controller
            data["error"] = str(exc)
        return data

    rows = [row(s) for s in schedules]
    if output is Output.json:
        _emit_json({"format_version": 1, "schedules": rows})
        return
    if not rows:
        typer.echo("no budget schedules (wattkeeper budget schedule add 12kW --cron ... --for 3h)")
    for r in rows:
        when = r["cron"] or time.strftime("%Y-%m-%d %H:%M", time.localtime(r["at_ts"]))
        nxt = r["next_start_ts"]
        typer.echo(
            f"{r['id']}: {r['domain']} {format_power(r['budget_w'])} for {r['duration_s']:.0f} s"
            f" at {when} ({r['timezone']})"
            + (" - in force now" if r["in_force"] else "")
            + ("" if nxt is None else time.strftime(", next %Y-%m-%d %H:%M", time.localtime(nxt)))
            + (f" - ignored: {r['error']}" if r["error"] else "")
        )


@schedule_app.command("remove")
def schedule_remove(
    schedule_id: Annotated[int, typer.Argument(help="The id `budget schedule list` shows.")],
    reason: ReasonOpt = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Remove a budget schedule (a window in force ends at the controller's next tick)."""
    from wattkeeper.store.db import StoreError

    store = _store(_config(config), db)
    try:
        removed = store.remove_schedule(schedule_id, _actor(), time.time(), reason=reason)
    except StoreError as exc:
        fail(str(exc))
    if not removed:
        fail(f"no budget schedule {schedule_id} (wattkeeper budget schedule list)")
    typer.echo(f"schedule {schedule_id} removed")


@budget_app.command("show")
def budget_show(
    output: OutputOpt = Output.table, db: DbOpt = None, config: ConfigOpt = None
) -> None:
    """Every budget as a tree: the facility and its domains, the limit in force at each
    level (set, configured or scheduled), the power measured under it and the headroom."""
    cfg = _config(config)
    store = _store(cfg, db)
    from wattkeeper.policies.schedule import effective_budget
    from wattkeeper.store.db import StoreError
    from wattkeeper.units import format_power

    try:
        row = store.get_budget()
        stored = store.budgets()
        schedules = store.schedules()
        as_of, _ = _status_moment(store)
        snap = store.snapshot(as_of, window_s=max(60.0, 3 * cfg.controller.stale_after_s))
    except StoreError as exc:
        fail(str(exc))
    now = time.time()
    node_power: dict[str, float] = {n.name: n.non_gpu_power_w or 0.0 for n in snap.nodes}
    for g in snap.gpus:
        node_power[g.node] = node_power.get(g.node, 0.0) + (g.power_w or 0.0)

    def level(name: str, parent: str | None, standing: float | None) -> dict[str, Any]:
        mine = [s for s in schedules if s.scope == name]
        in_force, source = effective_budget(standing, mine, now, 0.0)
        under = _domain_nodes(cfg, name)
        power = sum(w for n, w in node_power.items() if under is None or n in under)
        return {
            "name": name,
            "parent": parent,
            "budget_w": standing,
            "in_force_w": in_force,
            "in_force_schedule": None if source is None else source.id,
            "power_w": round(power, 1),
            "headroom_w": None if in_force is None else round(in_force - power, 1),
        }

    facility = level("facility", None, row.limit_w if row else None)
    domains = [level(d.name, d.parent, stored.get(d.name, d.limit)) for d in cfg.budget.domains]
    data = {
        "format_version": 1,
        "scope": "facility",
        "budget_w": facility["budget_w"],
        "updated_at": row.updated_at if row else None,
        "updated_by": row.updated_by if row else None,
        "in_force_w": facility["in_force_w"],
        "in_force_schedule": facility["in_force_schedule"],
        "power_w": facility["power_w"],
        "headroom_w": facility["headroom_w"],
        "domains": domains,
    }
    if output is Output.json:
        _emit_json(data)
        return
    if row is None:
        typer.echo("no facility budget set (wattkeeper budget set 18kW)")
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.updated_at))
        typer.echo(
            f"facility budget: {format_power(row.limit_w)} (set by {row.updated_by} at {when})"
        )

    def line(item: dict[str, Any], depth: int) -> None:
        limit = item["in_force_w"]
        sched = item["in_force_schedule"]
        typer.echo(
            f"{'  ' * depth}{item['name']}: {format_power(limit)}"
            + (f" (schedule {sched})" if sched is not None else "")
            + f", drawing {format_power(item['power_w'])}"
            + (
                ""
                if item["headroom_w"] is None
                else f", headroom {format_power(item['headroom_w'])}"
            )
        )
        for child in domains:
            if child["parent"] == item["name"]:
                line(child, depth + 1)

    line(facility, 0)


# -- audit --------------------------------------------------------------------------------------
def _moment(value: str, option: str, zone: str) -> float:
    """A duration back from now (``2h``, ``7d``) or an ISO 8601 time."""
    if value[:1].isdigit() and value[-1:].isalpha():
        return time.time() - _parse_duration(value, option)
    try:
        return _parse_at(value, zone)
    except typer.BadParameter:
        raise typer.BadParameter(
            f"{value!r} is neither a duration (2h) nor an ISO 8601 time (2026-12-24T17:00)",
            param_hint=option,
        ) from None


@app.command()
def audit(
    limit: Annotated[
        int, typer.Option(min=1, max=100_000, help="How many entries, newest first.")
    ] = 50,
    actor: Annotated[
        str | None,
        typer.Option(help="Who: 'cli' (every person), 'cli:alice', 'controller', 'agent'."),
    ] = None,
    action: Annotated[
        str | None,
        typer.Option(help="What: 'budget' (sets and schedules), 'node.drain', 'target.set'."),
    ] = None,
    subject: Annotated[
        list[str] | None,
        typer.Option(help="About: a node, a GPU UUID or a budget domain (repeatable)."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="From: a duration back from now (2h, 7d) or an ISO 8601 time."),
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Up to: a duration back from now or an ISO 8601 time.")
    ] = None,
    output: OutputOpt = Output.table,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The audit log: every budget, drain, target and power-limit change and restore, who
    made it and why (--reason), newest first; the options narrow it."""
    from wattkeeper.store.db import StoreError

    cfg = _config(config)
    zone = cfg.controller.timezone
    since_ts = None if since is None else _moment(since, "--since", zone)
    until_ts = None if until is None else _moment(until, "--until", zone)
    if since_ts is not None and until_ts is not None and since_ts > until_ts:
        raise typer.BadParameter(f"{since} is after {until}", param_hint="--since")
    store = _store(cfg, db)
    try:
        entries = store.audit_log(
            limit, subject or None, actor=actor, action=action, since=since_ts, until=until_ts
        )
    except StoreError as exc:
        fail(str(exc))
    rows = [
        {"ts": e.ts, "actor": e.actor, "action": e.action, "subject": e.subject, "detail": e.detail}
        for e in entries
    ]
    if output is Output.json:
        _emit_json({"format_version": 1, "entries": rows})
        return
    from rich.console import Console
    from rich.table import Table

    narrowed = any(x is not None for x in (actor, action, subject, since, until))
    t = Table(title=f"audit log, newest {len(rows)}" + (" matching" if narrowed else ""))
    for col in ("time", "actor", "action", "subject", "why", "detail"):
        t.add_column(col)
    for r in rows:
        detail = dict(r["detail"])
        why = detail.pop("reason", None)
        t.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["ts"])),
            r["actor"],
            r["action"],
            r["subject"],
            "" if why is None else str(why),
            ", ".join(
                f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in detail.items()
            ),
        )
    Console().print(t)


# -- db -----------------------------------------------------------------------------------------
@db_app.command("upgrade")
def db_upgrade(
    db: DbOpt = None,
    config: ConfigOpt = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Apply migrations up to head (creates the schema on an empty database)."""
    from wattkeeper.store.db import StoreError, current_revision, describe_url, make_engine, upgrade

    cfg = _config(config)
    url = db or cfg.store.resolved_url()
    try:
        engine = make_engine(url)
        before = current_revision(engine)
        upgrade(engine, revision)
        after = current_revision(engine)
    except StoreError as exc:
        fail(str(exc))
    typer.echo(f"{describe_url(url)}: schema {before or 'empty'} -> {after}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, or 'base' for empty.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask before dropping data.")] = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Roll migrations back (``base`` drops every wattkeeper table and its data)."""
    from wattkeeper.store.db import StoreError, check_revision

    try:
        check_revision(revision)
    except StoreError as exc:
        fail(str(exc), 2)
    if not yes and not typer.confirm(
        f"Roll the schema back to {revision}? Tables and their data may be dropped.",
        default=False,
    ):
        fail("not confirmed: nothing changed (pass --yes to skip the question)")
    from wattkeeper.store.db import (
        StoreError,
        current_revision,
        describe_url,
        downgrade,
        make_engine,
    )

    cfg = _config(config)
    url = db or cfg.store.resolved_url()
    try:
        engine = make_engine(url, must_exist=True)
        downgrade(engine, revision)
        after = current_revision(engine)
    except StoreError as exc:
        fail(str(exc))
    typer.echo(f"{describe_url(url)}: schema now {after or 'empty'}")


@db_app.command("current")
def db_current(db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Print the schema revision of the database and the one this version needs."""
    from wattkeeper.store.db import StoreError, current_revision, head_revision, make_engine

    cfg = _config(config)
    try:
        current = current_revision(make_engine(db or cfg.store.resolved_url(), must_exist=True))
    except StoreError as exc:
        fail(str(exc))
    typer.echo(f"current: {current or 'empty'}  head: {head_revision()}")


def _postgres_roles(db: str | None, config: str | None, what: str) -> Any:
    """The engine for a roles command: PostgreSQL only, at a schema that has the roles."""
    from wattkeeper.store.db import StoreError, check_schema, make_engine

    cfg = _config(config)
    try:
        engine = make_engine(db or cfg.store.resolved_url(), must_exist=True)
        if engine.dialect.name != "postgresql":
            fail(
                f"{what}: login roles and row-level security are PostgreSQL's; an SQLite "
                "store is one file that only its owner reads"
            )
        check_schema(engine, migrate=False)
    except StoreError as exc:
        fail(str(exc))
    return engine


@db_app.command("add-agent")
def db_add_agent(
    node: Annotated[str, typer.Argument(help="The node's name, as its agent gives it (--node).")],
    output: OutputOpt = Output.table,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Make a PostgreSQL login role for one node's agent (member of <db>_agent): it may
    write that node's samples and read its targets, nothing of any other node, and no
    budget. The password is printed once; run as a role with CREATEROLE."""
    from sqlalchemy.exc import SQLAlchemyError

    from wattkeeper.store.db import describe_url, error_line
    from wattkeeper.store.roles import RoleError, add_agent

    if not node.strip() or len(node) > 255:
        fail("the node name must be 1 to 255 characters", 2)
    engine = _postgres_roles(db, config, "db add-agent")
    try:
        with engine.begin() as conn:
            login = add_agent(conn, node, time.time())
    except RoleError as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        fail(f"db add-agent: {error_line(exc, engine)}")
    url = engine.url.set(username=login.role, password=login.password)
    shown = url.render_as_string(hide_password=False)
    if output == Output.json:
        _emit_json({"node": node, "role": login.role, "password": login.password, "url": shown})
    else:
        typer.echo(f"node {node}: login role {login.role}")
        typer.echo(f"url: {shown}")
    typer.echo(
        f"the password is shown once: give the agent on {node} this URL in store.url of a "
        f"0600 config file or in WATTKEEPER_STORE__URL ({describe_url(str(engine.url))})",
        err=True,
    )


@db_app.command("remove-agent")
def db_remove_agent(
    node: Annotated[str, typer.Argument(help="The node whose login role goes.")],
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Drop a node's login role: its agent can no longer connect."""
    from sqlalchemy.exc import SQLAlchemyError

    from wattkeeper.store.db import error_line
    from wattkeeper.store.roles import RoleError, remove_agent

    engine = _postgres_roles(db, config, "db remove-agent")
    try:
        with engine.begin() as conn:
            role = remove_agent(conn, node)
    except RoleError as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        fail(f"db remove-agent: {error_line(exc, engine)}")
    typer.echo(f"node {node}: login role {role} dropped")


@db_app.command("roles")
def db_roles(output: OutputOpt = Output.table, db: DbOpt = None, config: ConfigOpt = None) -> None:
    """The group roles of this database (grant them to logins) and each node's login."""
    from sqlalchemy import text

    from wattkeeper.store.roles import GROUPS, agents, group_role

    engine = _postgres_roles(db, config, "db roles")
    with engine.connect() as conn:
        database = conn.scalar(text("SELECT current_database()"))
        logins = agents(conn)
    groups = {g: group_role(database, g) for g in GROUPS}
    if output == Output.json:
        _emit_json(
            {
                "groups": groups,
                "agents": [{"node": n, "role": r, "created_at": t} for n, r, t in logins],
            }
        )
        return
    for group, role in groups.items():
        typer.echo(f"{group:<10} {role}")
    for node, role, _ in logins:
        typer.echo(f"agent      {role}  (node {node})")


# -- probe --------------------------------------------------------------------------------------
class Kind(StrEnum):
    auto = "auto"
    vllm = "vllm"
    sglang = "sglang"
    tgi = "tgi"
    triton = "triton"
    nim = "nim"
    llamacpp = "llamacpp"


@app.command()
def probe(
    source: Annotated[str, typer.Argument(help="A /metrics URL or a file holding such a page.")],
    kind: Annotated[Kind, typer.Option(help="Server kind, or auto to detect it.")] = Kind.auto,
    timeout: Annotated[str, typer.Option(help="HTTP timeout.")] = "2s",
    output: OutputOpt = Output.table,
) -> None:
    """Read one inference server page and show what wattkeeper understands of it.

    Exit 0 when the page was understood (even with per-series warnings), 1 when not.
    """
    from wattkeeper.collectors.tokens import probe as probe_source

    result = probe_source(source, kind.value, timeout_s=_parse_duration(timeout, "--timeout"))
    if output is Output.json:
        _emit_json({"format_version": 1, **result})
    else:
        _print_probe(result)
    if result["kind"] is None:
        raise typer.Exit(1)


def _print_probe(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if result["kind"] is not None:
        t = Table(title=f"{result['source']}: {result['kind']}")
        cols = ("model", "prompt tokens", "generated tokens", "running", "waiting", "KV cache")
        for col in cols:
            t.add_column(col, justify="left" if col == "model" else "right")

        def num(x: float | None, fmt: str = ",.0f") -> str:
            return "-" if x is None else format(x, fmt)

        for s in result["series"]:
            labels = ",".join(f"{k}={v}" for k, v in s.get("labels", {}).items())
            t.add_row(
                s["model"] or labels or "-",
                num(s["prompt_tokens_total"]),
                num(s["generation_tokens_total"]),
                num(s["requests_running"]),
                num(s["requests_waiting"]),
                num(s.get("kv_cache_usage_ratio"), ".0%"),
            )
        console.print(t)
    err = Console(stderr=True)
    for note in result["notes"]:
        err.print(f"note: {note}")
    for error in result["errors"]:
        err.print(f"error: {error}")


# -- simulate -----------------------------------------------------------------------------------
class Phase(StrEnum):
    decode = "decode"
    prefill = "prefill"
    mixed = "mixed"


@simulate_app.command("point")
def simulate_point(
    gpu: Annotated[str, typer.Option(help="GPU kind: h100, a100.")] = "h100",
    model: Annotated[str, typer.Option(help="Model: llama-8b, llama-70b, llama-405b-fp8.")] = (
        "llama-8b"
    ),
    phase: Annotated[Phase, typer.Option(help="decode, prefill or mixed.")] = Phase.decode,
    batch: Annotated[int, typer.Option(help="Sequences in flight.")] = 16,
    clock: Annotated[
        int | None, typer.Option(help="Locked SM clock, MHz.", show_default=False)
    ] = None,
    power_limit: Annotated[
        str | None, typer.Option(help="Power limit (e.g. 500W).", show_default=False)
    ] = None,
    prefill_fraction: Annotated[
        float | None,
        typer.Option(help="Share of time in prefill (mixed phase only).", show_default=False),
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """One GPU group's steady state: tokens/s, power, effective clock, time per token."""
    from wattkeeper.simulator.whatif import point

    limit_w = _parse_power(power_limit, "--power-limit") if power_limit is not None else None
    try:
        result = point(gpu, model, phase.value, batch, clock, limit_w, prefill_fraction)
    except ValueError as exc:
        fail(str(exc), 2)
    if output is Output.json:
        _emit_json({"format_version": 1, **result})
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{model} on {gpu}, {phase.value}, batch {batch}")
    t.add_column("measure")
    t.add_column("value", justify="right")
    for key, value in result.items():
        t.add_row(
            key,
            "-" if value is None else (f"{value:,.4g}" if isinstance(value, float) else str(value)),
        )
    Console().print(t)


@simulate_app.command("calibration")
def simulate_calibration(output: OutputOpt = Output.table) -> None:
    """Every published calibration row next to what the simulator gives, with the error."""
    from wattkeeper.simulator.whatif import calibration

    result = calibration()
    if output is Output.json:
        _emit_json({"format_version": 1, **result})
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"simulator vs measured ({result.get('source', '')})")
    for col in (
        "model",
        "GPUs",
        "batch",
        "tok/s measured",
        "tok/s sim",
        "err",
        "W/GPU measured",
        "W/GPU sim",
        "err",
    ):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in result["rows"]:
        t.add_row(
            r["model"],
            str(r["num_gpus"]),
            str(r["batch"]),
            f"{r['measured_tokens_per_s']:,.0f}",
            f"{r['sim_tokens_per_s']:,.0f}",
            f"{r['tokens_rel_error']:+.1%}",
            f"{r['measured_power_w_per_gpu']:.0f}",
            f"{r['sim_power_w_per_gpu']:.0f}",
            f"{r['power_rel_error']:+.1%}",
        )
    Console().print(t)
    typer.echo(f"largest relative error: {result['max_abs_rel_error']:.1%}")


@simulate_app.command("list")
def simulate_list(output: OutputOpt = Output.table) -> None:
    """Name the built-in scenarios and say what each is for."""
    from wattkeeper.simulator.scenario import list_scenarios

    items = list_scenarios()
    if output is Output.json:
        _emit_json(
            {"format_version": 1, "scenarios": [{"name": n, "description": d} for n, d in items]}
        )
        return
    width = max((len(n) for n, _ in items), default=0)
    for name, description in items:
        typer.echo(f"{name:<{width}}  {description}")


MIN_COMPARE_S = 30.0


@simulate_app.command("run")
def simulate_run(
    scenario: Annotated[str, typer.Argument(help="A scenario name (simulate list) or TOML file.")],
    compare: Annotated[
        bool, typer.Option("--compare", help="Run every policy on the same arrivals, side by side.")
    ] = False,
    policy: Annotated[
        list[str] | None,
        typer.Option(
            "--policy",
            help="Policy to run (repeatable): nocap, uniform, best-static, best-static-lock, "
            "proportional, wattkeeper, oracle-limits, oracle. Default: wattkeeper, or all "
            "with --compare.",
            show_default=False,
        ),
    ] = None,
    duration: Annotated[
        str | None,
        typer.Option(help="Override the scenario's duration (e.g. 10m).", show_default=False),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            help="Override the scenario's budget for the whole run (W, kW, MW), or 'none'.",
            show_default=False,
        ),
    ] = None,
    seeds: Annotated[
        int,
        typer.Option(help="Run each policy on this many seeds; report means and 95% intervals."),
    ] = 1,
    jobs: Annotated[
        int | None,
        typer.Option(
            help="Simulations run in parallel (default: one per CPU).", show_default=False
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            help="Write a Markdown report with PNG plots into this directory.", show_default=False
        ),
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Run a scenario on the simulated clock and score the policies against the oracle."""
    from wattkeeper.simulator.compare import POLICIES, to_json, with_budget
    from wattkeeper.simulator.compare import compare as run_compare
    from wattkeeper.simulator.scenario import load_scenario

    duration_s = _parse_duration(duration, "--duration") if duration is not None else None
    if duration_s is not None and duration_s < MIN_COMPARE_S:
        raise typer.BadParameter(
            f"at least {MIN_COMPARE_S:.0f}s: shorter runs end inside the warm-up and the "
            "drain, and measure nothing",
            param_hint="--duration",
        )
    if report is not None and report.exists() and not report.is_dir():
        raise typer.BadParameter(f"{report} exists and is not a directory", param_hint="--report")
    budget_override: float | None = None
    if budget is not None and budget.strip().lower() != "none":
        budget_override = _parse_power(budget, "--budget")
    if seeds < 1 or seeds > 100:
        raise typer.BadParameter(f"must be 1 to 100, got {seeds}", param_hint="--seeds")
    if jobs is not None and jobs < 1:
        raise typer.BadParameter(f"must be at least 1, got {jobs}", param_hint="--jobs")
    names = list(dict.fromkeys(policy or (POLICIES if compare else ("wattkeeper",))))
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise typer.BadParameter(
            f"unknown policy {unknown[0]!r}: expected one of {', '.join(POLICIES)}",
            param_hint="--policy",
        )
    try:
        sc = load_scenario(scenario)
    except (ValueError, OSError) as exc:
        fail(str(exc), 2)
    if budget is not None:
        sc = with_budget(sc, budget_override)
    if any(n.startswith("oracle") for n in names):
        _require_extra("scipy")
    if report is not None:
        _require_extra("matplotlib")
    workers = jobs or os.cpu_count() or 1
    if output is Output.json or not sys.stderr.isatty():
        result = run_compare(sc, names, duration_s=duration_s, seeds=seeds, workers=workers)
    else:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            tasks = {n: bar.add_task(n, total=1.0) for n in names}
            result = run_compare(
                sc,
                names,
                duration_s=duration_s,
                seeds=seeds,
                workers=workers,
                progress=lambda n, x: bar.update(tasks[n], completed=x),
            )
    if report is not None:
        from wattkeeper.simulator.report import write_report

        path = write_report(result, report)
        typer.echo(f"report: {path}", err=True)
    if output is Output.json:
        _emit_json(to_json(result))
        return
    from wattkeeper.simulator.report import markdown_table

    typer.echo(f"scenario {result['scenario']}: {result['description']}")
    typer.echo(markdown_table(result))


EXTRAS = {"scipy": "sim", "matplotlib": "sim"}
"""Modules that only an optional extra installs, and the extra that brings each."""


def _require_extra(*modules: str) -> None:
    """Refuse, before any work starts, a command whose extra is not installed."""
    from importlib.util import find_spec

    for module in modules:
        if find_spec(module) is None:
            _missing_extra(module)


def _missing_extra(module: str) -> NoReturn:
    extra = EXTRAS[module]
    fail(
        f"this command needs the '{extra}' extra ({module} is not installed): "
        f"pip install 'wattkeeper[{extra}]'"
    )


def main() -> None:
    try:
        app()
    except ModuleNotFoundError as exc:
        # The safety net behind _require_extra: a command that reaches an optional
        # module it did not check for still ends in one line, not a traceback.
        module = (exc.name or "").partition(".")[0]
        if module not in EXTRAS:
            raise
        try:
            _missing_extra(module)
        except typer.Exit as stop:
            sys.exit(stop.exit_code)


if __name__ == "__main__":
    main()
