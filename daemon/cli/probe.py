"""``probe``: check an inference server's /metrics page before an agent relies on it. It
needs no config and no store, so it is the one command that works on a machine where
nothing else is set up yet.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from wattkeeper.cli.common import Output, OutputOpt, _emit_json, _parse_duration


class Kind(StrEnum):
    auto = "auto"
    vllm = "vllm"
    sglang = "sglang"
    tgi = "tgi"
    triton = "triton"
    nim = "nim"
    llamacpp = "llamacpp"


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
