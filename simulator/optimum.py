"""The true optimum: the most tokens/s a facility can make at one instant under its budget.

The benchmark measures every policy against this number, so it must not share the
policies' code or their estimates: it reads the facility's true state and the
simulator's physics and imports nothing from ``wattkeeper.policies``. A bug shared by a
policy and its yardstick would otherwise hide.

The model, for one control interval in steady state:

- Each replica's tokens/s against its power is the upper concave envelope of the
  (power, tokens) pairs physics gives over its settings: a fine sweep of limits, a fine
  sweep of clock locks at the max limit, and a grid of both together (a lock and a limit
  bind different phases of a mixed prefill/decode replica). Tokens are capped at the
  replica's demand before enveloping, so the curve ends at a real setting that just
  meets the demand. Envelope vertices are real settings; nearly collinear ones are
  thinned away (``THIN_TOLERANCE``) to keep the LP small.
- Convex-combination (lambda) form over the vertices, with the weights summing to the
  node's on/off variable: concave curve and maximisation, so the LP picks adjacent
  vertices without SOS2 constraints, and the relaxation of a half-open node is tight.
- Draining a node is the one discrete choice (the reason this is a MILP): a node that
  is up pays its host's idle power and every GPU's floor whatever it produces, a
  drained one only its standby power.
- Host power is linear in the node's GPU power (``physics.host_power_w``), so the
  facility's power is linear in the LP's variables and the budget is one row.
- Objective: total tokens/s minus a penalty on power too small to trade any real
  tokens (``POWER_PENALTY_RATIO``): among allocations with the same tokens it picks the
  one drawing least, so it drains nodes that make nothing (idle nodes included). By
  default the tokens are the generated ones, the unit of the demand and of the
  benchmark's score; ``count="all"`` adds prompt tokens (see ``TokenCount``).

Where the envelope is not the physics curve: at the bottom of most curves a GPU whose
limit is below what its minimum clock draws stalls part of the time, and its tokens
rise slowly and then jump once the minimum clock fits. That stretch is not concave; the
envelope bridges it with a chord no single setting reaches. Across replicas the chord
is real (some at the floor, some past the jump), and a simplex basis is exactly that:
all but at most one replica sit on vertices. So the prediction can exceed what the
settings realise by part of one replica's tokens (negligible in a large facility, up
to half the total in a two-replica one). When a replica falls more than
``SHORT_TOLERANCE`` short, :func:`solve` dives: it re-solves with that replica held
below, then above, the chord and keeps what the settings realise best. Elsewhere a
mixed replica's envelope alternates between lock and limit vertices and physics
between two of them can sit a hair (<0.1%) under the chord, so interchangeable
replicas are evened out only where that realises more (see ``_even_out``).

Mapping back (rounding): each replica's power is mapped to the setting with the most
tokens whose true power (physics) does not exceed it: the best sampled setting under
it (at least the vertex at or below it), the limit searched by bisection with either
neighbouring vertex's lock held (this is the interpolation of the limit between two
vertices that share a lock), and every supported clock with either neighbour's limit
held. Limits are rounded down to whole milliwatts, so the power still fits. Ties go to
the least power, then to no lock and the lowest limit. Both numbers are reported: the
prediction (``tokens_per_s``, ``power_w``, the latter never below the true power) and
what physics says the setting does (``realised_*``).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from wattkeeper.simulator import physics

TokenCount = Literal["generated", "all"]
"""Which tokens the objective counts: generated only (the default: the unit of the demand
and of the benchmark's score), or prompt plus generated (``OperatingPoint.tokens_per_s``).
With "generated" a replica that only prefills (a disaggregated prefill pool) is worth
nothing and sits at its floor: valuing it needs its link to the decoders it feeds, which
one replica's curve cannot express; "all" values it by its prompt tokens instead. Demand
is in generated tokens/s either way; see ``Curve.cap_tokens_per_s``."""

POWER_PENALTY_RATIO = 1e-6
"""Weight of facility watts in the objective, relative to the facility's mean tokens per
watt at full power. Small enough that it never gives up a token worth having (a segment
must gain less than a millionth of the mean tokens/W to be left unfilled), large enough
to pick the lowest-power allocation among those with equal tokens."""

BUDGET_SLACK_RATIO = 1e-7
"""The LP sees a budget this much smaller, so HiGHS's feasibility tolerance cannot put
the reported facility power a hair over the real budget."""

MIP_REL_GAP = 1e-5
"""HiGHS stops when its bound is within this of the incumbent; tighter than HiGHS's
default (1e-4) because the benchmark reports differences of a fraction of a percent."""

_POWER_TOL_W = 1e-9
"""Float noise allowed when testing a setting's true power against a chosen power; the
reported power is the larger of the two, so the guarantee stays exact."""

_LIMIT_BISECTIONS = 32
"""Halvings of the limit range when mapping back (500 W / 2^32: far below a milliwatt)."""

SHORT_TOLERANCE = 0.01
"""A replica whose setting realises this much less than its prediction sits on a chord
no setting reaches; :func:`solve` dives to push it off (see ``MAX_DIVES``)."""

MAX_DIVES = 8
"""Most dives (two re-solves each) after the first solve. They happen only when a
replica is left inside the non-concave stall stretch, rare outside small facilities."""

_CACHE_MAX = 2048
"""Curves kept between calls (about 30 KB each, samples included). Repeated states (tests,
benches, steady scenarios) skip most of a cold solve's work; states that drift every
interval miss anyway, so the cache is simply emptied when full."""

LIMIT_SWEEP_DENSITY = 4
"""The two one-knob sweeps (limit alone, lock alone at the max limit) are sampled this
many times more finely than the two-knob grid: along them the curve bends sharply where
the clock leaves its minimum, and a coarse chord there under-reads by up to 4%."""

THIN_TOLERANCE = 2e-4
"""Most tokens/s, relative to a replica's peak, that thinning an envelope may give up."""


# --------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaState:
    """One replica's true state at this instant."""

    replica: int
    node: int
    gpu_kind: str
    """A ``physics.GPU_KINDS`` key."""
    model: str
    """A ``physics.MODELS`` key; the replica spans ``tensor_parallel`` GPUs of its node."""
    batch: float
    """Requests in flight (what it would run at)."""
    prefill_fraction: float
    """Share of busy time in prefill: 1.0 for a prefill-pool replica, 0 for decode-only."""
    demand_tokens_per_s: float | None = None
    """Most generated tokens/s it can usefully serve now (None: unlimited, i.e. saturated).
    It caps the counted tokens where it is met (``Curve.cap_tokens_per_s``); it does not
    limit a replica that generates nothing (a prefill pool)."""


@dataclass(frozen=True)
class NodeState:
    """One node: its host's power model, GPU count and whether it is up."""

    node: int
    host_kind: str
    """A ``physics.HOST_KINDS`` key."""
    gpus: int
    """GPUs on the node; all draw idle power when the node is up, replicas or not."""
    alive: bool = True
    standby_w: float = 150.0
    """Power of the node when drained (powered down)."""


@dataclass(frozen=True)
class ReplicaDecision:
    """The setting for one replica, what the optimum predicts and what physics realises."""

    replica: int
    power_limit_w: float
    """Per GPU of the replica (all GPUs of a lockstep group get the same)."""
    clock_lock_mhz: int | None
    """Upper end of a locked clock range, or None for no lock."""
    tokens_per_s: float
    """Predicted useful tokens/s (the demand-capped envelope at the chosen power)."""
    power_w: float
    """Predicted, whole replica; never below what physics says the setting draws."""
    realised_tokens_per_s: float = 0.0
    """``physics.operating_point`` at the setting, capped by the demand like the curve."""
    realised_power_w: float = 0.0
    """``physics.operating_point`` at the setting, whole replica."""


@dataclass(frozen=True)
class OptimumResult:
    """The optimum allocation and what it is worth."""

    tokens_per_s: float
    """Predicted total (the MILP's objective without the power penalty)."""
    power_w: float
    """Predicted facility power: GPUs, hosts and drained nodes' standby."""
    drained_nodes: frozenset[int]
    """Alive nodes the optimum powers down (dead nodes are never listed)."""
    replicas: tuple[ReplicaDecision, ...]
    """One per input replica, in input order; drained or dead ones make and draw 0."""
    status: str
    """"optimal"; "infeasible" (nothing fits: everything drained, or with
    ``allow_drain=False`` the floor allocation, which is over budget); "time_limit" (best
    incumbent when the limit struck); "error" (solver failure, floor/drain fallback)."""
    mip_gap: float
    """Relative gap HiGHS proved (0 for a pure LP)."""
    realised_tokens_per_s: float = 0.0
    """Total tokens/s physics gives for the mapped settings (capped by demand, as above)."""
    realised_power_w: float = 0.0
    """Facility power physics gives for the mapped settings; at most ``power_w``."""
    budget_w: float = 0.0
    solver_s: float = 0.0
    """Wall time inside HiGHS."""


# --------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Curve:
    """Upper concave envelope of one replica's (power, tokens/s) over its settings.

    Vertices are in increasing power and strictly increasing tokens: the first is the
    floor (the least any setting draws at this batch: idle for an idle replica), the last
    the first point reaching peak throughput (more power buys nothing). Each vertex keeps
    the setting that realises it; the samples behind the envelope are kept so that a
    power between vertices can be mapped back to a real setting.
    """

    gpu_kind: str
    model: str
    batch: float
    prefill_fraction: float
    count: TokenCount
    allow_clock_lock: bool
    """Whether settings may lock clocks (the mapping back honours it too)."""
    demand_tokens_per_s: float | None
    """The generated tokens/s demand that caps the tokens (None: it does not bind)."""
    cap_tokens_per_s: float | None
    """The demand in counted tokens: what the cheapest setting that generates the demand
    counts, scaled down if even that generates more than the demand. Equal to the demand
    when only generated tokens count or the replica only decodes. No setting is worth
    more than this: past the demand, a replica serves only the demand's requests."""
    tensor_parallel: int
    power_w: NDArray[np.float64]
    """Whole-replica power of each vertex, increasing."""
    tokens_per_s: NDArray[np.float64]
    """Tokens/s of each vertex, increasing; slopes decreasing (concave)."""
    power_limit_w: NDArray[np.float64]
    """Per-GPU power limit of each vertex's setting."""
    clock_lock_mhz: tuple[int | None, ...]
    """Clock lock of each vertex's setting (None: unlocked)."""
    sample_power_w: NDArray[np.float64]
    sample_tokens_per_s: NDArray[np.float64]
    """Counted tokens/s of each sample, capped like the vertices."""
    sample_decode_per_s: NDArray[np.float64]
    """Generated tokens/s of each sample, uncapped."""
    sample_limit_w: NDArray[np.float64]
    sample_lock_mhz: NDArray[np.float64]
    """NaN for unlocked samples."""

    @property
    def floor_w(self) -> float:
        return float(self.power_w[0])

    @property
    def peak_w(self) -> float:
        return float(self.power_w[-1])

    @property
    def peak_tokens_per_s(self) -> float:
        return float(self.tokens_per_s[-1])

    @property
    def slopes(self) -> NDArray[np.float64]:
        """Tokens per watt of each segment (decreasing: the marginal value of power)."""
        return np.diff(self.tokens_per_s) / np.diff(self.power_w)

    def tokens_at(self, power_w: float | NDArray[np.float64]) -> float | NDArray[np.float64]:
        """Envelope tokens/s at a whole-replica power; NaN below the floor (unreachable)."""
        p = np.asarray(power_w, dtype=float)
        t = np.interp(p, self.power_w, self.tokens_per_s)
        t = np.where(p < self.power_w[0] - _POWER_TOL_W, np.nan, t)
        return float(t) if t.ndim == 0 else t

    def power_for(self, tokens_per_s: float) -> float:
        """Least whole-replica power the envelope needs for ``tokens_per_s`` (inf if above peak)."""
        if tokens_per_s > self.tokens_per_s[-1]:
            return math.inf
        if tokens_per_s <= self.tokens_per_s[0]:
            return float(self.power_w[0])
        return float(np.interp(tokens_per_s, self.tokens_per_s, self.power_w))


def _setting_grid(
    kind: physics.GpuKind, allow_clock_lock: bool, points: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Settings to sample (limit, lock; NaN = unlocked), unlocked first.

    A fine sweep of limits without a lock, a fine sweep of supported clocks at the max
    limit, and a ``points`` x ``points`` grid of both together (a lock and a limit bind
    different phases of a mixed replica, so the pair can beat either knob alone). The
    mapping back searches limits and every supported clock exactly, so the grid only has
    to place the envelope's vertices, not every setting.
    """
    fine = max(points, LIMIT_SWEEP_DENSITY * (points - 1) + 1)
    sweep = np.linspace(kind.power_min_w, kind.power_max_w, fine)
    limits = [sweep]
    locks = [np.full(fine, math.nan)]
    if allow_clock_lock:
        clocks = np.asarray(kind.supported_sm_clocks_mhz(), dtype=float)
        clocks = clocks[clocks < kind.max_sm_clock_mhz]
        pick = np.unique(np.round(np.linspace(0, len(clocks) - 1, fine)).astype(int))
        limits.append(np.full(len(pick), kind.power_max_w))
        locks.append(clocks[pick])
        grid_clocks = clocks[
            np.unique(np.round(np.linspace(0, len(clocks) - 1, points)).astype(int))
        ]
        grid_limits = np.linspace(kind.power_min_w, kind.power_max_w, points)[:-1]
        lock_grid, limit_grid = np.meshgrid(grid_clocks, grid_limits, indexing="ij")
        limits.append(limit_grid.ravel())
        locks.append(lock_grid.ravel())
    return np.concatenate(limits), np.concatenate(locks)


def _evaluate(
    kind: physics.GpuKind,
    model: physics.ModelProfile,
    batch: NDArray[np.float64],
    prefill_fraction: NDArray[np.float64],
    limit_w: NDArray[np.float64],
    lock_mhz: NDArray[np.float64],
    count: TokenCount,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """(whole-replica power, counted tokens/s, generated tokens/s) from physics.

    Settings are uniform across a tensor-parallel group.

    A lockstep group runs at its slowest GPU's clock, so giving one GPU more than the
    others only wastes power: uniform settings are optimal, and with them
    ``operating_point`` equals ``group_operating_point``.
    """
    op = physics.operating_point(
        kind,
        model,
        batch=batch,
        prefill_fraction=prefill_fraction,
        clock_cap_mhz=lock_mhz,
        power_limit_w=limit_w,
    )
    decode = np.asarray(op.decode_tokens_per_s, dtype=float)
    tokens = np.asarray(op.tokens_per_s, dtype=float) if count == "all" else decode
    power = np.asarray(op.power_w, dtype=float) * model.tensor_parallel
    return power, tokens, decode


def _upper_envelope(
    power: NDArray[np.float64], tokens: NDArray[np.float64], pref: NDArray[np.float64]
) -> list[int]:
    """Indices of the upper concave envelope from the least-power sample to peak tokens.

    Ties (same power and tokens) go to the smallest ``pref``: the least intrusive setting.
    """
    order = np.lexsort((pref, -tokens, power))
    t = tokens[order]
    running = np.maximum.accumulate(t)
    keep = np.ones(len(t), dtype=bool)
    # Pareto front: a sample is kept only if it beats every cheaper one.
    keep[1:] = t[1:] > running[:-1] + 1e-9 * np.maximum(1.0, np.abs(running[:-1]))
    cand = order[keep]
    hull: list[int] = []
    for i in cand:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is dropped when it lies on or under the chord from a to i.
            if (tokens[b] - tokens[a]) * (power[i] - power[a]) <= (tokens[i] - tokens[a]) * (
                power[b] - power[a]
            ):
                hull.pop()
            else:
                break
        hull.append(int(i))
    return _thin(hull, power, tokens)


def _thin(hull: list[int], power: NDArray[np.float64], tokens: NDArray[np.float64]) -> list[int]:
    """Drop vertices that a chord over their neighbours misses by under ``THIN_TOLERANCE``.

    The fine sweeps put ~80 vertices on a smooth curve, most of them nearly collinear;
    they slow HiGHS (1024 replicas went from under a second to past the time limit) for
    no real tokens. Greedy from the floor, each chord reaches as far as a bound allows:
    a concave chain over a width w whose slopes fall from s1 to s2 lies at most
    w * (s1 - s2) / 4 above its chord. Kept vertices are still real settings, and the
    thinned curve is concave and at most the tolerance under the full one.
    """
    n = len(hull)
    if n <= 2:
        return hull
    p = power[hull].tolist()
    t = tokens[hull].tolist()
    s = [(t[i + 1] - t[i]) / (p[i + 1] - p[i]) for i in range(n - 1)]
    tol = 4.0 * THIN_TOLERANCE * max(t[-1], 1e-9)
    kept = [0]
    a, j = 0, 1
    while j < n - 1:
        # Could the chord from a reach j + 1, skipping a+1..j (slopes s[a]..s[j])?
        if (p[j + 1] - p[a]) * (s[a] - s[j]) <= tol:
            j += 1
        else:
            kept.append(j)
            a, j = j, j + 1
    kept.append(n - 1)
    return [hull[i] for i in kept]


_BaseKey = tuple[str, str, float, float, TokenCount, bool, int]
"""(gpu kind, model, batch, prefill fraction, count, clock locks allowed, points)."""
_CurveKey = tuple[_BaseKey, float | None]
"""A base key and the demand that caps it (None where the demand cannot bind)."""
_CURVES: dict[_CurveKey, Curve] = {}


def _base_key(s: ReplicaState, allow_clock_lock: bool, points: int, count: TokenCount) -> _BaseKey:
    return (
        s.gpu_kind,
        s.model,
        float(s.batch),
        float(s.prefill_fraction),
        count,
        allow_clock_lock,
        points,
    )


def _preference(limits: NDArray[np.float64], locks: NDArray[np.float64]) -> NDArray[np.float64]:
    """Unlocked before locked, then the lowest limit: the least intrusive of equal settings."""
    return np.isfinite(locks) * 1e6 + limits


def _make_curve(
    key: _BaseKey,
    demand: float | None,
    cap: float | None,
    power: NDArray[np.float64],
    tokens: NDArray[np.float64],
    decode: NDArray[np.float64],
    limits: NDArray[np.float64],
    locks: NDArray[np.float64],
) -> Curve:
    """Envelope of the samples, with tokens capped by the demand before enveloping.

    Capping first (rather than capping the envelope) makes the vertex where the curve
    meets the demand a real setting, so a demand-capped replica is given exactly the
    power its demand needs, not a point on a chord that no setting reaches.
    """
    gpu_kind, model_name, batch, pf, count, allow_lock, _ = key
    capped = tokens if cap is None else np.minimum(tokens, cap)
    v = _upper_envelope(power, capped, _preference(limits, locks))
    return Curve(
        gpu_kind=gpu_kind,
        model=model_name,
        batch=batch,
        prefill_fraction=pf,
        count=count,
        allow_clock_lock=allow_lock,
        demand_tokens_per_s=demand,
        cap_tokens_per_s=cap,
        tensor_parallel=physics.MODELS[model_name].tensor_parallel,
        power_w=power[v],
        tokens_per_s=capped[v],
        power_limit_w=limits[v],
        clock_lock_mhz=tuple(None if math.isnan(c) else int(c) for c in locks[v]),
        sample_power_w=power,
        sample_tokens_per_s=capped,
        sample_decode_per_s=decode,
        sample_limit_w=limits,
        sample_lock_mhz=locks,
    )


def _build_base(keys: Sequence[_BaseKey]) -> None:
    """Evaluate physics for all missing keys of one (kind, model) at once, then envelope each."""
    gpu_kind, model_name, _, _, count, allow_lock, points = keys[0]
    kind = physics.GPU_KINDS[gpu_kind]
    model = physics.MODELS[model_name]
    limits, locks = _setting_grid(kind, allow_lock, points)
    batch = np.asarray([k[2] for k in keys])[:, None]
    pf = np.asarray([k[3] for k in keys])[:, None]
    shape = (len(keys), len(limits))
    power, tokens, decode = (
        np.broadcast_to(a, shape)
        for a in _evaluate(kind, model, batch, pf, limits[None, :], locks[None, :], count)
    )
    for row, key in enumerate(keys):
        _CURVES[(key, None)] = _make_curve(
            key,
            None,
            None,
            np.array(power[row]),
            np.array(tokens[row]),
            np.array(decode[row]),
            limits,
            locks,
        )


def _demand_points(
    kind: physics.GpuKind,
    model: physics.ModelProfile,
    batch: NDArray[np.float64],
    pf: NDArray[np.float64],
    demand: NDArray[np.float64],
    limits: NDArray[np.float64],
    locks: NDArray[np.float64],
    count: TokenCount,
) -> tuple[NDArray[np.float64], ...]:
    """Least-power settings that just generate each demand, along both knobs of the grid.

    For every grid lock, the lowest limit that meets the demand (bisection); for every
    grid limit, the lowest supported clock that does. Unreachable ones get power inf and
    tokens -inf, which the envelope ignores. Returns (power, counted tokens, generated
    tokens, limit, lock), each of shape (replicas, points found).
    """
    b, pf, d = batch[:, None], pf[:, None], demand[:, None]
    u_locks = np.unique(locks)  # NaN (unlocked) sorts last and np.unique keeps one
    u_limits = np.unique(limits)
    shape = (len(batch), len(u_locks))
    lk = np.broadcast_to(u_locks[None, :], shape)

    def generated_at(limit: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.broadcast_to(_evaluate(kind, model, b, pf, limit, lk, count)[2], shape)

    lo = np.full(shape, kind.power_min_w)
    hi = np.full(shape, kind.power_max_w)
    reach = generated_at(hi) >= d
    at_min = generated_at(lo) >= d
    for _ in range(_LIMIT_BISECTIONS):
        mid = 0.5 * (lo + hi)
        ok = generated_at(mid) >= d
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    lim_a = np.where(at_min, kind.power_min_w, hi)
    p_a, t_a, g_a = (
        np.broadcast_to(x, shape) for x in _evaluate(kind, model, b, pf, lim_a, lk, count)
    )
    p_a = np.where(reach, p_a, np.inf)
    t_a = np.where(reach, t_a, -np.inf)
    g_a = np.where(reach, g_a, 0.0)

    clocks = np.asarray(kind.supported_sm_clocks_mhz(), dtype=float)  # descending
    shape3 = (len(batch), len(u_limits), len(clocks))
    p3, t3, g3 = (
        np.broadcast_to(x, shape3)
        for x in _evaluate(
            kind,
            model,
            b[:, :, None],
            pf[:, :, None],
            u_limits[None, :, None],
            clocks[None, None, :],
            count,
        )
    )
    meets = g3 >= d[:, :, None]
    # Tokens rise with the clock, so the last clock (in descending order) that meets the
    # demand is the lowest, and the cheapest.
    last = len(clocks) - 1 - np.argmax(meets[:, :, ::-1], axis=2)
    found = meets.any(axis=2)
    r, c = np.indices(found.shape)
    p_b = np.where(found, p3[r, c, last], np.inf)
    t_b = np.where(found, t3[r, c, last], -np.inf)
    g_b = np.where(found, g3[r, c, last], 0.0)
    lock_b = clocks[last]
    lock_b = np.where(lock_b >= kind.max_sm_clock_mhz, math.nan, lock_b)
    lim_b = np.broadcast_to(u_limits[None, :], found.shape)
    return (
        np.concatenate([p_a, p_b], axis=1),
        np.concatenate([t_a, t_b], axis=1),
        np.concatenate([g_a, g_b], axis=1),
        np.concatenate([lim_a, lim_b], axis=1),
        np.concatenate([lk, lock_b], axis=1),
    )


def _build_capped(keys: Sequence[_CurveKey]) -> None:
    """Demand-capped curves of one (kind, model): base samples plus the demand points."""
    base_key0 = keys[0][0]
    gpu_kind, model_name, _, _, count, _, _ = base_key0
    kind = physics.GPU_KINDS[gpu_kind]
    model = physics.MODELS[model_name]
    bases = [_CURVES[(k[0], None)] for k in keys]
    demand = np.asarray([k[1] for k in keys], dtype=float)
    batch = np.asarray([k[0][2] for k in keys])
    pf = np.asarray([k[0][3] for k in keys])
    limits, locks = bases[0].sample_limit_w, bases[0].sample_lock_mhz
    p_d, t_d, g_d, lim_d, lock_d = _demand_points(
        kind, model, batch, pf, demand, limits, locks, count
    )
    for row, (key, base) in enumerate(zip(keys, bases, strict=True)):
        # The cheapest demand point (most tokens among equals) converts the demand into
        # counted tokens; scaled when even it generates more than the demand.
        p_row, t_row, g_row = p_d[row], t_d[row], g_d[row]
        cheapest = np.flatnonzero(p_row <= p_row.min() + _POWER_TOL_W)
        k = cheapest[np.argmax(t_row[cheapest])]
        cap = float(t_row[k] * key[1] / g_row[k]) if g_row[k] > 0 else 0.0
        _CURVES[key] = _make_curve(
            key[0],
            key[1],
            cap,
            np.concatenate([base.sample_power_w, p_d[row]]),
            np.concatenate([base.sample_tokens_per_s, t_d[row]]),
            np.concatenate([base.sample_decode_per_s, g_d[row]]),
            np.concatenate([limits, lim_d[row]]),
            np.concatenate([locks, lock_d[row]]),
        )


def _curves(
    states: Sequence[ReplicaState], allow_clock_lock: bool, points: int, count: TokenCount
) -> list[Curve]:
    """Curves for many replicas, physics evaluated once per (kind, model) for all of them."""
    if len(_CURVES) > _CACHE_MAX:
        _CURVES.clear()
    base_keys = [_base_key(s, allow_clock_lock, points, count) for s in states]
    missing: dict[tuple[str, str], list[_BaseKey]] = defaultdict(list)
    for k in dict.fromkeys(base_keys):
        if (k, None) not in _CURVES:
            missing[(k[0], k[1])].append(k)
    for group in missing.values():
        _build_base(group)
    keys: list[_CurveKey] = []
    for s, bk in zip(states, base_keys, strict=True):
        d = s.demand_tokens_per_s
        binds = d is not None and d < float(_CURVES[(bk, None)].sample_decode_per_s.max())
        keys.append((bk, float(d) if binds and d is not None else None))
    capped: dict[tuple[str, str], list[_CurveKey]] = defaultdict(list)
    for k in dict.fromkeys(keys):
        if k not in _CURVES:
            capped[(k[0][0], k[0][1])].append(k)
    for group in capped.values():
        _build_capped(group)
    return [_CURVES[k] for k in keys]


def _check_replica(s: ReplicaState) -> None:
    if s.gpu_kind not in physics.GPU_KINDS:
        raise ValueError(f"replica {s.replica}: unknown gpu_kind {s.gpu_kind!r}")
    if s.model not in physics.MODELS:
        raise ValueError(f"replica {s.replica}: unknown model {s.model!r}")
    physics.MODELS[s.model].on(s.gpu_kind)  # raises when the pair is not modelled
    if not (math.isfinite(s.batch) and s.batch >= 0):
        raise ValueError(f"replica {s.replica}: batch must be finite and >= 0, got {s.batch}")
    if not 0.0 <= s.prefill_fraction <= 1.0:
        raise ValueError(f"replica {s.replica}: prefill_fraction must be within 0..1")
    d = s.demand_tokens_per_s
    if d is not None and not d >= 0:
        raise ValueError(f"replica {s.replica}: demand_tokens_per_s must be >= 0 or None")


def replica_curve(
    state: ReplicaState,
    *,
    allow_clock_lock: bool = True,
    points: int = 24,
    count: TokenCount = "generated",
) -> Curve:
    """The replica's concave (power, tokens/s) envelope over its settings.

    ``points`` sets the sampling: a ``points`` x ``points`` grid of limits and locks, and
    one-knob sweeps ``LIMIT_SWEEP_DENSITY`` times finer (see ``_setting_grid``). With a
    demand below its peak, the curve is of the tokens it can usefully serve: it ends at
    the least power that meets the demand (what :func:`solve` uses).
    """
    if points < 2:
        raise ValueError("points must be >= 2")
    _check_replica(state)
    return _curves([state], allow_clock_lock, points, count)[0]


# --------------------------------------------------------------------------------------
# Mapping a chosen power back to a setting
# --------------------------------------------------------------------------------------


@dataclass
class _Realised:
    limit_w: NDArray[np.float64]
    lock_mhz: NDArray[np.float64]
    tokens: NDArray[np.float64]
    """Useful tokens/s (capped by the demand); -inf where nothing fits."""
    power_w: NDArray[np.float64]


def _limit_family(
    kind: physics.GpuKind,
    model: physics.ModelProfile,
    b: NDArray[np.float64],
    pf: NDArray[np.float64],
    lock: NDArray[np.float64],
    target: NDArray[np.float64],
    cap: NDArray[np.float64],
    count: TokenCount,
) -> _Realised:
    """Largest limit whose true power fits, with the lock held (power rises with the limit)."""

    def power(limit: NDArray[np.float64]) -> NDArray[np.float64]:
        return _evaluate(kind, model, b, pf, limit, lock, count)[0]

    lo = np.full(b.shape, kind.power_min_w)
    hi = np.full(b.shape, kind.power_max_w)
    fits_lo = power(lo) <= target + _POWER_TOL_W
    fits_hi = power(hi) <= target + _POWER_TOL_W
    for _ in range(_LIMIT_BISECTIONS):
        mid = 0.5 * (lo + hi)
        ok = power(mid) <= target + _POWER_TOL_W
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid)
    # Whole milliwatts (NVML's unit), rounded down so the power still fits.
    limit = np.where(
        fits_hi, kind.power_max_w, np.maximum(np.floor(lo * 1e3) / 1e3, kind.power_min_w)
    )
    p, t, _ = _evaluate(kind, model, b, pf, limit, lock, count)
    ok = fits_lo & (p <= target + _POWER_TOL_W)
    return _Realised(limit, lock, np.where(ok, np.minimum(t, cap), -np.inf), p)


def _clock_family(
    kind: physics.GpuKind,
    model: physics.ModelProfile,
    b: NDArray[np.float64],
    pf: NDArray[np.float64],
    limit: NDArray[np.float64],
    target: NDArray[np.float64],
    cap: NDArray[np.float64],
    count: TokenCount,
) -> _Realised:
    """Highest supported clock lock whose true power fits, with the limit held."""
    clocks = np.asarray(kind.supported_sm_clocks_mhz(), dtype=float)  # descending
    shape = (len(b), len(clocks))
    p, t, _ = (
        np.broadcast_to(x, shape)
        for x in _evaluate(
            kind, model, b[:, None], pf[:, None], limit[:, None], clocks[None, :], count
        )
    )
    t = np.minimum(t, cap[:, None])
    fits = p <= target[:, None] + _POWER_TOL_W
    first = np.argmax(fits, axis=1)  # highest clock that fits: the most tokens
    rows = np.arange(len(b))
    lock = clocks[first]
    lock = np.where(lock >= kind.max_sm_clock_mhz, math.nan, lock)
    tokens = np.where(fits.any(axis=1), t[rows, first], -np.inf)
    return _Realised(limit.copy(), lock, tokens, p[rows, first].copy())


def _pick(score: NDArray[np.float64], power: NDArray[np.float64]) -> NDArray[np.intp]:
    """Per row, the most tokens; among near-equal tokens the least power, then the first.

    Capped tokens tie exactly over a range of powers; taking the first maximum would
    hand a demand-capped replica a needlessly expensive setting.
    """
    best = score.max(axis=-1, keepdims=True)
    near = score >= best - 1e-9 * np.maximum(1.0, np.abs(best))
    return np.argmin(np.where(near, power, np.inf), axis=-1)


def _realise(curves: Sequence[Curve], power_w: NDArray[np.float64]) -> _Realised:
    """The best setting whose true power is at most each replica's chosen power.

    Candidates: the best sampled setting under the power (at least the envelope vertex
    at or below it), and four one-knob searches through the settings of the two
    vertices around the power: the limit with either vertex's lock held, and every
    supported clock with either vertex's limit held. Between two vertices that share a
    lock this interpolates the limit exactly as far as the true power allows. The most
    useful tokens win, then the least power, then the sampled setting.
    """
    n = len(curves)
    out = _Realised(np.zeros(n), np.full(n, math.nan), np.zeros(n), np.zeros(n))
    groups: dict[tuple[str, str, str, bool], list[int]] = defaultdict(list)
    for i, c in enumerate(curves):
        groups[(c.gpu_kind, c.model, c.count, c.allow_clock_lock)].append(i)
    for (gk, mn, count, allow_lock), idx_list in groups.items():
        idx = np.asarray(idx_list)
        kind, model = physics.GPU_KINDS[gk], physics.MODELS[mn]
        cs = [curves[i] for i in idx_list]
        m = len(cs)
        target = power_w[idx]
        b = np.asarray([c.batch for c in cs])
        pf = np.asarray([c.prefill_fraction for c in cs])
        cap = np.asarray(
            [math.inf if c.cap_tokens_per_s is None else c.cap_tokens_per_s for c in cs]
        )
        best = _Realised(np.zeros(m), np.zeros(m), np.zeros(m), np.zeros(m))
        around = np.zeros((m, 4))  # limit below, lock below, limit above, lock above
        for j, c in enumerate(cs):
            fits = c.sample_power_w <= target[j] + _POWER_TOL_W
            if not fits.any():  # below the floor: only float noise gets here
                fits = c.sample_power_w <= c.sample_power_w.min()
            k = int(_pick(np.where(fits, c.sample_tokens_per_s, -np.inf), c.sample_power_w))
            best.limit_w[j], best.lock_mhz[j] = c.sample_limit_w[k], c.sample_lock_mhz[k]
            best.tokens[j], best.power_w[j] = c.sample_tokens_per_s[k], c.sample_power_w[k]
            v = int(np.searchsorted(c.power_w, target[j] + _POWER_TOL_W, side="right"))
            lo_v, hi_v = max(v - 1, 0), min(v, len(c.power_w) - 1)
            lock_lo, lock_hi = c.clock_lock_mhz[lo_v], c.clock_lock_mhz[hi_v]
            around[j] = (
                c.power_limit_w[lo_v],
                math.nan if lock_lo is None else lock_lo,
                c.power_limit_w[hi_v],
                math.nan if lock_hi is None else lock_hi,
            )
        cands = [
            best,
            _limit_family(kind, model, b, pf, around[:, 1], target, cap, count),
            _limit_family(kind, model, b, pf, around[:, 3], target, cap, count),
        ]
        if allow_lock:
            cands += [
                _clock_family(kind, model, b, pf, around[:, 0], target, cap, count),
                _clock_family(kind, model, b, pf, around[:, 2], target, cap, count),
            ]
        tok = np.stack([c.tokens for c in cands], axis=1)
        pw = np.stack([c.power_w for c in cands], axis=1)
        pick = _pick(tok, pw)
        rows = np.arange(m)
        out.limit_w[idx] = np.stack([c.limit_w for c in cands], axis=1)[rows, pick]
        out.lock_mhz[idx] = np.stack([c.lock_mhz for c in cands], axis=1)[rows, pick]
        out.tokens[idx] = tok[rows, pick]
        out.power_w[idx] = pw[rows, pick]
    return out


# --------------------------------------------------------------------------------------
# The facility problem
# --------------------------------------------------------------------------------------


@dataclass
class _NodeModel:
    """A node's power as the LP sees it: idle GPUs, host slope and standby."""

    state: NodeState
    host: physics.HostKind
    idle_gpu_w: float
    """Idle power of the GPUs no replica uses (they still draw when the node is up)."""
    gpu_max_w: float
    """Sum of its GPUs' max limits: the denominator of the host's load."""

    @property
    def host_slope(self) -> float:
        """Host watts per GPU watt (the host's load is GPU power over GPU max)."""
        return (self.host.serving_w - self.host.idle_w) / self.gpu_max_w

    def power_w(self, replica_gpu_w: float) -> float:
        gpu = replica_gpu_w + self.idle_gpu_w
        return gpu + float(physics.host_power_w(self.host, gpu / self.gpu_max_w))


def _host_gpu_kind(host_kind: str) -> physics.GpuKind:
    """GPU kind of a node no replica tells us about, from its host's name (dgx-h100 -> h100)."""
    for name, kind in physics.GPU_KINDS.items():
        if host_kind.endswith(name):
            return kind
    raise ValueError(f"cannot tell the GPU kind of host {host_kind!r} with no replica on it")


def _node_models(
    replicas: Sequence[ReplicaState], nodes: Sequence[NodeState]
) -> dict[int, _NodeModel]:
    used: dict[int, list[ReplicaState]] = defaultdict(list)
    for r in replicas:
        used[r.node].append(r)
    out: dict[int, _NodeModel] = {}
    for n in nodes:
        if n.host_kind not in physics.HOST_KINDS:
            raise ValueError(f"node {n.node}: unknown host_kind {n.host_kind!r}")
        if n.gpus < 0 or n.standby_w < 0:
            raise ValueError(f"node {n.node}: gpus and standby_w must be >= 0")
        rs = used.get(n.node, [])
        busy = sum(physics.MODELS[r.model].tensor_parallel for r in rs)
        if busy > n.gpus:
            raise ValueError(f"node {n.node}: replicas span {busy} GPUs, the node has {n.gpus}")
        kinds = [physics.GPU_KINDS[r.gpu_kind] for r in rs]
        # Idle GPUs are taken to be of the node's most common replica kind (nodes are
        # homogeneous in practice), else of the kind its host's name says.
        idle_kind = (
            max(sorted(set(kinds), key=lambda k: k.name), key=kinds.count)
            if kinds
            else _host_gpu_kind(n.host_kind)
        )
        gpu_max = (
            sum(
                physics.GPU_KINDS[r.gpu_kind].power_max_w * physics.MODELS[r.model].tensor_parallel
                for r in rs
            )
            + (n.gpus - busy) * idle_kind.power_max_w
        )
        out[n.node] = _NodeModel(
            state=n,
            host=physics.HOST_KINDS[n.host_kind],
            idle_gpu_w=(n.gpus - busy) * idle_kind.idle_w,
            gpu_max_w=max(gpu_max, 1e-9),
        )
    return out


def solve(
    replicas: Sequence[ReplicaState],
    nodes: Sequence[NodeState],
    budget_w: float,
    *,
    allow_drain: bool = True,
    allow_clock_lock: bool = True,
    points: int = 24,
    time_limit_s: float = 5.0,
    count: TokenCount = "generated",
) -> OptimumResult:
    """Most tokens/s under ``budget_w`` over power limits, clock locks and node drains.

    With ``allow_drain=False`` every alive node stays up and the problem is a pure LP.
    Dead nodes (``alive=False``) and their replicas make nothing and draw nothing.
    ``points`` sets the sampling of each curve (see :func:`replica_curve`);
    ``time_limit_s`` bounds HiGHS over the first solve and any dives together; ``count``
    picks the tokens that count (see :data:`TokenCount`). When nothing fits, the status
    says "infeasible" and the result is the least allocation (everything drained, or
    with ``allow_drain=False`` every replica at its floor), over budget.
    """
    if points < 2:
        raise ValueError("points must be >= 2")
    if not math.isfinite(budget_w):
        raise ValueError(f"budget_w must be finite, got {budget_w}")
    node_ids = [n.node for n in nodes]
    if len(set(node_ids)) != len(node_ids):
        raise ValueError("node ids must be unique")
    rep_ids = [r.replica for r in replicas]
    if len(set(rep_ids)) != len(rep_ids):
        raise ValueError("replica ids must be unique")
    for r in replicas:
        _check_replica(r)
        if r.node not in set(node_ids):
            raise ValueError(f"replica {r.replica} is on node {r.node}, which is not listed")
    nm = _node_models(replicas, nodes)
    curves = _curves(replicas, allow_clock_lock, points, count)

    alive_nodes = [n for n in nodes if n.alive]
    on_col = {n.node: i for i, n in enumerate(alive_nodes)}
    active = [i for i, r in enumerate(replicas) if nm[r.node].state.alive]

    standby_total = sum(n.standby_w for n in alive_nodes)
    floor_gpu = {n.node: nm[n.node].idle_gpu_w for n in alive_nodes}
    for i in active:
        floor_gpu[replicas[i].node] += curves[i].floor_w
    # What keeping each node up costs at the least (every replica at its floor), over
    # its standby: the pre-checks below and the no-incumbent fallback use it.
    a_on = np.asarray(
        [
            nm[n.node].power_w(floor_gpu[n.node] - nm[n.node].idle_gpu_w) - n.standby_w
            for n in alive_nodes
        ]
    )

    def result_for(
        on: dict[int, bool], power: NDArray[np.float64], status: str, gap: float, solver_s: float
    ) -> OptimumResult:
        return _finish(replicas, curves, nm, on, power, budget_w, status, gap, solver_s)

    all_on = {n.node: True for n in alive_nodes}
    floor_power = np.asarray([c.floor_w for c in curves])
    if allow_drain and standby_total > budget_w:
        return result_for(
            {k: False for k in all_on}, np.zeros(len(replicas)), "infeasible", 0.0, 0.0
        )
    if not allow_drain and standby_total + float(a_on.sum()) > budget_w:
        return result_for(all_on, floor_power, "infeasible", 0.0, 0.0)

    if not alive_nodes:
        return result_for({}, np.zeros(len(replicas)), "optimal", 0.0, 0.0)

    # Convex-combination (lambda) form: replica r takes weights lam_rv on its envelope's
    # vertices with sum_v lam_rv = on_n. Because that sum is on_n, this is the
    # perspective of the curve (the convex hull of on and off): a half-open node in the
    # relaxation gets half of every replica's curve, not half its power spent on the
    # steepest segments, which keeps the bound tight and the branching short. Concave
    # envelope and maximisation: the LP picks adjacent vertices, no SOS2 needed.
    n_rep, n_on = len(active), len(alive_nodes)
    n_vert = np.asarray([len(curves[i].power_w) for i in active], dtype=int)
    vert_rep = np.repeat(np.arange(n_rep), n_vert)
    vert_p = np.concatenate([curves[i].power_w for i in active]) if n_rep else np.zeros(0)
    vert_t = np.concatenate([curves[i].tokens_per_s for i in active]) if n_rep else np.zeros(0)
    n_lam = len(vert_p)
    on0 = n_lam
    n_var = n_lam + n_on
    rep_on = np.asarray([on_col[replicas[i].node] for i in active], dtype=int)
    node_cost = 1.0 + np.asarray([nm[n.node].host_slope for n in alive_nodes])
    lam_cost = vert_p * node_cost[rep_on[vert_rep]] if n_lam else np.zeros(0)
    # A node that is up pays its host's idle power and its idle GPUs (with the host's
    # share of them), less the standby it no longer draws.
    on_cost = np.asarray(
        [
            nm[n.node].host.idle_w
            + (1.0 + nm[n.node].host_slope) * nm[n.node].idle_gpu_w
            - n.standby_w
            for n in alive_nodes
        ]
    )
    # Rows: one per replica (sum_v lam_rv - on_n = 0), then the budget.
    rows = np.concatenate([vert_rep, np.arange(n_rep), np.full(n_lam + n_on, n_rep)])
    cols = np.concatenate([np.arange(n_lam), on0 + rep_on, np.arange(n_var)])
    vals = np.concatenate([np.ones(n_lam), -np.ones(n_rep), lam_cost, on_cost])
    a_mat = sparse.csr_array((vals, (rows, cols)), shape=(n_rep + 1, n_var))
    row_lb = np.concatenate([np.zeros(n_rep), [-np.inf]])
    # The slack never takes away what the least allocation needs (the pre-check let it in).
    least_w = standby_total if allow_drain else standby_total + float(a_on.sum())
    slack = min(BUDGET_SLACK_RATIO * abs(budget_w), budget_w - least_w)
    row_ub = np.concatenate([np.zeros(n_rep), [budget_w - standby_total - slack]])

    peak_t = sum(curves[i].peak_tokens_per_s for i in active)
    peak_p = sum(curves[i].peak_w for i in active) + 1.0
    eps = POWER_PENALTY_RATIO * max(peak_t / peak_p, 1e-9)
    c_obj = np.concatenate([-vert_t + eps * lam_cost, eps * on_cost])
    on_lo = np.zeros(n_on) if allow_drain else np.ones(n_on)
    integrality = np.concatenate(
        [np.zeros(n_lam), np.ones(n_on) if allow_drain else np.zeros(n_on)]
    )
    constraints = LinearConstraint(a_mat, row_lb, row_ub)
    vert_start = np.concatenate([[0], np.cumsum(n_vert)[:-1]]) if n_rep else np.zeros(0, int)
    started = time.perf_counter()

    def run(lam_ub: NDArray[np.float64]) -> OptimumResult | None:
        """One MILP with some vertices closed off (upper bound 0); None without a solution."""
        left = max(time_limit_s - (time.perf_counter() - started), 0.05)
        t0 = time.perf_counter()
        res = milp(
            c_obj,
            integrality=integrality,
            bounds=Bounds(
                np.concatenate([np.zeros(n_lam), on_lo]), np.concatenate([lam_ub, np.ones(n_on)])
            ),
            constraints=constraints,
            options={"time_limit": left, "mip_rel_gap": MIP_REL_GAP, "presolve": True},
        )
        solver_s = time.perf_counter() - t0
        if res.x is None:
            return None
        x = np.asarray(res.x)
        on = {n.node: bool(x[on0 + k] > 0.5) for k, n in enumerate(alive_nodes)}
        power = np.zeros(len(replicas))
        lam = np.clip(x[:n_lam], 0.0, 1.0)
        chosen = np.bincount(vert_rep, weights=lam * vert_p, minlength=n_rep)
        weight = np.bincount(vert_rep, weights=lam, minlength=n_rep)
        for j, i in enumerate(active):
            if on[replicas[i].node]:
                # Renormalised: on_n is 1 up to HiGHS's integrality tolerance.
                p_r = chosen[j] / weight[j] if weight[j] > 0 else curves[i].floor_w
                power[i] = min(max(p_r, curves[i].floor_w), curves[i].peak_w)
        power = _even_out(replicas, curves, nm, on, power)
        status = "optimal" if res.status == 0 else ("time_limit" if res.status == 1 else "error")
        gap = float(res.mip_gap) if allow_drain and res.mip_gap is not None else 0.0
        return result_for(on, power, status, gap, solver_s)

    lam_ub = np.ones(n_lam)
    first = run(lam_ub)
    if first is None:
        status = "time_limit" if time.perf_counter() - started >= time_limit_s else "error"
        # No incumbent: fall back to something feasible. Keeping every node up is a pure
        # LP that solves in a fraction of the MILP's time, where the floor fits;
        # otherwise everything drained (the pre-check showed the standbys fit).
        if allow_drain and standby_total + float(a_on.sum()) <= budget_w:
            kept = solve(
                replicas,
                nodes,
                budget_w,
                allow_drain=False,
                allow_clock_lock=allow_clock_lock,
                points=points,
                time_limit_s=time_limit_s,
                count=count,
            )
            spent = time.perf_counter() - started
            return replace(kept, status=status, mip_gap=math.inf, solver_s=spent)
        if allow_drain:
            return result_for(
                {k: False for k in all_on}, np.zeros(len(replicas)), status, math.inf, 0.0
            )
        return result_for(all_on, floor_power, status, math.inf, 0.0)

    # Dive past chords no setting reaches (the stall region; see the module docstring):
    # a replica left inside such a segment is pushed to one side of it, each side tried,
    # the better (by its LP bound) kept, until no replica falls short.
    pos = {i: j for j, i in enumerate(active)}
    best, current, spent = first, first, first.solver_s
    for _ in range(MAX_DIVES):
        short = _short_replica(current, curves, active)
        if short is None or time.perf_counter() - started >= time_limit_s:
            break
        i, seg = short
        start, k = int(vert_start[pos[i]]), int(n_vert[pos[i]])
        down, up = lam_ub.copy(), lam_ub.copy()
        down[start + seg + 1 : start + k] = 0.0
        up[start : start + seg + 1] = 0.0
        tries = [(ub, run(ub)) for ub in (down, up)]
        tries = [(ub, r) for ub, r in tries if r is not None]
        spent += sum(r.solver_s for _, r in tries)
        if not tries:
            break
        lam_ub, current = max(tries, key=lambda t: t[1].tokens_per_s)
        if _honest_tokens(current) > _honest_tokens(best):
            best = current
    return replace(best, solver_s=spent)


def _short_replica(
    res: OptimumResult, curves: Sequence[Curve], active: Sequence[int]
) -> tuple[int, int] | None:
    """The replica whose setting falls furthest short of its prediction (beyond
    ``SHORT_TOLERANCE``), with the envelope segment its power sits inside; or None."""
    worst: tuple[float, int, int] | None = None
    for i in active:
        d = res.replicas[i]
        gap = d.tokens_per_s - d.realised_tokens_per_s
        if d.power_w <= 0 or gap <= SHORT_TOLERANCE * d.tokens_per_s:
            continue
        c = curves[i]
        seg = int(np.searchsorted(c.power_w, d.power_w, side="right")) - 1
        if not 0 <= seg < len(c.power_w) - 1:
            continue
        if worst is None or gap > worst[0]:
            worst = (gap, i, seg)
    return None if worst is None else (worst[1], worst[2])


def _honest_tokens(res: OptimumResult) -> float:
    """Tokens a result can vouch for: realised, and no more than predicted per replica."""
    return sum(min(d.tokens_per_s, d.realised_tokens_per_s) for d in res.replicas)


def _even_out(
    replicas: Sequence[ReplicaState],
    curves: Sequence[Curve],
    nm: dict[int, _NodeModel],
    on: dict[int, bool],
    power: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Choose, per set of interchangeable replicas, between the LP's split and an even one.

    A piecewise-linear LP is indifferent between spreading power evenly over identical
    replicas and putting some at one vertex and the rest at the next (same segment, same
    total), and simplex returns the latter. Which realises more depends on physics
    between the two vertices: where it is concave (most of the range) the even split
    gains a little; across the stall region at the bottom, where no setting reaches the
    chord, only the vertices are real and the LP's split is what the hardware can do.
    Replicas with the same curve and host cost per watt on nodes that are up are
    interchangeable (same facility power either way), so each set keeps whichever
    realises more.
    """
    groups: dict[tuple[int, float], list[int]] = defaultdict(list)
    for i, r in enumerate(replicas):
        if nm[r.node].state.alive and on.get(r.node, False):
            groups[(id(curves[i]), nm[r.node].host_slope)].append(i)
    sets = [idx for idx in groups.values() if len(idx) > 1 and np.ptp(power[idx]) > 1e-6]
    if not sets:
        return power
    members = [i for idx in sets for i in idx]
    even = power.copy()
    for idx in sets:
        even[idx] = power[idx].mean()
    chosen = [curves[i] for i in members]
    as_is = _realise(chosen, power[members]).tokens
    spread = _realise(chosen, even[members]).tokens
    out = power.copy()
    pos = 0
    for idx in sets:
        k = len(idx)
        if spread[pos : pos + k].sum() > as_is[pos : pos + k].sum():
            out[idx] = even[idx]
        pos += k
    return out


def _finish(
    replicas: Sequence[ReplicaState],
    curves: Sequence[Curve],
    nm: dict[int, _NodeModel],
    on: dict[int, bool],
    power: NDArray[np.float64],
    budget_w: float,
    status: str,
    gap: float,
    solver_s: float,
) -> OptimumResult:
    """Map powers to settings, price everything, and assemble the result."""
    up = [i for i, r in enumerate(replicas) if nm[r.node].state.alive and on.get(r.node, False)]
    real = _realise([curves[i] for i in up], power[up]) if up else None
    decisions: list[ReplicaDecision] = []
    node_pred: dict[int, float] = defaultdict(float)
    node_real: dict[int, float] = defaultdict(float)
    pos = {i: k for k, i in enumerate(up)}
    for i, r in enumerate(replicas):
        if i not in pos or real is None:
            kind = physics.GPU_KINDS[r.gpu_kind]
            decisions.append(ReplicaDecision(r.replica, kind.power_min_w, None, 0.0, 0.0))
            continue
        k = pos[i]
        c = curves[i]
        pred_t = float(c.tokens_at(power[i]))  # the curve is already capped by the demand
        real_p = float(real.power_w[k])
        pred_p = max(float(power[i]), real_p)
        lock = real.lock_mhz[k]
        decisions.append(
            ReplicaDecision(
                replica=r.replica,
                power_limit_w=float(real.limit_w[k]),
                clock_lock_mhz=None if math.isnan(lock) else int(lock),
                tokens_per_s=pred_t,
                power_w=pred_p,
                realised_tokens_per_s=max(float(real.tokens[k]), 0.0),
                realised_power_w=real_p,
            )
        )
        node_pred[r.node] += pred_p
        node_real[r.node] += real_p
    total_pred = total_real = 0.0
    drained: set[int] = set()
    for node, m in nm.items():
        if not m.state.alive:
            continue
        if on.get(node, False):
            total_pred += m.power_w(node_pred[node])
            total_real += m.power_w(node_real[node])
        else:
            drained.add(node)
            total_pred += m.state.standby_w
            total_real += m.state.standby_w
    return OptimumResult(
        tokens_per_s=sum(d.tokens_per_s for d in decisions),
        power_w=total_pred,
        drained_nodes=frozenset(drained),
        replicas=tuple(decisions),
        status=status,
        mip_gap=gap,
        realised_tokens_per_s=sum(d.realised_tokens_per_s for d in decisions),
        realised_power_w=total_real,
        budget_w=budget_w,
        solver_s=solver_s,
    )


__all__ = [
    "BUDGET_SLACK_RATIO",
    "MIP_REL_GAP",
    "POWER_PENALTY_RATIO",
    "Curve",
    "NodeState",
    "OptimumResult",
    "ReplicaDecision",
    "ReplicaState",
    "TokenCount",
    "replica_curve",
    "solve",
]
