"""Policies side by side on the same scenario and the same arrivals.

Five policies run on identical facilities (same seed, so the same requests arrive):

- ``nocap``: no limit at all, the facility as it would run without wattkeeper;
- ``uniform``: what admins do today, the budget less the nodes' nameplate serving
  overhead split evenly over the GPUs, changed only when the budget changes;
- ``proportional``: every control period, limits proportional to each GPU's measured
  draw, scaled to fit the budget less the measured non-GPU power;
- ``wattkeeper``: the real thing: agents on the simulated GPU backend, a store, the
  controller's plan function, on the simulated clock;
- ``optimum``: at every control period, the best allocation of power limits, clock
  locks and drains on the simulator's true curves, by a MILP (``optimum.py``),
  independent of the policy code.

Scores come from the facility's ground truth: tokens, energy, the per-second facility
power against the budget in force, and the requests served within their SLO.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from wattkeeper.simulator import physics
from wattkeeper.simulator.facility import SimFacility
from wattkeeper.simulator.scenario import Scenario

POLICIES = ("nocap", "uniform", "proportional", "wattkeeper", "optimum")
CONTROL_INTERVAL_S = 5.0
START_TS = 1_800_000_000.0
"""Simulated runs start at a fixed Unix time so that results never depend on the wall."""


class Policy(Protocol):
    """A controller of the simulated facility, called once per simulated second."""

    def step(self, f: SimFacility, t: float) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PolicyResult:
    tokens: int
    tokens_per_s: float
    energy_j: float
    tokens_per_joule: float
    over_budget_s: int
    max_excursion_s: int
    """Longest run of consecutive seconds over budget."""
    max_excursion_w: float
    """Largest amount by which a 1-second average exceeded the budget."""
    slo_attainment: float | None
    requests_finished: int
    fraction_of_optimum: float | None = None
    series: dict[str, list[float]] | None = None
    """Per-second facility power and budget and per-interval tokens/s, for the report."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("series")
        return out


def gpu_power_range(f: SimFacility) -> tuple[np.ndarray, np.ndarray]:
    lo = np.array([f.gpu_kind(g).power_min_w for g in range(f.n_gpus)])
    hi = np.array([f.gpu_kind(g).power_max_w for g in range(f.n_gpus)])
    return lo, hi


class NoCap:
    def step(self, f: SimFacility, t: float) -> None:
        """Nothing: every GPU keeps its default limit."""

    def close(self) -> None:
        pass


class Uniform:
    """The budget less the nodes' serving overhead, split evenly; set when the budget changes."""

    def __init__(self) -> None:
        self._budget: float | None = None

    def step(self, f: SimFacility, t: float) -> None:
        budget = f.budget_at(t)
        if budget == self._budget:
            return
        self._budget = budget
        lo, hi = gpu_power_range(f)
        if budget is None:
            f.limit_requested[:] = hi
            return
        overhead = sum(physics.HOST_KINDS[h].serving_w for h in f.node_host_kind)
        share = (budget - overhead) / f.n_gpus
        f.limit_requested[:] = np.clip(share, lo, hi)

    def close(self) -> None:
        pass


class Periodic:
    """A policy that acts once per control period, and lifts every cap without a budget."""

    interval_s: float = CONTROL_INTERVAL_S
    _next: float = float("-inf")

    def step(self, f: SimFacility, t: float) -> None:
        if t < self._next:
            return
        self._next = t + self.interval_s
        budget = f.budget_at(t)
        lo, hi = gpu_power_range(f)
        if budget is None:
            f.limit_requested[:] = hi
            return
        self.control(f, t, budget, lo, hi)

    def control(
        self, f: SimFacility, t: float, budget: float, lo: np.ndarray, hi: np.ndarray
    ) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Proportional(Periodic):
    """Limits proportional to measured draw, scaled so that their sum fits the budget."""

    def __init__(self, interval_s: float = CONTROL_INTERVAL_S, margin_ratio: float = 0.02) -> None:
        self.interval_s = interval_s
        self.margin = margin_ratio

    def control(
        self, f: SimFacility, t: float, budget: float, lo: np.ndarray, hi: np.ndarray
    ) -> None:
        draw = np.maximum(f.power_avg_1s(), lo)
        gpu_budget = budget * (1 - self.margin) - float(f.host_power.sum())
        scale = gpu_budget / float(draw.sum()) if draw.sum() > 0 else 1.0
        f.limit_requested[:] = np.clip(draw * scale, lo, hi)


class Optimum(Periodic):
    """The MILP's allocation on true curves, re-solved every control period.

    It keeps the same 2% margin as the production controller: load drifts within a
    control period, and an oracle that spends the last watt would be over budget as
    often as not, which is not a result worth comparing against.

    Drains are decided with the MILP too, but they take minutes in the facility
    (in-flight requests finish first, a woken node needs ``wake_s``), so the drain set
    is re-decided only when the budget changes or every ``drain_every_s``; between
    those, each period's MILP sets limits and clock locks on the nodes that serve,
    with what the draining or waking nodes draw charged against the budget.
    """

    def __init__(
        self,
        interval_s: float = CONTROL_INTERVAL_S,
        margin_ratio: float = 0.02,
        drain_every_s: float = 300.0,
    ) -> None:
        self.interval_s = interval_s
        self.margin = margin_ratio
        self.drain_every_s = drain_every_s
        self._drain_due = float("-inf")
        self._budget: float | None = None
        self._drained: frozenset[int] = frozenset()

    def control(
        self, f: SimFacility, t: float, budget: float, lo: np.ndarray, hi: np.ndarray
    ) -> None:
        usable = budget * (1 - self.margin)
        if budget != self._budget or t >= self._drain_due:
            self._budget = budget
            self._drain_due = t + self.drain_every_s
            self._drained = self._solve(f, usable, exclude=set(), allow_drain=True).drained_nodes
        for n in range(f.n_nodes):
            f.set_drained(n, n in self._drained)
        # Nodes drained (in any state) or still waking take no part in this period's
        # plan: their GPUs sit at the floor and what they draw now is charged first.
        aside = {n for n in range(f.n_nodes) if n in self._drained or not f.node_up(n)}
        for n in aside:
            gpus = list(f.node_gpu_indices(n))
            f.limit_requested[gpus] = lo[gpus]
            usable -= float(f.power_true[gpus].sum() + f.host_power[n])
        result = self._solve(f, usable, exclude=aside, allow_drain=False)
        for d in result.replicas:
            gpus = np.flatnonzero(f.replica_of == d.replica)
            # The chosen setting's power is a prediction at the steady-state batch; the
            # limit also holds each GPU to it, so a batch that grows under a clock lock
            # (Little's law) cannot carry the facility over the budget.
            per_gpu = min(d.power_limit_w, d.power_w / len(gpus))
            f.limit_requested[gpus] = np.clip(per_gpu, lo[gpus], hi[gpus])
            if d.clock_lock_mhz is None:
                f.clock_lock[gpus] = np.nan
                f.clock_lock_min[gpus] = np.nan
            else:
                f.clock_lock[gpus] = d.clock_lock_mhz
                f.clock_lock_min[gpus] = min(f.gpu_kind(int(g)).min_sm_clock_mhz for g in gpus)

    @staticmethod
    def _solve(f: SimFacility, budget_w: float, exclude: set[int], allow_drain: bool) -> Any:
        """The MILP over the nodes that are up or in standby, on the load's true state.

        Each replica's curve is taken at the uncapped steady state of the current
        arrivals; a model with a backlog in the router is saturated (no demand cap), so
        the optimum also pays for draining queues, not only for keeping up. Prefill-pool
        replicas make no generated tokens themselves: where a scenario has them, the
        objective counts prompt tokens too, or the optimum would starve its decoders.
        """
        from wattkeeper.simulator import optimum

        demand = f.demand_tokens_per_s()
        batch = f.demand_physics_batch()
        share = f.demand_prefill_fraction()
        backlog = {m: q for m, q in f.router_queue.items() if q >= 1.0}
        for m, q in f.handoff_queue.items():
            if q >= 1.0:
                backlog[m] = backlog.get(m, 0.0) + q
        disaggregated = "prefill" in f.replica_role
        replicas = []
        for r in range(f.n_replicas):
            node = int(f.replica_node[r])
            if node in exclude or not f.node_alive[node]:
                continue
            g0 = int(np.flatnonzero(f.replica_of == r)[0])
            kind, model = f.gpu_kind_names[g0], f.replica_model[r]
            saturated = model in backlog
            if f.replica_role[r] == "prefill":
                full = physics.operating_point(
                    physics.GPU_KINDS[kind],
                    physics.MODELS[model],
                    batch=1.0,
                    prefill_fraction=1.0,
                )
                want = None if saturated else float(share[r] * full.prefill_tokens_per_s)
                state = optimum.ReplicaState(r, node, kind, model, 1.0, 1.0, want)
            else:
                n = float(f.max_inflight[r]) if saturated else max(float(batch[r]), 1.0)
                want = None if saturated else float(demand[r])
                if disaggregated and want is not None and f.replica_role[r] == "mixed":
                    want += float(share[r] * demand[r])
                state = optimum.ReplicaState(r, node, kind, model, n, float(share[r]), want)
            replicas.append(state)
        nodes = [
            optimum.NodeState(
                node=n,
                host_kind=f.node_host_kind[n],
                gpus=len(f.node_gpu_indices(n)),
                alive=bool(f.node_alive[n]) and n not in exclude,
                standby_w=f.scenario.standby_w,
            )
            for n in range(f.n_nodes)
        ]
        return optimum.solve(
            replicas,
            nodes,
            budget_w,
            allow_drain=allow_drain,
            count="all" if disaggregated else "generated",
        )


class Wattkeeper:
    """The production code path: agents, store, controller, on the simulated clock."""

    def __init__(self, f: SimFacility, store_dir: Path | None = None) -> None:
        from wattkeeper.clock import SimClock
        from wattkeeper.config import load_config
        from wattkeeper.runtime import build_on_facility, open_store
        from wattkeeper.store.db import make_engine, upgrade

        self._tmp = None
        if store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="wattkeeper-compare-")
            store_dir = Path(self._tmp.name)
        url = f"sqlite:///{store_dir / 'compare.db'}"
        upgrade(make_engine(url))
        cfg = load_config(None, environ={})
        self.clock = SimClock(f.now)
        self.rt = build_on_facility(cfg, open_store(cfg, url), f, self.clock)
        self.interval_s = cfg.controller.interval_s
        self._next = float("-inf")
        self._budget: float | None = None

    def step(self, f: SimFacility, t: float) -> None:
        self.clock.set(t)
        budget = f.budget_at(t)
        if budget is not None and budget != self._budget:
            self.rt.store.set_budget(budget, "scenario", t)
            self._budget = budget
        due = t >= self._next
        if due:
            self._next = t + self.interval_s
        self.rt.step(due)

    def close(self) -> None:
        self.rt.store.engine.dispose()
        if self._tmp is not None:
            self._tmp.cleanup()


def make_policy(name: str, f: SimFacility) -> Policy:
    if name == "nocap":
        return NoCap()
    if name == "uniform":
        return Uniform()
    if name == "proportional":
        return Proportional()
    if name == "optimum":
        return Optimum()
    if name == "wattkeeper":
        return Wattkeeper(f)
    raise ValueError(f"unknown policy {name!r}: expected one of {', '.join(POLICIES)}")


def _excursions(power: np.ndarray, budget: np.ndarray) -> tuple[int, int, float]:
    over = power > budget
    longest = run = 0
    for flag in over:
        run = run + 1 if flag else 0
        longest = max(longest, run)
    excess = float(np.max(power - budget, initial=0.0))
    return int(over.sum()), longest, max(0.0, excess)


def run_policy(
    scenario: Scenario,
    name: str,
    *,
    duration_s: float | None = None,
    progress: Callable[[float], None] | None = None,
) -> PolicyResult:
    """Run one policy over the scenario; the facility's ground truth is the score."""
    f = SimFacility(scenario, start_ts=START_TS)
    policy = make_policy(name, f)
    duration = float(duration_s if duration_s is not None else scenario.duration_s)
    steps = round(duration)
    tokens_series: list[float] = []
    last_tokens = 0.0
    try:
        for k in range(steps + 1):
            t = START_TS + k
            f.advance_to(t)
            policy.step(f, t)
            if k % 10 == 0:
                tokens_series.append((f.stats.generated_tokens - last_tokens) / 10.0)
                last_tokens = f.stats.generated_tokens
            if progress is not None and k % 60 == 0:
                progress(k / steps)
    finally:
        policy.close()
    st = f.stats
    seconds = len(st.second_power_w)
    power = np.asarray(st.second_power_w, dtype=float)
    budget = np.asarray(
        [np.inf if b is None else b for b in st.second_budget_w[:seconds]], dtype=float
    )
    over, longest, excess = _excursions(power, budget)
    finished = int(st.requests_finished)
    return PolicyResult(
        tokens=int(st.generated_tokens),
        tokens_per_s=st.generated_tokens / seconds if seconds else 0.0,
        energy_j=st.energy_j,
        tokens_per_joule=st.generated_tokens / st.energy_j if st.energy_j else 0.0,
        over_budget_s=over,
        max_excursion_s=longest,
        max_excursion_w=excess,
        # Fluid request accounting can put "within SLO" a hair above "finished".
        slo_attainment=min(1.0, st.requests_within_slo / finished) if finished else None,
        requests_finished=finished,
        series={
            "power_w": power.tolist(),
            "budget_w": [None if np.isinf(b) else float(b) for b in budget],
            "tokens_per_s": tokens_series,
        },
    )


def compare(
    scenario: Scenario,
    policies: Sequence[str] = POLICIES,
    *,
    duration_s: float | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:
    """Every policy on the same scenario; JSON-ready, with the series kept for plots."""
    results: dict[str, PolicyResult] = {}
    for name in policies:
        results[name] = run_policy(
            scenario,
            name,
            duration_s=duration_s,
            progress=(lambda x, n=name: progress(n, x)) if progress else None,
        )
    best = results.get("optimum")
    out: dict[str, Any] = {}
    for name, res in results.items():
        frac = res.tokens / best.tokens if best is not None and best.tokens else None
        out[name] = PolicyResult(**{**asdict(res), "fraction_of_optimum": frac})
    budgets = [b for b in scenario_budgets(scenario) if b is not None]
    return {
        "format_version": 1,
        "scenario": scenario.name,
        "description": scenario.description,
        "duration_s": float(duration_s if duration_s is not None else scenario.duration_s),
        "budget_w": budgets[0] if len(set(budgets)) == 1 else budgets,
        "policies": out,
    }


def scenario_budgets(scenario: Scenario) -> list[float | None]:
    """Budgets the scenario sets over its run, in order (one entry when constant)."""
    f = SimFacility(scenario, start_ts=START_TS)
    seen: list[float | None] = []
    for k in range(0, int(scenario.duration_s) + 1, 10):
        b = f.budget_at(START_TS + k)
        if not seen or seen[-1] != b:
            seen.append(b)
    return seen


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    return {
        **{k: v for k, v in result.items() if k != "policies"},
        "policies": {name: res.to_json() for name, res in result["policies"].items()},
    }
