"""A Markdown report with PNG plots of a policy comparison, for people, not for CI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wattkeeper.units import format_power

COLUMNS = (
    ("goodput tokens", "goodput_tokens", "{:,.0f}"),
    ("SLO attainment", "slo_attainment", "{:.1%}"),
    ("shed", "shed_requests", "{:,.0f}"),
    ("TTFT p99 s", "ttft_p99_s", "{:.3g}"),
    ("TPOT p99 ms", "tpot_p99_s", None),
    ("energy kWh", "energy_j", None),
    ("J per good token", "joules_per_good_token", "{:.4f}"),
    ("good tokens/J", "good_tokens_per_joule", "{:.3f}"),
    ("tokens/J", "tokens_per_joule", "{:.3f}"),
    ("cost per M good tokens", "cost_per_million_good_tokens", "{:.4f}"),
    ("s over budget", "over_budget_s", "{:,.0f}"),
    ("W·s over", "over_budget_ws", "{:,.0f}"),
    ("longest excursion s", "max_excursion_s", "{:,.0f}"),
    ("goodput of oracle", "of_oracle.goodput", "{:.1%}"),
    ("J/good token of oracle", "of_oracle.joules_per_good_token", "{:.3f}"),
    ("realised of bound", "realised_of_bound", "{:.1%}"),
)

NOTE = (
    "Oracle rows: goodput, energy and the per-token figures are the bound; attainment, "
    "shed, latencies and compliance are those of its plan applied to the facility, and "
    "*realised of bound* is the goodput that run made over the bound."
)


def _get(data: dict[str, Any], key: str) -> Any:
    if key == "realised_of_bound":
        realised = (data.get("realised") or {}).get("goodput_tokens")
        bound = data.get("goodput_tokens")
        return realised / bound if realised is not None and bound else None
    for part in key.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def cell(key: str, value: Any, fmt: str | None) -> str:
    if value is None:
        return "-"
    if key == "energy_j":
        return f"{value / 3.6e6:,.2f}"
    if key == "tpot_p99_s":
        return f"{value * 1e3:.1f}"
    return fmt.format(value) if fmt else str(value)


OPTIONAL = {"cost_per_million_good_tokens"}
"""Columns shown only where some row has a value (cost needs a price in the scenario)."""


def markdown_table(result: dict[str, Any]) -> str:
    datas = [
        (name, res.to_json() if hasattr(res, "to_json") else res)
        for name, res in result["policies"].items()
    ]
    columns = [
        c
        for c in COLUMNS
        if c[1] not in OPTIONAL or any(_get(d, c[1]) is not None for _, d in datas)
    ]
    head = "| policy | " + " | ".join(c[0] for c in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    rows = [head, rule]
    for name, data in datas:
        label = name if not data.get("setting") else f"{name} ({data['setting']})"
        rows.append(
            f"| {label} | "
            + " | ".join(cell(key, _get(data, key), fmt) for _, key, fmt in columns)
            + " |"
        )
    bounds = any(
        _get(r.to_json() if hasattr(r, "to_json") else r, "realised")
        for r in result["policies"].values()
    )
    return "\n".join(rows) + ("\n\n" + NOTE if bounds else "")


def write_report(result: dict[str, Any], directory: Path) -> Path:
    """Write ``report.md`` and its plots into ``directory``; returns the Markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    name = result["scenario"]
    policies = result["policies"]

    def time_plot(filename: str, ylabel: str, title: str, lines: dict[str, tuple]) -> None:
        fig, ax = plt.subplots(figsize=(10, 4))
        for label, (xs, ys, style) in lines.items():
            ax.plot(xs, ys, style, label=label, linewidth=1.2 if style else 0.8)
        ax.set_xlabel("time (s)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name}: {title}")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(directory / filename, dpi=110)
        plt.close(fig)

    power_lines: dict[str, tuple] = {}
    good_lines: dict[str, tuple] = {}
    jpt_lines: dict[str, tuple] = {}
    ttft_lines: dict[str, tuple] = {}
    tpot_lines: dict[str, tuple] = {}
    for pname, res in policies.items():
        series = res.series or {}
        power = series.get("power_w", [])
        good = series.get("good_tokens_per_s", [])
        power_lines[pname] = (range(len(power)), [p / 1e3 for p in power], "")
        tens = [10 * i for i in range(len(good))]
        good_lines[pname] = (tens, good, "")
        jpt = []
        for i, rate in enumerate(good):
            window = power[10 * i : 10 * i + 10] or power[-1:]
            mean_w = sum(window) / len(window) if window else 0.0
            jpt.append(mean_w / rate if rate > 0 else float("nan"))
        jpt_lines[pname] = (tens, jpt, "")
        minutes = [60 * i + 30 for i in range(len(series.get("ttft_p99_s", [])))]
        nan = float("nan")
        for key, lines in (("ttft", ttft_lines), ("tpot", tpot_lines)):
            for q in ("p50", "p99"):
                ys = [nan if v is None else v for v in series.get(f"{key}_{q}_s", [])]
                lines[f"{pname} {q}"] = (minutes[: len(ys)], ys, "--" if q == "p50" else "")
        if "budget" not in power_lines:
            budget = [None if b is None else b / 1e3 for b in series.get("budget_w", [])]
            power_lines["budget"] = (range(len(budget)), budget, "k--")
    time_plot("power.png", "facility power (kW)", "facility power against budget", power_lines)
    time_plot("goodput.png", "good tokens/s (10-s mean)", "goodput (tokens within SLO)", good_lines)
    time_plot(
        "energy_per_good_token.png",
        "J per good token (10-s mean)",
        "facility energy per good token",
        jpt_lines,
    )
    time_plot("ttft.png", "TTFT (s), per minute", "time to first token, p50 and p99", ttft_lines)
    time_plot("tpot.png", "TPOT (s), per minute", "time per output token, p50 and p99", tpot_lines)

    budget = result["budget_w"]
    if budget is None:
        budget_text = "none"
    elif isinstance(budget, int | float):
        budget_text = format_power(budget)
    else:
        budget_text = " then ".join(format_power(b) for b in budget)
    w0, w1 = result.get("window_s", (0, result["duration_s"]))
    text = "\n".join(
        [
            f"# Scenario `{name}`",
            "",
            result.get("description", ""),
            "",
            f"Duration {result['duration_s']:.0f} s, budget {budget_text}, "
            f"{result.get('seeds', 1)} seed(s) from {result.get('seed', 0)}; goodput, energy "
            f"and requests counted from {w0:.0f} s to {w1:.0f} s.",
            "",
            markdown_table(result),
            "",
            "![facility power against budget](power.png)",
            "",
            "![goodput](goodput.png)",
            "",
            "![energy per good token](energy_per_good_token.png)",
            "",
            "![TTFT percentiles](ttft.png)",
            "",
            "![TPOT percentiles](tpot.png)",
            "",
        ]
    )
    path = directory / "report.md"
    path.write_text(text)
    return path
