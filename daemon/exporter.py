"""Prometheus exporter: a custom collector that renders the newest readings at scrape time.

Nothing is set on a timer: each scrape reads what the agents sampled last and what the
store holds now (budget, targets), so a stalled agent shows as an old
``*_last_sample_timestamp_seconds`` rather than as frozen values that look fresh.
Names follow Prometheus conventions: base units (watts, joules, hertz, seconds),
``_total`` counters, 0-1 ratios, one ``_up`` gauge per source. docs/metrics.md lists
every family and maps dcgm-exporter's names onto these.

The agent-local part never depends on the database: when the store cannot be read, a
scrape still returns the GPU, host and token metrics with ``wattkeeper_store_up 0``,
because an exporter that answers 500 hides exactly the readings an operator needs
while the database is down.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from wattkeeper import __version__
from wattkeeper.bounded import Hung, SingleFlight
from wattkeeper.collectors.gpu import THROTTLE_REASONS
from wattkeeper.controller import PERIOD_BUCKETS_S
from wattkeeper.store.db import StoreError
from wattkeeper.summary import cost_options, facility_summary, in_force

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from wattkeeper.agent import Agent, TokenEndpoint
    from wattkeeper.collectors.gpu import GpuInfo, GpuSample
    from wattkeeper.collectors.host import HostSample
    from wattkeeper.collectors.tokens import TokenReading, TokenSeries
    from wattkeeper.runtime import Runtime
    from wattkeeper.store.repository import Snapshot

log = logging.getLogger(__name__)

GPU_LABELS = ["node", "gpu", "uuid", "name"]
TOKEN_LABELS = ["node", "endpoint", "model", "engine"]
SOURCE_LABELS = ["node", "endpoint"]
COLLECTOR_LABELS = ["node", "collector", "endpoint"]
MODEL_LABEL_NAMES = frozenset({"model_name", "model"})
"""Labels the token parsers take the model from; the rest of a series' labels is its engine."""
MHZ = 1e6
STATE_LOCK_TIMEOUT_S = 2.0
"""How long a scrape waits for a running agent tick before reading its state anyway."""
STORE_SCRAPE_TIMEOUT_S = 3.0
"""A scrape waits this long for the store (Prometheus' default scrape timeout is 10 s)."""


@dataclass(frozen=True)
class _AgentView:
    """A consistent copy of one agent's state, taken under the runtime lock.

    Copied rather than read in place because the agent thread mutates these dicts
    while HTTP threads render them; iterating a dict that changes size raises.
    """

    node: str
    backend: str
    infos: dict[str, GpuInfo]
    samples: dict[str, GpuSample]
    has_host: bool
    host: HostSample | None
    endpoints: list[TokenEndpoint]
    readings: dict[str, TokenReading | None]
    endpoint_last_ok: dict[str, float]
    collectors: dict[str, tuple[float, bool]]
    actuations: int
    errors: int
    spooled_ticks: int
    spool_dropped_ticks: int
    clock_locks: dict[str, int]


def _view(agent: Agent) -> _AgentView:
    st = agent.state
    return _AgentView(
        node=agent.node,
        backend=agent.backend.name,
        infos=dict(agent.infos),
        samples=dict(st.samples),
        has_host=agent.host is not None,
        host=st.host,
        endpoints=list(agent.endpoints),
        readings=dict(st.readings),
        endpoint_last_ok=dict(st.endpoint_last_ok),
        collectors=dict(st.collectors),
        actuations=st.actuations,
        errors=st.errors,
        spooled_ticks=st.spooled_ticks,
        spool_dropped_ticks=st.spool_dropped_ticks,
        clock_locks=agent.clock_locks,
    )


def _engine_label(series: TokenSeries) -> str:
    """What tells apart series of one model on one endpoint (vLLM engine, Triton version).

    Without it two data-parallel engines of one model would be two samples with the
    same label set: invalid exposition that Prometheus rejects as duplicates.
    """
    rest = sorted((k, v) for k, v in series.labels.items() if k not in MODEL_LABEL_NAMES)
    if not rest:
        return ""
    if len(rest) == 1:
        return rest[0][1]
    return ",".join(f"{k}={v}" for k, v in rest)


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it: ``+Inf``, else the shortest float text."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels or [])


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    """``name`` without ``_total``: prometheus_client appends it in the exposition."""
    return CounterMetricFamily(name, doc, labels=labels)


class WattkeeperCollector(Collector):
    """Renders one Runtime (its agents and its store) at every scrape."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        # Newest good sample time per (node, source): the agent forgets a GPU or host
        # reading that failed, but staleness must stay visible as an old timestamp.
        self._last_ok: dict[tuple[str, str], float] = {}
        self._last_ok_lock = threading.Lock()
        self._store_reads = SingleFlight("scrape-store")
        """A hung database costs a scrape its store metrics, never the scrape."""

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily(
            "wattkeeper_build", "wattkeeper version; always 1.", value={"version": __version__}
        )
        views = self._views()
        with self._last_ok_lock:
            yield from self._gpus(views)
            yield from self._host(views)
        yield from self._tokens(views)
        yield from self._agents(views)
        yield from self._controller()
        yield from self._store()

    def _views(self) -> list[_AgentView]:
        lock = self.rt.lock
        got = lock.acquire(timeout=STATE_LOCK_TIMEOUT_S)
        if not got:
            log.warning("agent tick holds the state lock; scraping without it")
        try:
            return [_view(a) for a in self.rt.agents]
        finally:
            if got:
                lock.release()

    def _remember(self, key: tuple[str, str], ts: float | None) -> float | None:
        if ts is not None and ts > self._last_ok.get(key, float("-inf")):
            self._last_ok[key] = ts
        return self._last_ok.get(key)

    # -- GPUs ----------------------------------------------------------------------------
    def _gpus(self, views: list[_AgentView]) -> Iterator[Metric]:
        info = _gauge(
            "wattkeeper_gpu_info",
            "Static facts of a GPU as labels; always 1.",
            [*GPU_LABELS, "pci_bus_id", "backend"],
        )
        up = _gauge(
            "wattkeeper_gpu_up",
            "1 when the last agent tick read every GPU of the node, else 0.",
            ["node"],
        )
        fam: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "power": _gauge(
                "wattkeeper_gpu_power_watts",
                "GPU power, the 1-second average NVML reports.",
                GPU_LABELS,
            ),
            "instant": _gauge(
                "wattkeeper_gpu_power_instant_watts",
                "GPU instantaneous power (noisy; prefer the average or the energy counter).",
                GPU_LABELS,
            ),
            "energy": _counter(
                "wattkeeper_gpu_energy_joules",
                "GPU energy since the driver loaded; rate() of it is average power.",
                GPU_LABELS,
            ),
            "sm": _gauge("wattkeeper_gpu_sm_clock_hertz", "SM clock.", GPU_LABELS),
            "lock": _gauge(
                "wattkeeper_gpu_sm_clock_lock_hertz",
                "Top of the SM clock lock the agent set; no series while unlocked.",
                GPU_LABELS,
            ),
            "mem": _gauge("wattkeeper_gpu_memory_clock_hertz", "Memory clock.", GPU_LABELS),
            "util": _gauge(
                "wattkeeper_gpu_utilization_ratio",
                "Share of the last sample period in which a kernel ran (0-1).",
                GPU_LABELS,
            ),
            "mem_util": _gauge(
                "wattkeeper_gpu_memory_utilization_ratio",
                "Share of the last sample period in which device memory was read or written.",
                GPU_LABELS,
            ),
            "temp": _gauge("wattkeeper_gpu_temperature_celsius", "GPU temperature.", GPU_LABELS),
            "limit": _gauge(
                "wattkeeper_gpu_power_limit_watts",
                "Enforced power limit (the most conservative of all limits in force).",
                GPU_LABELS,
            ),
            "requested": _gauge(
                "wattkeeper_gpu_power_limit_requested_watts",
                "Power management limit set on the device (what the agent asked for).",
                GPU_LABELS,
            ),
        }
        lmin = _gauge(
            "wattkeeper_gpu_power_limit_min_watts",
            "Lowest power limit the device accepts.",
            GPU_LABELS,
        )
        lmax = _gauge(
            "wattkeeper_gpu_power_limit_max_watts",
            "Highest power limit the device accepts.",
            GPU_LABELS,
        )
        ldef = _gauge(
            "wattkeeper_gpu_power_limit_default_watts",
            "Default power limit of the device.",
            GPU_LABELS,
        )
        reason_fam = _gauge(
            "wattkeeper_gpu_clock_event_reason",
            "1 while the clock event (throttle) reason is active, else 0.",
            [*GPU_LABELS, "reason"],
        )
        ts = _gauge(
            "wattkeeper_gpu_last_sample_timestamp_seconds",
            "Unix time of the newest good sample of the GPU.",
            GPU_LABELS,
        )
        known = list(THROTTLE_REASONS.values())
        for v in views:
            gpu_ok = v.collectors.get("gpu")
            if gpu_ok is not None:
                up.add_metric([v.node], 1.0 if gpu_ok[1] else 0.0)
            for uuid, gi in v.infos.items():
                labels = [v.node, str(gi.index), uuid, gi.name]
                info.add_metric([*labels, gi.pci_bus_id, v.backend], 1.0)
                lim = gi.power_limits
                lmin.add_metric(labels, lim.min_w)
                lmax.add_metric(labels, lim.max_w)
                ldef.add_metric(labels, lim.default_w)
                if uuid in v.clock_locks:
                    fam["lock"].add_metric(labels, v.clock_locks[uuid] * MHZ)
                s = v.samples.get(uuid)
                last = self._remember((v.node, uuid), s.timestamp if s else None)
                if last is not None:
                    ts.add_metric(labels, last)
                if s is None:
                    continue
                for key, value, scale in (
                    ("power", s.power_w, 1.0),
                    ("instant", s.power_instant_w, 1.0),
                    ("energy", s.energy_j, 1.0),
                    ("sm", s.sm_clock_mhz, MHZ),
                    ("mem", s.mem_clock_mhz, MHZ),
                    ("util", s.utilization_gpu_ratio, 1.0),
                    ("mem_util", s.utilization_mem_ratio, 1.0),
                    ("temp", s.temperature_c, 1.0),
                    ("limit", s.power_limit_w, 1.0),
                    ("requested", s.power_limit_requested_w, 1.0),
                ):
                    if value is not None:
                        fam[key].add_metric(labels, value * scale)
                active = set(s.throttle_reasons)
                # Known reasons always present (0 or 1) so a reason going away is a 0,
                # not a vanished series; an unknown bit shows up only while set.
                for reason in [*known, *sorted(active - set(known))]:
                    reason_fam.add_metric([*labels, reason], 1.0 if reason in active else 0.0)
        yield info
        yield up
        yield from fam.values()
        yield from (lmin, lmax, ldef, reason_fam, ts)

    # -- host ----------------------------------------------------------------------------
    def _host(self, views: list[_AgentView]) -> Iterator[Metric]:
        up = _gauge(
            "wattkeeper_host_up",
            "1 when the last agent tick read the host collector, else 0.",
            ["node"],
        )
        ts = _gauge(
            "wattkeeper_host_last_sample_timestamp_seconds",
            "Unix time of the newest good host sample.",
            ["node"],
        )
        host_w = _gauge(
            "wattkeeper_node_non_gpu_power_watts",
            "Node power outside the GPUs (CPUs, memory, fans, PSU losses).",
            ["node"],
        )
        method = _gauge(
            "wattkeeper_node_non_gpu_power_info",
            "How the non-GPU power was obtained (method: rapl or model); always 1.",
            ["node", "method"],
        )
        cpu = _gauge("wattkeeper_node_cpu_utilization_ratio", "Host CPU use (0-1).", ["node"])
        for v in views:
            if not v.has_host:
                continue
            ran = v.collectors.get("host")
            if ran is not None:
                up.add_metric([v.node], 1.0 if ran[1] and v.host is not None else 0.0)
            h = v.host
            last = self._remember((v.node, "host"), h.timestamp if h else None)
            if last is not None:
                ts.add_metric([v.node], last)
            if h is None:
                continue
            if h.non_gpu_power_w is not None:
                host_w.add_metric([v.node], h.non_gpu_power_w)
                method.add_metric([v.node, h.power_source], 1.0)
            if h.cpu_util_ratio is not None:
                cpu.add_metric([v.node], h.cpu_util_ratio)
        yield from (up, ts, host_w, method, cpu)

    # -- token sources -------------------------------------------------------------------
    def _tokens(self, views: list[_AgentView]) -> Iterator[Metric]:
        up = _gauge(
            "wattkeeper_token_source_up",
            "1 when the last read of the inference server's metrics page was understood.",
            SOURCE_LABELS,
        )
        last = _gauge(
            "wattkeeper_token_source_last_sample_timestamp_seconds",
            "Unix time of the last good read of the endpoint.",
            SOURCE_LABELS,
        )
        kind = _gauge(
            "wattkeeper_token_source_info",
            "Server kind of the endpoint (detected, or as configured); always 1.",
            [*SOURCE_LABELS, "kind"],
        )
        gen = _counter(
            "wattkeeper_tokens_generated",
            "Generated (decode) tokens, as the inference server counts them.",
            TOKEN_LABELS,
        )
        prompt = _counter(
            "wattkeeper_tokens_prompt",
            "Prompt (prefill) tokens, as the inference server counts them.",
            TOKEN_LABELS,
        )
        finished = _counter(
            "wattkeeper_requests_finished",
            "Requests the inference server finished.",
            TOKEN_LABELS,
        )
        running = _gauge("wattkeeper_requests_running", "Requests being served.", TOKEN_LABELS)
        waiting = _gauge("wattkeeper_requests_waiting", "Requests queued.", TOKEN_LABELS)
        kv = _gauge(
            "wattkeeper_kv_cache_usage_ratio",
            "KV-cache use (0-1); the fullest engine where a series has several.",
            TOKEN_LABELS,
        )
        # The servers' own latency histograms, re-exported with their buckets: an SLO is
        # a quantile, and only buckets let Prometheus take one over any window
        # (histogram_quantile over rate), across nodes and servers of every kind.
        ttft = HistogramMetricFamily(
            "wattkeeper_ttft_seconds",
            "Time to first token, as the inference server measures it (its own buckets).",
            labels=TOKEN_LABELS,
        )
        tpot = HistogramMetricFamily(
            "wattkeeper_tpot_seconds",
            "Time per output token (inter-token latency), as the inference server measures "
            "it (its own buckets).",
            labels=TOKEN_LABELS,
        )
        for v in views:
            for ep in v.endpoints:
                if ep.name not in v.readings:
                    continue  # not read yet: no verdict rather than a false "down"
                reading = v.readings[ep.name]
                src = [v.node, ep.name]
                up.add_metric(src, 1.0 if reading is not None else 0.0)
                kind.add_metric([*src, reading.kind if reading else ep.kind], 1.0)
                if ep.name in v.endpoint_last_ok:
                    last.add_metric(src, v.endpoint_last_ok[ep.name])
                if reading is None:
                    continue
                for series in reading.series:
                    labels = [v.node, ep.name, series.model, _engine_label(series)]
                    for family, value in (
                        (gen, series.generation_tokens_total),
                        (prompt, series.prompt_tokens_total),
                        (finished, series.requests_total),
                        (running, series.requests_running),
                        (waiting, series.requests_waiting),
                        (kv, series.kv_cache_usage_ratio),
                    ):
                        if value is not None:
                            family.add_metric(labels, value)
                    for hist_family, hist in (
                        (ttft, series.ttft_seconds),
                        (tpot, series.tpot_seconds),
                    ):
                        if hist is not None:
                            hist_family.add_metric(
                                labels,
                                [(_le(le), count) for le, count in hist.buckets],
                                None if math.isnan(hist.sum) else hist.sum,
                            )
        yield from (up, last, kind, gen, prompt, finished, running, waiting, kv, ttft, tpot)

    # -- the agents themselves -----------------------------------------------------------
    def _agents(self, views: list[_AgentView]) -> Iterator[Metric]:
        dur = _gauge(
            "wattkeeper_collector_duration_seconds",
            "How long the collector took on the last agent tick.",
            COLLECTOR_LABELS,
        )
        ok = _gauge(
            "wattkeeper_collector_success",
            "1 when the collector succeeded on the last agent tick, else 0.",
            COLLECTOR_LABELS,
        )
        changes = _counter(
            "wattkeeper_agent_power_limit_changes",
            "Power limits the agent applied to GPUs.",
            ["node"],
        )
        errors = _counter(
            "wattkeeper_agent_errors",
            "GPU reads and actuations that failed.",
            ["node"],
        )
        spooled = _gauge(
            "wattkeeper_agent_spooled_ticks",
            "Ticks of samples waiting for the store (kept while it is away).",
            ["node"],
        )
        dropped = _counter(
            "wattkeeper_agent_spool_dropped_ticks",
            "Ticks of samples dropped because the store was away longer than the spool holds.",
            ["node"],
        )
        for v in views:
            spooled.add_metric([v.node], float(v.spooled_ticks))
            dropped.add_metric([v.node], float(v.spool_dropped_ticks))
            for name, (seconds, success) in v.collectors.items():
                if name == "host" and not v.has_host:
                    continue  # no host collector configured: nothing ran, nothing failed
                collector, _, endpoint = name.partition(":")
                labels = [v.node, collector, endpoint]
                dur.add_metric(labels, seconds)
                ok.add_metric(labels, 1.0 if success else 0.0)
            changes.add_metric([v.node], float(v.actuations))
            errors.add_metric([v.node], float(v.errors))
        yield from (dur, ok, changes, errors, spooled, dropped)

    # -- the controller ------------------------------------------------------------------
    def _controller(self) -> Iterator[Metric]:
        controller = self.rt.controller
        if controller is None:
            return
        state = controller.state
        yield GaugeMetricFamily(
            "wattkeeper_controller_leading",
            "1 while this controller holds the leader lease and plans, else 0 (standby).",
            value=1.0 if controller.leading else 0.0,
        )
        periods = state.periods
        hist = HistogramMetricFamily(
            "wattkeeper_controller_period_duration_seconds",
            "Whole control periods this controller led: snapshot, plan and writes.",
            buckets=[
                *(
                    (f"{le:g}", float(n))
                    for le, n in zip(PERIOD_BUCKETS_S, periods.counts, strict=True)
                ),
                ("+Inf", float(periods.total)),
            ],
            sum_value=periods.sum_s,
        )
        yield hist

    # -- the store: budget, targets, facility figures ------------------------------------
    def _store(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        try:
            now = self.rt.clock.now()
            store = self.rt.store
            snap: Snapshot | None = self._store_reads.call(
                lambda: in_force(store, store.snapshot(now), now), STORE_SCRAPE_TIMEOUT_S
            )
        except (StoreError, SQLAlchemyError, Hung) as exc:
            log.warning("scrape without store metrics: %s", str(exc).splitlines()[0])
            snap = None
        yield GaugeMetricFamily(
            "wattkeeper_store_up",
            "1 when this scrape could read the store, else 0.",
            value=1.0 if snap is not None else 0.0,
        )
        yield GaugeMetricFamily(
            "wattkeeper_store_query_duration_seconds",
            "How long this scrape's read of the store took.",
            value=time.perf_counter() - t0,
        )
        if snap is not None:
            summary = facility_summary(
                snap,
                stale_after_s=self.rt.cfg.controller.stale_after_s,
                **cost_options(self.rt.cfg, snap.ts),
            )
            yield from _facility(snap, summary)


def _node_latency(snap: Snapshot) -> Iterator[Metric]:
    """The latency the controller acts on: each node's slowest server since the agent's
    previous read, as stored (the servers' own histograms are re-exported as
    ``wattkeeper_ttft_seconds``/``wattkeeper_tpot_seconds``)."""
    families = {
        ("ttft", "mean"): "Mean time to first token",
        ("tpot", "mean"): "Mean time per output token",
        ("ttft", "p90"): "90th percentile time to first token",
        ("tpot", "p90"): "90th percentile time per output token",
    }
    for (what, stat), title in families.items():
        g = _gauge(
            f"wattkeeper_node_{what}_{stat}_seconds",
            f"{title} of the node's slowest server since the agent's previous read "
            "(what the controller steers on).",
            ["node"],
        )
        for n in snap.nodes:
            value = getattr(n, f"{what}_{stat}_s")
            if value is not None:
                g.add_metric([n.name], value)
        yield g


def _facility(snap: Snapshot, s: dict) -> Iterator[Metric]:
    """Figures the controller decides on, from the store, so they match `wattkeeper status`."""
    budget = _gauge("wattkeeper_facility_budget_watts", "Facility power budget in force.")
    if s["budget_w"] is not None:
        budget.add_metric([], s["budget_w"])
    yield budget
    yield GaugeMetricFamily(
        "wattkeeper_facility_power_watts",
        "Facility power: every GPU plus every node's non-GPU power, newest samples.",
        value=s["facility_power_w"],
    )
    tpj = _gauge(
        "wattkeeper_facility_tokens_per_joule",
        "Generated tokens per joule of facility energy (tokens/s over watts).",
    )
    if s["tokens_per_joule"] is not None:
        tpj.add_metric([], s["tokens_per_joule"])
    yield tpj
    node_tpj = _gauge(
        "wattkeeper_node_tokens_per_joule",
        "Generated tokens per joule of the node's energy (GPUs and host).",
        ["node"],
    )
    drained = _gauge("wattkeeper_node_drained", "1 while the node is drained, else 0.", ["node"])
    for n in s["nodes"]:
        drained.add_metric([n["name"]], 1.0 if n["drained"] else 0.0)
        if n["tokens_per_joule"] is not None:
            node_tpj.add_metric([n["name"]], n["tokens_per_joule"])
    yield node_tpj
    yield drained
    cost = _gauge(
        "wattkeeper_energy_cost_per_token",
        "Energy cost of a generated token at the present rate, in the price's currency"
        " (cost.price_per_kwh and cost.pue; status shows it per million tokens);"
        ' node="" for the facility. Absent without a price.',
        ["node"],
    )
    if s["cost_per_million_tokens"] is not None:
        cost.add_metric([""], s["cost_per_million_tokens"] / 1e6)
    for n in s["nodes"]:
        if n["cost_per_million_tokens"] is not None:
            cost.add_metric([n["name"]], n["cost_per_million_tokens"] / 1e6)
    yield cost
    yield from _node_latency(snap)
    target = _gauge(
        "wattkeeper_gpu_target_power_limit_watts",
        "Power limit the controller wants for the GPU.",
        GPU_LABELS,
    )
    lease = _gauge(
        "wattkeeper_gpu_target_lease_expiry_timestamp_seconds",
        "Unix time at which the GPU's target lease expires (then the agent falls back).",
        GPU_LABELS,
    )
    for g in snap.gpus:
        labels = [g.node, str(g.index), g.uuid, g.name]
        if g.target_power_limit_w is not None:
            target.add_metric(labels, g.target_power_limit_w)
        if g.target_lease_expires_at is not None:
            lease.add_metric(labels, g.target_lease_expires_at)
    yield target
    yield lease


def make_registry(rt: Runtime) -> CollectorRegistry:
    """A registry of its own: no process or platform collectors mixed into our names."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WattkeeperCollector(rt))
    return registry


def _server_class(host: str) -> type[ThreadingHTTPServer]:
    """An IPv6 listen address ([::1]:9847) needs an AF_INET6 socket; the default is IPv4."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return ThreadingHTTPServer  # let bind() raise the clear OSError
    family = infos[0][0] if infos else socket.AF_INET
    if family != socket.AF_INET6:
        return ThreadingHTTPServer

    class _V6Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    return _V6Server


def _handler(rt: Runtime) -> type[MetricsHandler]:
    """/metrics (and any other path, as prometheus_client serves), plus /routes: the
    published routing weights and in-flight limits as JSON, read from the store at
    request time like everything else here."""
    from wattkeeper.routers import publication
    from wattkeeper.runtime import route_servers

    base = MetricsHandler.factory(make_registry(rt))
    servers = route_servers(rt.cfg)
    reads = SingleFlight("routes-store")

    class Handler(base):  # type: ignore[misc, valid-type]
        def do_GET(self) -> None:
            if urlsplit(self.path).path != "/routes":
                super().do_GET()
                return
            try:
                rows = reads.call(rt.store.routes, STORE_SCRAPE_TIMEOUT_S)
                doc = publication(rows, servers, rt.clock.now())
                status = 200
            except (StoreError, Hung) as exc:
                doc, status = {"error": str(exc)}, 503
            body = (json.dumps(doc, indent=1) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def serve(rt: Runtime, host: str, port: int) -> ThreadingHTTPServer:
    """Serve /metrics and /routes on a daemon thread; OSError when the address is taken.

    The caller stops it with ``shutdown()`` and then ``server_close()`` to free the port.
    """
    handler = _handler(rt)
    server = _server_class(host)((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
