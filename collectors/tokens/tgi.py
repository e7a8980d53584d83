"""Hugging Face Text Generation Inference (TGI).

TGI has no token counters. Each finished request records its input length and
generated-token count in the histograms ``tgi_request_input_length`` and
``tgi_request_generated_tokens``; their ``_sum`` only ever grows, so it serves as
a token counter, with two differences said in the notes: a request's tokens are
counted when it finishes (long generations arrive late, in one step), and
failed requests are not counted. TGI serves one model and labels nothing.
Counters are exposed without ``_total`` (``tgi_request_success``); the index
resolves that name whichever way the parser spells it.
"""

from __future__ import annotations

from .registry import TokenSource, register
from .series import MetricMap, ref


@register("tgi", detect_priority=40)
class TgiSource(TokenSource):
    prefixes = ("tgi_",)
    metric_map = MetricMap(
        identifying_labels=(),
        model_label=None,
        prompt_tokens=(ref("tgi_request_input_length_sum"),),
        generation_tokens=(ref("tgi_request_generated_tokens_sum"),),
        requests_total=(ref("tgi_request_success"),),
        requests_running=(ref("tgi_batch_current_size"),),
        requests_waiting=(ref("tgi_queue_size"),),
        tpot=("tgi_request_mean_time_per_token_duration",),
    )
    caveats = (
        "TGI has no token counters: prompt/generation tokens are the sums of the "
        "per-request histograms tgi_request_input_length / tgi_request_generated_tokens, "
        "which count a request only when it finishes successfully",
        "TGI exposes no TTFT histogram and no KV-cache usage; tpot_seconds is the "
        "histogram of each request's mean time per token",
        "TGI does not name the model on its metrics page: model is empty",
    )
