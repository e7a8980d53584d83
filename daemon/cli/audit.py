"""``audit``: what changed, who changed it and why, read back after an incident. Its own
module because its filters (who, what, about what, when) are its own.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from wattkeeper.cli.common import (
    ConfigOpt,
    DbOpt,
    Output,
    OutputOpt,
    _config,
    _emit_json,
    _parse_at,
    _parse_duration,
    _store,
    fail,
)


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
