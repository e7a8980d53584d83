"""Values that cross from the token scrapers into the agent, the store and the CLI.

Every server kind is reduced to the same few numbers (token counters, load gauges,
latency histograms) so that nothing above this package needs to know which server
produced them. A number a server does not expose is ``None``, never a zero that
would look like a measurement; what could not be read, or can only be read
approximately, is said in ``errors`` and ``notes`` rather than hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


class TokenSourceError(Exception):
    """Why a page could not be read at all: the agent reports it and keeps running.

    The message always starts with the source (URL or path) when it is known, so a
    log line or the CLI's error output says which server misbehaved without context.
    """

    def __init__(self, problem: str, source: str | None = None) -> None:
        self.problem = problem
        self.source = source
        super().__init__(f"{source}: {problem}" if source else problem)

    def with_source(self, source: str) -> TokenSourceError:
        """The same problem, named after the endpoint; parsing does not know the URL."""
        if self.source is not None:
            return self
        error = TokenSourceError(self.problem, source)
        error.__cause__ = self.__cause__
        return error


def _json_number(value: float | None) -> float | None:
    """NaN has no JSON spelling; ``null`` says the same thing (no usable value)."""
    if value is None or math.isnan(value):
        return None
    return value


@dataclass(frozen=True)
class Histogram:
    """A cumulative Prometheus histogram as the server exposed it.

    Kept as buckets rather than a mean because latency SLOs are quantiles, and
    quantiles over a window need bucket differences between two scrapes.
    ``buckets`` always ends with the ``+Inf`` bucket. ``sum`` is NaN when the page
    did not carry ``_sum`` (the parser says so in the reading's notes).
    """

    buckets: tuple[tuple[float, float], ...]
    sum: float
    count: float

    def since(self, earlier: Histogram) -> Histogram | None:
        """What was observed between ``earlier`` and this scrape, or None when the two
        cannot be subtracted: the bucket bounds changed, or a counter went down (the
        server restarted), in which case this scrape's own totals are the window."""
        if [le for le, _ in earlier.buckets] != [le for le, _ in self.buckets]:
            return None
        pairs = zip(self.buckets, earlier.buckets, strict=True)
        counts = [(le, c - c0) for (le, c), (_, c0) in pairs]
        if any(c < 0 for _, c in counts) or self.count < earlier.count:
            return self
        return Histogram(tuple(counts), self.sum - earlier.sum, self.count - earlier.count)

    def quantile_floor(self, q: float) -> float | None:
        """The lower bound of the bucket the ``q`` quantile falls in: what the buckets
        prove. At or above an SLO it means more than ``1 - q`` of the observations
        missed it; an interpolated quantile above the SLO may only be the bucket's
        width (SGLang's 50-75 ms bucket around a 60 ms SLO)."""
        total = self.buckets[-1][1] if self.buckets else 0.0
        if total <= 0:
            return None
        rank = q * total
        lower_le = 0.0
        for le, count in self.buckets:
            if count >= rank:
                return lower_le
            lower_le = le
        return lower_le

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile as Prometheus's ``histogram_quantile`` estimates it: linear
        within the bucket it falls in; the highest finite bound when it falls in the
        ``+Inf`` bucket; None without observations."""
        total = self.buckets[-1][1] if self.buckets else 0.0
        if total <= 0:
            return None
        rank = q * total
        lower_le, lower_count = 0.0, 0.0
        for le, count in self.buckets:
            if count >= rank:
                if not math.isfinite(le):
                    return lower_le
                if count == lower_count:
                    return le
                return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
            lower_le, lower_count = le, count
        return lower_le

    def to_json(self) -> dict[str, Any]:
        """Strict JSON: ``+Inf`` is written as the string ``"+Inf"``, as Prometheus spells it."""
        return {
            "sum": _json_number(self.sum),
            "count": self.count,
            "buckets": [[le if math.isfinite(le) else "+Inf", count] for le, count in self.buckets],
        }


@dataclass(frozen=True)
class TokenSeries:
    """One model (or one engine of a model) on one server.

    Several models or data-parallel engines behind one endpoint burn power on
    different GPUs, so they are kept apart by their identifying labels instead of
    being summed into one number.
    """

    model: str
    labels: dict[str, str] = field(hash=False)
    prompt_tokens_total: float | None
    generation_tokens_total: float | None
    requests_total: float | None
    requests_running: float | None
    requests_waiting: float | None
    kv_cache_usage_ratio: float | None
    ttft_seconds: Histogram | None
    tpot_seconds: Histogram | None

    def to_json(self) -> dict[str, Any]:
        """The per-series part of the ``wattkeeper probe -o json`` contract."""
        return {
            "model": self.model,
            "labels": dict(self.labels),
            "prompt_tokens_total": _json_number(self.prompt_tokens_total),
            "generation_tokens_total": _json_number(self.generation_tokens_total),
            "requests_total": _json_number(self.requests_total),
            "requests_running": _json_number(self.requests_running),
            "requests_waiting": _json_number(self.requests_waiting),
            "kv_cache_usage_ratio": _json_number(self.kv_cache_usage_ratio),
            "ttft_seconds": self.ttft_seconds.to_json() if self.ttft_seconds else None,
            "tpot_seconds": self.tpot_seconds.to_json() if self.tpot_seconds else None,
        }


@dataclass(frozen=True)
class TokenReading:
    """Everything one scrape of one server yielded, including what was wrong with it.

    ``errors`` are defects of the page (a histogram whose buckets go down, a
    negative counter): the affected value is dropped, the rest is still usable.
    ``notes`` are honest caveats about what the numbers mean for this server kind.
    """

    kind: str
    series: tuple[TokenSeries, ...]
    errors: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
