"""Token-page parser throughput: how many pages per second one agent core can read.

An agent scrapes every inference server on its node on each tick; this says
whether parsing could ever matter against a 1-15 s tick. Measured on the vLLM
fixture page (the real docs excerpt, about 2 KB) and, because real vLLM pages
are far longer (every histogram, every engine), on a generated full-size page
with 4 models x 2 engines and complete histograms. A number, not a pass/fail.

Run: ``.venv/bin/python bench/bench_parser.py [--seconds 2]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from wattkeeper.collectors.tokens import parse_page

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "metrics"
BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
HISTOGRAMS = (
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
)


def full_size_page(models: int = 4, engines: int = 2) -> str:
    """A vLLM-shaped page of realistic length: counters, gauges and six histograms each."""
    lines: list[str] = []
    label_sets = [
        f'engine="{e}",model_name="model-{m}"' for m in range(models) for e in range(engines)
    ]
    for name, kind in (
        ("vllm:prompt_tokens_total", "counter"),
        ("vllm:generation_tokens_total", "counter"),
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
    ):
        lines += [f"# HELP {name} {name}.", f"# TYPE {name} {kind}"]
        lines += [
            f"{name}{{{labels}}} {0.5 if 'perc' in name else 1234.0}" for labels in label_sets
        ]
    lines += ["# TYPE vllm:request_success_total counter"]
    for labels in label_sets:
        for reason in ("stop", "length", "abort"):
            lines.append(f'vllm:request_success_total{{finished_reason="{reason}",{labels}}} 10.0')
    for name in HISTOGRAMS:
        lines += [f"# HELP {name} {name}.", f"# TYPE {name} histogram"]
        for labels in label_sets:
            for i, le in enumerate(BUCKETS):
                lines.append(f'{name}_bucket{{le="{le}",{labels}}} {float(i * 10)}')
            lines.append(f'{name}_bucket{{le="+Inf",{labels}}} 200.0')
            lines.append(f"{name}_sum{{{labels}}} 31.5")
            lines.append(f"{name}_count{{{labels}}} 200.0")
    return "\n".join(lines) + "\n"


def pages_per_second(text: str, seconds: float) -> tuple[float, int]:
    """Repeat ``parse_page`` for about ``seconds``; (pages/s, pages parsed)."""
    parse_page(text, "vllm")  # warm-up: imports, regex compilation
    done = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(20):
            parse_page(text, "vllm")
        done += 20
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - started), done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per page (default 2)")
    args = parser.parse_args()
    pages = {
        "vllm_metrics.txt (fixture)": (FIXTURE / "vllm_metrics.txt").read_text(),
        "generated full-size vLLM page": full_size_page(),
    }
    for label, text in pages.items():
        rate, done = pages_per_second(text, args.seconds)
        print(
            f"{label}: {rate:,.0f} pages/s "
            f"({1e6 / rate:,.0f} us/page, {len(text.encode()):,} bytes, "
            f"{text.count(chr(10)):,} lines, {done:,} pages)"
        )


if __name__ == "__main__":
    main()
