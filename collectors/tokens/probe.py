"""``wattkeeper probe``: read one source and describe it as JSON.

The probe is how an operator checks a server before pointing an agent at it, so
it never raises for a bad page or an unreachable server: the reason goes into
``errors`` and ``kind`` is ``null`` when no reading could be made.
"""

from __future__ import annotations

from typing import Any

import httpx

from .fetch import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT_S, read_source
from .model import TokenSourceError


def probe(
    source: str,
    kind: str = "auto",
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    client: httpx.Client | None = None,
) -> dict[str, Any]:
    """``{"source", "kind", "series": [TokenSeries.to_json()...], "errors", "notes"}``."""
    try:
        reading = read_source(source, kind, timeout_s=timeout_s, max_bytes=max_bytes, client=client)
    except TokenSourceError as exc:
        return {"source": source, "kind": None, "series": [], "errors": [str(exc)], "notes": []}
    return {
        "source": source,
        "kind": reading.kind,
        "series": [series.to_json() for series in reading.series],
        "errors": list(reading.errors),
        "notes": list(reading.notes),
    }
