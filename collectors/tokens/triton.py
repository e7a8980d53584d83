"""Triton Inference Server with the TensorRT-LLM backend (metrics port 8002).

There are no token counters at all: Triton counts requests
(``nv_inference_request_success`` per model and version) and the TensorRT-LLM
backend adds batch-manager gauges (``nv_trt_llm_request_metrics`` by
``request_type``: active, waiting, context, scheduled, max) and KV-cache block
gauges (``nv_trt_llm_kv_cache_block_metrics`` by ``kv_cache_block_type``: used,
free, max, tokens_per, and in newer releases fraction). The KV ratio is
used / max blocks, with ``fraction`` as the fallback. An ensemble deployment
shows every step (ensemble, preprocessing, tensorrt_llm, postprocessing) as its
own model, each with its own request count; the batch-manager gauges belong to
the ``tensorrt_llm`` step.
"""

from __future__ import annotations

from .exposition import MetricIndex
from .registry import TokenSource, register
from .series import FieldValues, MetricMap, SeriesKey, ref, series_key

_KV_BLOCKS = "nv_trt_llm_kv_cache_block_metrics"


@register("triton", detect_priority=60)
class TritonSource(TokenSource):
    prefixes = ("nv_trt_llm_", "nv_inference_")
    metric_map = MetricMap(
        identifying_labels=("model", "version"),
        model_label="model",
        requests_total=(ref("nv_inference_request_success"),),
        requests_running=(ref("nv_trt_llm_request_metrics", request_type="active"),),
        requests_waiting=(ref("nv_trt_llm_request_metrics", request_type="waiting"),),
        kv_cache_usage=(ref(_KV_BLOCKS, kv_cache_block_type="fraction"),),
    )
    caveats = (
        "no token counters: Triton with TensorRT-LLM exposes only request counts, "
        "so prompt/generation tokens are unknown (null) and tokens/s cannot be measured "
        "from this page",
        "Triton exposes no TTFT/TPOT histograms",
    )

    def derive(self, page: MetricIndex, errors: list[str], notes: list[str]) -> FieldValues:
        """KV usage from block counts, which every backend release exposes."""
        identifying = self.metric_map.identifying_labels
        used: dict[SeriesKey, float] = {}
        total: dict[SeriesKey, float] = {}
        for sample in page.get(_KV_BLOCKS):
            kind = sample.labels.get("kv_cache_block_type")
            key = series_key(sample.labels, identifying)
            if kind == "used":
                used[key] = used.get(key, 0.0) + sample.value
            elif kind == "max":
                total[key] = total.get(key, 0.0) + sample.value
        ratios: dict[SeriesKey, float | None] = {}
        for key in used.keys() & total.keys():
            if total[key] > 0 and 0 <= used[key] <= total[key]:
                ratios[key] = used[key] / total[key]
            else:
                errors.append(
                    f"{_KV_BLOCKS}{dict(key)}: used {used[key]:g} of max {total[key]:g} blocks "
                    "is not a usage ratio; kv_cache_usage_ratio dropped"
                )
                ratios[key] = None
        if not ratios:
            return {}
        return {"kv_cache_usage_ratio": dict(ratios)}
