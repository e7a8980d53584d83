"""``budget``: the limits a person sets (now, or for a window on a schedule), and the tree
of what is in force. Setting and scheduling refuse the same impossible budgets, so they
share their parsing and checks here.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from wattkeeper.cli.common import (
    ConfigOpt,
    DbOpt,
    Output,
    OutputOpt,
    ReasonOpt,
    _actor,
    _check_domain,
    _check_floor,
    _config,
    _configured_limit,
    _domain_nodes,
    _emit_json,
    _parse_at,
    _parse_duration,
    _parse_power,
    _status_moment,
    _store,
    fail,
)

budget_app = typer.Typer(
    help="Show or set power budgets: the facility, its domains (room, PDU, rack), schedules.",
    no_args_is_help=True,
)


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


def _domain_and_power(args: list[str], cfg: Any) -> tuple[str, float]:
    if len(args) == 2 and args[1].strip().lower() in ("w", "kw", "mw"):
        args = [f"{args[0]}{args[1]}"]  # budget set 18 kW, unquoted
    if len(args) not in (1, 2):
        raise typer.BadParameter("give [DOMAIN] VALUE, e.g. '18kW' or 'rack-4 40kW'")
    domain = args[0] if len(args) == 2 else "facility"
    _check_domain(cfg, domain)
    return domain, _parse_power(args[-1], "VALUE")


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
