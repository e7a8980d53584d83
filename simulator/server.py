"""Simulated inference servers: each node's replicas exposed as a vLLM /metrics page.

The agent reads these pages with the same parser it uses on a real vLLM server, so the
simulation exercises the real token-source code path, counters and all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wattkeeper.simulator.facility import SimFacility


class SimVllmServer:
    """One vLLM-like server per node, one engine per replica on that node."""

    def __init__(self, facility: SimFacility, node: int, clock: object) -> None:
        self.facility = facility
        self.node = node
        self.clock = clock
        self.url = f"sim://node{node}/metrics"

    def replicas(self) -> list[int]:
        f = self.facility
        return [r for r in range(f.n_replicas) if f.replica_node[r] == self.node]

    def render(self) -> str:
        """The page a vLLM V1 server would serve now."""
        f = self.facility
        f.advance_to(self.clock())  # type: ignore[operator]
        model = f.spec.model
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, values: list[tuple[int, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for engine, value in values:
                lines.append(f'{name}{{engine="{engine}",model_name="{model}"}} {float(value)!r}')

        reps = self.replicas()
        alive = bool(f.node_alive[self.node])
        running = [(e, float(round(f.batch[r])) if alive else 0.0) for e, r in enumerate(reps)]
        family(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            running,
        )
        family(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            [(e, 0.0) for e, _ in enumerate(reps)],
        )
        family(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            [(e, min(1.0, f.batch[r] / 512.0)) for e, r in enumerate(reps)],
        )
        family(
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            [(e, float(int(f.replica_prompt[r]))) for e, r in enumerate(reps)],
        )
        family(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            [(e, float(int(f.replica_generated[r]))) for e, r in enumerate(reps)],
        )
        lines.append("# HELP vllm:request_success_total Count of successfully processed requests.")
        lines.append("# TYPE vllm:request_success_total counter")
        for e, r in enumerate(reps):
            lines.append(
                f'vllm:request_success_total{{engine="{e}",finished_reason="stop",'
                f'model_name="{model}"}} {float(int(f.replica_requests[r]))!r}'
            )
        return "\n".join(lines) + "\n"
