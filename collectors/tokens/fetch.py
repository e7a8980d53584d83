"""Getting a page from a server (or a file) without letting the server hurt the agent.

The agent scrapes on its control tick; a server that hangs, streams without
end, or answers with an error page must cost at most a bounded wait and a
bounded amount of memory, and must come back as one ``TokenSourceError`` that
names the endpoint, never as an httpx exception the agent would have to know.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from .model import TokenReading, TokenSourceError
from .page import parse_page

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_MAX_BYTES = 4_000_000

# Ask for the classic text format: servers built on prometheus_client negotiate
# and would otherwise be free to answer in OpenMetrics.
_ACCEPT = "text/plain;version=0.0.4;q=1.0,*/*;q=0.1"


def _check_limits(timeout_s: float, max_bytes: int) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes!r}")


def _decode(body: bytes, encoding: str | None, source: str) -> str:
    try:
        return body.decode(encoding or "utf-8")
    except (UnicodeDecodeError, LookupError) as exc:
        raise TokenSourceError(f"page is not {encoding or 'utf-8'} text ({exc})", source) from exc


def fetch_page(
    url: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    client: httpx.Client | None = None,
) -> str:
    """GET a metrics page, streaming, and stop at ``max_bytes`` or after ``timeout_s``.

    ``timeout_s`` bounds connecting and each read, and the body as a whole is cut
    off at the first chunk that arrives after it, so a server trickling bytes
    cannot hold the agent much longer than that. ``max_bytes`` counts decoded
    bytes, so a compressed response cannot inflate past it. Pass ``client`` to
    reuse connections across scrapes; its own timeouts are overridden.
    """
    _check_limits(timeout_s, max_bytes)
    own_client = client is None
    http = client if client is not None else httpx.Client()
    deadline = time.monotonic() + timeout_s
    try:
        with http.stream(
            "GET",
            url,
            headers={"Accept": _ACCEPT},
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=True,
        ) as response:
            if response.status_code != 200:
                raise TokenSourceError(
                    f"HTTP {response.status_code} {response.reason_phrase}".rstrip(), url
                )
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise TokenSourceError(
                    f"page too big: Content-Length {int(declared)} bytes exceeds "
                    f"max_bytes={max_bytes}",
                    url,
                )
            chunks: list[bytes] = []
            received = 0
            for chunk in response.iter_bytes():
                received += len(chunk)
                if received > max_bytes:
                    raise TokenSourceError(
                        f"page too big: more than max_bytes={max_bytes} bytes, stopped reading",
                        url,
                    )
                if time.monotonic() > deadline:
                    raise TokenSourceError(
                        f"timed out: body not complete after {timeout_s:g} s", url
                    )
                chunks.append(chunk)
            return _decode(b"".join(chunks), response.charset_encoding, url)
    except httpx.TimeoutException as exc:
        raise TokenSourceError(
            f"timed out after {timeout_s:g} s ({type(exc).__name__})", url
        ) from exc
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise TokenSourceError(f"invalid URL ({exc})", url) from exc
    except httpx.ConnectError as exc:
        raise TokenSourceError(f"cannot connect ({exc})", url) from exc
    except httpx.HTTPError as exc:
        raise TokenSourceError(f"HTTP error: {type(exc).__name__}: {exc}", url) from exc
    finally:
        if own_client:
            http.close()


def _read_file(path_text: str, max_bytes: int) -> str:
    path = Path(path_text.removeprefix("file://"))
    try:
        with path.open("rb") as handle:
            # read one byte past the cap rather than trusting st_size: /proc files say 0
            body = handle.read(max_bytes + 1)
    except OSError as exc:
        raise TokenSourceError(f"cannot read file: {exc.strerror or exc}", path_text) from exc
    if len(body) > max_bytes:
        raise TokenSourceError(f"page too big: file exceeds max_bytes={max_bytes}", path_text)
    return _decode(body, "utf-8", path_text)


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def read_source(
    source: str,
    kind: str = "auto",
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    client: httpx.Client | None = None,
) -> TokenReading:
    """Read and parse one source: an ``http(s)://`` URL, or a file path (a saved page).

    Files make the same code path testable and let an operator check a captured
    page with ``wattkeeper probe``; only ``max_bytes`` applies to them.
    """
    if is_url(source):
        text = fetch_page(source, timeout_s=timeout_s, max_bytes=max_bytes, client=client)
    else:
        _check_limits(timeout_s, max_bytes)
        text = _read_file(source, max_bytes)
    return parse_page(text, kind, source=source)
