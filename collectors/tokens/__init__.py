"""Token sources: read inference servers' metrics pages as token counters, load and latency.

One module per server kind registers itself in ``registry``; importing this
package imports them all. ``KINDS`` lists them in detection order. Everything the
agent and the CLI need is re-exported here.
"""

from __future__ import annotations

from . import llamacpp, nim, sglang, tgi, triton, vllm  # noqa: F401  (registration)
from .fetch import fetch_page, read_source
from .model import Histogram, TokenReading, TokenSeries, TokenSourceError
from .page import detect_kind, parse_page
from .probe import probe
from .rates import CounterRate, LatencyWindow, LatencyWindows
from .registry import get_source, register, registered_kinds

KINDS: tuple[str, ...] = registered_kinds()

__all__ = [
    "KINDS",
    "CounterRate",
    "Histogram",
    "LatencyWindow",
    "LatencyWindows",
    "TokenReading",
    "TokenSeries",
    "TokenSourceError",
    "detect_kind",
    "fetch_page",
    "get_source",
    "parse_page",
    "probe",
    "read_source",
    "register",
]
