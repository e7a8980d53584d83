"""Rates and increases from counters, with resets handled as Prometheus does.

Inference servers restart (a new model, an OOM, a rolling update) and their
counters start again from zero. Like Prometheus ``rate()``/``increase()``, a
counter that goes down is taken to have been reset and to have counted up from
zero since, so the increase over that interval is the new value; a plain
difference would report a huge negative throughput. Unlike Prometheus there is
no extrapolation to window edges: the agent wants what happened between two
scrapes, nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

from .model import Histogram, TokenSeries


def counter_increase(previous: float, current: float) -> float:
    """Increase from ``previous`` to ``current``, reset-aware."""
    return current if current < previous else current - previous


def _check_finite(key: Hashable, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"counter {key!r}: value {value!r} is not a finite number")


class CounterRate:
    """Remembers the last value of each counter (keyed by the caller) between scrapes.

    ``update`` (rates) and ``increase`` keep separate memories, so a caller may use
    both on the same key without one resetting the other.
    """

    def __init__(self) -> None:
        self._last_point: dict[Hashable, tuple[float, float]] = {}
        self._last_value: dict[Hashable, float] = {}

    def update(self, key: Hashable, value: float, ts: float) -> float | None:
        """Per-second rate since the previous update of ``key``; ``None`` on the first.

        Also ``None`` when time did not advance: a repeated timestamp keeps the
        earlier point as the base, a timestamp that went backwards replaces it.
        """
        _check_finite(key, value)
        previous = self._last_point.get(key)
        if previous is None:
            self._last_point[key] = (value, ts)
            return None
        previous_value, previous_ts = previous
        elapsed_s = ts - previous_ts
        if elapsed_s == 0:
            return None
        self._last_point[key] = (value, ts)
        if elapsed_s < 0:
            return None
        return counter_increase(previous_value, value) / elapsed_s

    def increase(self, key: Hashable, value: float) -> float:
        """Increase since the previous call for ``key`` (reset-aware); 0 on the first."""
        _check_finite(key, value)
        previous = self._last_value.get(key)
        self._last_value[key] = value
        if previous is None:
            return 0.0
        return counter_increase(previous, value)

    def forget(self, key: Hashable) -> None:
        """Drop a counter whose series disappeared, so a later one starts fresh."""
        self._last_point.pop(key, None)
        self._last_value.pop(key, None)

    def keys(self) -> set[Hashable]:
        return set(self._last_point) | set(self._last_value)


LATENCY_QUANTILE = 0.9
"""The quantile stored and acted on: high enough that most requests are within it,
low enough that a 5-second window of a few dozen requests still estimates it."""


@dataclass(frozen=True)
class LatencyWindow:
    """Latency of the requests a server observed between two reads. The quantiles are
    as coarse as the server's buckets (vLLM's TPOT buckets jump from 25 to 50 ms); the
    means, from ``_sum`` and ``_count``, are exact, so they are what a policy steers on."""

    ttft_p90_s: float | None = None
    tpot_p90_s: float | None = None
    ttft_mean_s: float | None = None
    tpot_mean_s: float | None = None
    ttft_p90_floor_s: float | None = None
    """The p90 is at least this: the lower bound of its bucket."""
    tpot_p90_floor_s: float | None = None
    latency_requests: float | None = None
    """Observations in the TPOT window, else in the TTFT window (named as the store's
    column: a window is stored field for field)."""


def _mean(h: Histogram | None) -> float | None:
    if h is None or h.count <= 0 or not math.isfinite(h.sum):
        return None
    return h.sum / h.count


class LatencyWindows:
    """Each series' TTFT and TPOT histograms at the previous scrape, so every scrape
    yields the latency of the requests observed since: a cumulative histogram's quantile
    would describe the server's whole life, not what the GPUs' settings do now."""

    def __init__(self) -> None:
        self._last: dict[Hashable, tuple[Histogram | None, Histogram | None]] = {}

    def update(self, key: Hashable, series: TokenSeries) -> LatencyWindow:
        """What was observed since the previous update of ``key``; fields are None where
        the server has no such histogram, on the first scrape, and where nothing was
        observed in between."""
        previous = self._last.get(key, (None, None))
        current = (series.ttft_seconds, series.tpot_seconds)
        self._last[key] = current
        ttft, tpot = (
            cur.since(old) if cur is not None and old is not None else None
            for cur, old in zip(current, previous, strict=True)
        )
        counted = [w.count for w in (tpot, ttft) if w is not None and w.count > 0]
        return LatencyWindow(
            ttft_p90_s=ttft.quantile(LATENCY_QUANTILE) if ttft is not None else None,
            tpot_p90_s=tpot.quantile(LATENCY_QUANTILE) if tpot is not None else None,
            ttft_mean_s=_mean(ttft),
            tpot_mean_s=_mean(tpot),
            ttft_p90_floor_s=ttft.quantile_floor(LATENCY_QUANTILE) if ttft is not None else None,
            tpot_p90_floor_s=tpot.quantile_floor(LATENCY_QUANTILE) if tpot is not None else None,
            latency_requests=counted[0] if counted else None,
        )

    def forget(self, key: Hashable) -> None:
        self._last.pop(key, None)
