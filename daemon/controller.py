"""The controller: read the newest samples, plan per-GPU limits, write targets with a lease."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from wattkeeper.policies.plan import Plan, PlanGpu, PlanNode, PlanSettings, plan
from wattkeeper.store.repository import Snapshot, Store, TargetSpec

log = logging.getLogger(__name__)


@dataclass
class ControllerState:
    last_plan: Plan | None = None
    last_tick_ts: float | None = None
    targets_changed: int = 0
    no_budget_warned: bool = False


class Controller:
    def __init__(
        self, store: Store, settings: PlanSettings, lease_s: float, forget_after_s: float = 3600.0
    ) -> None:
        self.store = store
        self.forget_after_s = forget_after_s
        self.settings = settings
        self.lease_s = lease_s
        self.state = ControllerState()

    def tick(self, now: float) -> Plan | None:
        snap = self.store.snapshot(now, window_s=max(60.0, 3 * self.settings.stale_after_s))
        self.state.last_tick_ts = now
        if snap.budget_w is None:
            if not self.state.no_budget_warned:
                log.warning("no facility budget set: nothing to enforce (wattkeeper budget set)")
                self.state.no_budget_warned = True
            return None
        self.state.no_budget_warned = False
        result = plan(*planning_inputs(snap, self.forget_after_s), snap.budget_w, self.settings)
        self.state.last_plan = result
        specs = [TargetSpec(t.uuid, t.power_limit_w, reason=t.reason) for t in result.targets]
        self.state.targets_changed += self.store.write_targets(specs, now, self.lease_s)
        if not result.feasible:
            log.warning("%s", result.explanation)
        return result


def planning_inputs(
    snap: Snapshot, forget_after_s: float = float("inf")
) -> tuple[list[PlanNode], list[PlanGpu]]:
    """Planner inputs from a snapshot; nodes silent for ``forget_after_s`` no longer count.

    A node that stopped reporting a moment ago still holds its cap and its power is
    assumed; one silent for longer than ``forget_after_s`` is taken as gone
    (decommissioned, or a simulation that ended) so it stops holding budget forever.
    """
    now = snap.ts
    live = [n for n in snap.nodes if now - n.last_seen_at <= forget_after_s]
    names = {n.name for n in live}
    nodes = [
        PlanNode(n.name, n.non_gpu_power_w, None if n.host_ts is None else now - n.host_ts)
        for n in live
    ]
    gpus = [
        PlanGpu(
            uuid=g.uuid,
            node=g.node,
            min_w=g.power_min_w,
            max_w=g.power_max_w,
            power_w=g.power_w,
            limit_w=g.power_limit_w,
            target_w=g.target_power_limit_w,
            sample_age_s=None if g.sample_ts is None else now - g.sample_ts,
            power_capped="sw_power_cap" in g.throttle_reasons,
        )
        for g in snap.gpus
        if g.node in names
    ]
    return nodes, gpus
