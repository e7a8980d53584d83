"""Policies side by side on the same scenario, the same arrivals and the same rules.

The comparison is the ruler every claim about tokens per joule is measured with, so
every policy runs under one set of rules: the same facility (seeded, so the same
requests arrive), the same router with the same admission rule (a request whose queue
wait already exceeds the TTFT SLO is shed, as a router answering 429 does), the same
2% margin on measured power where a policy plans against a budget, and one score read
from the facility's ground truth, never from what a policy believes.

Policies (``POLICIES``):

- ``nocap``: every GPU at its default limit;
- ``uniform``: every control period, the budget less the 2% margin less the nodes'
  measured non-GPU power, split evenly over the GPUs (what a careful admin scripts);
- ``best-static``: the one static power limit, as a share of each GPU's maximum, for the
  whole run, found in hindsight on a grid (``static_search``): the most goodput, then
  the least energy, among those whose run stays under budget after the first control
  period (what ``nvidia-smi -pl`` and a week of tuning give);
- ``best-static-lock``: the same with one static clock lock (``nvidia-smi -lgc``);
- ``proportional``: every control period, limits proportional to measured draw;
- ``wattkeeper``: the real thing: agents, store and controller on the simulated clock;
- ``oracle-limits`` and ``oracle``: the per-period steady-state bound of ``oracle.py``
  on the true arrival rates, with power limits only, and with limits, clock locks,
  in-flight limits, routing weights and drains.

Measures (``score``), per policy: goodput (output tokens of the requests that met both
SLOs), energy and requests over a measurement window (after a warm-up, to the end of the
run: see ``measure_window``), per-request TTFT and TPOT percentiles, shed requests, and
budget compliance over the whole run at one-second resolution.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from wattkeeper.simulator.facility import LATENCY_BOUNDS_S, SimFacility
from wattkeeper.simulator.scenario import EnergyPrice, Scenario

POLICIES = (
    "nocap",
    "uniform",
    "best-static",
    "best-static-lock",
    "proportional",
    "wattkeeper",
    "oracle-limits",
    "oracle",
)
CONTROL_INTERVAL_S = 5.0
MARGIN_RATIO = 0.02
"""The margin every budget-planning policy keeps below the budget, on measured power."""
START_TS = 1_800_000_000.0
"""Simulated runs start at a fixed Unix time so that results never depend on the wall."""
WARMUP_MAX_S = 300.0
"""Longest warm-up: a capped replica's batch takes about two minutes to grow to its new
steady state (Little's law) from the uncapped one the facility starts in."""
GOODPUT_TIE_RATIO = 5e-3
"""Static settings whose goodput is within this share of the best count as tied; the
least energy among them wins (``static_search``)."""

HEADLINE = (
    "goodput_tokens",
    "slo_attainment",
    "energy_j",
    "joules_per_good_token",
    "good_tokens_per_joule",
    "tokens_per_joule",
    "over_budget_s",
)
"""Measures that get a mean and a 95% interval over seeds."""


class Policy(Protocol):
    """A controller of the simulated facility, called once per simulated second."""

    def step(self, f: SimFacility, t: float) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PolicySpec:
    """What to run: a policy name and, for static settings, the setting."""

    name: str
    limit_ratio: float | None = None
    """Static power limit as a share of each GPU's maximum limit."""
    lock_ratio: float | None = None
    """Static clock lock as a share of each GPU's maximum SM clock."""
    settings: tuple[tuple[str, str], ...] = ()
    """Configuration for the ``wattkeeper`` policy beyond the scenario's, as (``section.key``,
    value) pairs, e.g. ``(("controller.oversubscribe", "true"),)``."""

    def label(self) -> str:
        if self.limit_ratio is not None:
            return f"static limit {self.limit_ratio:.3f}"
        if self.lock_ratio is not None:
            return f"static lock {self.lock_ratio:.3f}"
        return self.name


@dataclass
class PolicyResult:
    """One policy's score; the headline measures are means where several seeds ran."""

    goodput_tokens: float
    tokens: float
    slo_attainment: float | None
    requests_finished: float
    requests_within_slo: float
    shed_requests: float
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p90_s: float | None
    tpot_p99_s: float | None
    energy_j: float
    mean_power_w: float
    joules_per_good_token: float | None
    good_tokens_per_joule: float
    tokens_per_joule: float
    goodput_tokens_per_s: float
    over_budget_s: int
    over_budget_ws: float
    max_excursion_s: int
    max_excursion_w: float
    time_to_comply_s: float | None
    """Longest time, over the run's budget cuts, from the cut until the first second at or
    under the new budget; None when the budget never drops."""
    window_s: tuple[float, float]
    energy_cost: float | None = None
    """Grid energy cost over the window (with the scenario's PUE), where it sets a price."""
    cost_per_million_good_tokens: float | None = None
    seeds: int = 1
    ci95: dict[str, tuple[float, float]] = field(default_factory=dict)
    setting: str | None = None
    of_oracle: dict[str, float | None] = field(default_factory=dict)
    realised: dict[str, float | None] | None = None
    """For the oracles: what their plan did when applied to the facility (goodput,
    energy, attainment), next to the bound reported in the main fields."""
    series: dict[str, list[Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "series"}
        out["window_s"] = list(self.window_s)
        out["ci95"] = {k: list(v) for k, v in self.ci95.items()}
        return out


# -- policies -------------------------------------------------------------------------------
def gpu_power_range(f: SimFacility) -> tuple[np.ndarray, np.ndarray]:
    lo = np.array([f.gpu_kind(g).power_min_w for g in range(f.n_gpus)])
    hi = np.array([f.gpu_kind(g).power_max_w for g in range(f.n_gpus)])
    return lo, hi


class NoCap:
    def step(self, f: SimFacility, t: float) -> None:
        """Nothing: every GPU keeps its default limit."""

    def close(self) -> None:
        pass


class Static:
    """One setting for the whole run, applied at the start and never changed."""

    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec
        self._done = False

    def step(self, f: SimFacility, t: float) -> None:
        if self._done:
            return
        self._done = True
        lo, hi = gpu_power_range(f)
        if self.spec.limit_ratio is not None:
            f.limit_requested[:] = np.clip(self.spec.limit_ratio * hi, lo, hi)
        if self.spec.lock_ratio is not None:
            for g in range(f.n_gpus):
                kind = f.gpu_kind(g)
                f.clock_lock[g] = lock_clock_mhz(kind, self.spec.lock_ratio)
                f.clock_lock_min[g] = kind.min_sm_clock_mhz

    def close(self) -> None:
        pass


def lock_clock_mhz(kind: Any, ratio: float) -> int:
    """The supported clock nearest ``ratio`` of the kind's maximum."""
    want = ratio * kind.max_sm_clock_mhz
    return min(kind.supported_sm_clocks_mhz(), key=lambda c: abs(c - want))


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


class Uniform(Periodic):
    """The budget less the margin and the measured non-GPU power, split evenly."""

    def __init__(self, margin_ratio: float = MARGIN_RATIO) -> None:
        self.margin = margin_ratio

    def control(
        self, f: SimFacility, t: float, budget: float, lo: np.ndarray, hi: np.ndarray
    ) -> None:
        share = (budget * (1 - self.margin) - float(f.host_power.sum())) / f.n_gpus
        f.limit_requested[:] = np.clip(share, lo, hi)


class Proportional(Periodic):
    """Limits proportional to measured draw, scaled so that their sum fits the budget."""

    def __init__(self, margin_ratio: float = MARGIN_RATIO) -> None:
        self.margin = margin_ratio

    def control(
        self, f: SimFacility, t: float, budget: float, lo: np.ndarray, hi: np.ndarray
    ) -> None:
        draw = np.maximum(f.power_avg_1s(), lo)
        gpu_budget = budget * (1 - self.margin) - float(f.host_power.sum())
        scale = gpu_budget / float(draw.sum()) if draw.sum() > 0 else 1.0
        f.limit_requested[:] = np.clip(draw * scale, lo, hi)


class Wattkeeper:
    """The production code path: agents, store, controller, on the simulated clock."""

    def __init__(
        self,
        f: SimFacility,
        store_dir: Path | None = None,
        settings: tuple[tuple[str, str], ...] = (),
    ) -> None:
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
        # The operator's SLO is the scenario's: a real deployment configures it in [slo].
        # So is the standby power a drain powers a node down to, and the simulated nodes
        # have a drain actuator that does.
        slo = f.scenario.slo
        cfg = load_config(
            None,
            environ={
                "WATTKEEPER_SLO__TTFT_S": str(slo.ttft_s),
                "WATTKEEPER_SLO__TPOT_S": str(slo.tpot_s),
                "WATTKEEPER_CONTROLLER__DRAIN_NODES": "true",
                "WATTKEEPER_CONTROLLER__CONSOLIDATE": "true",
                "WATTKEEPER_CONTROLLER__DRAINED_NODE_W": str(f.scenario.standby_w),
                **{
                    f"WATTKEEPER_{key.replace('.', '__').upper()}": value for key, value in settings
                },
            },
        )
        self.clock = SimClock(f.now)
        self.rt = build_on_facility(cfg, open_store(cfg, url), f, self.clock)
        self._budget: float | None = None

    def step(self, f: SimFacility, t: float) -> None:
        budget = f.budget_at(t)
        if budget is not None and budget != self._budget:
            self.rt.store.set_budget(budget, "scenario", t)
            self._budget = budget
        self.rt.advance(t)

    def close(self) -> None:
        self.rt.store.engine.dispose()
        if self._tmp is not None:
            self._tmp.cleanup()


def make_policy(spec: PolicySpec, f: SimFacility) -> Policy:
    name = spec.name
    if name == "nocap":
        return NoCap()
    if name == "static":
        return Static(spec)
    if name == "uniform":
        return Uniform()
    if name == "proportional":
        return Proportional()
    if name == "wattkeeper":
        return Wattkeeper(f, settings=spec.settings)
    if name in ("oracle", "oracle-limits"):
        from wattkeeper.simulator.oracle_policy import OraclePolicy

        return OraclePolicy(variant="limits" if name == "oracle-limits" else "full")
    raise ValueError(f"unknown policy {name!r}: expected one of {', '.join(POLICIES)}")


# -- scoring ---------------------------------------------------------------------------------
def measure_window(duration_s: float, ttft_s: float = 2.0) -> tuple[float, float]:
    """Seconds (from the start) of the measurement window: requests that arrive in it
    are followed to their end, and energy is counted over it.

    The warm-up is a tenth of the run, at least the first control period (GPUs start
    uncapped) and at most ``WARMUP_MAX_S``. Runs shorter than about ten minutes give
    figures, but a capped policy's batch is still settling in them. The window closes a
    drain before the run ends: three TTFT SLOs (at most a fifth of the run), by when
    most of its requests have been shed or reached decode; those still decoding then are
    counted at their replica's current time per token (``SimFacility.window_totals``),
    and those not yet decoding count as missing their SLO. Counting by arrival, not by
    finish, keeps a policy that holds more requests in flight (a larger batch, as a
    lower clock gives) from being charged for tokens it has only deferred.
    """
    warmup = min(max(CONTROL_INTERVAL_S, min(WARMUP_MAX_S, 0.1 * duration_s)), duration_s)
    drain = min(max(3.0 * ttft_s, CONTROL_INTERVAL_S), 0.2 * duration_s)
    return warmup, max(warmup, duration_s - drain)


def percentile(hist: np.ndarray, q: float) -> float | None:
    """The ``q`` quantile of a ``LATENCY_BOUNDS_S`` histogram: the upper bound of the bin
    where the cumulative count reaches it (never optimistic by more than a bin, 2.3%)."""
    total = float(hist.sum())
    if total <= 0.0:
        return None
    idx = int(np.searchsorted(np.cumsum(hist), q * total, side="left"))
    return float(LATENCY_BOUNDS_S[min(idx, len(LATENCY_BOUNDS_S) - 1)])


def compliance(
    power: np.ndarray, budget: np.ndarray
) -> tuple[int, float, int, float, float | None]:
    """Seconds and watt-seconds over budget, longest run of seconds over, largest excess,
    and the longest time to comply after a budget cut (1-second resolution)."""
    over = power > budget
    excess = np.where(over, power - budget, 0.0)
    longest = run = 0
    for flag in over:
        run = run + 1 if flag else 0
        longest = max(longest, run)
    comply: float | None = None
    for k in range(1, len(budget)):
        if budget[k] < budget[k - 1]:
            after = np.flatnonzero(~over[k:])
            took = float(after[0]) if len(after) else float(len(budget) - k)
            comply = took if comply is None else max(comply, took)
    return int(over.sum()), float(excess.sum()), longest, float(excess.max(initial=0.0)), comply


def score(f: SimFacility, duration_s: float) -> PolicyResult:
    """The facility's ground truth, as the comparison reports it."""
    st = f.stats
    w0, w1 = (round(x) for x in measure_window(duration_s, f.slo.ttft_s))
    power = np.asarray(st.second_power_w, dtype=float)
    budget = np.asarray(
        [np.inf if b is None else b for b in st.second_budget_w[: len(power)]], dtype=float
    )
    window = slice(w0, w1)
    energy = float(power[window].sum())
    totals = f.window_totals()
    good = totals["good_tokens"]
    tokens = totals["tokens"]
    finished = totals["finished"]
    within = totals["within_slo"]
    shed = totals["shed"]
    seconds = max(w1 - w0, 1)
    over_s, over_ws, longest, excess, comply = compliance(power, budget)
    price = f.scenario.price
    cost = None if price is None else price.cost(np.arange(w0, w1), power[window])
    # Every request that arrived in the window is judged: one still queued, prefilling or
    # waiting for a decode replica when the run ends has not been served within its SLO.
    judged = max(totals["arrived"], finished + shed)
    minutes = max(len(st.minute_ttft_hist), len(st.minute_tpot_hist))

    def minute_p(hists: list[np.ndarray], q: float) -> list[float | None]:
        return [percentile(hists[i], q) if i < len(hists) else None for i in range(minutes)]

    return PolicyResult(
        goodput_tokens=good,
        tokens=tokens,
        # Fluid accounting can put "within SLO" a hair above "finished".
        slo_attainment=min(1.0, within / judged) if judged > 0 else None,
        requests_finished=finished,
        requests_within_slo=within,
        shed_requests=shed,
        ttft_p50_s=percentile(st.ttft_hist, 0.50),
        ttft_p90_s=percentile(st.ttft_hist, 0.90),
        ttft_p99_s=percentile(st.ttft_hist, 0.99),
        tpot_p50_s=percentile(st.tpot_hist, 0.50),
        tpot_p90_s=percentile(st.tpot_hist, 0.90),
        tpot_p99_s=percentile(st.tpot_hist, 0.99),
        energy_j=energy,
        mean_power_w=energy / seconds,
        joules_per_good_token=energy / good if good > 0 else None,
        good_tokens_per_joule=good / energy if energy > 0 else 0.0,
        tokens_per_joule=tokens / energy if energy > 0 else 0.0,
        goodput_tokens_per_s=good / seconds,
        over_budget_s=over_s,
        over_budget_ws=over_ws,
        max_excursion_s=longest,
        max_excursion_w=excess,
        time_to_comply_s=comply,
        window_s=(float(w0), float(w1)),
        energy_cost=cost,
        cost_per_million_good_tokens=per_million(cost, good),
        series={
            "power_w": power.tolist(),
            "budget_w": [None if np.isinf(b) else float(b) for b in budget],
            "tokens_per_s": _per_10s(st.second_tokens),
            "good_tokens_per_s": _per_10s(st.second_good_tokens),
            "ttft_p50_s": minute_p(st.minute_ttft_hist, 0.5),
            "ttft_p99_s": minute_p(st.minute_ttft_hist, 0.99),
            "tpot_p50_s": minute_p(st.minute_tpot_hist, 0.5),
            "tpot_p99_s": minute_p(st.minute_tpot_hist, 0.99),
        },
    )


def per_million(cost: float | None, good: float) -> float | None:
    return None if cost is None or good <= 0 else cost / good * 1e6


def _per_10s(per_second: Sequence[float]) -> list[float]:
    xs = np.asarray(per_second, dtype=float)
    n = len(xs) // 10
    return (xs[: n * 10].reshape(n, 10).mean(axis=1)).tolist() if n else []


# -- running ---------------------------------------------------------------------------------
def with_budget(scenario: Scenario, budget_w: float | None) -> Scenario:
    """The scenario with one budget for the whole run (None: no budget at all)."""
    schedule = () if budget_w is None else ((0.0, float(budget_w)),)
    return replace(scenario, budget_schedule=schedule)


def run_policy(
    scenario: Scenario,
    policy: str | PolicySpec,
    *,
    duration_s: float | None = None,
    progress: Callable[[float], None] | None = None,
) -> PolicyResult:
    """Run one policy over the scenario; the facility's ground truth is the score."""
    spec = PolicySpec(policy) if isinstance(policy, str) else policy
    f = SimFacility(scenario, start_ts=START_TS)
    duration = float(duration_s if duration_s is not None else scenario.duration_s)
    w0, w1 = measure_window(duration, scenario.slo.ttft_s)
    f.measure_from = START_TS + w0
    f.window = (START_TS + w0, START_TS + w1)
    pol = make_policy(spec, f)
    steps = round(duration)
    try:
        for k in range(steps + 1):
            t = START_TS + k
            f.advance_to(t)
            pol.step(f, t)
            if progress is not None and k % 60 == 0:
                progress(k / max(steps, 1))
    finally:
        pol.close()
    res = score(f, duration)
    res.setting = None if spec.name != "static" else spec.label()
    if hasattr(pol, "bound"):
        window = measure_window(duration, scenario.slo.ttft_s)
        res = as_bound(res, pol.bound(f), window, f.start_ts, scenario.price)
    return res


def as_bound(
    res: PolicyResult,
    bound: Sequence[tuple[float, float, float]],
    window: tuple[float, float],
    start_ts: float,
    price: EnergyPrice | None = None,
) -> PolicyResult:
    """The oracle's result: goodput and energy are its per-period bound summed over the
    measurement window (each period's steady state on the arrival rates of the moment);
    latencies and compliance are those of its plan applied to the facility, whose
    goodput, energy and attainment are kept under ``realised``."""
    w0, w1 = start_ts + window[0], start_ts + window[1]
    good = energy = cost = 0.0
    for k, (t, tps, power) in enumerate(bound):
        t_end = bound[k + 1][0] if k + 1 < len(bound) else w1
        lo, hi = max(t, w0), min(t_end, w1)
        span = max(0.0, hi - lo)
        good += tps * span
        energy += power * span
        if price is not None and span > 0:
            seconds = np.arange(np.floor(lo), np.ceil(hi)) - start_ts
            cost += price.cost(seconds, np.full(len(seconds), power * span / len(seconds)))
    seconds = max(w1 - w0, 1.0)
    realised = {
        "goodput_tokens": res.goodput_tokens,
        "energy_j": res.energy_j,
        "joules_per_good_token": res.joules_per_good_token,
        "slo_attainment": res.slo_attainment,
        "shed_requests": res.shed_requests,
    }
    return replace(
        res,
        goodput_tokens=good,
        energy_j=energy,
        mean_power_w=energy / seconds,
        joules_per_good_token=energy / good if good > 0 else None,
        good_tokens_per_joule=good / energy if energy > 0 else 0.0,
        goodput_tokens_per_s=good / seconds,
        energy_cost=cost if price is not None else None,
        cost_per_million_good_tokens=per_million(cost if price is not None else None, good),
        realised=realised,
    )


def _job(scenario: Scenario, spec: PolicySpec, duration_s: float | None) -> PolicyResult:
    return run_policy(scenario, spec, duration_s=duration_s)


class Runner:
    """Runs (scenario, policy) jobs on a process pool of ``workers`` (1: in this process).

    Every job is an independent simulation, so the comparison's dozens of runs (the
    static searches above all) spread over the machine's cores.
    """

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Runner:
        if self.workers > 1:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("fork"))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def run(
        self,
        jobs: Sequence[tuple[Scenario, PolicySpec]],
        duration_s: float | None,
        done: Callable[[int], None] | None = None,
    ) -> list[PolicyResult]:
        if self._pool is None:
            out = []
            for i, (sc, spec) in enumerate(jobs):
                out.append(_job(sc, spec, duration_s))
                if done is not None:
                    done(i)
            return out
        futures = {
            self._pool.submit(_job, sc, spec, duration_s): i for i, (sc, spec) in enumerate(jobs)
        }
        results: list[PolicyResult | None] = [None] * len(jobs)
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            if done is not None:
                done(i)
        return [r for r in results if r is not None]


def seeded(scenario: Scenario, seeds: int) -> list[Scenario]:
    return [replace(scenario, seed=scenario.seed + i) for i in range(seeds)]


def aggregate(runs: Sequence[PolicyResult]) -> PolicyResult:
    """Over seeds: the mean of every count, energy and latency percentile; the per-token
    ratios from the mean energy and goodput (so that ``joules_per_good_token`` is still
    ``energy_j / goodput_tokens``); ``realised`` averaged the same way; a 95% interval of
    each headline measure over the seeds; the series of the first seed's run."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    merged: dict[str, Any] = dict(first.__dict__)
    for key in first.__dict__:
        if key in ("window_s", "seeds", "ci95", "setting", "of_oracle", "series", "realised"):
            continue
        values = [getattr(r, key) for r in runs]
        if all(isinstance(v, int | float) for v in values):
            merged[key] = float(np.mean(values))
        elif any(v is None for v in values):
            present = [v for v in values if v is not None]
            merged[key] = float(np.mean(present)) if len(present) == len(values) else None
    good, energy, tokens = merged["goodput_tokens"], merged["energy_j"], merged["tokens"]
    merged["joules_per_good_token"] = energy / good if good > 0 else None
    merged["good_tokens_per_joule"] = good / energy if energy > 0 else 0.0
    merged["tokens_per_joule"] = tokens / energy if energy > 0 else 0.0
    merged["cost_per_million_good_tokens"] = per_million(merged["energy_cost"], good)
    if all(r.realised for r in runs):
        realised: dict[str, float | None] = {}
        for key in first.realised or {}:
            values = [(r.realised or {}).get(key) for r in runs]
            realised[key] = None if None in values else float(np.mean(values))  # type: ignore[arg-type]
        if realised.get("goodput_tokens") and realised.get("energy_j") is not None:
            realised["joules_per_good_token"] = realised["energy_j"] / realised["goodput_tokens"]
        merged["realised"] = realised
    merged["seeds"] = len(runs)
    merged["ci95"] = {
        key: interval([getattr(r, key) for r in runs])
        for key in HEADLINE
        if all(getattr(r, key) is not None for r in runs)
    }
    return PolicyResult(**merged)


_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
"""Student's t, two-sided 95%, for 1-10 degrees of freedom (1.96 beyond)."""


def interval(values: Sequence[float]) -> tuple[float, float]:
    """95% confidence interval of the mean (Student's t)."""
    xs = np.asarray(values, dtype=float)
    n = len(xs)
    mean = float(xs.mean())
    if n < 2:
        return mean, mean
    t = _T95[n - 2] if n - 2 < len(_T95) else 1.96
    half = t * float(xs.std(ddof=1)) / math.sqrt(n)
    return mean - half, mean + half


# -- best static settings in hindsight -----------------------------------------------------
def static_grid(scenario: Scenario, which: str, points: int = 11) -> list[float]:
    """Ratios of each GPU's maximum (limit or clock) from the highest floor to 1."""
    from wattkeeper.simulator import physics

    kinds = [physics.GPU_KINDS[g.gpu] for g in scenario.fleet]
    if which == "limit":
        floor = max(k.power_min_w / k.power_max_w for k in kinds)
    else:
        floor = max(k.min_sm_clock_mhz / k.max_sm_clock_mhz for k in kinds)
    return [float(x) for x in np.linspace(floor, 1.0, points)]


def _spec(which: str, ratio: float) -> PolicySpec:
    if which == "limit":
        return PolicySpec("static", limit_ratio=ratio)
    return PolicySpec("static", lock_ratio=ratio)


def pick_static(results: dict[float, PolicyResult | Sequence[PolicyResult]]) -> float:
    """The setting with the most goodput, then the least energy, among those whose every
    run (one per seed) stays under the budget less the common 2% margin after the first
    control period; when none does, the fewest watt-seconds over. The margin is the one
    every planning policy keeps: a static setting tuned in hindsight to the last watt of
    the budget would get watts they may not use."""
    runs = {k: [v] if isinstance(v, PolicyResult) else list(v) for k, v in results.items()}
    means = {k: aggregate(v) for k, v in runs.items()}
    ok = {k: means[k] for k, v in runs.items() if all(_over_after_settle(r) == 0 for r in v)}
    if not ok:
        return min(means, key=lambda k: (means[k].over_budget_ws, -k))
    best = max(r.goodput_tokens for r in ok.values())
    tied = {k: r for k, r in ok.items() if r.goodput_tokens >= best * (1 - GOODPUT_TIE_RATIO)}
    return min(tied, key=lambda k: (tied[k].energy_j, k))


def _over_after_settle(r: PolicyResult) -> int:
    """Seconds after the first control period over the budget less the margin."""
    series = r.series or {}
    power = series.get("power_w", [])
    budget = series.get("budget_w", [])
    settle = round(CONTROL_INTERVAL_S)
    return sum(
        1
        for p, b in zip(power[settle:], budget[settle:], strict=False)
        if b is not None and p > b * (1 - MARGIN_RATIO)
    )


def static_search(
    scenarios: Sequence[Scenario],
    which: str,
    runner: Runner,
    duration_s: float | None,
    done: Callable[[], None] | None = None,
) -> tuple[float, list[PolicyResult]]:
    """Best static setting on a grid in hindsight: 11 points from the floor to the
    maximum, then four around the best at a quarter and half of the grid's step.
    Scored on the mean over ``scenarios`` (the seeds). Returns the ratio and its runs."""
    grid = static_grid(scenarios[0], which)
    step = grid[1] - grid[0]
    tried: dict[float, list[PolicyResult]] = {}

    def evaluate(ratios: Sequence[float]) -> None:
        new = [r for r in ratios if r not in tried and grid[0] - 1e-9 <= r <= 1.0 + 1e-9]
        jobs = [(sc, _spec(which, r)) for r in new for sc in scenarios]
        results = runner.run(jobs, duration_s, (lambda _i: done()) if done else None)
        n = len(scenarios)
        for i, r in enumerate(new):
            tried[r] = results[i * n : (i + 1) * n]

    evaluate(grid)
    best = pick_static(dict(tried))
    evaluate([best + d * step for d in (-0.5, -0.25, 0.25, 0.5)])
    best = pick_static(dict(tried))
    return best, tried[best]


# -- the comparison ---------------------------------------------------------------------------
def compare(
    scenario: Scenario,
    policies: Sequence[str] = POLICIES,
    *,
    duration_s: float | None = None,
    seeds: int = 1,
    workers: int = 1,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:
    """Every policy on the same scenario; JSON-ready, with the series kept for plots."""
    scenarios = seeded(scenario, seeds)
    results: dict[str, PolicyResult] = {}
    with Runner(workers) as runner:
        plain = [p for p in policies if p not in ("best-static", "best-static-lock")]
        jobs = [(sc, PolicySpec(p)) for p in plain for sc in scenarios]
        counts = dict.fromkeys(plain, 0)

        def finished(i: int) -> None:
            name = plain[i // len(scenarios)]
            counts[name] += 1
            if progress is not None:
                progress(name, counts[name] / len(scenarios))

        runs = runner.run(jobs, duration_s, finished)
        for k, name in enumerate(plain):
            results[name] = aggregate(runs[k * len(scenarios) : (k + 1) * len(scenarios)])
        for name, which in (("best-static", "limit"), ("best-static-lock", "lock")):
            if name not in policies:
                continue
            ratio, best_runs = static_search(scenarios, which, runner, duration_s)
            res = aggregate(best_runs)
            what = "power limit" if which == "limit" else "clock lock"
            res.setting = f"{what} {ratio:.3f} of max"
            results[name] = res
            if progress is not None:
                progress(name, 1.0)
    oracle = results.get("oracle")
    for res in results.values():
        res.of_oracle = ratios_to(res, oracle)
    ordered = {p: results[p] for p in policies if p in results}
    run_s = float(duration_s if duration_s is not None else scenario.duration_s)
    budgets = [b for b in scenario_budgets(scenario, run_s) if b is not None]
    return {
        "format_version": 2,
        "scenario": scenario.name,
        "description": scenario.description,
        "duration_s": float(duration_s if duration_s is not None else scenario.duration_s),
        "seed": scenario.seed,
        "seeds": seeds,
        "budget_w": (budgets[0] if len(set(budgets)) == 1 else budgets) if budgets else None,
        "window_s": list(
            measure_window(float(duration_s or scenario.duration_s), scenario.slo.ttft_s)
        ),
        "slo": {"ttft_s": scenario.slo.ttft_s, "tpot_s": scenario.slo.tpot_s},
        "policies": ordered,
    }


def ratios_to(res: PolicyResult, ref: PolicyResult | None) -> dict[str, float | None]:
    """Goodput and joules per good token as a share of a reference policy's."""
    if ref is None:
        return {}
    good = res.goodput_tokens / ref.goodput_tokens if ref.goodput_tokens > 0 else None
    jpt = (
        res.joules_per_good_token / ref.joules_per_good_token
        if res.joules_per_good_token is not None and ref.joules_per_good_token
        else None
    )
    return {"goodput": good, "joules_per_good_token": jpt}


def scenario_budgets(scenario: Scenario, duration_s: float | None = None) -> list[float | None]:
    """Budgets in force over the run (``duration_s``, default the scenario's), in order
    (one entry when constant)."""
    seen: list[float | None] = []
    end = scenario.duration_s if duration_s is None else duration_s
    for k in range(0, int(end) + 1, 10):
        b = scenario.budget_at(float(k))
        if not seen or seen[-1] != b:
            seen.append(b)
    return seen


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    return {
        **{k: v for k, v in result.items() if k != "policies"},
        "policies": {name: res.to_json() for name, res in result["policies"].items()},
    }
