"""Bad pages and bad servers: each is one clear TokenSourceError naming the source.

The HTTP cases run against a real server on 127.0.0.1 (http.server in a thread),
so timeouts, byte caps and status codes go through httpx's real code paths.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from wattkeeper.collectors.tokens import (
    TokenSourceError,
    fetch_page,
    parse_page,
    probe,
    read_source,
)

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
VLLM_PAGE = (FIXTURES / "vllm_metrics.txt").read_text()
SLOW_S = 1.5


# --- text ----------------------------------------------------------------------------


def test_empty_page() -> None:
    for text in ("", "\n\n", "   \n"):
        with pytest.raises(TokenSourceError, match="empty page"):
            parse_page(text)


def test_comments_only_page() -> None:
    with pytest.raises(TokenSourceError, match="no samples"):
        parse_page("# HELP vllm:foo nothing\n# TYPE vllm:foo gauge\n")


def test_garbage_sample_line_names_the_line() -> None:
    text = VLLM_PAGE.replace(
        "# HELP vllm:generation_tokens_total",
        "this is not a metric\n# HELP vllm:generation_tokens_total",
    )
    with pytest.raises(TokenSourceError) as caught:
        parse_page(text, source="http://gpu3:8000/metrics")
    message = str(caught.value)
    assert message.startswith("http://gpu3:8000/metrics: malformed exposition text: line 7: ")
    assert "'this is not a metric'" in message
    assert "Traceback" not in message


@pytest.mark.parametrize(
    "bad_line",
    [
        "...",
        "$ curl http://0.0.0.0:8000/metrics",
        'vllm:num_requests_running{model_name="m"}',  # no value
        'vllm:num_requests_running{model_name="m"} eight',
        'vllm:num_requests_running{model_name="m} 1',  # unterminated label value
        "vllm:num_requests_running{model_name=m} 1",  # unquoted label value
        "<html><body>502 Bad Gateway</body></html>",
        '{"error": "not found"}',
        "# TYPE",
    ],
)
def test_malformed_lines(bad_line: str) -> None:
    with pytest.raises(TokenSourceError, match="malformed exposition text: line 1: "):
        parse_page(bad_line + "\n", "vllm")


def test_the_raw_calibration_page_with_elisions_is_malformed() -> None:
    raw = VLLM_PAGE.replace("# $ curl", "$ curl")
    with pytest.raises(TokenSourceError, match="line 3: cannot parse '\\$ curl"):
        parse_page(raw)


def test_truncated_page_cut_mid_line() -> None:
    cut = VLLM_PAGE.index("27453.0") + 3  # would otherwise parse as 274 tokens
    with pytest.raises(TokenSourceError, match=r"truncated page.*'vllm:generation_tokens_total"):
        parse_page(VLLM_PAGE[:cut], source="/tmp/page.txt")


def test_truncated_page_cut_mid_label() -> None:
    cut = VLLM_PAGE.index('model_name="meta-llama') + 15
    with pytest.raises(TokenSourceError, match="truncated page"):
        parse_page(VLLM_PAGE[:cut])


def test_truncated_histogram_is_dropped_with_an_error() -> None:
    """Cut at a line boundary inside a histogram: the page parses, the histogram does not."""
    text = """\
sglang:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 2.0
sglang:time_to_first_token_seconds_bucket{le="0.5",model_name="m"} 5.0
sglang:generation_tokens_total{model_name="m"} 10.0
"""
    reading = parse_page(text)
    (series,) = reading.series
    assert series.generation_tokens_total == 10.0
    assert series.ttft_seconds is None
    assert any("neither _count nor a +Inf bucket" in error for error in reading.errors)


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        (
            [
                'vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 5.0',
                'vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 3.0',
                'vllm:time_to_first_token_seconds_count{model_name="m"} 3.0',
            ],
            "cumulative bucket counts decrease",
        ),
        (
            [
                'vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 3.0',
                'vllm:time_to_first_token_seconds_count{model_name="m"} 4.0',
            ],
            "differs from _count",
        ),
        (
            [
                'vllm:time_to_first_token_seconds_bucket{le="soon",model_name="m"} 3.0',
                'vllm:time_to_first_token_seconds_count{model_name="m"} 3.0',
            ],
            "bad bucket bound",
        ),
    ],
)
def test_inconsistent_histograms_are_errors(lines: list[str], error: str) -> None:
    reading = parse_page("\n".join(lines) + "\n")
    assert reading.series[0].ttft_seconds is None
    assert any(error in message for message in reading.errors)


def test_bad_values_are_dropped_with_errors() -> None:
    text = """\
vllm:generation_tokens_total{model_name="m"} NaN
vllm:prompt_tokens_total{model_name="m"} -5
vllm:kv_cache_usage_perc{model_name="m"} 87.5
vllm:num_requests_running{model_name="m"} 2
"""
    reading = parse_page(text)
    (series,) = reading.series
    assert series.generation_tokens_total is None
    assert series.prompt_tokens_total is None
    assert series.kv_cache_usage_ratio is None
    assert series.requests_running == 2.0
    errors = " | ".join(reading.errors)
    assert "not a finite number" in errors
    assert "negative value -5" in errors
    assert "87.5 is outside 0-1" in errors


# --- files ----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(TokenSourceError, match=f"^{missing}: cannot read file"):
        read_source(str(missing))


def test_file_bigger_than_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    path.write_text(VLLM_PAGE)
    with pytest.raises(TokenSourceError, match="page too big: file exceeds max_bytes=100"):
        read_source(str(path), max_bytes=100)


def test_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "binary.txt"
    path.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(TokenSourceError, match="not utf-8 text"):
        read_source(str(path))


def test_errors_from_files_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sglang.txt"
    path.write_text((FIXTURES / "sglang_metrics.txt").read_text())
    with pytest.raises(TokenSourceError, match=f"^{path}: not a vllm page"):
        read_source(str(path), "vllm")


# --- HTTP -------------------------------------------------------------------------------

HUGE_BYTES = 5_000_000


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, *, length: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up on purpose (byte cap, timeout)

    def _route(self) -> None:
        if self.path == "/metrics":
            self._send(200, VLLM_PAGE.encode())
        elif self.path == "/v1/metrics":
            self._send(200, (FIXTURES / "nim_metrics.txt").read_bytes())
        elif self.path == "/slow":
            time.sleep(SLOW_S)
            self._send(200, VLLM_PAGE.encode())
        elif self.path == "/trickle":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for line in VLLM_PAGE.encode().splitlines(keepends=True):
                self.wfile.write(line)
                self.wfile.flush()
                time.sleep(0.05)
        elif self.path == "/huge":
            self._send(200, b"#" * HUGE_BYTES)
        elif self.path == "/huge-no-length":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = b"# padding\n" * 10_000
            for _ in range(HUGE_BYTES // len(chunk)):
                self.wfile.write(chunk)
        elif self.path == "/error":
            self._send(500, b"internal error\n")
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/metrics")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/truncated":
            self._send(200, VLLM_PAGE.encode()[:-20])
        else:
            self._send(404, b"not found\n")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_fetch_page_ok(server: str) -> None:
    assert fetch_page(f"{server}/metrics") == VLLM_PAGE


def test_fetch_page_with_a_shared_client(server: str) -> None:
    with httpx.Client() as client:
        for _ in range(3):
            assert fetch_page(f"{server}/metrics", client=client) == VLLM_PAGE


def test_read_source_over_http(server: str) -> None:
    reading = read_source(f"{server}/metrics")
    assert reading.kind == "vllm"
    assert reading.series[0].generation_tokens_total == 27453.0
    nim = read_source(f"{server}/v1/metrics", "nim")
    assert nim.series[0].generation_tokens_total == 393216.0


def test_redirect_is_followed(server: str) -> None:
    assert fetch_page(f"{server}/redirect") == VLLM_PAGE


def test_slow_server_times_out(server: str) -> None:
    url = f"{server}/slow"
    started = time.monotonic()
    with pytest.raises(TokenSourceError, match=r"timed out after 0.3 s") as caught:
        fetch_page(url, timeout_s=0.3)
    assert time.monotonic() - started < SLOW_S
    assert str(caught.value).startswith(f"{url}: ")


def test_trickling_server_is_cut_off_at_the_deadline(server: str) -> None:
    with pytest.raises(TokenSourceError, match="timed out"):
        fetch_page(f"{server}/trickle", timeout_s=0.3)


def test_page_over_max_bytes_by_content_length(server: str) -> None:
    url = f"{server}/huge"
    with pytest.raises(TokenSourceError, match="page too big: Content-Length 5000000") as caught:
        fetch_page(url, max_bytes=1_000_000)
    assert str(caught.value).startswith(f"{url}: ")


def test_page_over_max_bytes_while_streaming(server: str) -> None:
    with pytest.raises(
        TokenSourceError, match="more than max_bytes=1000000 bytes, stopped reading"
    ):
        fetch_page(f"{server}/huge-no-length", max_bytes=1_000_000)


def test_http_500(server: str) -> None:
    url = f"{server}/error"
    with pytest.raises(TokenSourceError, match=r"HTTP 500 Internal Server Error") as caught:
        fetch_page(url)
    assert str(caught.value).startswith(f"{url}: ")


def test_http_404(server: str) -> None:
    with pytest.raises(TokenSourceError, match="HTTP 404"):
        read_source(f"{server}/nothing-here")


def test_truncated_response_over_http(server: str) -> None:
    url = f"{server}/truncated"
    with pytest.raises(TokenSourceError, match=f"^{url}: truncated page"):
        read_source(url)


def test_connection_refused() -> None:
    with pytest.raises(TokenSourceError, match=r"^http://127.0.0.1:9/metrics: cannot connect"):
        fetch_page("http://127.0.0.1:9/metrics", timeout_s=1.0)


def test_invalid_limits_are_programming_errors() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        fetch_page("http://127.0.0.1:9/metrics", timeout_s=0)
    with pytest.raises(ValueError, match="max_bytes"):
        read_source("/dev/null", max_bytes=0)


# --- probe never raises for a bad page ----------------------------------------------------


def test_probe_reports_errors_instead_of_raising(server: str, tmp_path: Path) -> None:
    cases = {
        f"{server}/error": "HTTP 500",
        f"{server}/huge": "page too big",
        f"{server}/truncated": "truncated page",
        str(tmp_path / "missing.txt"): "cannot read file",
    }
    for source, problem in cases.items():
        result = probe(source, timeout_s=0.5, max_bytes=1_000_000)
        assert result["source"] == source
        assert result["kind"] is None
        assert result["series"] == []
        assert result["notes"] == []
        (error,) = result["errors"]
        assert error.startswith(f"{source}: ") and problem in error


def test_probe_of_a_slow_server(server: str) -> None:
    result = probe(f"{server}/slow", timeout_s=0.3)
    assert result["kind"] is None
    assert "timed out" in result["errors"][0]


def test_probe_of_the_wrong_kind(server: str) -> None:
    result = probe(f"{server}/metrics", "sglang")
    assert result["kind"] is None
    assert "not a sglang page" in result["errors"][0]
    assert "looks like a vllm page" in result["errors"][0]


def test_duplicate_series_is_an_error() -> None:
    text = (
        'vllm:num_requests_running{model_name="m"} 1\nvllm:num_requests_running{model_name="m"} 2\n'
    )
    reading = parse_page(text)
    assert reading.series[0].requests_running is None
    assert any("appears twice" in error for error in reading.errors)
