"""Prometheus exporter: a custom collector that renders the newest readings at scrape time.

Nothing is set on a timer: each scrape reads what the agents sampled last and what the
store holds now (budget, targets), so a stalled agent shows as an old
``wattkeeper_last_sample_timestamp_seconds`` rather than as frozen values.
Names follow Prometheus conventions: base units, ``_total`` counters, 0-1 ratios.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

from wattkeeper import __version__
from wattkeeper.collectors.gpu import THROTTLE_REASONS
from wattkeeper.summary import facility_summary

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from wattkeeper.runtime import Runtime

log = logging.getLogger(__name__)

GPU_LABELS = ["node", "gpu", "uuid", "name"]


class WattkeeperCollector(Collector):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily(
            "wattkeeper_build", "wattkeeper version.", value={"version": __version__}
        )
        yield from self._gpus()
        yield from self._hosts_and_tokens()
        yield from self._collectors()
        yield from self._facility()

    def _gpus(self) -> Iterator[Metric]:
        g = {
            "power": GaugeMetricFamily(
                "wattkeeper_gpu_power_watts",
                "GPU power, 1-second average as NVML reports it.",
                labels=GPU_LABELS,
            ),
            "instant": GaugeMetricFamily(
                "wattkeeper_gpu_power_instant_watts", "GPU instantaneous power.", labels=GPU_LABELS
            ),
            "energy": CounterMetricFamily(
                "wattkeeper_gpu_energy_joules",
                "GPU energy counter since driver load.",
                labels=GPU_LABELS,
            ),
            "sm": GaugeMetricFamily(
                "wattkeeper_gpu_sm_clock_hertz", "SM clock.", labels=GPU_LABELS
            ),
            "mem": GaugeMetricFamily(
                "wattkeeper_gpu_memory_clock_hertz", "Memory clock.", labels=GPU_LABELS
            ),
            "util": GaugeMetricFamily(
                "wattkeeper_gpu_utilization_ratio",
                "Share of time a kernel was running (0-1).",
                labels=GPU_LABELS,
            ),
            "temp": GaugeMetricFamily(
                "wattkeeper_gpu_temperature_celsius", "GPU temperature.", labels=GPU_LABELS
            ),
            "limit": GaugeMetricFamily(
                "wattkeeper_gpu_power_limit_watts", "Enforced power limit.", labels=GPU_LABELS
            ),
            "lmin": GaugeMetricFamily(
                "wattkeeper_gpu_power_limit_min_watts",
                "Lowest power limit the device accepts.",
                labels=GPU_LABELS,
            ),
            "lmax": GaugeMetricFamily(
                "wattkeeper_gpu_power_limit_max_watts",
                "Highest power limit the device accepts.",
                labels=GPU_LABELS,
            ),
            "ldef": GaugeMetricFamily(
                "wattkeeper_gpu_power_limit_default_watts",
                "Default power limit of the device.",
                labels=GPU_LABELS,
            ),
            "throttle": GaugeMetricFamily(
                "wattkeeper_gpu_clock_event_reason",
                "1 when the clock event (throttle) reason is active.",
                labels=[*GPU_LABELS, "reason"],
            ),
            "ts": GaugeMetricFamily(
                "wattkeeper_gpu_last_sample_timestamp_seconds",
                "Unix time of the newest sample.",
                labels=GPU_LABELS,
            ),
        }
        for agent in self.rt.agents:
            for uuid, info in agent.infos.items():
                labels = [agent.node, str(info.index), uuid, info.name]
                lim = info.power_limits
                g["lmin"].add_metric(labels, lim.min_w)
                g["lmax"].add_metric(labels, lim.max_w)
                g["ldef"].add_metric(labels, lim.default_w)
                s = agent.state.samples.get(uuid)
                if s is None:
                    continue
                for key, value, scale in (
                    ("power", s.power_w, 1.0),
                    ("instant", s.power_instant_w, 1.0),
                    ("energy", s.energy_j, 1.0),
                    ("sm", s.sm_clock_mhz, 1e6),
                    ("mem", s.mem_clock_mhz, 1e6),
                    ("util", s.utilization_gpu_ratio, 1.0),
                    ("temp", s.temperature_c, 1.0),
                    ("limit", s.power_limit_w, 1.0),
                ):
                    if value is not None:
                        g[key].add_metric(labels, value * scale)
                active = set(s.throttle_reasons)
                for reason in THROTTLE_REASONS.values():
                    g["throttle"].add_metric([*labels, reason], 1.0 if reason in active else 0.0)
                g["ts"].add_metric(labels, s.timestamp)
        yield from g.values()

    def _hosts_and_tokens(self) -> Iterator[Metric]:
        host_w = GaugeMetricFamily(
            "wattkeeper_node_non_gpu_power_watts",
            "Node power outside the GPUs (RAPL or the overhead model).",
            labels=["node", "source"],
        )
        cpu = GaugeMetricFamily(
            "wattkeeper_node_cpu_utilization_ratio", "Host CPU use (0-1).", labels=["node"]
        )
        ep_labels = ["node", "endpoint", "model"]
        gen = CounterMetricFamily(
            "wattkeeper_tokens_generated",
            "Generated tokens, as the inference server counts them.",
            labels=ep_labels,
        )
        prompt = CounterMetricFamily(
            "wattkeeper_tokens_prompt",
            "Prompt (prefill) tokens, as the server counts them.",
            labels=ep_labels,
        )
        running = GaugeMetricFamily(
            "wattkeeper_requests_running", "Requests being served.", labels=ep_labels
        )
        waiting = GaugeMetricFamily(
            "wattkeeper_requests_waiting", "Requests queued.", labels=ep_labels
        )
        up = GaugeMetricFamily(
            "wattkeeper_token_source_up",
            "1 when the last scrape of the endpoint was understood.",
            labels=["node", "endpoint", "kind"],
        )
        last = GaugeMetricFamily(
            "wattkeeper_token_source_last_sample_timestamp_seconds",
            "Unix time of the last good scrape of the endpoint.",
            labels=["node", "endpoint", "kind"],
        )
        for agent in self.rt.agents:
            h = agent.state.host
            if h is not None:
                if h.non_gpu_power_w is not None:
                    host_w.add_metric([agent.node, h.power_source], h.non_gpu_power_w)
                if h.cpu_util_ratio is not None:
                    cpu.add_metric([agent.node], h.cpu_util_ratio)
            for ep in agent.endpoints:
                reading = agent.state.readings.get(ep.name)
                kind = reading.kind if reading else ep.kind
                up.add_metric([agent.node, ep.name, kind], 1.0 if reading else 0.0)
                if ep.name in agent.state.endpoint_last_ok:
                    last.add_metric(
                        [agent.node, ep.name, kind], agent.state.endpoint_last_ok[ep.name]
                    )
                if reading is None:
                    continue
                for series in reading.series:
                    labels = [agent.node, ep.name, series.model]
                    for fam, value in (
                        (gen, series.generation_tokens_total),
                        (prompt, series.prompt_tokens_total),
                        (running, series.requests_running),
                        (waiting, series.requests_waiting),
                    ):
                        if value is not None:
                            fam.add_metric(labels, value)
        yield from (host_w, cpu, gen, prompt, running, waiting, up, last)

    def _collectors(self) -> Iterator[Metric]:
        dur = GaugeMetricFamily(
            "wattkeeper_collector_duration_seconds",
            "How long the collector took on the last agent tick.",
            labels=["node", "collector"],
        )
        ok = GaugeMetricFamily(
            "wattkeeper_collector_success",
            "1 when the collector succeeded on the last agent tick.",
            labels=["node", "collector"],
        )
        for agent in self.rt.agents:
            for name, (seconds, success) in agent.state.collectors.items():
                dur.add_metric([agent.node, name], seconds)
                ok.add_metric([agent.node, name], 1.0 if success else 0.0)
        yield dur
        yield ok

    def _facility(self) -> Iterator[Metric]:
        snap = self.rt.store.snapshot(self.rt.clock.now())
        s = facility_summary(snap)
        budget = GaugeMetricFamily(
            "wattkeeper_facility_budget_watts", "Facility power budget in force."
        )
        if s["budget_w"] is not None:
            budget.add_metric([], s["budget_w"])
        yield budget
        yield GaugeMetricFamily(
            "wattkeeper_facility_power_watts",
            "Facility power: every GPU plus every node's non-GPU power.",
            value=s["facility_power_w"],
        )
        tpj = GaugeMetricFamily(
            "wattkeeper_facility_tokens_per_joule", "Generated tokens per joule of facility energy."
        )
        if s["tokens_per_joule"] is not None:
            tpj.add_metric([], s["tokens_per_joule"])
        yield tpj
        node_tpj = GaugeMetricFamily(
            "wattkeeper_node_tokens_per_joule",
            "Generated tokens per joule of the node's energy.",
            labels=["node"],
        )
        for n in s["nodes"]:
            if n["tokens_per_joule"] is not None:
                node_tpj.add_metric([n["name"]], n["tokens_per_joule"])
        yield node_tpj
        target = GaugeMetricFamily(
            "wattkeeper_gpu_target_power_limit_watts",
            "Power limit the controller wants for the GPU.",
            labels=["node", "gpu", "uuid"],
        )
        lease = GaugeMetricFamily(
            "wattkeeper_gpu_target_lease_expiry_timestamp_seconds",
            "Unix time at which the GPU's target lease expires.",
            labels=["node", "gpu", "uuid"],
        )
        for g in snap.gpus:
            if g.target_power_limit_w is not None:
                target.add_metric([g.node, str(g.index), g.uuid], g.target_power_limit_w)
            if g.target_lease_expires_at is not None:
                lease.add_metric([g.node, str(g.index), g.uuid], g.target_lease_expires_at)
        yield target
        yield lease


def make_registry(rt: Runtime) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WattkeeperCollector(rt))
    return registry


def serve(rt: Runtime, host: str, port: int) -> ThreadingHTTPServer:
    """Serve /metrics on a daemon thread; OSError when the address is taken."""
    handler = MetricsHandler.factory(make_registry(rt))
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
