"""What more than one command group needs, kept here so that the groups import only this
module and never each other: the options every command spells the same way (``--db``,
``--config``, ``-o``, ``--reason``), how a command fails, loads its config, opens its
store and names its actor, and the checks and views that several groups apply to the
same data (budget domains and floors, the moment ``status`` describes, the facility
table, optional extras).
"""

from __future__ import annotations

import json
import os
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer


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
