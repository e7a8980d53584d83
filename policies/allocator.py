"""Power-limit allocation under a facility budget: demand-aware water-filling.

Each GPU gets at least its hardware floor; GPUs that draw less than they are allowed
keep a limit just above their draw, and what is left is spread evenly over the GPUs
that are held back by their cap. The sum of limits plus the non-GPU power never
exceeds the budget less its margin, so as long as the GPUs enforce their limits the
facility stays under budget whatever the load does between control periods.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CAPPED_RATIO = 0.97
"""A GPU drawing this share of its limit is treated as held back by it (demand unknown)."""
HEADROOM_W = 25.0
HEADROOM_RATIO = 0.10


@dataclass(frozen=True)
class GpuState:
    """What the allocator needs to know of one GPU."""

    uuid: str
    min_w: float
    max_w: float
    power_w: float | None
    """1-second average draw; None when there is no fresh sample."""
    limit_w: float | None
    """Limit in force; None when unknown."""
    power_capped: bool = False


@dataclass(frozen=True)
class Allocation:
    uuid: str
    limit_w: float
    reason: str


@dataclass(frozen=True)
class AllocationResult:
    allocations: tuple[Allocation, ...]
    gpu_budget_w: float
    feasible: bool
    summary: str


def estimate_demand_w(g: GpuState) -> float:
    """How much the GPU would draw if it were not capped, as far as we can tell."""
    if g.power_w is None or g.limit_w is None:
        return g.max_w
    if g.power_capped or g.power_w >= CAPPED_RATIO * g.limit_w:
        return g.max_w
    return float(np.clip(g.power_w * (1 + HEADROOM_RATIO) + HEADROOM_W, g.min_w, g.max_w))


def water_fill(lower: np.ndarray, upper: np.ndarray, total: float) -> np.ndarray:
    """Raise every entry from ``lower`` towards ``upper`` by one common level until the
    sum reaches ``total``: x_i = clip(level, lower_i, upper_i). Exact, O(n log n)."""
    if upper.sum() <= total:
        return upper.copy()
    if lower.sum() >= total:
        return lower.copy()
    lo, hi = float(lower.min()), float(upper.max())
    for _ in range(60):  # bisection on the level: 60 halvings is below a microwatt
        level = (lo + hi) / 2
        if np.clip(level, lower, upper).sum() > total:
            hi = level
        else:
            lo = level
    return np.clip(lo, lower, upper)


def allocate(gpus: list[GpuState], gpu_budget_w: float) -> AllocationResult:
    """Split ``gpu_budget_w`` into per-GPU power limits."""
    if not gpus:
        return AllocationResult((), gpu_budget_w, True, "no GPUs")
    mins = np.array([g.min_w for g in gpus])
    maxs = np.array([g.max_w for g in gpus])
    demand = np.array([estimate_demand_w(g) for g in gpus])
    floor_sum = float(mins.sum())
    if gpu_budget_w < floor_sum:
        allocs = tuple(
            Allocation(
                g.uuid,
                g.min_w,
                f"budget for GPUs {gpu_budget_w:.0f} W is below the "
                f"sum of hardware floors {floor_sum:.0f} W: held at the floor",
            )
            for g in gpus
        )
        return AllocationResult(
            allocs,
            gpu_budget_w,
            False,
            f"infeasible: GPU budget {gpu_budget_w:.0f} W < floors "
            f"{floor_sum:.0f} W; draining nodes is the remaining lever",
        )
    first = water_fill(mins, demand, gpu_budget_w)
    left = gpu_budget_w - float(first.sum())
    limits = water_fill(first, maxs, float(first.sum()) + left) if left > 1e-6 else first
    allocs = []
    for g, d, lim in zip(gpus, demand, limits, strict=True):
        if lim >= g.max_w - 1e-6:
            why = (
                "uncapped: budget allows the maximum"
                if np.isfinite(gpu_budget_w)
                else "uncapped: no budget"
            )
        elif d >= g.max_w - 1e-6:
            why = f"demand unknown or above cap: equal share {lim:.0f} W"
        elif lim >= d - 1e-6:
            why = f"draws {g.power_w or 0:.0f} W: limit {lim:.0f} W leaves headroom"
        else:
            why = f"demand {d:.0f} W held to equal share {lim:.0f} W"
        # Whole watts, rounded down, but never below a fractional hardware floor.
        allocs.append(Allocation(g.uuid, max(g.min_w, float(np.floor(lim))), why))
    shared = f"share {gpu_budget_w:.0f} W" if np.isfinite(gpu_budget_w) else "at their maximum"
    return AllocationResult(tuple(allocs), gpu_budget_w, True, f"{len(gpus)} GPUs {shared}")
