"""The controller's decision: ``plan(snapshot, settings) -> Plan``, pure and deterministic."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from wattkeeper.policies.allocator import GpuState, allocate


@dataclass(frozen=True)
class PlanSettings:
    margin_ratio: float = 0.02
    stale_after_s: float = 10.0
    default_node_overhead_w: float = 2000.0
    """Non-GPU power assumed for a node that has not reported any (conservative)."""
    drained_node_w: float | None = None
    """What a drained node draws once powered down (None: not known to power down)."""
    non_gpu_w_per_gpu_w: float = 0.2
    """How much non-GPU power rises per watt of added GPU power: fans follow the heat and
    power supplies lose a share of what they deliver (assumption, configurable)."""

    def is_fresh(self, age_s: float | None) -> bool:
        """A reading counts as current only if it exists and is within ``stale_after_s``."""
        return age_s is not None and age_s <= self.stale_after_s


@dataclass(frozen=True)
class PlanGpu:
    uuid: str
    node: str
    min_w: float
    max_w: float
    power_w: float | None
    limit_w: float | None
    target_w: float | None
    sample_age_s: float | None
    power_capped: bool
    ceiling_w: float | None = None
    """The most this GPU needs to hold its servers' latency SLO (None: not known)."""
    ceiling_reason: str = ""


@dataclass(frozen=True)
class PlanNode:
    name: str
    non_gpu_power_w: float | None
    sample_age_s: float | None
    drained: bool = False


@dataclass(frozen=True)
class PlanTarget:
    uuid: str
    power_limit_w: float
    reason: str


@dataclass(frozen=True)
class Plan:
    targets: tuple[PlanTarget, ...]
    budget_w: float | None
    gpu_budget_w: float
    non_gpu_power_w: float
    feasible: bool
    stale_gpus: int
    explanation: str


def plan(
    nodes: list[PlanNode], gpus: list[PlanGpu], budget_w: float | None, s: PlanSettings
) -> Plan:
    """Per-GPU power limits that keep facility power under ``budget_w`` (None: no
    budget) and each GPU under its latency ceiling.

    Stale GPUs (no sample younger than ``stale_after_s``) keep their current target and
    count at that target: a controller that cannot see a GPU does not relax its cap.
    """
    non_gpu = 0.0
    for n in nodes:
        measured = n.non_gpu_power_w if s.is_fresh(n.sample_age_s) else None
        if measured is None and n.drained and s.drained_node_w is not None:
            measured = s.drained_node_w  # powered down: its agent cannot report
        non_gpu += measured if measured is not None else s.default_node_overhead_w
    usable = math.inf if budget_w is None else budget_w * (1 - s.margin_ratio) - non_gpu
    drawn = sum(fresh_gpu_power(gpus, s))
    if usable > drawn:
        # Raising GPU power raises non-GPU power too: G + H0 + k (G - G0) <= B'.
        usable = drawn + (usable - drawn) / (1 + s.non_gpu_w_per_gpu_w)
    stale: list[PlanGpu] = []
    fresh_gpus: list[PlanGpu] = []
    targets: list[PlanTarget] = []
    drained = {n.name for n in nodes if n.drained}
    for g in gpus:
        if g.node in drained:
            # Out of service: at the floor until it empties, budgeted at what it draws
            # (nothing once its actuator powered it down).
            targets.append(PlanTarget(g.uuid, g.min_w, "node drained: held at the floor"))
            fresh = g.power_w is not None and s.is_fresh(g.sample_age_s)
            if fresh and g.power_w is not None:
                usable -= min(g.power_w, g.max_w)
            elif s.drained_node_w is None:
                usable -= g.min_w  # may still be powered and at its floor
            # else: powered down, counted in the node's standby power
            continue
        (fresh_gpus if s.is_fresh(g.sample_age_s) else stale).append(g)
    for g in stale:
        if g.target_w is None and g.limit_w is None:
            targets.append(PlanTarget(g.uuid, g.min_w, "never sampled: held at the floor"))
            usable -= g.min_w
            continue
        keep = g.target_w if g.target_w is not None else g.limit_w
        assert keep is not None
        keep = min(max(keep, g.min_w), g.max_w)
        targets.append(PlanTarget(g.uuid, keep, "no fresh sample: cap held, not relaxed"))
        # Budget the larger of what we asked and what the GPU last had: a cleanly
        # stopped agent restores its GPUs above their target, a crashed one leaves the
        # target in force; either way that is what the GPU may draw now.
        usable -= min(max(keep, g.limit_w or 0.0), g.max_w)
    tops = [g.max_w if g.ceiling_w is None else min(g.max_w, g.ceiling_w) for g in fresh_gpus]
    result = allocate(
        [
            GpuState(g.uuid, g.min_w, top, g.power_w, g.limit_w, g.power_capped)
            for g, top in zip(fresh_gpus, tops, strict=True)
        ],
        usable,
    )
    for g, top, a in zip(fresh_gpus, tops, result.allocations, strict=True):
        at_ceiling = top < g.max_w and a.limit_w >= math.floor(top)
        reason = f"latency ceiling {top:.0f} W: {g.ceiling_reason}" if at_ceiling else a.reason
        targets.append(PlanTarget(a.uuid, a.limit_w, reason))
    held = "no budget" if budget_w is None else f"budget {budget_w:.0f} W"
    explanation = f"{held}, non-GPU {non_gpu:.0f} W, margin {s.margin_ratio:.0%}: {result.summary}"
    if stale:
        explanation += f"; {len(stale)} GPU(s) without fresh samples held at their cap"
    return Plan(tuple(targets), budget_w, usable, non_gpu, result.feasible, len(stale), explanation)


def fresh_gpu_power(gpus: list[PlanGpu], s: PlanSettings) -> Iterator[float]:
    """Power of every GPU whose sample is current."""
    return (g.power_w for g in gpus if g.power_w is not None and s.is_fresh(g.sample_age_s))


def fresh_node_power(nodes: list[PlanNode], s: PlanSettings) -> Iterator[float]:
    """Non-GPU power of every node whose host sample is current."""
    return (
        n.non_gpu_power_w
        for n in nodes
        if n.non_gpu_power_w is not None and s.is_fresh(n.sample_age_s)
    )
