"""Simulated inference servers: each node's replicas exposed as a vLLM or SGLang /metrics page.

The agent reads these pages with the same parser it uses on real servers, so the
simulation exercises the real token-source code path, counters, resets and histograms
included. A node that is down (failed, in standby or still waking) refuses the
connection, as a real server would, rather than serving zeros that look like an idle
node. Values are printed as ``float(x)!r`` (never numpy reprs) and pages end with a
newline, as the exposition format requires.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from wattkeeper.simulator import physics
from wattkeeper.simulator.facility import (
    SGLANG_TPOT_BOUNDS_S,
    SGLANG_TTFT_BOUNDS_S,
    TPOT_BOUNDS_S,
    TTFT_BOUNDS_S,
    VLLM_ITL_BOUNDS_S,
    VLLM_TTFT_BOUNDS_S,
    SimFacility,
)


def _num(x: float) -> str:
    return repr(float(x))


class _Page:
    """Lines of one exposition page, family by family."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[str, float]],
    ) -> None:
        """``samples`` are (rendered label set without braces, value)."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{{{labels}}} {_num(value)}")

    def histogram(
        self,
        name: str,
        help_text: str,
        series: Iterable[tuple[str, np.ndarray, float]],
        bounds: tuple[float, ...],
        facility_bounds: tuple[float, ...],
    ) -> None:
        """Cumulative buckets at this server's ``bounds`` from the facility's finer histogram."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        positions = np.searchsorted(facility_bounds, bounds)
        for labels, counts, total in series:
            cumulative = np.cumsum(counts)
            sep = "," if labels else ""
            self.lines.append(f"{name}_sum{{{labels}}} {_num(total)}")
            for le, pos in zip(bounds, positions, strict=True):
                self.lines.append(
                    f'{name}_bucket{{{labels}{sep}le="{float(le)!r}"}} {_num(cumulative[pos])}'
                )
            self.lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {_num(cumulative[-1])}')
            self.lines.append(f"{name}_count{{{labels}}} {_num(cumulative[-1])}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class SimServer:
    """The inference server(s) of one node; ``kind`` is the token-source kind to parse with."""

    kind = ""

    def __init__(self, facility: SimFacility, node: int, clock: Callable[[], float]) -> None:
        self.facility = facility
        self.node = node
        self.clock = clock
        self.url = f"sim://node{node}/metrics"

    def replicas(self) -> list[int]:
        return self.facility.node_replicas(self.node)

    def render(self) -> str:
        """The page the server would serve now; ConnectionRefusedError while the node is down."""
        f = self.facility
        f.advance_to(self.clock())
        if not f.node_up(self.node):
            raise ConnectionRefusedError(
                f"{self.url}: connection refused (simulated node {self.node} is "
                f"{f.node_state(self.node)})"
            )
        return self._render(self.replicas())

    def _render(self, reps: list[int]) -> str:
        raise NotImplementedError


class SimVllmServer(SimServer):
    """One vLLM V1 server per node with one data-parallel engine per replica."""

    kind = "vllm"

    def _render(self, reps: list[int]) -> str:
        f = self.facility
        model = physics.MODELS[f.replica_model[reps[0]]].hf_name if reps else ""
        labels = [f'engine="{e}",model_name="{model}"' for e in range(len(reps))]
        kv = f.kv_cache_usage()
        page = _Page()

        def per_replica(values: np.ndarray) -> list[tuple[str, float]]:
            return [(lbl, float(values[r])) for lbl, r in zip(labels, reps, strict=True)]

        page.family(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            per_replica(f.replica_batch),
        )
        # The router in front holds the queue (max_inflight <= max_num_seqs): nothing
        # waits inside vLLM.
        page.family(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            [(lbl, 0.0) for lbl in labels],
        )
        page.family(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            per_replica(kv),
        )
        page.family(
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            per_replica(f.replica_prompt),
        )
        page.family(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            per_replica(f.replica_generated),
        )
        page.family(
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            [
                (f'engine="{e}",finished_reason="stop",model_name="{model}"', f.replica_requests[r])
                for e, r in enumerate(reps)
            ],
        )
        page.histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            [
                (lbl, f.replica_ttft_hist[r], f.replica_ttft_sum[r])
                for lbl, r in zip(labels, reps, strict=True)
            ],
            VLLM_TTFT_BOUNDS_S,
            TTFT_BOUNDS_S,
        )
        page.histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            [
                (lbl, f.replica_tpot_hist[r], f.replica_tpot_sum[r])
                for lbl, r in zip(labels, reps, strict=True)
            ],
            VLLM_ITL_BOUNDS_S,
            TPOT_BOUNDS_S,
        )
        return page.text()


class SimSglangServer(SimServer):
    """One SGLang server per node running its replicas as data-parallel ranks (``dp_rank``);
    the token source sums the ranks into one series per model."""

    kind = "sglang"

    def _render(self, reps: list[int]) -> str:
        f = self.facility
        model = physics.MODELS[f.replica_model[reps[0]]].hf_name if reps else ""
        labels = [f'dp_rank="{e}",model_name="{model}"' for e in range(len(reps))]
        kv = f.kv_cache_usage()
        page = _Page()

        def per_replica(values: np.ndarray) -> list[tuple[str, float]]:
            return [(lbl, float(values[r])) for lbl, r in zip(labels, reps, strict=True)]

        page.family(
            "sglang:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            per_replica(f.replica_prompt),
        )
        page.family(
            "sglang:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            per_replica(f.replica_generated),
        )
        page.family(
            "sglang:num_requests_total",
            "counter",
            "Number of requests processed.",
            per_replica(f.replica_requests),
        )
        page.family(
            "sglang:num_running_reqs",
            "gauge",
            "The number of running requests.",
            per_replica(f.replica_batch),
        )
        page.family(
            "sglang:num_queue_reqs",
            "gauge",
            "The number of requests in the waiting queue.",
            [(lbl, 0.0) for lbl in labels],
        )
        page.family("sglang:token_usage", "gauge", "The token usage.", per_replica(kv))
        page.histogram(
            "sglang:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            [
                (lbl, f.replica_ttft_hist[r], f.replica_ttft_sum[r])
                for lbl, r in zip(labels, reps, strict=True)
            ],
            SGLANG_TTFT_BOUNDS_S,
            TTFT_BOUNDS_S,
        )
        page.histogram(
            "sglang:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            [
                (lbl, f.replica_tpot_hist[r], f.replica_tpot_sum[r])
                for lbl, r in zip(labels, reps, strict=True)
            ],
            SGLANG_TPOT_BOUNDS_S,
            TPOT_BOUNDS_S,
        )
        return page.text()


SERVERS: dict[str, type[SimServer]] = {"vllm": SimVllmServer, "sglang": SimSglangServer}


def make_server(facility: SimFacility, node: int, clock: Callable[[], float]) -> SimServer:
    """The server of the format the node's group names in the scenario."""
    return SERVERS[facility.node_server[node]](facility, node, clock)


__all__ = ["SERVERS", "SimServer", "SimSglangServer", "SimVllmServer", "make_server"]
