"""Read a metrics page as one server kind: detection and the kind check.

Asking for the wrong kind is an error rather than an empty reading, because an
agent configured with ``kind: vllm`` in front of an SGLang server would
otherwise report zero tokens/s forever and the controller would treat the node
as idle.
"""

from __future__ import annotations

from .exposition import MetricIndex, parse_exposition
from .model import TokenReading, TokenSourceError
from .registry import get_source, sources_by_priority


def _detect(page: MetricIndex) -> str | None:
    for source in sources_by_priority():
        if source.matches(page):
            return source.kind
    return None


def _unknown_page_message() -> str:
    signatures = "; ".join(
        f"{source.kind}: {source.describe_signature()}" for source in sources_by_priority()
    )
    return f"no metric of a known inference server on this page (looked for {signatures})"


def detect_kind(text: str, *, source: str | None = None) -> str:
    """The server kind whose metric names the page carries; raises when none fits."""
    try:
        page = parse_exposition(text)
        kind = _detect(page)
        if kind is None:
            raise TokenSourceError(_unknown_page_message())
    except TokenSourceError as exc:
        if source is None:
            raise
        raise exc.with_source(source) from exc.__cause__
    return kind


def parse_page(text: str, kind: str = "auto", *, source: str | None = None) -> TokenReading:
    """Parse ``text`` as a page of ``kind`` ("auto" detects it).

    Raises ``TokenSourceError`` for malformed, truncated or empty text, an unknown
    kind, or a page that belongs to another kind. ``source`` only names the page
    in error messages.
    """
    try:
        if kind != "auto":
            token_source = get_source(kind)  # unknown kind fails before parsing
        page = parse_exposition(text)
        if kind == "auto":
            detected = _detect(page)
            if detected is None:
                raise TokenSourceError(_unknown_page_message())
            token_source = get_source(detected)
        elif not token_source.matches(page):
            looks_like = _detect(page)
            hint = f"; it looks like a {looks_like} page" if looks_like else ""
            raise TokenSourceError(
                f"not a {kind} page: no {token_source.describe_signature()} metrics{hint}"
            )
        return token_source.extract(page)
    except TokenSourceError as exc:
        if source is None:
            raise
        raise exc.with_source(source) from exc.__cause__
