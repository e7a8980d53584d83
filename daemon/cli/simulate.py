"""``simulate``: scenarios scored policy against policy, and what-if questions to the
calibrated simulator. Nothing here touches a store or a GPU; what it needs beyond the
base install (scipy, matplotlib) is checked before the work starts.
"""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from wattkeeper.cli.common import (
    Output,
    OutputOpt,
    _emit_json,
    _parse_duration,
    _parse_power,
    _require_extra,
    fail,
)


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
