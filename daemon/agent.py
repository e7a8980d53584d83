"""The node agent: sample GPUs, host and token sources, store them, reconcile targets.

``tick(now)`` is a step function of an injected clock: APScheduler calls it in real time,
the simulator calls it on a simulated clock, and both run exactly this code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wattkeeper.collectors.gpu import GpuBackend, GpuError, GpuInfo, GpuSample
from wattkeeper.collectors.host import HostSample
from wattkeeper.collectors.tokens import CounterRate, TokenReading, TokenSourceError, parse_page
from wattkeeper.store.repository import Store, TokenRow

log = logging.getLogger(__name__)

LIMIT_TOLERANCE_W = 1.0


@dataclass
class TokenEndpoint:
    """Where a node's token counters come from: a URL fetched over HTTP, or a callable page."""

    name: str
    kind: str
    read_page: Callable[[], str]


@dataclass
class AgentState:
    """What the last tick saw, kept for the exporter and the live view."""

    samples: dict[str, GpuSample] = field(default_factory=dict)
    host: HostSample | None = None
    readings: dict[str, TokenReading | None] = field(default_factory=dict)
    endpoint_errors: dict[str, str] = field(default_factory=dict)
    endpoint_last_ok: dict[str, float] = field(default_factory=dict)
    tick_ts: float | None = None
    collectors: dict[str, tuple[float, bool]] = field(default_factory=dict)
    """Per collector ('gpu', 'host', 'tokens:<endpoint>'): last duration in s and success."""
    actuations: int = 0
    errors: int = 0


class HostReader:
    """What the agent needs from the host collector."""

    def sample(self, now: float) -> HostSample:  # pragma: no cover - protocol
        raise NotImplementedError


class Agent:
    def __init__(
        self,
        node: str,
        backend: GpuBackend,
        store: Store,
        *,
        host: HostReader | None = None,
        endpoints: Sequence[TokenEndpoint] = (),
        fallback_power_limit_ratio: float = 0.6,
        restore_on_exit: bool = True,
        tokens_interval_s: float = 0.0,
    ) -> None:
        self.node = node
        self.backend = backend
        self.store = store
        self.host = host
        self.endpoints = list(endpoints)
        self.fallback_ratio = fallback_power_limit_ratio
        self.restore_on_exit = restore_on_exit
        self.actor = f"agent:{node}"
        self.infos: dict[str, GpuInfo] = {}
        self.gpu_ids: dict[str, int] = {}
        self.state = AgentState()
        self._rates = CounterRate()
        self.tokens_interval_s = tokens_interval_s
        self._tokens_due = float("-inf")

    def register(self, now: float) -> None:
        infos = self.backend.gpus()
        self.infos = {i.uuid: i for i in infos}
        self.gpu_ids = self.store.register_node(self.node, self.backend.name, infos, now)

    def tick(self, now: float) -> None:
        if not self.gpu_ids:
            self.register(now)
        samples = self._timed("gpu", self._sample_gpus, lambda r: len(r) == len(self.infos))
        host = self._timed("host", lambda: self._sample_host(now), lambda r: r is not None)
        tokens: list[TokenRow] = []
        if now >= self._tokens_due:
            # Servers are scraped less often than GPUs: a page costs milliseconds to parse
            # and token rates need no finer grain than the control period.
            self._tokens_due = now + self.tokens_interval_s - 1e-6
            tokens = self._read_tokens(now)
        self.store.write_samples(
            self.node,
            self.gpu_ids,
            samples.values(),
            now,
            host=(host.cpu_util_ratio, host.non_gpu_power_w, host.power_source) if host else None,
            tokens=tokens,
        )
        self.state.samples = samples
        self.state.host = host
        self.state.tick_ts = now
        self.reconcile(now, samples)

    # -- observation -------------------------------------------------------------------
    def _timed(self, name: str, fn: Callable[[], Any], ok: Callable[[Any], bool]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        self.state.collectors[name] = (time.perf_counter() - t0, ok(result))
        return result

    def _sample_gpus(self) -> dict[str, GpuSample]:
        out: dict[str, GpuSample] = {}
        for uuid in self.infos:
            try:
                out[uuid] = self.backend.sample(uuid)
            except GpuError as exc:
                self.state.errors += 1
                log.warning("GPU %s: %s", uuid, exc)
        return out

    def _sample_host(self, now: float) -> HostSample | None:
        if self.host is None:
            return None
        try:
            return self.host.sample(now)
        except OSError as exc:
            log.warning("host collector: %s", exc)
            return None

    def _read_tokens(self, now: float) -> list[TokenRow]:
        rows: list[TokenRow] = []
        for ep in self.endpoints:
            t0 = time.perf_counter()
            try:
                reading = parse_page(ep.read_page(), ep.kind)
            except (TokenSourceError, OSError) as exc:
                self.state.collectors[f"tokens:{ep.name}"] = (time.perf_counter() - t0, False)
                self.state.readings[ep.name] = None
                self.state.endpoint_errors[ep.name] = str(exc)
                rows.append(TokenRow(endpoint=ep.name, model="", up=False, error=str(exc)[:1000]))
                continue
            self.state.collectors[f"tokens:{ep.name}"] = (time.perf_counter() - t0, True)
            self.state.readings[ep.name] = reading
            self.state.endpoint_errors.pop(ep.name, None)
            self.state.endpoint_last_ok[ep.name] = now
            for series in reading.series:
                key = (ep.name, series.model, tuple(sorted(series.labels.items())))
                rate = None
                if series.generation_tokens_total is not None:
                    rate = self._rates.update(key, series.generation_tokens_total, now)
                rows.append(
                    TokenRow(
                        endpoint=ep.name,
                        model=series.model,
                        up=True,
                        prompt_tokens_total=series.prompt_tokens_total,
                        generation_tokens_total=series.generation_tokens_total,
                        generation_tokens_per_s=rate,
                        requests_running=series.requests_running,
                        requests_waiting=series.requests_waiting,
                    )
                )
        return rows

    # -- actuation ---------------------------------------------------------------------
    def reconcile(self, now: float, samples: dict[str, GpuSample]) -> None:
        """Move each GPU toward its target; an expired lease falls back to the safe cap.

        Decreases are applied before increases so that, between the two, the facility
        never holds more power than either the old or the new plan allows.
        """
        targets = self.store.targets_for_node(self.node)
        moves: list[tuple[str, float, str]] = []
        for uuid, target in targets.items():
            info = self.infos.get(uuid)
            if info is None or target.power_limit_w is None:
                continue
            if target.lease_expires_at >= now:
                want, why = target.power_limit_w, target.reason or "target"
            else:
                lim = info.power_limits
                fallback = max(lim.min_w, min(lim.max_w, self.fallback_ratio * lim.default_w))
                want = min(fallback, target.power_limit_w)
                why = f"lease expired at {target.lease_expires_at:.0f}: fallback safe cap"
            current = samples[uuid].power_limit_requested_w if uuid in samples else None
            if current is not None and abs(current - want) < LIMIT_TOLERANCE_W:
                continue
            moves.append((uuid, want, why))
        moves.sort(
            key=lambda m: (
                m[1] - (samples[m[0]].power_limit_requested_w or 0) if m[0] in samples else 0
            )
        )
        for uuid, want, why in moves:
            before = samples[uuid].power_limit_requested_w if uuid in samples else None
            try:
                if self.backend.original_settings(uuid) is None:
                    self.store.set_original_power_limit(self.gpu_ids[uuid], before)
                self.backend.set_power_limit(uuid, want)
            except GpuError as exc:
                self.state.errors += 1
                log.error("cannot set power limit of %s to %.0f W: %s", uuid, want, exc)
                self.store.audit(
                    self.actor,
                    "power_limit.failed",
                    uuid,
                    {"power_limit_w": want, "error": str(exc)},
                    now,
                )
                continue
            self.state.actuations += 1
            self.store.audit(
                self.actor,
                "power_limit.set",
                uuid,
                {"power_limit_w": want, "previous_w": before, "reason": why},
                now,
            )

    def shutdown(self, now: float) -> None:
        """On a clean stop, put back what each GPU had before the agent touched it."""
        if not self.restore_on_exit:
            return
        for uuid in self.infos:
            original = self.backend.original_settings(uuid)
            if original is None:
                continue
            try:
                self.backend.restore(uuid)
            except GpuError as exc:
                log.error("cannot restore %s: %s", uuid, exc)
                continue
            self.store.audit(
                self.actor, "gpu.restore", uuid, {"power_limit_w": original.power_limit_w}, now
            )
