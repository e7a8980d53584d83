"""NVIDIA NIM for LLMs (``/v1/metrics``).

NIM exposes vLLM's metric set without the ``vllm:`` prefix (NIM observability
docs): ``prompt_tokens_total``, ``generation_tokens_total``,
``num_requests_running``/``_waiting``, ``gpu_cache_usage_perc`` (0-1, "1 means
100 percent usage"), ``time_to_first_token_seconds``,
``time_per_output_token_seconds``, ``request_success_total`` (finish reason
stop or length). Detected by its unprefixed token counters.
"""

from __future__ import annotations

from .registry import TokenSource, register
from .series import MetricMap, ref


@register("nim", detect_priority=50, metrics_path="/v1/metrics")
class NimSource(TokenSource):
    signature_names = (
        "generation_tokens_total",
        "prompt_tokens_total",
        "num_requests_running",
        "num_requests_waiting",
        "gpu_cache_usage_perc",
    )
    metric_map = MetricMap(
        identifying_labels=("model_name",),
        model_label="model_name",
        prompt_tokens=(ref("prompt_tokens_total"),),
        generation_tokens=(ref("generation_tokens_total"),),
        requests_total=(ref("request_success_total"),),
        requests_running=(ref("num_requests_running"),),
        requests_waiting=(ref("num_requests_waiting"),),
        kv_cache_usage=(ref("gpu_cache_usage_perc"),),
        ttft=("time_to_first_token_seconds",),
        tpot=("inter_token_latency_seconds", "time_per_output_token_seconds"),
    )
