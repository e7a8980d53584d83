"""From an indexed page to per-model ``TokenSeries``: the part every server kind shares.

Each kind describes itself declaratively (a ``MetricMap``: which names, in order
of preference, hold each field, and which labels tell models apart); this module
does the grouping and aggregation once, the same way for all of them:

- samples are grouped into series by the kind's identifying labels (``model_name``,
  ``engine``, Triton's ``model``/``version``);
- other labels are breakdowns of one series (``finished_reason``, ``dp_rank``,
  ``is_streaming``) and are summed over, except that replica labels
  (``tp_rank``, ``pp_rank``, ...) carry copies of one value and are collapsed with
  ``max`` first, so tensor parallelism never multiplies a request count;
- a KV-cache ratio over several breakdowns takes the maximum: the fullest engine
  is the one about to preempt, which is what batch-size decisions must respect.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .exposition import MetricIndex, PageSample, build_histogram
from .model import Histogram

SeriesKey = tuple[tuple[str, str], ...]

REPLICA_LABELS: frozenset[str] = frozenset({"tp_rank", "pp_rank", "attn_tp_rank", "moe_ep_rank"})


@dataclass(frozen=True)
class Ref:
    """A metric name, optionally restricted to samples with given label values."""

    name: str
    match: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        if not self.match:
            return self.name
        selector = ",".join(f'{key}="{value}"' for key, value in self.match)
        return f"{self.name}{{{selector}}}"


def ref(name: str, **match: str) -> Ref:
    """``ref("nv_trt_llm_request_metrics", request_type="active")``."""
    return Ref(name, tuple(sorted(match.items())))


@dataclass(frozen=True)
class MetricMap:
    """Where one server kind keeps each field; empty tuples mean "never exposed"."""

    identifying_labels: tuple[str, ...]
    model_label: str | None
    prompt_tokens: tuple[Ref, ...] = ()
    generation_tokens: tuple[Ref, ...] = ()
    requests_total: tuple[Ref, ...] = ()
    requests_running: tuple[Ref, ...] = ()
    requests_waiting: tuple[Ref, ...] = ()
    kv_cache_usage: tuple[Ref, ...] = ()
    ttft: tuple[str, ...] = ()
    tpot: tuple[str, ...] = ()


COUNTER_FIELDS = ("prompt_tokens_total", "generation_tokens_total", "requests_total")
GAUGE_FIELDS = ("requests_running", "requests_waiting")
RATIO_FIELDS = ("kv_cache_usage_ratio",)
HISTOGRAM_FIELDS = ("ttft_seconds", "tpot_seconds")


def scalar_refs(metric_map: MetricMap) -> dict[str, tuple[Ref, ...]]:
    return {
        "prompt_tokens_total": metric_map.prompt_tokens,
        "generation_tokens_total": metric_map.generation_tokens,
        "requests_total": metric_map.requests_total,
        "requests_running": metric_map.requests_running,
        "requests_waiting": metric_map.requests_waiting,
        "kv_cache_usage_ratio": metric_map.kv_cache_usage,
    }


def histogram_names(metric_map: MetricMap) -> dict[str, tuple[str, ...]]:
    return {"ttft_seconds": metric_map.ttft, "tpot_seconds": metric_map.tpot}


def series_key(labels: dict[str, str], identifying: Iterable[str]) -> SeriesKey:
    return tuple((name, labels[name]) for name in identifying if name in labels)


def _selected(page: MetricIndex, reference: Ref) -> list[PageSample]:
    return [
        sample
        for sample in page.get(reference.name)
        if all(sample.labels.get(key) == value for key, value in reference.match)
    ]


def first_present(page: MetricIndex, refs: tuple[Ref, ...]) -> tuple[Ref | None, list[PageSample]]:
    """The first candidate the page has: newer names first, older names as fallback."""
    for reference in refs:
        samples = _selected(page, reference)
        if samples:
            return reference, samples
    return None, []


def _breakdown(labels: dict[str, str], ignore: set[str]) -> tuple[SeriesKey, SeriesKey]:
    rest = tuple(sorted((k, v) for k, v in labels.items() if k not in ignore))
    breakdown = tuple((k, v) for k, v in rest if k not in REPLICA_LABELS)
    replica = tuple((k, v) for k, v in rest if k in REPLICA_LABELS)
    return breakdown, replica


def scalar_by_series(
    samples: list[PageSample],
    reference: Ref,
    identifying: tuple[str, ...],
    field_name: str,
    errors: list[str],
) -> dict[SeriesKey, float | None]:
    """One value per series; ``None`` (with an error) where the page's value is unusable."""
    ignore = set(identifying) | {key for key, _ in reference.match}
    grouped: dict[SeriesKey, dict[SeriesKey, float]] = {}
    seen: set[SeriesKey] = set()
    duplicated: set[SeriesKey] = set()
    for sample in samples:
        key = series_key(sample.labels, identifying)
        full = tuple(sorted(sample.labels.items()))
        if full in seen:
            duplicated.add(key)
        seen.add(full)
        breakdown, _replica = _breakdown(sample.labels, ignore)
        per_key = grouped.setdefault(key, {})
        previous = per_key.get(breakdown)
        # replicas of one value: keep the largest rather than adding copies
        per_key[breakdown] = sample.value if previous is None else max(previous, sample.value)
    result: dict[SeriesKey, float | None] = {}
    for key, parts in grouped.items():
        values = list(parts.values())
        where = f"{reference.describe()}{_render_key(key)}"
        if key in duplicated:
            errors.append(f"{where}: the same series appears twice; {field_name} dropped")
            result[key] = None
            continue
        if any(math.isnan(value) or math.isinf(value) for value in values):
            errors.append(f"{where}: not a finite number; {field_name} dropped")
            result[key] = None
            continue
        if field_name in RATIO_FIELDS:
            value = max(values)
            if not 0.0 <= value <= 1.0:
                errors.append(
                    f"{where}: {value:g} is outside 0-1 for a usage ratio; {field_name} dropped"
                )
                result[key] = None
                continue
        else:
            value = math.fsum(values)
            if value < 0:
                errors.append(f"{where}: negative value {value:g}; {field_name} dropped")
                result[key] = None
                continue
        result[key] = value
    return result


@dataclass
class _HistogramParts:
    buckets: list[tuple[str | None, float]]
    sum: float | None = None
    count: float | None = None


def histogram_by_series(
    page: MetricIndex,
    base: str,
    identifying: tuple[str, ...],
    field_name: str,
    errors: list[str],
    notes: list[str],
) -> dict[SeriesKey, Histogram | None]:
    """Histograms per series, breakdowns summed bucket by bucket when their bounds agree."""
    parts: dict[SeriesKey, dict[SeriesKey, dict[SeriesKey, _HistogramParts]]] = {}
    ignore = set(identifying) | {"le"}

    def slot(sample: PageSample) -> _HistogramParts:
        key = series_key(sample.labels, identifying)
        breakdown, replica = _breakdown(sample.labels, ignore)
        by_breakdown = parts.setdefault(key, {}).setdefault(breakdown, {})
        return by_breakdown.setdefault(replica, _HistogramParts(buckets=[]))

    for sample in page.get(f"{base}_bucket"):
        slot(sample).buckets.append((sample.labels.get("le"), sample.value))
    for sample in page.get(f"{base}_sum"):
        slot(sample).sum = sample.value
    for sample in page.get(f"{base}_count"):
        slot(sample).count = sample.value

    result: dict[SeriesKey, Histogram | None] = {}
    for key, by_breakdown in parts.items():
        what = f"{base}{_render_key(key)}"
        built: list[Histogram] = []
        failed = False
        for by_replica in by_breakdown.values():
            candidates = [
                build_histogram(p.buckets, p.sum, p.count, what, errors, notes)
                for p in by_replica.values()
            ]
            usable = [h for h in candidates if h is not None]
            if len(usable) != len(candidates):
                failed = True
                break
            built.append(max(usable, key=lambda h: h.count))
        if failed or not built:
            result[key] = None
            continue
        merged = _merge_histograms(built)
        if merged is None:
            errors.append(f"{what}: breakdowns with different bucket bounds; {field_name} dropped")
        result[key] = merged
    return result


def _merge_histograms(histograms: list[Histogram]) -> Histogram | None:
    if len(histograms) == 1:
        return histograms[0]
    bounds = [le for le, _ in histograms[0].buckets]
    if any([le for le, _ in h.buckets] != bounds for h in histograms[1:]):
        return None
    buckets = tuple(
        (le, math.fsum(h.buckets[i][1] for h in histograms)) for i, le in enumerate(bounds)
    )
    return Histogram(
        buckets=buckets,
        sum=math.fsum(h.sum for h in histograms),
        count=math.fsum(h.count for h in histograms),
    )


def _render_key(key: SeriesKey) -> str:
    if not key:
        return ""
    return "{" + ",".join(f'{name}="{value}"' for name, value in key) + "}"


# field name -> series -> value; what extraction fills and what ``derive`` hooks return
FieldValues = dict[str, dict[SeriesKey, "float | Histogram | None"]]
