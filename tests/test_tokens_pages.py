"""Token sources against real (and documentation-composed) metrics pages.

Expected numbers are read off the fixture pages by hand, not computed by the code
under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from wattkeeper.collectors.tokens import (
    KINDS,
    Histogram,
    TokenSeries,
    TokenSourceError,
    detect_kind,
    get_source,
    parse_page,
    probe,
    read_source,
)

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"


def page(name: str) -> str:
    return (FIXTURES / name).read_text()


def only_series(text: str, kind: str = "auto") -> TokenSeries:
    reading = parse_page(text, kind)
    assert len(reading.series) == 1
    return reading.series[0]


def test_every_fixture_keeps_its_source_header() -> None:
    for path in sorted(FIXTURES.glob("*.txt")):
        first = path.read_text().splitlines()[0]
        assert first.startswith(("# SOURCE", "# COMPOSED FROM DOCUMENTATION")), path.name


def test_kinds_are_the_six_servers() -> None:
    assert set(KINDS) == {"vllm", "sglang", "tgi", "triton", "nim", "llamacpp"}
    assert KINDS[0] == "vllm"  # token counters first in detection order
    assert get_source("nim").metrics_path == "/v1/metrics"
    assert get_source("vllm").metrics_path == "/metrics"


# --- real pages --------------------------------------------------------------------


def test_vllm_real_page() -> None:
    reading = parse_page(page("vllm_metrics.txt"))
    assert reading.kind == "vllm"
    assert reading.errors == ()
    (series,) = reading.series
    assert series.model == LLAMA_8B
    assert series.labels == {"model_name": LLAMA_8B}
    assert series.generation_tokens_total == 27453.0
    assert series.requests_running == 8.0
    # stop 1 + length 131 + abort 0
    assert series.requests_total == 132.0
    # elided from the docs excerpt
    assert series.prompt_tokens_total is None
    assert series.requests_waiting is None
    assert series.kv_cache_usage_ratio is None
    assert series.tpot_seconds is None
    ttft = series.ttft_seconds
    assert ttft is not None
    assert ttft.count == 140.0
    assert ttft.buckets[:4] == ((0.001, 0.0), (0.005, 0.0), (0.01, 0.0), (0.02, 13.0))
    assert ttft.buckets[-2] == (0.1, 140.0)
    assert ttft.buckets[-1] == (math.inf, 140.0)  # rebuilt from _count
    assert math.isnan(ttft.sum)  # the excerpt has no _sum
    notes = " ".join(reading.notes)
    assert "no +Inf bucket" in notes and "no _sum" in notes
    assert "prompt_tokens_total (vllm:prompt_tokens_total)" in notes


def test_sglang_real_page() -> None:
    reading = parse_page(page("sglang_metrics.txt"))
    assert reading.kind == "sglang"
    assert reading.errors == ()
    # func_latency_seconds{name="generate_request"} is not a model and makes no series
    (series,) = reading.series
    assert series.model == LLAMA_8B
    assert series.prompt_tokens_total == 8128902.0
    assert series.generation_tokens_total == 7557572.0
    assert series.requests_running == 162.0
    assert series.requests_waiting == 2826.0
    assert series.kv_cache_usage_ratio == 0.28
    assert series.requests_total is None  # no sglang:num_requests_total in this release
    ttft = series.ttft_seconds
    assert ttft is not None
    assert ttft.sum == pytest.approx(2351897.9474117756)
    assert ttft.count == 11008.0
    assert dict(ttft.buckets)[1.0] == 27.0
    assert dict(ttft.buckets)[30.0] == 2513.0
    assert ttft.buckets[-1] == (math.inf, 11008.0)
    tpot = series.tpot_seconds
    assert tpot is not None
    assert tpot.sum == pytest.approx(866964.5791549598)
    assert tpot.count == 7400757.0
    assert dict(tpot.buckets)[0.1] == 4950195.0


def test_llamacpp_real_page() -> None:
    reading = parse_page(page("llamacpp_metrics.txt"))
    assert reading.kind == "llamacpp"
    assert reading.errors == ()
    (series,) = reading.series
    assert series.model == ""
    assert series.labels == {}
    assert series.prompt_tokens_total == 6886.0
    assert series.generation_tokens_total == 3469.0
    assert series.requests_running == 0.0
    assert series.requests_waiting == 0.0
    assert series.kv_cache_usage_ratio == 0.491063
    assert series.requests_total is None
    assert series.ttft_seconds is None and series.tpot_seconds is None


def test_tgi_real_fragment_has_no_token_metrics() -> None:
    reading = parse_page(page("tgi_metrics.txt"))
    assert reading.kind == "tgi"
    assert reading.errors == ()
    # the fragment only has tgi_request_count and tgi_batch_inference_count
    assert reading.series == ()
    assert any("no token counters" in note for note in reading.notes)
    assert any("no series" in note for note in reading.notes)


# --- composed pages (marked as such in their headers) ------------------------------


def test_tgi_composed_page_uses_histogram_sums_as_token_counters() -> None:
    reading = parse_page(page("tgi_metrics_composed.txt"))
    assert reading.kind == "tgi"
    assert reading.errors == ()
    (series,) = reading.series
    assert series.prompt_tokens_total == 612352.0
    assert series.generation_tokens_total == 254120.0
    # exposed as a counter without _total: found under the documented name
    assert series.requests_total == 1000.0
    assert series.requests_running == 14.0
    assert series.requests_waiting == 3.0
    assert series.kv_cache_usage_ratio is None
    assert series.ttft_seconds is None
    assert series.tpot_seconds is not None
    assert series.tpot_seconds.sum == pytest.approx(27.43)
    assert series.tpot_seconds.count == 1000.0


def test_triton_composed_page() -> None:
    reading = parse_page(page("triton_trtllm_metrics.txt"))
    assert reading.kind == "triton"
    assert reading.errors == ()
    by_model = {series.model: series for series in reading.series}
    assert set(by_model) == {"ensemble", "preprocessing", "tensorrt_llm", "postprocessing"}
    trt = by_model["tensorrt_llm"]
    assert trt.labels == {"model": "tensorrt_llm", "version": "1"}
    assert trt.requests_total == 1204.0
    assert trt.requests_running == 8.0  # request_type="active"
    assert trt.requests_waiting == 3.0  # request_type="waiting"
    assert trt.kv_cache_usage_ratio == pytest.approx(3120 / 6240)
    for series in reading.series:
        assert series.prompt_tokens_total is None
        assert series.generation_tokens_total is None
    assert by_model["ensemble"].requests_total == 1204.0
    assert by_model["ensemble"].requests_running is None
    assert any("no token counters" in note for note in reading.notes)


def test_triton_kv_falls_back_to_fraction_without_block_counts() -> None:
    text = (
        "# TYPE nv_trt_llm_kv_cache_block_metrics gauge\n"
        'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="m",version="1"}'
        " 0.25\n"
    )
    assert only_series(text).kv_cache_usage_ratio == 0.25


def test_nim_composed_page() -> None:
    reading = parse_page(page("nim_metrics.txt"))
    assert reading.kind == "nim"
    assert reading.errors == ()
    (series,) = reading.series
    assert series.model == "meta/llama-3.1-8b-instruct"
    assert series.prompt_tokens_total == 1572864.0
    assert series.generation_tokens_total == 393216.0
    assert series.requests_total == 1536.0
    assert series.requests_running == 24.0
    assert series.requests_waiting == 5.0
    assert series.kv_cache_usage_ratio == 0.4125
    assert series.ttft_seconds is not None and series.ttft_seconds.count == 1536.0
    assert series.tpot_seconds is not None and series.tpot_seconds.sum == pytest.approx(3345.6)


# --- detection -----------------------------------------------------------------------

DETECT_CASES = [
    ("vllm_metrics.txt", "vllm"),
    ("sglang_metrics.txt", "sglang"),
    ("tgi_metrics.txt", "tgi"),
    ("tgi_metrics_composed.txt", "tgi"),
    ("triton_trtllm_metrics.txt", "triton"),
    ("nim_metrics.txt", "nim"),
    ("llamacpp_metrics.txt", "llamacpp"),
]


@pytest.mark.parametrize(("fixture", "kind"), DETECT_CASES)
def test_detect_kind_on_every_fixture(fixture: str, kind: str) -> None:
    assert detect_kind(page(fixture)) == kind
    assert parse_page(page(fixture), kind).kind == kind


def test_every_kind_has_a_fixture() -> None:
    assert {kind for _, kind in DETECT_CASES} == set(KINDS)


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ('vllm:num_requests_running{model_name="m"} 1\n', "vllm"),
        ('sglang:num_running_reqs{model_name="m"} 1\n', "sglang"),
        ("tgi_queue_size 1\n", "tgi"),
        ('nv_inference_request_success{model="m",version="1"} 1\n', "triton"),
        ('nv_trt_llm_request_metrics{model="m",request_type="active",version="1"} 1\n', "triton"),
        ("llamacpp:requests_processing 1\n", "llamacpp"),
        ('generation_tokens_total{model_name="m"} 1\n', "nim"),
    ],
)
def test_detect_kind_from_one_line(line: str, kind: str) -> None:
    assert detect_kind(line) == kind


def test_triton_with_vllm_backend_is_read_as_vllm() -> None:
    """Triton's vLLM backend shows both families; the vllm: token counters win."""
    text = (
        'nv_inference_request_success{model="vllm_model",version="1"} 10\n'
        'vllm:generation_tokens_total{model="vllm_model",version="1"} 500\n'
    )
    assert detect_kind(text) == "vllm"
    assert parse_page(text, "triton").series[0].requests_total == 10.0


def test_detect_kind_rejects_an_unrelated_page() -> None:
    with pytest.raises(TokenSourceError, match="no metric of a known inference server"):
        detect_kind("# TYPE node_load1 gauge\nnode_load1 0.5\n")


@pytest.mark.parametrize(
    ("fixture", "wrong_kind", "looks_like"),
    [
        ("sglang_metrics.txt", "vllm", "sglang"),
        ("vllm_metrics.txt", "sglang", "vllm"),
        ("llamacpp_metrics.txt", "tgi", "llamacpp"),
        ("triton_trtllm_metrics.txt", "nim", "triton"),
        ("nim_metrics.txt", "triton", "nim"),
        ("tgi_metrics.txt", "llamacpp", "tgi"),
    ],
)
def test_page_of_another_kind_is_an_error(fixture: str, wrong_kind: str, looks_like: str) -> None:
    with pytest.raises(TokenSourceError) as caught:
        parse_page(page(fixture), wrong_kind, source="http://node7:8000/metrics")
    message = str(caught.value)
    assert message.startswith("http://node7:8000/metrics: ")
    assert f"not a {wrong_kind} page" in message
    assert f"looks like a {looks_like} page" in message


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(TokenSourceError, match="unknown server kind 'ollama'"):
        parse_page(page("vllm_metrics.txt"), "ollama")


# --- several models and engines ------------------------------------------------------


def test_several_models_and_engines_are_separate_series() -> None:
    text = """\
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="llama-8b"} 100.0
vllm:generation_tokens_total{engine="1",model_name="llama-8b"} 250.0
vllm:generation_tokens_total{engine="0",model_name="qwen-7b"} 40.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama-8b"} 3.0
vllm:num_requests_running{engine="1",model_name="llama-8b"} 5.0
vllm:num_requests_running{engine="0",model_name="qwen-7b"} 1.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="llama-8b"} 0.5
vllm:gpu_cache_usage_perc{engine="1",model_name="llama-8b"} 0.75
vllm:gpu_cache_usage_perc{engine="0",model_name="qwen-7b"} 0.1
"""
    reading = parse_page(text, "vllm")
    got = {
        (s.model, s.labels["engine"]): (
            s.generation_tokens_total,
            s.requests_running,
            s.kv_cache_usage_ratio,
        )
        for s in reading.series
    }
    assert got == {
        ("llama-8b", "0"): (100.0, 3.0, 0.5),
        ("llama-8b", "1"): (250.0, 5.0, 0.75),
        ("qwen-7b", "0"): (40.0, 1.0, 0.1),
    }


def test_breakdown_labels_are_summed_and_replicas_collapsed() -> None:
    text = """\
sglang:num_requests_total{is_streaming="true",model_name="m"} 4
sglang:num_requests_total{is_streaming="false",model_name="m"} 3
sglang:num_running_reqs{dp_rank="0",model_name="m",tp_rank="0"} 5
sglang:num_running_reqs{dp_rank="0",model_name="m",tp_rank="1"} 5
sglang:num_running_reqs{dp_rank="1",model_name="m",tp_rank="0"} 2
sglang:num_running_reqs{dp_rank="1",model_name="m",tp_rank="1"} 2
sglang:token_usage{dp_rank="0",model_name="m"} 0.2
sglang:token_usage{dp_rank="1",model_name="m"} 0.7
"""
    series = only_series(text)
    assert series.requests_total == 7.0
    assert series.requests_running == 7.0  # dp ranks add up, tp replicas do not
    assert series.kv_cache_usage_ratio == 0.7  # the fullest engine


def test_old_vllm_names_are_fallbacks() -> None:
    text = """\
vllm:gpu_cache_usage_perc{model_name="m"} 0.3
vllm:time_per_output_token_seconds_bucket{le="0.05",model_name="m"} 2.0
vllm:time_per_output_token_seconds_bucket{le="+Inf",model_name="m"} 3.0
vllm:time_per_output_token_seconds_sum{model_name="m"} 0.2
vllm:time_per_output_token_seconds_count{model_name="m"} 3.0
"""
    series = only_series(text)
    assert series.kv_cache_usage_ratio == 0.3
    assert series.tpot_seconds == Histogram(
        buckets=((0.05, 2.0), (math.inf, 3.0)), sum=0.2, count=3.0
    )


# --- JSON ---------------------------------------------------------------------------


def test_series_to_json_is_strict_json() -> None:
    (series,) = parse_page(page("vllm_metrics.txt")).series
    data = series.to_json()
    assert list(data) == [
        "model",
        "labels",
        "prompt_tokens_total",
        "generation_tokens_total",
        "requests_total",
        "requests_running",
        "requests_waiting",
        "kv_cache_usage_ratio",
        "ttft_seconds",
        "tpot_seconds",
    ]
    assert data["ttft_seconds"]["sum"] is None  # NaN has no JSON spelling
    assert data["ttft_seconds"]["buckets"][-1] == ["+Inf", 140.0]
    json.dumps(data, allow_nan=False)


@pytest.mark.parametrize(("fixture", "kind"), DETECT_CASES)
def test_probe_shape(fixture: str, kind: str) -> None:
    result = probe(str(FIXTURES / fixture))
    assert list(result) == ["source", "kind", "series", "errors", "notes"]
    assert result["source"] == str(FIXTURES / fixture)
    assert result["kind"] == kind
    assert result["errors"] == []
    for series in result["series"]:
        for key in (
            "model",
            "prompt_tokens_total",
            "generation_tokens_total",
            "requests_running",
            "requests_waiting",
        ):
            assert key in series
    json.loads(json.dumps(result, allow_nan=False))


def test_probe_values_for_sglang() -> None:
    result = probe(str(FIXTURES / "sglang_metrics.txt"), "sglang")
    (series,) = result["series"]
    assert series["model"] == LLAMA_8B
    assert series["prompt_tokens_total"] == 8128902.0
    assert series["requests_waiting"] == 2826.0
    assert series["ttft_seconds"]["count"] == 11008.0


def test_read_source_on_a_file_matches_parse_page() -> None:
    path = FIXTURES / "llamacpp_metrics.txt"
    assert read_source(str(path)) == parse_page(path.read_text())
    assert read_source(f"file://{path}", "llamacpp").kind == "llamacpp"
