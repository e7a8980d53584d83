"""The registry of token sources, one per inference-server kind (node_exporter style).

A kind module declares its metric names and registers itself with one decorator;
nothing else in the package lists the kinds, so adding a server is one new file
plus one import in ``__init__``. Detection asks every registered kind, in
priority order, whether the page carries its metric names: kinds that expose
real token counters come before those that do not, because a Triton server with
the vLLM backend shows both ``vllm:`` and ``nv_inference_`` names and the
``vllm:`` counters are the better source.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, TypeVar

from .exposition import MetricIndex
from .model import Histogram, TokenReading, TokenSeries, TokenSourceError
from .series import (
    HISTOGRAM_FIELDS,
    FieldValues,
    MetricMap,
    SeriesKey,
    first_present,
    histogram_by_series,
    histogram_names,
    scalar_by_series,
    scalar_refs,
)


class TokenSource:
    """What a server kind must say about itself; the extraction is shared.

    Subclasses set the class attributes and, where one field needs arithmetic
    across metrics (Triton's KV blocks used / max), override ``derive``.
    """

    kind: ClassVar[str] = ""
    detect_priority: ClassVar[int] = 100
    metrics_path: ClassVar[str] = "/metrics"
    prefixes: ClassVar[tuple[str, ...]] = ()
    signature_names: ClassVar[tuple[str, ...]] = ()
    metric_map: ClassVar[MetricMap]
    caveats: ClassVar[tuple[str, ...]] = ()

    def describe_signature(self) -> str:
        return " or ".join([*(f"{p}*" for p in self.prefixes), *self.signature_names])

    def matches(self, page: MetricIndex) -> bool:
        """Whether the page carries this kind's metric names at all."""
        if any(page.has(name) for name in self.signature_names):
            return True
        if not self.prefixes:
            return False
        return any(name.startswith(self.prefixes) for name in page.names())

    def derive(self, page: MetricIndex, errors: list[str], notes: list[str]) -> FieldValues:
        """Fields computed from several metrics; they win over the plain metric map."""
        return {}

    def extract(self, page: MetricIndex) -> TokenReading:
        """Group the page into series and fill every field the kind exposes."""
        errors: list[str] = []
        notes: list[str] = list(self.caveats)
        mm = self.metric_map
        identifying = mm.identifying_labels
        fields: FieldValues = {}
        missing: list[str] = []

        derived = self.derive(page, errors, notes)
        for field_name, refs in scalar_refs(mm).items():
            if field_name in derived:
                fields[field_name] = dict(derived[field_name])
                continue
            if not refs:
                continue
            chosen, samples = first_present(page, refs)
            if chosen is None:
                missing.append(f"{field_name} ({' / '.join(r.describe() for r in refs)})")
                continue
            fields[field_name] = dict(
                scalar_by_series(samples, chosen, identifying, field_name, errors)
            )
        for field_name, bases in histogram_names(mm).items():
            if field_name in derived:
                fields[field_name] = dict(derived[field_name])
                continue
            if not bases:
                continue
            base = next(
                (b for b in bases if page.has(f"{b}_bucket") or page.has(f"{b}_count")), None
            )
            if base is None:
                missing.append(f"{field_name} ({' / '.join(bases)})")
                continue
            fields[field_name] = dict(
                histogram_by_series(page, base, identifying, field_name, errors, notes)
            )

        keys: set[SeriesKey] = set()
        for values in fields.values():
            keys.update(values)
        if missing and keys:
            notes.append("not on this page: " + ", ".join(missing))
        if not keys:
            notes.append(f"no {self.kind} token, load or latency metric on this page, so no series")
        series = tuple(self._series(key, fields) for key in sorted(keys))
        return TokenReading(kind=self.kind, series=series, errors=tuple(errors), notes=tuple(notes))

    def _series(self, key: SeriesKey, fields: FieldValues) -> TokenSeries:
        labels = dict(key)
        model_label = self.metric_map.model_label
        model = labels.get(model_label, "") if model_label else ""

        def scalar(name: str) -> float | None:
            value = fields.get(name, {}).get(key)
            return value if isinstance(value, float) else None

        def histogram(name: str) -> Histogram | None:
            value = fields.get(name, {}).get(key)
            return value if isinstance(value, Histogram) else None

        ttft, tpot = (histogram(name) for name in HISTOGRAM_FIELDS)
        return TokenSeries(
            model=model,
            labels=labels,
            prompt_tokens_total=scalar("prompt_tokens_total"),
            generation_tokens_total=scalar("generation_tokens_total"),
            requests_total=scalar("requests_total"),
            requests_running=scalar("requests_running"),
            requests_waiting=scalar("requests_waiting"),
            kv_cache_usage_ratio=scalar("kv_cache_usage_ratio"),
            ttft_seconds=ttft,
            tpot_seconds=tpot,
        )


_SOURCES: dict[str, TokenSource] = {}

T = TypeVar("T", bound=type[TokenSource])


def register(
    kind: str, *, detect_priority: int, metrics_path: str = "/metrics"
) -> Callable[[T], T]:
    """Class decorator: make a token source known by ``kind`` (one call per module)."""

    def decorate(cls: T) -> T:
        if kind in _SOURCES:
            raise ValueError(f"token source kind {kind!r} registered twice")
        cls.kind = kind
        cls.detect_priority = detect_priority
        cls.metrics_path = metrics_path
        _SOURCES[kind] = cls()
        return cls

    return decorate


def get_source(kind: str) -> TokenSource:
    try:
        return _SOURCES[kind]
    except KeyError:
        known = ", ".join(registered_kinds())
        raise TokenSourceError(f"unknown server kind {kind!r} (known: auto, {known})") from None


def registered_kinds() -> tuple[str, ...]:
    """Kinds in detection order: the order in which ``auto`` tries them."""
    return tuple(source.kind for source in sources_by_priority())


def sources_by_priority() -> list[TokenSource]:
    return sorted(_SOURCES.values(), key=lambda source: source.detect_priority)
