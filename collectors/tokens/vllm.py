"""vLLM (V1 engine, and the older V0 names as fallbacks).

Names from vLLM's ``docs/design/metrics.md`` and ``docs/usage/metrics.md``.
``vllm:kv_cache_usage_perc`` (V0: ``gpu_cache_usage_perc``) is a 0-1 fraction
despite its name: its HELP text reads "KV-cache usage. 1 means 100 percent
usage." ``vllm:request_success_total`` is split by ``finished_reason`` (stop,
length, abort, ...); every finished request costs energy, so the reasons are
summed. Data-parallel engines carry an ``engine`` label and stay separate series.
"""

from __future__ import annotations

from .registry import TokenSource, register
from .series import MetricMap, ref


@register("vllm", detect_priority=10)
class VllmSource(TokenSource):
    prefixes = ("vllm:",)
    metric_map = MetricMap(
        identifying_labels=("model_name", "engine"),
        model_label="model_name",
        prompt_tokens=(ref("vllm:prompt_tokens_total"),),
        generation_tokens=(ref("vllm:generation_tokens_total"),),
        requests_total=(ref("vllm:request_success_total"),),
        requests_running=(ref("vllm:num_requests_running"),),
        requests_waiting=(ref("vllm:num_requests_waiting"),),
        kv_cache_usage=(ref("vllm:kv_cache_usage_perc"), ref("vllm:gpu_cache_usage_perc")),
        ttft=("vllm:time_to_first_token_seconds",),
        tpot=("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    )
    caveats = (
        "requests_total sums vllm:request_success_total over every finished_reason "
        "(stop, length, abort, ...)",
    )
