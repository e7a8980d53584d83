"""``node``: a person takes a node out of service and puts it back. Kept apart from the
controller's own draining, which never undoes what a person did here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from wattkeeper.cli.common import ConfigOpt, DbOpt, ReasonOpt, _actor, _config, _store, fail

node_app = typer.Typer(help="Take a node out of service or put it back.", no_args_is_help=True)


@node_app.command("drain")
def node_drain(
    name: Annotated[str, typer.Argument(help="The node, as `status` lists it.")],
    reason: ReasonOpt = None,
    now: Annotated[
        bool,
        typer.Option(
            "--now",
            help="Do not wait for its requests in flight to finish: its agent also runs "
            "agent.drain_now_command, which sends them back to the router.",
        ),
    ] = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Drain a node: its agent runs its drain command, its GPUs are held at their floor,
    and the controller never puts it back; only `node resume` does."""
    _set_drained(name, True, reason, db, config, at_once=now)


@node_app.command("resume")
def node_resume(
    name: Annotated[str, typer.Argument(help="The node, as `status` lists it.")],
    reason: ReasonOpt = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Put a drained node back in service (whoever drained it)."""
    _set_drained(name, False, reason, db, config)


@node_app.command("remove")
def node_remove(
    name: Annotated[str, typer.Argument(help="The node, as `status` lists it.")],
    reason: ReasonOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Remove it even though its agent wrote lately.")
    ] = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Forget a node for good (decommissioned, renamed, or its GPUs moved to another
    host): its GPUs, samples, targets and routes go, the audit log keeps the removal. A
    node whose agent still writes would only register again, so it is refused unless
    --force."""
    from wattkeeper.store.db import StoreError
    from wattkeeper.store.repository import CLAIM_LIVE_S

    store = _store(_config(config), db)
    now = time.time()
    try:
        claims = store.node_claims()
        if name not in claims:
            fail(f"no node named {name!r} in the store (wattkeeper status lists them)")
        quiet_s = now - claims[name][1]
        if quiet_s < CLAIM_LIVE_S and not force:
            fail(
                f"node {name!r} was heard from {max(0.0, quiet_s):.0f} s ago: its agent "
                "would register it again. Stop that agent first, or pass --force"
            )
        gpus = store.remove_nodes([name], _actor(), now, reason=reason)
    except StoreError as exc:
        fail(str(exc))
    typer.echo(f"{name}: removed, with its {gpus} GPU(s)")


def _set_drained(
    name: str,
    drained: bool,
    reason: str | None,
    db: str | None,
    config: Path | None,
    at_once: bool = False,
) -> None:
    from wattkeeper.store.db import StoreError

    store = _store(_config(config), db)
    actor, now = _actor(), time.time()
    try:
        changed = store.set_drained(name, drained, actor, now, reason=reason)
        if at_once:
            changed = store.drain_now(name, actor, now, reason=reason) or changed
    except KeyError:
        fail(f"no node named {name!r} in the store (wattkeeper status lists them)")
    except StoreError as exc:
        fail(str(exc))
    state = ("drained, marked to end now" if at_once else "drained") if drained else "in service"
    typer.echo(f"{name}: {state}" + ("" if changed else " (already)"))
