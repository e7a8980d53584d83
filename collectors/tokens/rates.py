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


class LatencyWindows:
    """Each series' TTFT and TPOT histograms at the previous scrape, so every scrape
    yields the latency of the requests observed since: a cumulative histogram's quantile
    would describe the server's whole life, not what the GPUs' settings do now."""

    def __init__(self) -> None:
        self._last: dict[Hashable, tuple[Histogram | None, Histogram | None]] = {}

    def update(
        self, key: Hashable, series: TokenSeries
    ) -> tuple[float | None, float | None, float | None]:
        """(TTFT quantile, TPOT quantile, observations) since the previous update of
        ``key``; None where the server has no such histogram, on the first scrape, and
        where nothing was observed in between."""
        previous = self._last.get(key, (None, None))
        self._last[key] = (series.ttft_seconds, series.tpot_seconds)
        windows = [
            cur.since(old) if cur is not None and old is not None else None
            for cur, old in zip((series.ttft_seconds, series.tpot_seconds), previous, strict=True)
        ]
        ttft, tpot = (w.quantile(LATENCY_QUANTILE) if w is not None else None for w in windows)
        counted = [w.count for w in reversed(windows) if w is not None and w.count > 0]
        return ttft, tpot, counted[0] if counted else None

    def forget(self, key: Hashable) -> None:
        self._last.pop(key, None)
