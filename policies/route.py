"""Routing weights and in-flight limits: where requests go, and how many each server runs.

Power limits decide how fast each GPU runs; the router in front of the replicas decides
how much work each one gets and how large its batch may grow. Two levers, both at the
load balancer, since no inference server changes its own maximum batch at run time:

- **Weights.** Under weighted least-in-flight routing (HAProxy's ``leastconn`` with
  server weights) each server's share of the requests in flight follows its weight. A
  node that makes more tokens per joule gets more of the work; the others, lightly
  loaded, are walked down by their latency ceilings and draw less. The tilt is measured,
  not assumed: tokens per second over GPU watts, smoothed over control periods. It is
  bounded (``min_share``), so no serving node is starved of the requests that keep its
  latency and efficiency measurable; a node whose latency nears the SLO loses weight
  until it has slack again, so the tilt never buys energy with missed requests.
- **In-flight limits.** When a node's time per output token nears the SLO and its power
  cannot rise (its limits are at their maximum, or a budget holds them below their
  ceiling), a larger batch only makes every request slower. Capping the requests each
  server runs keeps the admitted ones within the SLO; the rest wait at the router, where
  they still can meet their TTFT, instead of all of them missing TPOT. The limit is
  raised again while latency has slack and lifted once it no longer binds.

Pure: the controller feeds it what the store says and publishes what it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_WEIGHT = 256
"""HAProxy's server weights run from 0 to 256; 0 sends a server nothing."""


@dataclass(frozen=True)
class RouteSettings:
    weights: bool = True
    """Off: every serving node gets the full weight."""
    inflight_limits: bool = True
    """Off: the servers' own limits stand."""
    min_share: float = 0.25
    """The least weight of a serving node, as a share of the most efficient node's."""
    smoothing: float = 0.3
    """Weight of the newest period in the smoothed tokens per joule."""
    target_ratio: float = 0.85
    """Latency (mean, share of its SLO) below which a node has slack."""
    high_ratio: float = 0.95
    """Latency above which a node gives up weight, or its in-flight limit falls."""
    weight_down: float = 0.8
    weight_up: float = 1.1
    inflight_down: float = 0.9
    inflight_up: float = 1.05
    lift_ratio: float = 1.5
    """An in-flight limit this far above the requests running no longer binds: lifted."""


@dataclass(frozen=True)
class RouteNode:
    """What the controller knows of one node this period."""

    name: str
    serving: bool
    """Alive, not drained, and its servers answer."""
    servers: int
    tokens_per_s: float | None
    gpu_power_w: float | None
    steer: float | None
    """The worst mean latency (TTFT or TPOT) as a share of its SLO."""
    tpot_ratio: float | None
    """Mean time per output token as a share of its SLO."""
    power_can_rise: bool
    """Its latency ceiling may still raise its limits: neither at the maximum nor held
    below the ceiling by a budget."""
    requests_running: float | None
    """Summed over the node's servers."""
    pool: str = ""
    """The models it serves: weights compare nodes of one pool only (a pool serving a
    larger model makes fewer tokens per joule, which says nothing about its nodes)."""
    held_off: str | None = None
    """Why it gets no new requests while it serves (a consolidation trial); None: it
    gets its weight."""


@dataclass(frozen=True)
class RouteTarget:
    node: str
    weight: int
    max_inflight: int | None
    """Per server of the node; None: the servers' own limit."""
    reason: str


@dataclass
class _NodeRoute:
    efficiency: float | None = None
    latency_share: float = 1.0
    inflight: float | None = None


@dataclass
class Routes:
    """The routing state the controller keeps across periods."""

    settings: RouteSettings = field(default_factory=RouteSettings)
    nodes: dict[str, _NodeRoute] = field(default_factory=dict)

    def to_memory(self) -> dict[str, dict]:
        """What was learned per node, as plain JSON."""
        return {
            name: {
                "efficiency": _finite(st.efficiency),
                "latency_share": _finite(st.latency_share),
                "inflight": _finite(st.inflight),
            }
            for name, st in self.nodes.items()
        }

    def restore(self, memory: dict[str, dict]) -> int:
        """Take back what a controller kept (``to_memory``); a node already known here
        keeps its own, and an entry that does not read as numbers is skipped."""
        taken = 0
        for node, kept in memory.items():
            if node in self.nodes or not isinstance(kept, dict) or "efficiency" not in kept:
                continue
            try:
                eff, inflight = kept.get("efficiency"), kept.get("inflight")
                st = _NodeRoute(
                    efficiency=None if eff is None else float(eff),
                    latency_share=float(kept.get("latency_share") or 1.0),
                    inflight=None if inflight is None else float(inflight),
                )
            except (TypeError, ValueError):
                continue
            self.nodes[node] = st
            taken += 1
        return taken

    def update(self, nodes: list[RouteNode]) -> list[RouteTarget]:
        """One control period: new weights and in-flight limits for every node."""
        s = self.settings
        for gone in set(self.nodes) - {n.name for n in nodes}:
            del self.nodes[gone]  # the caller no longer routes it at all
        for n in nodes:
            st = self.nodes.setdefault(n.name, _NodeRoute())
            # A node held off runs down its batch: its tokens per joule say nothing.
            if n.serving and not n.held_off and n.tokens_per_s is not None and n.gpu_power_w:
                eff = n.tokens_per_s / n.gpu_power_w
                st.efficiency = (
                    eff
                    if st.efficiency is None
                    else (1 - s.smoothing) * st.efficiency + s.smoothing * eff
                )
        best: dict[str, float] = {}
        for n in nodes:
            eff = self.nodes[n.name].efficiency
            if n.serving and not n.held_off and eff is not None and eff > 0:
                best[n.pool] = max(best.get(n.pool, 0.0), eff)
        return [self._target(n, self.nodes[n.name], best.get(n.pool)) for n in nodes]

    def _target(self, n: RouteNode, st: _NodeRoute, best: float | None) -> RouteTarget:
        s = self.settings
        if not n.serving:
            st.inflight = None
            st.efficiency = None  # measured afresh when it serves again
            return RouteTarget(
                n.name, 0, None, "not serving (drained, silent or down): no new requests"
            )
        if n.held_off:
            st.inflight = None
            return RouteTarget(n.name, 0, None, n.held_off)
        if not s.weights:
            share, said = 1.0, "weights off"
        elif best is None or st.efficiency is None:
            share, said = 1.0, "tokens per joule not yet measured"
        else:
            share = max(s.min_share, min(1.0, st.efficiency / best))
            said = f"{st.efficiency:.2f} tokens/J, {share:.0%} of the best in its pool"
        if not s.weights:
            pass
        elif n.steer is not None and n.steer > s.high_ratio:
            st.latency_share = max(s.min_share, st.latency_share * s.weight_down)
            said += f"; latency at {n.steer:.0%} of the SLO: weight lowered"
        elif n.steer is not None and n.steer < s.target_ratio:
            st.latency_share = min(1.0, st.latency_share * s.weight_up)
        weight = max(1, round(MAX_WEIGHT * share * st.latency_share))
        inflight = self._inflight(n, st)
        if inflight is not None:
            said += f"; TPOT near the SLO with no power to add: {inflight} in flight per server"
        return RouteTarget(n.name, weight, inflight, said)

    def _inflight(self, n: RouteNode, st: _NodeRoute) -> int | None:
        s = self.settings
        if not s.inflight_limits:
            return None
        per_server = None
        if n.requests_running is not None and n.servers > 0:
            per_server = n.requests_running / n.servers
        if n.tpot_ratio is not None and n.tpot_ratio > s.high_ratio and not n.power_can_rise:
            if per_server is not None and per_server >= 1.0:
                start = per_server if st.inflight is None else min(st.inflight, per_server)
                st.inflight = max(1.0, start * s.inflight_down)
        elif st.inflight is not None and (n.tpot_ratio is None or n.tpot_ratio < s.target_ratio):
            st.inflight *= s.inflight_up
            if per_server is not None and st.inflight > s.lift_ratio * max(per_server, 1.0):
                st.inflight = None
        return None if st.inflight is None else max(1, round(st.inflight))


def _finite(x: float | None) -> float | None:
    """JSON's numbers (PostgreSQL's json type refuses NaN and infinities)."""
    return x if x is None or math.isfinite(x) else None
