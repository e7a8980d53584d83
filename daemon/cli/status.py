"""The commands that read the store and change nothing: ``status`` (the facility as it is)
and ``explain`` (why a node, GPU or budget is as it is). They sit together because they
describe the same snapshot at the same moment, the one ``run``'s live table shows.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from wattkeeper.cli.common import (
    ConfigOpt,
    DbOpt,
    Output,
    OutputOpt,
    _check_domain,
    _config,
    _configured_limit,
    _domain_nodes,
    _emit_json,
    _live_table,
    _status_moment,
    _store,
    fail,
)

if TYPE_CHECKING:
    from wattkeeper.config import Config
    from wattkeeper.policies.schedule import Schedule
    from wattkeeper.store.repository import Snapshot


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
        every_schedule = store.schedules()
        schedules = [s for s in every_schedule if s.scope == domain]
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
    what_if = _what_if(cfg, snap, domain, set(held), stored, every_schedule)
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
        "what_if": what_if,
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
    for change in what_if or []:
        if abs(change["gpu_limits_w"]) < 0.5:
            typer.echo(f"{change['budget_change_w']:+.0f} W: no GPU limit would change")
            continue
        typer.echo(
            f"{change['budget_change_w']:+.0f} W: GPU limits {change['gpu_limits_w']:+.0f} W"
            + (
                ""
                if change["tokens_per_s"] is None
                else f", about {change['tokens_per_s']:+.0f} tokens/s at the nodes' "
                "measured tokens per joule (the last watts give less than the average)"
            )
        )
    if schedules:
        typer.echo(f"schedules: {', '.join(str(s.id) for s in schedules)}")


WHAT_IF_W = 100.0


def _what_if(
    cfg: Config,
    snap: Snapshot,
    domain: str,
    held: set[str],
    stored: dict[str, float],
    schedules: list[Schedule],
) -> list[dict] | None:
    """What 100 W more or less on this budget would change: the snapshot planned again
    with the budget moved, each GPU the budget does not hold kept at its target (the
    latency ceiling or its top holds it there), and the change in limits turned into
    tokens at each node's measured tokens per joule. An estimate an operator can act on,
    not a promise: the watts at the margin give fewer tokens than the average does."""
    from wattkeeper.controller import planning_inputs
    from wattkeeper.policies.plan import FACILITY, plan
    from wattkeeper.policies.schedule import effective_budget
    from wattkeeper.runtime import config_domains, plan_settings

    def in_force_of(name: str, standing: float | None) -> float | None:
        mine = [s for s in schedules if s.scope == name]
        return effective_budget(standing, mine, time.time(), 0.0)[0]

    # Every budget as it is in force now, schedules' windows included, as the
    # controller plans.
    facility_w = in_force_of(FACILITY, snap.budget_w)
    domains = [
        replace(d, limit_w=in_force_of(d.name, stored.get(d.name, d.limit_w)))
        for d in config_domains(cfg)
    ]
    in_force = (
        facility_w
        if domain == FACILITY
        else next((d.limit_w for d in domains if d.name == domain), None)
    )
    if in_force is None:
        return None
    nodes, gpus = planning_inputs(snap, cfg.controller.forget_after_s)
    gpus = [
        replace(g, ceiling_w=None if g.uuid in held or g.target_w is None else g.target_w)
        for g in gpus
    ]
    settings = plan_settings(cfg)

    def limits(delta: float) -> dict[str, float]:
        if domain == FACILITY:
            result = plan(nodes, gpus, in_force + delta, settings, domains)
        else:
            moved = [
                replace(d, limit_w=in_force + delta) if d.name == domain else d for d in domains
            ]
            result = plan(nodes, gpus, facility_w, settings, moved)
        return {t.uuid: t.power_limit_w for t in result.targets}

    drawn: dict[str, float] = {}
    for g in snap.gpus:
        drawn[g.node] = drawn.get(g.node, 0.0) + (g.power_w or 0.0)
    per_joule = {
        n.name: n.generation_tokens_per_s / drawn[n.name]
        for n in snap.nodes
        if n.generation_tokens_per_s is not None and drawn.get(n.name, 0.0) > 0
    }
    node_of = {g.uuid: g.node for g in gpus}
    base = limits(0.0)
    out = []
    for delta in (WHAT_IF_W, -WHAT_IF_W):
        moved = limits(delta)
        by_node: dict[str, float] = {}
        for uuid, watts in moved.items():
            step = watts - base.get(uuid, watts)
            by_node[node_of[uuid]] = by_node.get(node_of[uuid], 0.0) + step
        known = [n for n, w in by_node.items() if abs(w) >= 0.5]
        tokens = (
            sum(by_node[n] * per_joule[n] for n in known)
            if all(n in per_joule for n in known)
            else None
        )
        out.append(
            {
                "budget_change_w": delta,
                "gpu_limits_w": round(sum(by_node.values()), 1),
                "tokens_per_s": None if tokens is None else round(tokens, 1),
            }
        )
    return out


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
        memory = store.recall("learned")
    except StoreError as exc:
        fail(str(exc))
    learned = None
    if memory is not None:
        kept, kept_at = memory
        ceiling = (kept.get("ceilings") or {}).get(node)
        learned = {
            "kept_at": kept_at,
            "ceiling": None
            if not isinstance(ceiling, dict)
            else {
                k: ceiling.get(k)
                for k in ("ratio", "floor", "batch_limit", "unqueued_ttft_s", "reason")
            },
            "tokens_per_joule": ((kept.get("routes") or {}).get(node) or {}).get("efficiency"),
            "non_gpu_w_per_gpu_w": kept.get("coupling"),
            "consolidated": (kept.get("consolidated") or {}).get(node),
        }
    latency = {
        key: getattr(view, key)
        for key in ("ttft_mean_s", "tpot_mean_s", "ttft_p90_s", "tpot_p90_s", "requests_running")
    }
    data = {
        "format_version": 1,
        "node": node,
        "drained": view.drained,
        "drained_by": view.drained_by,
        "drain_now": view.drain_now,
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
                "sm_clock_mhz": g.sm_clock_mhz,
                "target_sm_clock_max_mhz": targets[g.uuid].sm_clock_max_mhz
                if g.uuid in targets
                else None,
                "reason": targets[g.uuid].reason if g.uuid in targets else None,
            }
            for g in gpus
        ],
        "learned": learned,
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
    if view.drain_now:
        state += ", its requests in flight sent back (drain now)"
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
    if learned is not None:
        c = learned["ceiling"]
        parts = []
        if c is not None and c.get("ratio") is not None:
            parts.append(f"latency ceiling at {c['ratio']:.0%} of each GPU's range")
            if c.get("floor"):
                parts.append(f"not below {c['floor']:.0%} (it queued lower)")
            if c.get("batch_limit"):
                parts.append(f"in-flight limit {c['batch_limit']:.0f} requests")
            if c.get("unqueued_ttft_s"):
                parts.append(f"TTFT without a queue {c['unqueued_ttft_s'] * 1e3:.0f} ms")
        if learned["tokens_per_joule"] is not None:
            parts.append(f"{learned['tokens_per_joule']:.2f} tokens/J")
        if learned["non_gpu_w_per_gpu_w"] is not None:
            parts.append(
                f"non-GPU power rises {learned['non_gpu_w_per_gpu_w']:.2f} W per GPU W (facility)"
            )
        held = learned["consolidated"]
        if isinstance(held, list) and len(held) >= 3 and view.drained_by == "controller":
            from wattkeeper.policies.consolidate import ConsolidateSettings

            back = ConsolidateSettings().return_ratio * float(held[1])
            parts.append(
                f"consolidated at {held[1]:.0f} tokens/s in its pool; returns above"
                f" {back:.0f} tokens/s"
            )
        age = now - learned["kept_at"]
        typer.echo(
            f"learned (kept {age:.0f} s ago): {'; '.join(parts) or 'nothing for this node yet'}"
        )
    for g in data["gpus"]:
        clock = "" if g["sm_clock_mhz"] is None else f", SM clock {g['sm_clock_mhz']:.0f} MHz"
        if g["target_sm_clock_max_mhz"] is not None:
            clock += f" (locked at or below {g['target_sm_clock_max_mhz']} MHz)"
        typer.echo(
            f"  GPU {g['index']} {g['uuid']}: draws {format_power(g['power_w'])}, limit "
            f"{format_power(g['power_limit_w'])}, target {format_power(g['target_power_limit_w'])}"
            f"{clock} - {g['reason'] or 'no target'}"
        )
    for e in data["audit"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"]))
        typer.echo(f"  {when} {e['actor']} {e['action']} {e['subject']}")
