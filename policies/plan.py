"""The controller's decision: ``plan(snapshot, settings) -> Plan``, pure and deterministic."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from wattkeeper.policies.budget_tree import BudgetTree, TreeAllocation, allocate_tree

CAPPED_RATIO = 0.97
"""A GPU drawing this share of its limit is taken as held back by it (demand unknown)."""
HEADROOM_W = 25.0
HEADROOM_RATIO = 0.10
"""A GPU drawing less than its limit wants its draw plus this share and these watts."""


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
    oversubscribe: bool = False
    """Budget a GPU that draws well under its limit at its predicted draw, not at its
    limit, and lift its limit to its top: the budgets then hold more GPUs at full speed,
    and a surge past them is caught by the emergency check (the controller re-plans on
    the measurement within an agent interval). Off: every limit counts in full, so no
    surge can pass a budget."""

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
    standby: bool = False
    """Its drain powered it down (its agent said so): silent, it draws standby power."""


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
    infeasible_budgets: tuple[str, ...] = ()
    """The budgets its GPUs' floors and non-GPU power exceed (``FACILITY`` or a domain)."""


@dataclass(frozen=True)
class Domain:
    """A budget below the facility's: a room, PDU or rack, holding nodes and domains."""

    name: str
    parent: str
    """Its parent domain's name; ``FACILITY`` for a top-level one."""
    limit_w: float | None
    """None: it only groups (no limit of its own)."""
    nodes: tuple[str, ...] = ()


FACILITY = "facility"


def domain_members(domains: Sequence[Domain]) -> dict[str, set[str]]:
    """The nodes under each domain, its subdomains' included."""
    children: dict[str, list[Domain]] = {}
    for d in domains:
        children.setdefault(d.parent, []).append(d)

    def under(d: Domain) -> set[str]:
        out = set(d.nodes)
        for child in children.get(d.name, []):
            out |= under(child)
        return out

    return {d.name: under(d) for d in domains}


def plan(
    nodes: list[PlanNode],
    gpus: list[PlanGpu],
    budget_w: float | None,
    s: PlanSettings,
    domains: Sequence[Domain] = (),
) -> Plan:
    """Per-GPU power limits that keep facility power under ``budget_w`` (None: no
    budget), every domain under its own limit, and each GPU under its latency ceiling.

    One water-filling for all of it (``policies/budget_tree.py``): GPUs rise to a common
    level, a budget that fills freezes its subtree, and each node's non-GPU power counts
    against every budget above it. Stale GPUs (no sample younger than
    ``stale_after_s``) keep their current target and count at that target in their
    node: a controller that cannot see a GPU does not relax its cap.
    """
    overhead: dict[str, float] = {}
    for n in nodes:
        if s.is_fresh(n.sample_age_s) and n.non_gpu_power_w is not None:
            overhead[n.name] = n.non_gpu_power_w
        elif n.standby and s.drained_node_w is not None:
            overhead[n.name] = s.drained_node_w  # powered down: its agent cannot report
        else:
            # Silent: its host draws what it last did, or the configured model where that
            # is higher (a partitioned node keeps running).
            last = n.non_gpu_power_w if n.non_gpu_power_w is not None else 0.0
            overhead[n.name] = max(last, s.default_node_overhead_w)
    stale: list[PlanGpu] = []
    fresh_gpus: list[PlanGpu] = []
    targets: list[PlanTarget] = []
    drained = {n.name for n in nodes if n.drained}
    asleep = {n.name for n in nodes if n.drained and n.standby}
    held = dict.fromkeys(overhead, 0.0)  # GPU watts a node holds outside the water-filling
    for g in gpus:
        held.setdefault(g.node, 0.0)
        overhead.setdefault(g.node, s.default_node_overhead_w)
        fresh = s.is_fresh(g.sample_age_s)
        if g.node in drained and (fresh or g.node in asleep):
            # Out of service: at the floor until it empties, budgeted at what it draws;
            # silent after its drain powered it down, at nothing (its host at standby).
            targets.append(PlanTarget(g.uuid, g.min_w, "node drained: held at the floor"))
            if fresh and g.power_w is not None:
                held[g.node] += min(g.power_w, g.max_w)
            elif g.node not in asleep or s.drained_node_w is None:
                held[g.node] += g.min_w
            continue
        if fresh:
            fresh_gpus.append(g)
            continue
        # Silent and not known to be powered down (a drain that failed or only cordons,
        # an agent that died): what it may draw is what its caps allow.
        stale.append(g)
        if g.target_w is None and g.limit_w is None:
            targets.append(PlanTarget(g.uuid, g.min_w, "never sampled: held at the floor"))
            held[g.node] += g.min_w
            continue
        keep = g.target_w if g.target_w is not None else g.limit_w
        assert keep is not None
        keep = min(max(keep, g.min_w), g.max_w)
        if g.node in drained:
            targets.append(PlanTarget(g.uuid, g.min_w, "node drained, silent: to the floor"))
        else:
            targets.append(PlanTarget(g.uuid, keep, "no fresh sample: cap held, not relaxed"))
        # Budget the larger of what we asked and what the GPU last had: a cleanly
        # stopped agent restores its GPUs above their target, a crashed one leaves the
        # target in force; either way that is what the GPU may draw now. Its host power
        # was last read at the GPU's last draw, so a rise from there to the cap brings
        # the coupled host power too; the rest is in the host reading already.
        may_draw = min(max(keep, g.limit_w or 0.0), g.max_w)
        rise = may_draw - (g.power_w if g.power_w is not None else 0.0)
        held[g.node] += may_draw + s.non_gpu_w_per_gpu_w * max(0.0, rise)

    non_gpu = sum(overhead.values())
    drawn_by_node: dict[str, float] = {}
    for g in fresh_gpus:
        if g.power_w is not None:
            drawn_by_node[g.node] = drawn_by_node.get(g.node, 0.0) + g.power_w
    # The facility: raising GPU power raises non-GPU power too, G + H0 + k (G - G0) <= B',
    # so the GPUs' share above today's draw shrinks by 1 + k.
    # Held watts are drawn already (or budgeted with their own rise): only the fresh
    # GPUs' rise above their draw pays the coupling.
    usable = (
        math.inf
        if budget_w is None
        else budget_w * (1 - s.margin_ratio) - non_gpu - sum(held.values())
    )
    drawn = sum(drawn_by_node.values())
    if usable > drawn:
        usable = drawn + (usable - drawn) / (1 + s.non_gpu_w_per_gpu_w)

    tree, node_index = _tree(domains, overhead, held, drawn_by_node, usable, s)
    maxs = np.array([g.max_w for g in fresh_gpus], dtype=float)
    ceilings = np.array(
        [np.inf if g.ceiling_w is None else g.ceiling_w for g in fresh_gpus], dtype=float
    )
    tops = np.minimum(maxs, ceilings)
    mins = np.array([g.min_w for g in fresh_gpus], dtype=float)
    demand = np.minimum(tops, demand_w(fresh_gpus, mins, tops))
    leaf = np.array([node_index[g.node] for g in fresh_gpus], dtype=np.int64)
    # Demand first (a GPU drawing less than its share keeps headroom above its draw),
    # then what demand left over, up to each GPU's ceiling.
    first = allocate_tree(tree, leaf, mins, demand)
    # Oversubscribed, a light GPU that got all it is predicted to draw counts at that in
    # every budget: what demand left over goes to the GPUs held back, and the light ones'
    # limits rise to their tops outside the budgets.
    lifted = (demand < tops - 1e-6) & (first.limits_w >= demand - 1e-6) & s.oversubscribe
    budget_tops = np.where(lifted, first.limits_w, tops)
    second = allocate_tree(tree, leaf, first.limits_w, budget_tops) if fresh_gpus else first
    limits = np.where(lifted, tops, second.limits_w)
    # Whole watts, rounded down, but never below a fractional hardware floor.
    whole = np.maximum(mins, np.floor(limits)).tolist()
    reasons = _reasons(fresh_gpus, second, tree, tops, maxs, demand)
    for i, (g, limit, reason) in enumerate(zip(fresh_gpus, whole, reasons, strict=True)):
        if lifted[i]:
            reason = (
                f"oversubscribed: budgeted at its predicted draw {demand[i]:.0f} W, "
                f"limit {limit:.0f} W"
            )
        targets.append(PlanTarget(g.uuid, limit, reason))
    infeasible = first.infeasible or second.infeasible
    said = "no budget" if budget_w is None else f"budget {budget_w:.0f} W"
    explanation = f"{said}, non-GPU {non_gpu:.0f} W, margin {s.margin_ratio:.0%}: "
    if infeasible:
        explanation += "; ".join(b.reason for b in infeasible)
    elif np.isfinite(usable):
        explanation += f"{len(fresh_gpus)} GPUs share {usable:.0f} W"
    else:
        explanation += f"{len(fresh_gpus)} GPUs at their ceilings"
    if stale:
        explanation += f"; {len(stale)} GPU(s) without fresh samples held at their cap"
    return Plan(
        tuple(targets),
        budget_w,
        usable,
        non_gpu,
        not infeasible,
        len(stale),
        explanation,
        tuple(dict.fromkeys(b.name for b in infeasible)),
    )


def _tree(
    domains: Sequence[Domain],
    overhead: dict[str, float],
    held: dict[str, float],
    drawn_by_node: dict[str, float],
    usable: float,
    s: PlanSettings,
) -> tuple[BudgetTree, dict[str, int]]:
    """Facility, domains and one leaf per node (its non-GPU power and held GPU watts as
    overhead). The facility's limit is what its GPUs may share plus all overhead, so its
    capacity for the water-filling is exactly ``usable``. A domain keeps the same margin
    and, like the facility, pays for the non-GPU power its GPUs' rise would add."""
    names = [FACILITY] + [d.name for d in domains]
    index = {name: i for i, name in enumerate(names)}
    parents = [-1] + [index[d.parent] for d in domains]
    members = domain_members(domains)
    limits = [math.inf]
    for d in domains:
        if d.limit_w is None:
            limits.append(math.inf)
            continue
        limit = d.limit_w * (1 - s.margin_ratio)
        fixed = sum(overhead.get(n, 0.0) + held.get(n, 0.0) for n in members[d.name])
        drawn = sum(drawn_by_node.get(n, 0.0) for n in members[d.name])
        room = limit - fixed - drawn
        if room > 0:  # G + H + k (G - G0) <= L: the rise above today's draw shrinks
            limit = fixed + drawn + room / (1 + s.non_gpu_w_per_gpu_w)
        limits.append(limit)
    home = {node: index[d.name] for d in domains for node in d.nodes}
    node_index: dict[str, int] = {}
    overheads = [0.0] * len(names)
    for node in overhead:
        node_index[node] = len(names)
        names.append(f"node:{node}")
        parents.append(home.get(node, 0))
        limits.append(math.inf)
        overheads.append(overhead[node] + held.get(node, 0.0))
    total_overhead = sum(overheads)
    limits[0] = usable + total_overhead if np.isfinite(usable) else math.inf
    return BudgetTree.from_parents(names, parents, limits, overheads), node_index


def demand_w(gpus: list[PlanGpu], mins: np.ndarray, tops: np.ndarray) -> np.ndarray:
    """What each GPU would draw if it were not capped, as far as we can tell: a GPU
    drawing well under its limit wants a little more than it draws (it keeps headroom
    above its draw); one at its limit, or unknown, wants its top."""
    power = np.array([np.nan if g.power_w is None else g.power_w for g in gpus], dtype=float)
    limit = np.array([np.nan if g.limit_w is None else g.limit_w for g in gpus], dtype=float)
    capped = np.array([g.power_capped for g in gpus], dtype=bool)
    unknown = np.isnan(power) | np.isnan(limit)
    held = capped | (power >= CAPPED_RATIO * limit)
    light = np.clip(power * (1 + HEADROOM_RATIO) + HEADROOM_W, mins, tops)
    return np.where(unknown | held, tops, light)


def _reasons(
    gpus: list[PlanGpu],
    alloc: TreeAllocation,
    tree: BudgetTree,
    tops: np.ndarray,
    maxs: np.ndarray,
    demand: np.ndarray,
) -> list[str]:
    """Why each GPU got its limit, in words for the audit log and ``explain``: the budget
    that holds it (by name), its latency ceiling, or its own demand."""
    limits = alloc.limits_w
    holder = alloc.limited_by
    held = (holder >= 0) & (limits < tops - 1e-6)
    hopeless = np.isneginf(alloc.node_level_w)
    out = []
    for i, g in enumerate(gpus):
        raw = float(limits[i])
        limit = max(g.min_w, math.floor(raw))  # as written: whole watts
        top = max(g.min_w, math.floor(tops[i]))
        if held[i]:
            h = int(holder[i])
            if hopeless[h]:
                out.append(f"budget {tree.names[h]} is below its GPUs' floors: held at the floor")
            else:
                out.append(f"budget {tree.names[h]} holds it at {limit:.0f} W")
        elif tops[i] < maxs[i] and raw >= tops[i] - 1e-6:
            out.append(f"latency ceiling {top:.0f} W: {g.ceiling_reason}")
        elif raw >= maxs[i] - 1e-6:
            out.append("uncapped: the budgets allow the maximum")
        elif demand[i] < tops[i] - 1e-6:
            out.append(f"draws {g.power_w or 0:.0f} W: limit {limit:.0f} W leaves headroom")
        else:
            out.append(f"limit {limit:.0f} W")
    return out


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
