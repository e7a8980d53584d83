import math
from typing import NamedTuple

import numpy as np
import pytest

from wattkeeper.policies.plan import Plan, PlanGpu, PlanNode, PlanSettings, plan


class GpuState(NamedTuple):
    uuid: str
    min_w: float
    max_w: float
    power_w: float | None
    limit_w: float | None
    power_capped: bool = False


def h100(uuid, power=None, limit=700.0, capped=False):
    return GpuState(uuid, 200.0, 700.0, power, limit, capped)


class Split:
    """The plan for ``gpus`` on one node with no host power, no margin and no coupling:
    what the GPUs may share is exactly ``budget``."""

    oversubscribe = False

    def __init__(self, gpus: list[GpuState], budget: float) -> None:
        node = [PlanNode("n", 0.0, 0.0)]
        plan_gpus = [
            PlanGpu(g.uuid, "n", g.min_w, g.max_w, g.power_w, g.limit_w, None, 0.0, g.power_capped)
            for g in gpus
        ]
        settings = PlanSettings(
            margin_ratio=0.0, non_gpu_w_per_gpu_w=0.0, oversubscribe=self.oversubscribe
        )
        self.plan: Plan = plan(node, plan_gpus, budget, settings)
        self.limits = {t.uuid: t.power_limit_w for t in self.plan.targets}
        self.reasons = {t.uuid: t.reason for t in self.plan.targets}


def test_sum_of_limits_never_exceeds_the_gpu_budget():
    rng = np.random.default_rng(1)
    for _ in range(50):
        gpus = [
            h100(f"g{i}", power=float(rng.uniform(100, 700)), capped=bool(rng.integers(0, 2)))
            for i in range(16)
        ]
        budget = float(rng.uniform(3300, 11000))
        limits = list(Split(gpus, budget).limits.values())
        assert sum(limits) <= budget + 1e-6
        assert all(200.0 <= x <= 700.0 for x in limits)


def test_light_gpus_keep_headroom_and_give_the_rest_to_capped_ones():
    gpus = [
        h100("light", power=250.0, limit=400.0),
        h100("busy", power=399.0, limit=400.0, capped=True),
    ]
    res = Split(gpus, 1000.0).limits
    assert res["light"] == pytest.approx(250 * 1.1 + 25, abs=1)
    assert res["busy"] == pytest.approx(1000 - res["light"], abs=1)


def test_budget_below_floor_holds_everyone_at_the_floor():
    res = Split([h100("a", 500.0), h100("b", 500.0)], 300.0)
    assert not res.plan.feasible
    assert list(res.limits.values()) == [200.0, 200.0]
    assert "drain" in res.plan.explanation


def test_plan_counts_non_gpu_power_and_margin():
    nodes = [PlanNode("n0", 2000.0, 1.0)]
    gpus = [PlanGpu(f"g{i}", "n0", 200, 700, None, None, None, None, False) for i in range(4)]
    p = plan(nodes, gpus, 4000.0, PlanSettings(margin_ratio=0.05, stale_after_s=10))
    # never-sampled GPUs are held at the floor
    assert all(t.power_limit_w == 200 for t in p.targets)
    gpus = [PlanGpu(f"g{i}", "n0", 200, 700, 650, 700, None, 1.0, True) for i in range(4)]
    p = plan(nodes, gpus, 4000.0, PlanSettings(margin_ratio=0.05, stale_after_s=10))
    assert sum(t.power_limit_w for t in p.targets) <= 4000 * 0.95 - 2000 + 1e-6
    assert p.non_gpu_power_w == 2000.0


def test_stale_gpus_are_not_relaxed():
    nodes = [PlanNode("n0", 1000.0, 1.0)]
    gpus = [
        PlanGpu("stale", "n0", 200, 700, 300, 300, 300.0, 60.0, True),
        PlanGpu("fresh", "n0", 200, 700, 300, 300, 300.0, 1.0, True),
    ]
    p = plan(nodes, gpus, 10_000.0, PlanSettings(stale_after_s=10))
    t = {x.uuid: x for x in p.targets}
    assert t["stale"].power_limit_w == 300.0
    assert "not relaxed" in t["stale"].reason
    assert t["fresh"].power_limit_w == 700.0
    assert p.stale_gpus == 1


def test_unknown_node_power_is_assumed_conservatively():
    gpus = [PlanGpu("g", "n0", 200, 700, 650, 700, None, 1.0, True)]
    p = plan(
        [PlanNode("n0", None, None)],
        gpus,
        3000.0,
        PlanSettings(margin_ratio=0.0, default_node_overhead_w=2500.0),
    )
    assert p.non_gpu_power_w == 2500.0
    assert p.targets[0].power_limit_w == 500.0


def test_stale_gpu_restored_above_its_target_is_budgeted_at_the_restored_limit():
    nodes = [PlanNode("n0", 1000.0, 1.0)]
    # target 300 W, but the agent stopped cleanly and put the GPU back to 700 W
    gpus = [
        PlanGpu("gone", "n0", 200, 700, None, 700, 300.0, 60.0, False),
        PlanGpu("live", "n0", 200, 700, 650, 700, 700.0, 1.0, True),
    ]
    p = plan(nodes, gpus, 2200.0, PlanSettings(margin_ratio=0.0, non_gpu_w_per_gpu_w=0.0))
    t = {x.uuid: x.power_limit_w for x in p.targets}
    assert t["gone"] == 300.0
    assert t["live"] == 2200 - 1000 - 700


def test_fractional_floor_is_never_rounded_below():
    res = Split(
        [GpuState("a", 100.5, 400, 300.0, 400.0), GpuState("b", 100.5, 400, 300.0, 400.0)],
        201.0,
    )
    assert list(res.limits.values()) == [100.5, 100.5]


def test_a_silent_drained_node_counts_at_its_caps_until_its_agent_said_it_powered_down():
    """A drained node whose samples stopped may have powered down, or its drain may have
    failed with the GPUs still at their old limits: only the agent's word that its drain
    powers the node down lets the plan count it at standby power."""
    settings = PlanSettings(margin_ratio=0.0, non_gpu_w_per_gpu_w=0.0, drained_node_w=150.0)
    serving = [
        PlanGpu(f"a-{i}", "a", 200.0, 700.0, 690.0, 700.0, None, 1.0, True) for i in range(4)
    ]
    silent = [
        PlanGpu(f"b-{i}", "b", 200.0, 700.0, 700.0, 700.0, 700.0, 60.0, False) for i in range(4)
    ]

    def a_total(standby: bool) -> float:
        nodes = [
            PlanNode("a", 1000.0, 1.0),
            PlanNode("b", 1000.0, 60.0, drained=True, standby=standby),
        ]
        p = plan(nodes, serving + silent, 3500.0, settings)
        b = [t for t in p.targets if t.uuid.startswith("b-")]
        assert all(t.power_limit_w == 200.0 for t in b)  # drained: asked to the floor
        return sum(t.power_limit_w for t in p.targets if t.uuid.startswith("a-"))

    # Not known to be down: b may draw 4 x 700 W and its host (assumed 2 kW), which
    # leaves nothing of 3.5 kW: a is held at its floors.
    assert a_total(standby=False) == 4 * 200.0
    # Its agent said the drain powers it down: b is 150 W, a gets the rest.
    assert a_total(standby=True) == pytest.approx(3500.0 - 1000.0 - 150.0, abs=4.0)


def test_a_silent_node_costs_its_peers_its_caps_and_its_hosts_rise_to_them_only():
    """A node that fell silent is held at its cap, its host at what it last drew, plus
    the host power its GPU's rise from its last draw to its cap would add; only the
    live GPU's own rise pays the coupling. (Charging the held watts the coupling again
    held a live peer near its floor whenever a node died.)"""
    k = 0.8
    settings = PlanSettings(
        margin_ratio=0.0, non_gpu_w_per_gpu_w=k, stale_after_s=10, default_node_overhead_w=1000
    )

    def peer_limit(b_power: float) -> float:
        nodes = [PlanNode("a", 1000.0, 1.0), PlanNode("b", 1000.0, 60.0)]
        gpus = [
            PlanGpu("a0", "a", 200, 700, 450, 450, 450.0, 1.0, True),
            PlanGpu("b0", "b", 200, 700, b_power, 450, 450.0, 60.0, True),
        ]
        targets = {t.uuid: t.power_limit_w for t in plan(nodes, gpus, 3000.0, settings).targets}
        assert targets["b0"] == 450.0  # held, not relaxed
        return targets["a0"]

    # Drawing its cap when it fell silent: what is left above a0's draw pays a0's rise.
    assert peer_limit(450.0) == math.floor(450 + (3000 - 2000 - 450 - 450) / (1 + k))
    # Drawing 250 W of its 450 W cap: it may still rise 200 W, and its host 160 W.
    assert peer_limit(250.0) == pytest.approx(3000 - 2000 - (450 + k * 200), abs=1)


class Oversubscribed(Split):
    oversubscribe = True


def test_oversubscription_budgets_light_gpus_at_their_draw_and_lifts_their_limits():
    """The busy GPU gets what the light one is predicted not to draw, as without
    oversubscription; the light one's limit goes to its maximum instead of staying at
    its draw plus headroom. Budgeted on predicted draw, the sum still fits."""
    gpus = [
        h100("light", power=250.0, limit=400.0),
        h100("busy", power=399.0, limit=400.0, capped=True),
    ]
    plain = Split(gpus, 1000.0).limits
    over = Oversubscribed(gpus, 1000.0)
    predicted = 250 * 1.1 + 25
    assert over.limits["light"] == 700.0 and plain["light"] == pytest.approx(predicted, abs=1)
    assert over.limits["busy"] == plain["busy"] == pytest.approx(1000 - predicted, abs=1)
    assert over.limits["busy"] + predicted <= 1000.0 + 1e-6
    assert over.reasons["light"].startswith("oversubscribed: budgeted at its predicted draw")
    # A budget that cannot give the light GPU even its predicted draw lifts nothing.
    tight = Oversubscribed(gpus, 450.0)
    assert tight.limits == Split(gpus, 450.0).limits


def test_oversubscription_keeps_every_budget_on_predicted_draw():
    rng = np.random.default_rng(7)
    for _ in range(50):
        gpus = [
            h100(f"g{i}", power=float(rng.uniform(100, 700)), capped=bool(rng.integers(0, 2)))
            for i in range(16)
        ]
        budget = float(rng.uniform(3300, 11000))
        over = Oversubscribed(gpus, budget)
        charged = 0.0
        for g in gpus:
            limit = over.limits[g.uuid]
            lifted = over.reasons[g.uuid].startswith("oversubscribed")
            charged += min(700.0, max(200.0, g.power_w * 1.1 + 25)) if lifted else limit
        assert charged <= budget + 1e-6
