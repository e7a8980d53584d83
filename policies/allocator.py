"""What a GPU would draw if it were not capped: the demand the water-filling serves first.

GPUs that draw less than they are allowed keep a limit just above their draw, and what
is left is spread over the GPUs held back by their cap (``policies/plan.py``, with the
water-filling itself in ``policies/budget_tree.py``).
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


def estimate_demand_w(g: GpuState) -> float:
    """How much the GPU would draw if it were not capped, as far as we can tell."""
    if g.power_w is None or g.limit_w is None:
        return g.max_w
    if g.power_capped or g.power_w >= CAPPED_RATIO * g.limit_w:
        return g.max_w
    return float(np.clip(g.power_w * (1 + HEADROOM_RATIO) + HEADROOM_W, g.min_w, g.max_w))
