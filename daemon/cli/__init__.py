"""The admin CLI. Heavy modules are imported inside commands so ``--help`` is instant.

Data goes to stdout (a table on a terminal, ``-o json`` for machines), diagnostics to
stderr; exit 0 ok, 1 error, 2 usage.

One module per command group, each importing only ``common``: a change to one group is
read and reviewed without the other commands around it. This module only assembles the
app, so the order in which ``--help`` lists the commands is decided in one place.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from wattkeeper import __version__
from wattkeeper.cli import audit, budget, db, node, probe, run, simulate, status
from wattkeeper.cli.common import EXTRAS, _missing_extra

app = typer.Typer(
    help="Keep a GPU inference facility inside its power budget at the best tokens per joule.",
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    add_completion=False,
)


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


# ``--help`` lists the commands in the order they are registered here, then the groups in
# theirs.
app.command()(run.run)
app.command()(run.agent)
app.command()(run.controller)
app.command()(status.status)
app.command()(audit.audit)
app.command()(probe.probe)
app.add_typer(budget.budget_app, name="budget")
app.add_typer(node.node_app, name="node")
app.add_typer(db.db_app, name="db")
app.add_typer(simulate.simulate_app, name="simulate")
app.add_typer(status.explain_app, name="explain")


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
