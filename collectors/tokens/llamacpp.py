"""llama.cpp ``llama-server --metrics``.

One model per server and no labels, so the single series has an empty model
name. There is no finished-request counter and no latency histogram: only the
averages ``llamacpp:prompt_tokens_seconds`` / ``predicted_tokens_seconds``,
which are not comparable with other servers' histograms and are not read.
"""

from __future__ import annotations

from .registry import TokenSource, register
from .series import MetricMap, ref


@register("llamacpp", detect_priority=30)
class LlamaCppSource(TokenSource):
    prefixes = ("llamacpp:",)
    metric_map = MetricMap(
        identifying_labels=(),
        model_label=None,
        prompt_tokens=(ref("llamacpp:prompt_tokens_total"),),
        generation_tokens=(ref("llamacpp:tokens_predicted_total"),),
        requests_running=(ref("llamacpp:requests_processing"),),
        requests_waiting=(ref("llamacpp:requests_deferred"),),
        kv_cache_usage=(ref("llamacpp:kv_cache_usage_ratio"),),
    )
    caveats = (
        "llama.cpp does not name the model on its metrics page: model is empty",
        "llama.cpp has no finished-request counter and no TTFT/TPOT histograms",
    )
