"""The simulated facility's router obeying the published routes, as HAProxy would.

Each simulated node serves one metrics endpoint for all its replicas, so the node's
"server" is all of them: its weight goes to every replica, and its per-server in-flight
limit is shared among its replicas. A node without a route, or a route without a limit,
keeps the scenario's ``max_inflight``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from wattkeeper.policies.route import MAX_WEIGHT
from wattkeeper.store.repository import RouteRow


class SimRouter:
    def __init__(self, facility: Any, node_names: Sequence[str]) -> None:
        self.facility = facility
        self.node_of = {name: k for k, name in enumerate(node_names)}
        self.default_inflight = facility.max_inflight.copy()

    def apply(self, routes: Sequence[RouteRow], now: float) -> None:
        f = self.facility
        for route in routes:
            node = self.node_of.get(route.node)
            if node is None:
                continue
            reps = f.node_replicas(node)
            for r in reps:
                f.route_weight[r] = route.weight / MAX_WEIGHT
                limit = self.default_inflight[r]
                if route.max_inflight is not None:
                    limit = min(limit, max(1.0, route.max_inflight / len(reps)))
                f.set_max_inflight(r, limit)
