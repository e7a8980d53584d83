"""Drains: when a budget cannot serve every node, serve with fewer.

Every GPU has a hardware floor and every node's host draws power whatever the caps, so
below some budget capping alone cannot comply at all, and a little above it every GPU
crawls at its floor and no request meets its SLO. Taking a node out of service (its
drain actuator powering it down where it can) gives its watts to the others. This
module decides which nodes, pure and deterministic; the controller marks them in the
store and each node's agent acts.

- Drain at once when the serving nodes cannot all get a useful share: budget before
  SLO, and a node that cannot be served well is better off drained.
- Drain the node that makes the fewest tokens per watt first, among the nodes under
  the budget (facility, room, PDU, rack) that cannot serve them.
- Undrain one node at a time, only with room to spare under every budget over it and
  not sooner than ``hold_s`` after the last change, so nodes do not flap.
- Never undrain a node a person drained; never drain the last serving node.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DrainSettings:
    serve_share: float = 0.15
    """A node serves usefully when each GPU gets at least this share of its range above
    its floor."""
    undrain_headroom: float = 1.10
    """Undrain only when what it needs, times this, fits."""
    hold_s: float = 300.0
    drained_node_w: float | None = None
    """What a drained node draws (standby); None: its host power, as if not powered down."""


@dataclass(frozen=True)
class DrainNode:
    name: str
    drained: bool
    by_person: bool
    gpu_floor_w: float
    gpu_max_w: float
    host_w: float
    """Non-GPU power when serving (measured, or the configured assumption)."""
    tokens_per_s: float | None
    power_w: float | None

    def serve_w(self, s: DrainSettings) -> float:
        return self.gpu_floor_w + s.serve_share * (self.gpu_max_w - self.gpu_floor_w) + self.host_w

    def idle_w(self, s: DrainSettings) -> float:
        return self.host_w if s.drained_node_w is None else s.drained_node_w


@dataclass(frozen=True)
class DrainDecision:
    name: str
    drain: bool
    reason: str


def need_w(nodes: list[DrainNode], serving: set[str], s: DrainSettings) -> float:
    """Facility power to serve ``serving`` usefully with every other node drained."""
    return sum(n.serve_w(s) if n.name in serving else n.idle_w(s) for n in nodes)


def decide(
    nodes: list[DrainNode],
    usable_w: float,
    now: float,
    last_change_ts: float,
    s: DrainSettings,
) -> list[DrainDecision]:
    """Which nodes to drain or return to service this period (usually none), under one
    budget over every node."""
    return decide_tree(nodes, [("facility", usable_w, None)], now, last_change_ts, s)


def decide_tree(
    nodes: list[DrainNode],
    budgets: list[tuple[str, float, set[str] | None]],
    now: float,
    last_change_ts: float,
    s: DrainSettings,
) -> list[DrainDecision]:
    """The same under a budget tree: ``budgets`` are (name, usable watts, the nodes under
    it; None: all). A node drains when any budget over it cannot serve its serving nodes
    usefully, and returns only when every budget over it has room for it, so a rack too
    tight for its nodes is not undone by a facility with watts to spare."""
    serving = {n.name for n in nodes if not n.drained}
    out: list[DrainDecision] = []
    by_name = {n.name: n for n in nodes}

    def under(members: set[str] | None) -> list[DrainNode]:
        # From the members, not a scan of every node per budget: a facility has
        # thousands of racks.
        if members is None:
            return nodes
        return [by_name[m] for m in sorted(members) if m in by_name]

    # Least tokens per watt first. A node whose tokens are not known (no token source, a
    # failing scrape) may be serving well: it goes last, not first.
    def efficiency(n: DrainNode) -> tuple[int, float, str]:
        if n.tokens_per_s is None or not n.power_w:
            return (1, 0.0, n.name)
        return (0, n.tokens_per_s / n.power_w, n.name)

    # Innermost budgets first: a rack's own drain may already bring the room and the
    # facility within theirs, where their pick (the least efficient node anywhere under
    # them) would be a second drain.
    for name, usable_w, members in sorted(budgets, key=lambda b: (b[2] is None, len(b[2] or ()))):
        held = under(members)
        if need_w(held, serving, s) <= usable_w:
            continue
        what = "budget" if name == "facility" else f"budget {name!r}"
        for n in sorted((n for n in held if n.name in serving), key=efficiency):
            if len(serving) <= 1 or need_w(held, serving, s) <= usable_w:
                break
            serving.discard(n.name)
            out.append(
                DrainDecision(
                    n.name,
                    True,
                    f"{what} {usable_w:.0f} W (after margin) cannot give every serving node "
                    f"{s.serve_share:.0%} of its GPUs' range: fewest tokens per watt drained",
                )
            )
    if out or now - last_change_ts < s.hold_s:
        return out
    for n in sorted(nodes, key=lambda n: n.name):
        if not n.drained or n.by_person:
            continue
        needs = []
        for _name, usable_w, members in budgets:
            if members is not None and n.name not in members:
                continue
            needs.append((need_w(under(members), serving | {n.name}, s), usable_w))
        if not needs:
            out.append(DrainDecision(n.name, False, "no budget holds it any more"))
            break
        if all(need * s.undrain_headroom <= usable for need, usable in needs):
            need, usable = max(needs, key=lambda x: x[0] / x[1])
            out.append(
                DrainDecision(n.name, False, f"budget {usable:.0f} W serves it: needs {need:.0f} W")
            )
            break  # one at a time; one too big to return does not block a smaller one
    return out
