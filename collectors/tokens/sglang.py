"""SGLang (``--enable-metrics``).

Names from SGLang's ``docs/references/production_metrics.md`` and its metrics
collector. ``sglang:token_usage`` is the fraction of KV-cache token slots in use
(0-1). ``sglang:num_requests_total`` (requests processed) exists only in newer
releases. Newer releases call the per-token latency histogram
``inter_token_latency_seconds``; older ones ``time_per_output_token_seconds``.
Scheduler metrics may carry ``tp_rank``/``dp_rank``: replicas are collapsed and
data-parallel ranks summed (see ``series``), so one model is one series.
"""

from __future__ import annotations

from .registry import TokenSource, register
from .series import MetricMap, ref


@register("sglang", detect_priority=20)
class SglangSource(TokenSource):
    prefixes = ("sglang:",)
    metric_map = MetricMap(
        identifying_labels=("model_name",),
        model_label="model_name",
        prompt_tokens=(ref("sglang:prompt_tokens_total"),),
        generation_tokens=(ref("sglang:generation_tokens_total"),),
        requests_total=(ref("sglang:num_requests_total"),),
        requests_running=(ref("sglang:num_running_reqs"),),
        requests_waiting=(ref("sglang:num_queue_reqs"),),
        kv_cache_usage=(ref("sglang:token_usage"),),
        ttft=("sglang:time_to_first_token_seconds",),
        tpot=("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
    )
