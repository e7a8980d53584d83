"""A Markdown report with PNG plots of a policy comparison, for people, not for CI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wattkeeper.units import format_power

COLUMNS = (
    ("tokens", "tokens", "{:,.0f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("energy kWh", "energy_j", None),
    ("tokens/J", "tokens_per_joule", "{:.3f}"),
    ("s over budget", "over_budget_s", "{:d}"),
    ("longest excursion s", "max_excursion_s", "{:d}"),
    ("SLO attainment", "slo_attainment", "{:.1%}"),
    ("of optimum", "fraction_of_optimum", "{:.1%}"),
)


def cell(key: str, value: Any, fmt: str | None) -> str:
    if value is None:
        return "-"
    if key == "energy_j":
        return f"{value / 3.6e6:,.2f}"
    return fmt.format(value) if fmt else str(value)


def markdown_table(result: dict[str, Any]) -> str:
    head = "| policy | " + " | ".join(c[0] for c in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    rows = [head, rule]
    for name, res in result["policies"].items():
        data = res.to_json() if hasattr(res, "to_json") else res
        rows.append(
            f"| {name} | "
            + " | ".join(cell(key, data.get(key), fmt) for _, key, fmt in COLUMNS)
            + " |"
        )
    return "\n".join(rows)


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
    tokens_lines: dict[str, tuple] = {}
    tpj_lines: dict[str, tuple] = {}
    for pname, res in policies.items():
        series = res.series or {}
        power = series.get("power_w", [])
        tps = series.get("tokens_per_s", [])
        power_lines[pname] = (range(len(power)), [p / 1e3 for p in power], "")
        tens = [10 * i for i in range(len(tps))]
        tokens_lines[pname] = (tens, tps, "")
        tpj = []
        for i, rate in enumerate(tps):
            window = power[10 * i : 10 * i + 10] or power[-1:]
            mean_w = sum(window) / len(window) if window else 0.0
            tpj.append(rate / mean_w if mean_w else 0.0)
        tpj_lines[pname] = (tens, tpj, "")
        if "budget" not in power_lines:
            budget = [None if b is None else b / 1e3 for b in series.get("budget_w", [])]
            power_lines["budget"] = (range(len(budget)), budget, "k--")
    time_plot("power.png", "facility power (kW)", "facility power against budget", power_lines)
    time_plot("tokens.png", "tokens/s (10-s mean)", "generated tokens per second", tokens_lines)
    time_plot(
        "tokens_per_joule.png",
        "tokens per joule (10-s mean)",
        "tokens per joule of facility energy",
        tpj_lines,
    )

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = list(policies)
    for ax, (key, title) in zip(
        axes,
        (
            ("tokens_per_joule", "tokens per joule"),
            ("tokens", "tokens"),
            ("fraction_of_optimum", "fraction of optimum"),
        ),
        strict=True,
    ):
        values = [getattr(policies[n], key) or 0.0 for n in names]
        ax.bar(names, values, color="#4c72b0")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(directory / "policies.png", dpi=110)
    plt.close(fig)

    budget = result["budget_w"]
    budget_text = (
        format_power(budget)
        if isinstance(budget, int | float)
        else " then ".join(format_power(b) for b in budget)
    )
    text = "\n".join(
        [
            f"# Scenario `{name}`",
            "",
            result.get("description", ""),
            "",
            f"Duration {result['duration_s']:.0f} s, budget {budget_text}.",
            "",
            markdown_table(result),
            "",
            "![facility power against budget](power.png)",
            "",
            "![tokens per second](tokens.png)",
            "",
            "![tokens per joule](tokens_per_joule.png)",
            "",
            "![per-policy totals](policies.png)",
            "",
        ]
    )
    path = directory / "report.md"
    path.write_text(text)
    return path
