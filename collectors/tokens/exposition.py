"""Prometheus text exposition to an index of samples by metric name.

``prometheus_client.parser`` does the tokenising; this module only makes its
output safe to consume:

- the parser is lax and lazy: errors surface as bare ``ValueError`` (sometimes
  with an empty message) while iterating, so every failure is turned into a
  ``TokenSourceError`` that names the offending line;
- it renames counters: the family of ``foo_total`` is called ``foo``, and a
  counter exposed *without* ``_total`` (TGI's ``tgi_request_success``) has
  ``_total`` appended to its samples. The index keeps the sample names and adds
  the family name as an alias, so a metric can be looked up by the name the
  server documents whichever way it was written;
- metric names with ``:`` (``vllm:``, ``sglang:``, ``llamacpp:``) are legal
  legacy names and come through unchanged (checked with prometheus_client 0.26);
- a page cut off mid-line still parses whenever the cut leaves a valid number
  (``27453.0`` cut to ``274``), so a page whose last line has no newline is
  refused as truncated: the format requires a final line feed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from .model import Histogram, TokenSourceError

_MAX_QUOTED_LINE = 120


@dataclass(frozen=True)
class PageSample:
    """One sample line, with the value already a float."""

    name: str
    labels: dict[str, str]
    value: float


class MetricIndex:
    """Samples of one page, looked up by exposed metric name."""

    def __init__(self) -> None:
        self._by_name: dict[str, list[PageSample]] = {}
        self._count = 0

    def add(self, sample: PageSample, *aliases: str) -> None:
        """Index ``sample`` under its own name and under each alias (a counter's family name)."""
        for name in (sample.name, *aliases):
            self._by_name.setdefault(name, []).append(sample)
        self._count += 1

    def get(self, name: str) -> list[PageSample]:
        """Every sample exposed under ``name`` (empty when the page lacks it)."""
        return self._by_name.get(name, [])

    def has(self, name: str) -> bool:
        return name in self._by_name

    def names(self) -> Iterable[str]:
        return self._by_name.keys()

    @property
    def sample_count(self) -> int:
        return self._count


def _quote(line: str) -> str:
    line = line.strip()
    if len(line) > _MAX_QUOTED_LINE:
        line = line[:_MAX_QUOTED_LINE] + "..."
    return repr(line)


def _locate_bad_line(text: str) -> str:
    """Find the first line the parser rejects on its own.

    Only run after a failure, so a clean page pays nothing for it. A line that
    parses alone but not in context (a sample that contradicts its TYPE) falls
    through to the generic message.
    """
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            for _ in text_string_to_metric_families(line + "\n"):
                pass
        except Exception:
            return f"line {number}: cannot parse {_quote(line)}"
    return "the parser rejected the page"


def _families(text: str) -> Iterator[tuple[str, str, list[Sample]]]:
    for family in text_string_to_metric_families(text):
        yield family.name, family.type, family.samples


def parse_exposition(text: str) -> MetricIndex:
    """Parse a whole page, or raise ``TokenSourceError`` saying what is wrong with it."""
    if not text.strip():
        raise TokenSourceError("empty page: no metrics at all")
    if not text.endswith("\n"):
        last = text.rsplit("\n", 1)[-1]
        raise TokenSourceError(
            f"truncated page: the last line has no newline, cut off at {_quote(last)}"
        )
    index = MetricIndex()
    try:
        for family_name, family_type, samples in _families(text):
            for sample in samples:
                value = float(sample.value)
                page_sample = PageSample(sample.name, dict(sample.labels), value)
                if family_type == "counter" and family_name != sample.name:
                    index.add(page_sample, family_name)
                else:
                    index.add(page_sample)
    except Exception as exc:  # the parser raises bare ValueErrors, and worse on odd input
        detail = str(exc).strip()
        where = _locate_bad_line(text)
        message = f"malformed exposition text: {where}"
        if detail and detail not in where:
            message += f" ({detail})"
        raise TokenSourceError(message) from exc
    if index.sample_count == 0:
        raise TokenSourceError("empty page: comments only, no samples")
    return index


def _parse_le(raw: str | None) -> float:
    if raw is None:
        raise ValueError("bucket without an 'le' label")
    return float(raw)  # float() reads "+Inf" as well


def build_histogram(
    buckets: list[tuple[str | None, float]],
    sum_value: float | None,
    count_value: float | None,
    what: str,
    errors: list[str],
    notes: list[str],
) -> Histogram | None:
    """Assemble and check one histogram; ``None`` (with an error) when it cannot be trusted.

    A missing ``+Inf`` bucket is rebuilt from ``_count`` (they are equal by
    definition) and a missing ``_sum`` becomes NaN, each with a note, because
    documentation excerpts and some exporters omit them while the buckets are
    still good for quantiles.
    """
    try:
        pairs = sorted((_parse_le(le), value) for le, value in buckets)
    except ValueError as exc:
        errors.append(f"{what}: bad bucket bound ({exc}); histogram dropped")
        return None
    if len({le for le, _ in pairs}) != len(pairs):
        errors.append(f"{what}: duplicate bucket bounds; histogram dropped")
        return None
    if any(math.isnan(value) for _, value in pairs):
        errors.append(f"{what}: NaN bucket count; histogram dropped")
        return None
    if any(later < earlier for (_, earlier), (_, later) in itertools.pairwise(pairs)):
        errors.append(f"{what}: cumulative bucket counts decrease; histogram dropped")
        return None
    has_inf = bool(pairs) and math.isinf(pairs[-1][0])
    if count_value is None and not has_inf:
        errors.append(f"{what}: neither _count nor a +Inf bucket; histogram dropped")
        return None
    if count_value is None:
        count_value = pairs[-1][1]
        notes.append(f"{what}: no _count on the page; taken from the +Inf bucket")
    if not has_inf:
        if pairs and pairs[-1][1] > count_value:
            errors.append(f"{what}: buckets exceed _count; histogram dropped")
            return None
        pairs.append((math.inf, count_value))
        notes.append(f"{what}: no +Inf bucket on the page; rebuilt from _count")
    elif pairs[-1][1] != count_value:
        errors.append(
            f"{what}: +Inf bucket {pairs[-1][1]:g} differs from _count {count_value:g}; "
            "histogram dropped"
        )
        return None
    if sum_value is None:
        sum_value = math.nan
        notes.append(f"{what}: no _sum on the page; sum is unknown (null in JSON)")
    return Histogram(buckets=tuple(pairs), sum=sum_value, count=count_value)
