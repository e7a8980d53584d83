"""CounterRate against Prometheus increase()/rate() semantics, on generated pages.

The pages are generated (two models, two engines, a server restart in the middle)
so that every counter value, and therefore every expected increase, is known.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest

from wattkeeper.collectors.tokens import (
    CounterRate,
    Histogram,
    LatencyWindow,
    LatencyWindows,
    parse_page,
)


def prometheus_increase(values: list[float]) -> float:
    """Reference: Prometheus' increase() without extrapolation (resets count from zero)."""
    total = 0.0
    for previous, current in itertools.pairwise(values):
        total += current if current < previous else current - previous
    return total


def vllm_page(counters: dict[tuple[str, str], tuple[float, float]]) -> str:
    """A vLLM page; ``counters`` maps (model, engine) to (prompt, generation) tokens."""
    lines = [
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
    ]
    for (model, engine), (prompt, _) in counters.items():
        lines.append(f'vllm:prompt_tokens_total{{engine="{engine}",model_name="{model}"}} {prompt}')
    lines += [
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
    ]
    for (model, engine), (_, generation) in counters.items():
        lines.append(
            f'vllm:generation_tokens_total{{engine="{engine}",model_name="{model}"}} {generation}'
        )
    return "\n".join(lines) + "\n"


def test_first_update_has_no_rate() -> None:
    rates = CounterRate()
    assert rates.update("a", 100.0, 10.0) is None
    assert rates.update("a", 160.0, 12.0) == 30.0


def test_increase_is_zero_at_first_then_differences() -> None:
    rates = CounterRate()
    assert rates.increase("a", 5.0) == 0.0
    assert rates.increase("a", 8.0) == 3.0
    assert rates.increase("a", 8.0) == 0.0


def test_reset_counts_from_zero() -> None:
    rates = CounterRate()
    rates.update("a", 1000.0, 0.0)
    # restarted and counted to 40 since: increase is 40, not -960
    assert rates.update("a", 40.0, 10.0) == 4.0
    assert rates.update("a", 100.0, 20.0) == 6.0
    assert rates.increase("b", 1000.0) == 0.0
    assert rates.increase("b", 40.0) == 40.0


def test_reset_to_zero_exactly() -> None:
    rates = CounterRate()
    rates.increase("a", 7.0)
    assert rates.increase("a", 0.0) == 0.0
    assert rates.increase("a", 3.0) == 3.0


def test_time_that_does_not_advance() -> None:
    rates = CounterRate()
    rates.update("a", 10.0, 5.0)
    assert rates.update("a", 20.0, 5.0) is None  # same instant: keep the base
    assert rates.update("a", 30.0, 7.0) == 10.0  # (30 - 10) / (7 - 5)
    assert rates.update("a", 40.0, 6.0) is None  # clock went back: new base
    assert rates.update("a", 46.0, 9.0) == 2.0


def test_keys_are_independent_and_forgettable() -> None:
    rates = CounterRate()
    rates.update(("m1", "0"), 10.0, 0.0)
    rates.update(("m2", "0"), 500.0, 0.0)
    assert rates.update(("m1", "0"), 20.0, 1.0) == 10.0
    assert rates.update(("m2", "0"), 510.0, 1.0) == 10.0
    rates.forget(("m1", "0"))
    assert rates.update(("m1", "0"), 30.0, 2.0) is None
    assert rates.keys() == {("m1", "0"), ("m2", "0")}


def test_update_and_increase_keep_separate_memories() -> None:
    rates = CounterRate()
    rates.update("a", 10.0, 0.0)
    assert rates.increase("a", 10.0) == 0.0
    assert rates.update("a", 20.0, 1.0) == 10.0
    assert rates.increase("a", 20.0) == 10.0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="not a finite number"):
        CounterRate().update("a", bad, 0.0)
    with pytest.raises(ValueError, match="not a finite number"):
        CounterRate().increase("a", bad)


def test_generated_scrapes_with_a_restart_and_several_models() -> None:
    # generation tokens per (model, engine) at each scrape, 15 s apart; engine 1 of
    # llama restarts between scrapes 3 and 4, qwen restarts between 5 and 6
    history: dict[tuple[str, str], list[float]] = {
        ("llama-8b", "0"): [0.0, 1500.0, 3100.0, 4600.0, 6300.0, 7800.0],
        ("llama-8b", "1"): [200.0, 1700.0, 3300.0, 120.0, 1650.0, 3150.0],
        ("qwen-7b", "0"): [50.0, 80.0, 95.0, 140.0, 150.0, 30.0],
    }
    interval_s = 15.0
    rates = CounterRate()
    increases: dict[tuple[str, str], float] = dict.fromkeys(history, 0.0)
    per_scrape_rates: dict[tuple[str, str], list[float | None]] = {k: [] for k in history}
    for step in range(6):
        text = vllm_page({key: (values[step] * 2, values[step]) for key, values in history.items()})
        reading = parse_page(text, "vllm")
        assert len(reading.series) == 3
        now = 1000.0 + step * interval_s
        for series in reading.series:
            key = (series.model, series.labels["engine"])
            assert series.generation_tokens_total == history[key][step]
            assert series.prompt_tokens_total == history[key][step] * 2
            increases[key] += rates.increase(("gen", *key), series.generation_tokens_total)
            per_scrape_rates[key].append(
                rates.update(("gen-rate", *key), series.generation_tokens_total, now)
            )
    for key, values in history.items():
        assert increases[key] == pytest.approx(prometheus_increase(values))
        assert per_scrape_rates[key][0] is None
        expected_rates = [
            (current if current < previous else current - previous) / interval_s
            for previous, current in itertools.pairwise(values)
        ]
        assert per_scrape_rates[key][1:] == pytest.approx(expected_rates)
    # the restart shows as the post-restart count, never as a negative rate
    assert per_scrape_rates[("llama-8b", "1")][3] == pytest.approx(120.0 / interval_s)
    assert per_scrape_rates[("qwen-7b", "0")][5] == pytest.approx(30.0 / interval_s)
    assert increases[("llama-8b", "1")] == pytest.approx(1500 + 1600 + 120 + 1530 + 1500)


def test_generated_page_with_a_model_that_appears_later() -> None:
    rates = CounterRate()
    first = parse_page(vllm_page({("a", "0"): (10.0, 5.0)}), "vllm")
    second = parse_page(vllm_page({("a", "0"): (30.0, 9.0), ("b", "0"): (7.0, 3.0)}), "vllm")
    for series in first.series:
        rates.update((series.model, "gen"), series.generation_tokens_total, 0.0)
    got = {
        series.model: rates.update((series.model, "gen"), series.generation_tokens_total, 2.0)
        for series in second.series
    }
    assert got == {"a": 2.0, "b": None}


# -- latency over the window between two scrapes ------------------------------------------
NIM_PAGE = (Path(__file__).parent / "fixtures" / "metrics" / "nim_metrics.txt").read_text()


def with_observations(page: str, metric: str, value: float, n: int) -> str:
    """``page`` after ``n`` more observations of ``value`` in histogram ``metric``."""
    out = []
    for line in page.splitlines():
        m = re.match(rf'{metric}_bucket\{{le="([^"]+)"(.*)\}} (\S+)$', line)
        if m and float(m.group(1)) >= value:
            line = f'{metric}_bucket{{le="{m.group(1)}"{m.group(2)}}} {float(m.group(3)) + n}'
        for suffix, add in (("_count", n), ("_sum", n * value)):
            m = re.match(rf"({metric}{suffix}\{{.*\}}) (\S+)$", line)
            if m:
                line = f"{m.group(1)} {float(m.group(2)) + add}"
        out.append(line)
    return "\n".join(out) + "\n"


def nim_series(page: str):
    (series,) = parse_page(page, "nim").series
    return series


def test_histogram_quantile_interpolates_as_prometheus_does() -> None:
    h = Histogram(((0.1, 10.0), (0.2, 30.0), (0.5, 40.0), (math.inf, 40.0)), 6.0, 40.0)
    assert h.quantile(0.25) == pytest.approx(0.1)  # rank 10: the top of the first bucket
    assert h.quantile(0.5) == pytest.approx(0.15)  # rank 20: halfway through the second
    assert h.quantile(0.9) == pytest.approx(0.2 + 0.3 * 6 / 10)
    top = Histogram(((0.1, 1.0), (math.inf, 5.0)), 9.0, 5.0)
    assert top.quantile(0.9) == 0.1  # in +Inf: the highest finite bound
    assert Histogram(((math.inf, 0.0),), 0.0, 0.0).quantile(0.9) is None
    # What the buckets prove: the lower bound of the bucket the quantile falls in.
    assert h.quantile_floor(0.9) == 0.2 and h.quantile_floor(0.5) == 0.1
    assert h.quantile_floor(0.2) == 0.0 and top.quantile_floor(0.9) == 0.1


def test_latency_window_is_what_was_observed_between_scrapes() -> None:
    windows = LatencyWindows()
    first = nim_series(NIM_PAGE)
    assert windows.update("k", first) == LatencyWindow()  # nothing to subtract yet
    assert windows.update("k", first) == LatencyWindow()  # nothing observed since
    # 50 requests at 0.04 s per token after 391,680 observations that were mostly faster:
    # the window sees only the new ones, inside (0.025, 0.05].
    later = with_observations(NIM_PAGE, "time_per_output_token_seconds", 0.04, 50)
    later = with_observations(later, "time_to_first_token_seconds", 0.9, 50)
    w = windows.update("k", nim_series(later))
    assert w.latency_requests == 50
    assert 0.025 < w.tpot_p90_s <= 0.05 and 0.5 < w.ttft_p90_s <= 1.0
    # The means are exact where the quantiles are as coarse as the buckets.
    assert w.tpot_mean_s == pytest.approx(0.04) and w.ttft_mean_s == pytest.approx(0.9)
    lifetime = nim_series(later).tpot_seconds.quantile(0.9)
    assert lifetime < 0.025  # what a cumulative quantile would have said


def test_latency_window_after_a_server_restart_is_the_new_life() -> None:
    windows = LatencyWindows()
    windows.update(
        "k", nim_series(with_observations(NIM_PAGE, "time_to_first_token_seconds", 0.9, 5000))
    )
    w = windows.update("k", nim_series(NIM_PAGE))  # counts went down: restarted
    assert w.ttft_p90_s == nim_series(NIM_PAGE).ttft_seconds.quantile(0.9)
