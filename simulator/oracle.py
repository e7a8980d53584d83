"""The comparison's reference: a per-control-period bound on good tokens/s, then on power.

Every policy is scored against this number, so it has to be at least as good as any of
them on the same physics (``physics.py``), or the ratios mean nothing. It imports nothing
from ``wattkeeper.policies`` (a bug shared by a policy and its yardstick would hide).
Its curves let the batch follow the load: curves at a fixed batch charge a capped
replica for tokens it does not lose, and a static cap then beats the "optimum"
(``docs/comparison.md``).

**A replica** (one GPU, or a lockstep tensor-parallel group with one setting on all its
GPUs) runs a *setting*: a power limit (``LIMIT_STEP_W`` grid) or a supported clock lock
with the limit at its maximum. Serving ``lam`` generated tokens/s it runs at the
smallest batch that makes them (Little's law: the batch follows the load), and spends
the share ``pf`` of its busy time prefilling that makes the prompts that come with them
(``pf·P = k·lam``, k the demand's prompt:output ratio). It is feasible where that batch
is at most its batch cap (the largest in-flight limit allowed, and the KV cache), TPOT
meets the SLO, and the prefill utilisation ``pf`` is at most ``rho_max``. ``W_r(lam)`` is
the least power (whole group) over settings.

**TTFT** is bounded by a proxy, not a queueing formula: prefill utilisation (a mixed
replica's prefill time share, a prefill replica's prompt tokens over its capacity) at
most ``PREFILL_UTILISATION_MAX`` (0.9), so the prompt queue is stable with headroom. The
demand carries no per-request lengths a single prompt's TTFT could be checked with.

**W_r is not convex**, and convexifying it globally would not bound anything useful:
a busy GPU pays its memory power and a dynamic floor (an H100 on Llama-3.1-8B jumps from
75 W idle to ~196 W at batch 1), below ~230 W a limit makes the GPU stall at its
minimum clock, and clock locks come in 15 MHz steps that each add ~100 tokens/s for
~0.6 W. Mixing idle with busy, or batch 50 with batch 250, over time within one replica
is not realisable: the batch follows the load and TPOT is a mean over a request's life.
What the oracle does allow, because a policy can do it:

- a power limit anywhere in the range (NVML takes milliwatts): the feasible end of the
  limit family is interpolated between neighbouring grid limits;
- dithering between two neighbouring settings within a period (alternating two adjacent
  clock locks second by second): the chord between their feasible ends.

``W_r`` is that pointwise minimum on a dense grid of rates; the MILP represents it
exactly as a few convex pieces (each within ``PIECE_TOLERANCE_W`` of it), with an integer
count of replicas per piece for each group of identical replicas on a node (no SOS2, no
symmetric binaries). Replicas in one piece share its rate (a convex piece is best
shared evenly).

**The facility**: served rates per replica (routing shares free: per model their sum at
most the demand), nodes on or off (binary: a drained node serves nothing and draws its
standby power if its drain powers it down, else idle), host power linear in the node's
GPU power (``physics.host_power_w`` with the simulator's load), and one budget row at
``budget_w·(1 - margin)``. Stage 1 maximises good tokens/s, stage 2 keeps
``1 - STAGE2_TOKEN_SLACK`` of them and minimises facility power (HiGHS via
``scipy.optimize.milp``).

**Disaggregated serving**: a ``"prefill"`` replica makes prompt tokens only, a
``"decode"`` one generated tokens without prefilling; per model the prefill pool's prompt
tokens/s must cover ``k`` times what its decode replicas serve (mixed replicas prefill
their own). Prompt tokens are worth nothing by themselves. The KV hand-off is free, as in
the simulator.

**Variants**: ``"full"``: limits and clock locks, in-flight limits, drains, free routing.
``"limits"``: what a limits-only policy controls: limits only, no drains, in-flight
limits as the scenario sets them. Routing stays free: the router is not the policy's
lever, but its least-in-flight rule already sends more work to the replicas that
finish faster (an H100 over an A100), so an even split would not bound what the
facility does with limits alone.

Curves are cached per (GPU kind, model, role, prompt ratio bucket, SLO, batch cap,
settings family), so a re-solve every control period costs two small MILPs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from wattkeeper.simulator import physics
from wattkeeper.simulator.facility import (
    KV_BYTES_PER_TOKEN,
    VLLM_GPU_MEMORY_UTILIZATION,
    WEIGHT_BYTES,
)
from wattkeeper.simulator.scenario import Slo

Role = Literal["mixed", "decode", "prefill"]
Variant = Literal["full", "limits"]
Status = Literal["optimal", "over_budget"]
ArrayLikeF = float | NDArray[np.float64]

DEFAULT_MARGIN = 0.02
"""Share of the budget held back, the margin the policies get."""

PREFILL_UTILISATION_MAX = 0.9
"""The TTFT proxy (rho_max): most of a replica's prefill capacity the oracle uses. At 0.9
the prompt queue is stable with a 10% reserve; it is also the most of a mixed replica's
time the simulator lets prefill take (``facility.MIXED_PREFILL_SHARE_MAX``)."""

LIMIT_STEP_W = 1.0
"""Grid of power limits (per GPU). Between grid limits the family's feasible end is
interpolated; the grid matters because at low power a watt is worth ~10% of tokens."""

BATCH_POINTS = 160
"""Geometric batch samples per setting between 1 and the batch cap (ratio ~1.04 at a cap
of 1024); each setting's feasible end is added exactly (bisection)."""

RATE_GRID_POINTS = 2049
"""Uniform rates on which ``W_r`` is tabulated, besides every setting's batch-1 rate and
feasible end (where its kinks are)."""

PIECE_TOLERANCE_W = 0.05
"""Most a piece's convex hull may lie below ``W_r``, per GPU of the replica: the oracle's
only optimism beyond the model."""

THIN_TOLERANCE_W = 0.02
"""Most that dropping a piece's vertex may raise it, per GPU (conservative: a chord lies
above a convex curve), to keep the MILP small."""

MAX_INFLIGHT_LIMIT = 1024
"""Largest in-flight limit when neither ``max_inflight`` nor the request lengths (for the
KV cache) bound it. ASSUMPTION: servers cap running sequences at 1024."""

PROMPT_RATIO_BUCKET = 0.005
"""The prompt:output ratio is rounded down to a geometric grid of this step for the curve
cache; fewer prompt tokens only loosen the bound (by under ``pf x 0.5%`` of tokens)."""

STAGE2_TOKEN_SLACK = 1e-4
"""Stage 2 may give up this share of stage 1's tokens to save power (solver noise)."""

_BISECTIONS = 48
_REALISE_STEPS = 12
_MIP_REL_GAP = 1e-7
_MIP_TIME_LIMIT_S = 10.0
"""A guard, never reached in the benchmarks (under 0.2 s); at the limit HiGHS's best
incumbent is used, which is feasible but may fall short of the optimum."""
_CACHE_MAX = 256
_TINY = 1e-12


# --------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaIn:
    """One replica: ``tensor_parallel`` GPUs of one kind on ``node`` serving ``model``."""

    replica: int
    node: int
    kind: str
    """A ``physics.GPU_KINDS`` key."""
    model: str
    """A ``physics.MODELS`` key."""
    role: Role = "mixed"
    max_inflight: int | None = None
    """Largest in-flight limit this replica may run at (its batch follows the load up to
    it); None: up to the KV cache, or ``MAX_INFLIGHT_LIMIT`` without request lengths."""


@dataclass(frozen=True)
class NodeIn:
    """One node: its host's power model, GPU count, whether it is up and how it drains."""

    node: int
    host_kind: str
    """A ``physics.HOST_KINDS`` key."""
    gpus: int
    """GPUs on the node; those without a replica draw idle power while it is on."""
    alive: bool = True
    """A dead node serves nothing and draws nothing (as in the simulator)."""
    standby_w: float = 150.0
    """Power of a drained node that is powered down."""
    powers_down: bool = True
    """Whether a drain powers the node down (else it idles: host and GPUs at idle)."""


@dataclass(frozen=True)
class ModelDemand:
    """True demand of one model in this period."""

    model: str
    output_tokens_per_s: float
    """Generated tokens/s arriving (the goodput's unit)."""
    prompt_tokens_per_s: float
    """Prompt tokens/s arriving with them (they fix the prefill share)."""
    mean_prompt_tokens: float | None = None
    mean_output_tokens: float | None = None
    """Mean request lengths for the KV capacity in sequences (a request holds its prompt
    and half its output on average, as the simulator's KV gauge counts); None: no KV cap."""

    @property
    def prompt_per_output(self) -> float:
        """k: prompt tokens per generated token."""
        if self.output_tokens_per_s <= 0.0:
            return 0.0
        return max(self.prompt_tokens_per_s, 0.0) / self.output_tokens_per_s


@dataclass(frozen=True)
class ReplicaPlan:
    """What the oracle has one replica do, and what that is worth."""

    replica: int
    served_tokens_per_s: float
    """Generated tokens/s (0 for a prefill replica)."""
    power_limit_w: float | None
    """Per GPU (every GPU of a group alike); the maximum under a clock lock; None when the
    replica serves nothing (any setting does)."""
    clock_lock_mhz: int | None
    inflight_limit: int | None
    """Smallest power of two at or above the batch (at most ``max_inflight``; in the
    limits variant ``max_inflight`` itself when given); None where nothing decodes."""
    batch: float
    """Mean running sequences (physics ``batch``; below 1: busy part of the time)."""
    power_w: float
    """Whole group, as the oracle counts it (its piece of ``W_r`` at the served rate)."""
    tpot_s: float
    """At that setting and batch (inf where nothing decodes)."""
    role: Role = "mixed"
    prompt_tokens_per_s: float = 0.0
    prefill_fraction: float = 0.0
    """Share of busy time in prefill (physics ``prefill_fraction``)."""
    setting_power_w: float = 0.0
    """Whole group: what physics says the single reported setting draws at that batch.
    Above ``power_w`` by a little where the oracle dithers two neighbouring settings."""


@dataclass(frozen=True)
class OracleResult:
    """The bound for one control period."""

    good_tokens_per_s: float
    """Served generated tokens/s, within the SLO by construction."""
    facility_power_w: float
    """GPUs, hosts, drained nodes (dead nodes draw nothing)."""
    gpu_power_w: float
    host_power_w: float
    """Facility power less GPU power (hosts of nodes that are on, drained nodes)."""
    replicas: tuple[ReplicaPlan, ...]
    """One per input replica, in input order."""
    drained_nodes: frozenset[int]
    """Alive nodes the oracle drains (dead nodes are never listed)."""
    shed_tokens_per_s: float
    """Demanded generated tokens/s not served."""
    status: Status = "optimal"
    """"over_budget": even the least the facility can draw (every alive node idle, or
    drained where the variant allows and that is cheaper) is over the budget; nothing is
    served and that floor is reported."""
    variant: Variant = "full"


# --------------------------------------------------------------------------------------
# One replica: physics at a setting, samples, W_r and its convex pieces
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mix:
    """A replica's steady state at a batch and setting, its prompts served."""

    tokens: NDArray[np.float64]
    prompt: NDArray[np.float64]
    power_w: NDArray[np.float64]
    prefill_fraction: NDArray[np.float64]
    tpot_s: NDArray[np.float64]

    def rate(self, role: Role) -> NDArray[np.float64]:
        """What the replica is valued by: prompt tokens for a prefill replica."""
        return self.prompt if role == "prefill" else self.tokens


def _mix(
    kind: physics.GpuKind,
    model: physics.ModelProfile,
    role: Role,
    prompt_ratio: float,
    batch: ArrayLikeF,
    limit_w: ArrayLikeF,
    lock_mhz: ArrayLikeF,
    prefill: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None,
) -> _Mix:
    """Physics at a batch and setting with the prefill share that serves the prompts.

    Each phase meets the limit on its own and physics mixes them linearly in
    ``prefill_fraction`` (``physics._assemble``), so one call per phase suffices: decode
    at the batch (pf 0), prefill at batch 1 (pf 1; its rate does not depend on the
    batch, so a caller iterating on the batch passes it once as ``prefill``). A prefill
    replica's batch is its busy share (at most 1). Power: whole group.
    """
    tp = model.tensor_parallel
    b = np.asarray(batch, dtype=float)
    busy = np.clip(b, 0.0, 1.0)
    p_rate, p_pow = (
        prefill if prefill is not None else _prefill_phase(kind, model, limit_w, lock_mhz)
    )
    if role == "prefill":
        shape = np.broadcast_shapes(b.shape, p_rate.shape)
        return _Mix(
            tokens=np.zeros(shape),
            prompt=np.broadcast_to(busy * p_rate, shape),
            power_w=np.broadcast_to(tp * (kind.idle_w + busy * (p_pow - kind.idle_w)), shape),
            prefill_fraction=np.ones(shape),
            tpot_s=np.full(shape, np.inf),
        )
    dec = physics.operating_point(
        kind,
        model,
        batch=np.maximum(b, 1.0),
        prefill_fraction=0.0,
        clock_cap_mhz=lock_mhz,
        power_limit_w=limit_w,
    )
    g = np.asarray(dec.decode_tokens_per_s, dtype=float)
    kg = (prompt_ratio if role == "mixed" else 0.0) * g
    pf = np.where(kg > 0, kg / np.maximum(p_rate + kg, _TINY), 0.0)
    busy_power = (1.0 - pf) * np.asarray(dec.power_w, dtype=float) + pf * p_pow
    tokens = busy * (1.0 - pf) * g
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(tokens > 0, np.maximum(b, 1.0) / ((1.0 - pf) * g), np.inf)
    return _Mix(
        tokens=tokens,
        prompt=busy * pf * p_rate,
        power_w=tp * (kind.idle_w + busy * (busy_power - kind.idle_w)),
        prefill_fraction=pf,
        tpot_s=tpot,
    )


def _prefill_phase(
    kind: physics.GpuKind, model: physics.ModelProfile, limit_w: ArrayLikeF, lock_mhz: ArrayLikeF
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Prompt tokens/s and per-GPU power of a setting while prefilling."""
    pre = physics.operating_point(
        kind, model, batch=1.0, prefill_fraction=1.0, clock_cap_mhz=lock_mhz, power_limit_w=limit_w
    )
    return np.asarray(pre.prefill_tokens_per_s, dtype=float), np.asarray(pre.power_w, dtype=float)


def _feasible(m: _Mix, role: Role, tpot_s: float, rho_max: float) -> NDArray[np.bool_]:
    """The SLO checks (TPOT; prefill utilisation for TTFT), both monotone in the batch."""
    if role == "prefill":
        return np.ones(np.shape(m.tokens), dtype=bool)
    return (m.tpot_s <= tpot_s) & (m.prefill_fraction <= rho_max + 1e-12)


@dataclass(frozen=True)
class _CurveKey:
    kind: str
    model: str
    role: Role
    prompt_ratio: float
    ttft_s: float
    tpot_s: float
    rho_max: float
    batch_cap: float
    clock_locks: bool


@dataclass(frozen=True, eq=False)
class ReplicaCurve:
    """``W_r`` of one kind of replica: least group power against the rate it serves.

    Rates are generated tokens/s (prompt tokens/s for a prefill replica). ``grid_*`` is
    ``W_r`` tabulated (dithering neighbouring settings included, see the module);
    ``pieces`` its convex pieces as the MILP sees them (vertex arrays, left to right,
    the first starting at idle).
    """

    kind: str
    model: str
    role: Role
    prompt_ratio: float
    batch_cap: float
    grid_tokens_per_s: NDArray[np.float64]
    grid_power_w: NDArray[np.float64]
    pieces: tuple[tuple[NDArray[np.float64], NDArray[np.float64]], ...]
    limit_w: NDArray[np.float64] = field(repr=False)
    """Per setting: its power limit per GPU."""
    lock_mhz: NDArray[np.float64] = field(repr=False)
    """Per setting: its clock lock (NaN: none)."""
    sample_batch: NDArray[np.float64] = field(repr=False)
    """Per setting x sample: the batch (rows end at the setting's feasible end)."""
    sample_tokens: NDArray[np.float64] = field(repr=False)
    """Per setting x sample: the rate (-1 where no batch makes the setting feasible)."""
    sample_power_w: NDArray[np.float64] = field(repr=False)

    @property
    def max_tokens_per_s(self) -> float:
        """The SLO-feasible maximum rate."""
        return float(self.grid_tokens_per_s[-1])

    @property
    def idle_w(self) -> float:
        return float(self.grid_power_w[0])

    def power_at(self, tokens_per_s: float | NDArray[np.float64]) -> NDArray[np.float64]:
        """The MILP's ``W_r``: the lowest piece over the rate (inf past the maximum)."""
        lam = np.asarray(tokens_per_s, dtype=float)
        out = np.full(lam.shape, np.inf)
        for x, y in self.pieces:
            inside = (lam >= x[0] - 1e-9) & (lam <= x[-1] + 1e-9)
            out = np.where(inside, np.minimum(out, np.interp(lam, x, y)), out)
        return out

    @property
    def piece_gap_w(self) -> float:
        """Most the pieces lie below the tabulated ``W_r`` (``PIECE_TOLERANCE_W`` per GPU)."""
        return float(np.max(self.grid_power_w - self.power_at(self.grid_tokens_per_s)))


def _settings(kind: physics.GpuKind, clock_locks: bool) -> tuple[NDArray, NDArray, NDArray]:
    """Limits (ascending, no lock), then supported locks (ascending, max limit), and the
    family of each (0, 1): neighbours within a family may be dithered."""
    limits = np.arange(kind.power_min_w, kind.power_max_w + 1e-9, LIMIT_STEP_W)
    if limits[-1] < kind.power_max_w - 1e-9:
        limits = np.append(limits, kind.power_max_w)
    lock = np.full(limits.shape, np.nan)
    family = np.zeros(limits.shape, dtype=np.int64)
    if clock_locks:
        clocks = np.sort(np.asarray(kind.supported_sm_clocks_mhz(), dtype=float))
        limits = np.concatenate([limits, np.full(clocks.shape, kind.power_max_w)])
        lock = np.concatenate([lock, clocks])
        family = np.concatenate([family, np.ones(clocks.shape, dtype=np.int64)])
    return limits, lock, family


def _feasible_end(
    kind: physics.GpuKind,
    model: physics.ModelProfile,
    key: _CurveKey,
    limit: NDArray,
    lock: NDArray,
) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    """Per setting: whether batch 1 is feasible, and the largest feasible batch (TPOT,
    prefill share and batch all rise with it, so a bisection finds it)."""
    n = limit.size
    one = _mix(kind, model, key.role, key.prompt_ratio, np.ones(n), limit, lock)
    usable = _feasible(one, key.role, key.tpot_s, key.rho_max) & (key.batch_cap >= 1.0)
    hi = np.full(n, max(key.batch_cap, 1.0))
    top_ok = _feasible(
        _mix(kind, model, key.role, key.prompt_ratio, hi, limit, lock),
        key.role,
        key.tpot_s,
        key.rho_max,
    )
    lo = np.where(top_ok, hi, 1.0)
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        ok = _feasible(
            _mix(kind, model, key.role, key.prompt_ratio, mid, limit, lock),
            key.role,
            key.tpot_s,
            key.rho_max,
        )
        lo = np.where(ok & ~top_ok, mid, lo)
        hi = np.where(ok | top_ok, hi, mid)
    return usable, lo


def _tabulate(
    tokens: NDArray[np.float64], power: NDArray[np.float64], family: NDArray, idle_w: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``W_r`` on a grid: the least power over settings, and over chords between the
    feasible ends of neighbouring settings (continuous limits, dithered locks)."""
    usable = tokens[:, -1] >= 0.0
    lam_max = float(tokens[usable, -1].max()) if usable.any() else 0.0
    if lam_max <= 0.0:
        return np.array([0.0]), np.array([idle_w])
    grid = np.concatenate(
        [np.linspace(0.0, lam_max, RATE_GRID_POINTS), tokens[usable, 1], tokens[usable, -1]]
    )
    grid = np.unique(grid[grid >= 0.0])
    raw = np.full(grid.shape, np.inf)
    for s in np.flatnonzero(usable):
        w = np.interp(grid, tokens[s], power[s], right=np.inf)
        raw = np.minimum(raw, np.where(grid > tokens[s, -1], np.inf, w))
    pair = usable[:-1] & usable[1:] & (family[:-1] == family[1:])
    xa, xb = tokens[:-1, -1][pair], tokens[1:, -1][pair]
    ya, yb = power[:-1, -1][pair], power[1:, -1][pair]
    swap = xa > xb
    xa, xb = np.where(swap, xb, xa)[:, None], np.where(swap, xa, xb)[:, None]
    ya, yb = np.where(swap, yb, ya)[:, None], np.where(swap, ya, yb)[:, None]
    wide = (xb - xa)[:, 0] > 1e-9
    xa, xb, ya, yb = xa[wide], xb[wide], ya[wide], yb[wide]
    if xa.size:
        inside = (grid[None, :] >= xa) & (grid[None, :] <= xb)
        with np.errstate(divide="ignore", invalid="ignore"):
            chord = ya + (yb - ya) * (grid[None, :] - xa) / (xb - xa)
        raw = np.minimum(raw, np.where(inside, chord, np.inf).min(axis=0))
    raw[0] = idle_w
    return grid, raw


def _chain_push(hull: list[int], x: NDArray, y: NDArray, j: int) -> None:
    """Add point j to a lower convex chain (monotone chain step)."""
    while len(hull) >= 2:
        a, b = hull[-2], hull[-1]
        if (x[b] - x[a]) * (y[j] - y[a]) - (y[b] - y[a]) * (x[j] - x[a]) <= 0.0:
            hull.pop()
        else:
            break
    hull.append(j)


def _thin(x: NDArray[np.float64], y: NDArray[np.float64], tol_w: float) -> tuple[NDArray, NDArray]:
    """Drop vertices of a convex chain whose chord stays within ``tol_w`` above them."""
    keep = [0]
    i, n = 0, x.size
    while i < n - 1:
        j = i + 1
        while j + 1 < n:
            mid = slice(i + 1, j + 2)
            chord = y[i] + (y[j + 1] - y[i]) * (x[mid] - x[i]) / (x[j + 1] - x[i])
            if np.all(chord - y[mid] <= tol_w):
                j += 1
            else:
                break
        keep.append(j)
        i = j
    idx = np.asarray(keep)
    return x[idx], y[idx]


def _convex_pieces(
    x: NDArray[np.float64], y: NDArray[np.float64], gpus: int
) -> tuple[tuple[NDArray[np.float64], NDArray[np.float64]], ...]:
    """Split a tabulated curve into as few consecutive pieces as possible whose lower
    convex hulls stay within ``PIECE_TOLERANCE_W`` of it (greedy: extend while it holds;
    the hull only drops as a piece grows, so greedy is optimal)."""
    n = x.size
    if n == 1:
        return ((x.copy(), y.copy()),)
    pieces = []
    i = 0
    while i < n - 1:
        hull = [i]
        good = [i, i + 1]
        j = i + 1
        while j < n:
            trial = list(hull)
            _chain_push(trial, x, y, j)
            seg = slice(i, j + 1)
            gap = np.max(y[seg] - np.interp(x[seg], x[trial], y[trial]))
            if gap > PIECE_TOLERANCE_W * gpus and j > i + 1:
                break
            hull, good = trial, trial
            j += 1
        pieces.append(_thin(x[good], y[good], THIN_TOLERANCE_W * gpus))
        i = good[-1]
    return tuple(pieces)


def _build_curve(key: _CurveKey) -> ReplicaCurve:
    kind = physics.GPU_KINDS[key.kind]
    model = physics.MODELS[key.model]
    idle = float(model.tensor_parallel * kind.idle_w)
    limit, lock, family = _settings(kind, key.clock_locks)
    if key.role == "prefill":
        batch = np.tile(np.array([0.0, key.rho_max, key.rho_max]), (limit.size, 1))
        usable = np.ones(limit.size, dtype=bool)
    else:
        usable, b_end = _feasible_end(kind, model, key, limit, lock)
        grid = np.geomspace(1.0, max(key.batch_cap, 1.0), BATCH_POINTS)
        batch = np.minimum(np.concatenate([[0.0], grid])[None, :], b_end[:, None])
        batch = np.concatenate([batch, b_end[:, None]], axis=1)
    m = _mix(kind, model, key.role, key.prompt_ratio, batch, limit[:, None], lock[:, None])
    tokens = np.where(usable[:, None], m.rate(key.role), -1.0)
    power = np.asarray(m.power_w, dtype=float)
    grid_x, grid_y = _tabulate(tokens, power, family, idle)
    return ReplicaCurve(
        kind=key.kind,
        model=key.model,
        role=key.role,
        prompt_ratio=key.prompt_ratio,
        batch_cap=key.batch_cap,
        grid_tokens_per_s=grid_x,
        grid_power_w=grid_y,
        pieces=_convex_pieces(grid_x, grid_y, model.tensor_parallel),
        limit_w=limit,
        lock_mhz=lock,
        sample_batch=batch,
        sample_tokens=tokens,
        sample_power_w=power,
    )


_CURVES: dict[_CurveKey, ReplicaCurve] = {}


def _bucket_ratio(k: float) -> float:
    """Round the prompt ratio down to the cache grid (fewer prompts: a looser bound)."""
    if k <= 0.0:
        return 0.0
    step = math.log1p(PROMPT_RATIO_BUCKET)
    return math.exp(math.floor(math.log(k) / step + 1e-9) * step)


def kv_capacity_seqs(kind: str, model: str, demand: ModelDemand) -> float:
    """Sequences the KV cache holds at the demand's mean lengths (inf without them).

    The simulator's KV estimate (``facility.kv_cache_usage``): vLLM's share of the GPUs'
    memory less the weights, over the bytes of a prompt and half an output.
    """
    if demand.mean_prompt_tokens is None or demand.mean_output_tokens is None:
        return math.inf
    k = physics.GPU_KINDS[kind]
    tp = physics.MODELS[model].tensor_parallel
    free = k.memory_bytes * tp * VLLM_GPU_MEMORY_UTILIZATION - WEIGHT_BYTES[model]
    per_seq = KV_BYTES_PER_TOKEN[model] * (
        demand.mean_prompt_tokens + demand.mean_output_tokens / 2.0
    )
    return max(free / per_seq, 0.0)


def batch_cap(replica: ReplicaIn, demand: ModelDemand | None) -> float:
    """Largest batch: ``max_inflight`` (or ``MAX_INFLIGHT_LIMIT``) and the KV cache, the
    latter rounded up to a sixteenth of an octave for the cache (a looser bound)."""
    cap = float(replica.max_inflight or MAX_INFLIGHT_LIMIT)
    if demand is not None:
        kv = kv_capacity_seqs(replica.kind, replica.model, demand)
        if math.isfinite(kv):
            cap = min(cap, 2.0 ** (math.ceil(16.0 * math.log2(max(kv, 1.0)) - 1e-9) / 16.0))
    return cap


def replica_curve(
    kind: str,
    model: str,
    slo: Slo,
    *,
    role: Role = "mixed",
    prompt_per_output: float = 0.0,
    batch_cap: float = MAX_INFLIGHT_LIMIT,
    rho_max: float = PREFILL_UTILISATION_MAX,
    clock_locks: bool = True,
) -> ReplicaCurve:
    """``W_r`` for one kind of replica (cached; the prompt ratio is bucketed down)."""
    physics.MODELS[model].on(kind)  # a clear error for a model not modelled on the kind
    key = _CurveKey(
        kind=kind,
        model=model,
        role=role,
        prompt_ratio=_bucket_ratio(prompt_per_output) if role == "mixed" else 0.0,
        ttft_s=float(slo.ttft_s),
        tpot_s=float(slo.tpot_s),
        rho_max=float(rho_max),
        batch_cap=float(batch_cap) if role != "prefill" else 0.0,
        clock_locks=clock_locks,
    )
    curve = _CURVES.get(key)
    if curve is None:
        if len(_CURVES) >= _CACHE_MAX:
            _CURVES.clear()
        curve = _CURVES[key] = _build_curve(key)
    return curve


def clear_cache() -> None:
    """Forget every cached curve (tests; or after the physics changed)."""
    _CURVES.clear()


def cache_size() -> int:
    """Curves cached (tests check that a re-solve builds none)."""
    return len(_CURVES)


# --------------------------------------------------------------------------------------
# A served rate back to one setting
# --------------------------------------------------------------------------------------


def _realise(
    curve: ReplicaCurve, lam: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], _Mix]:
    """The single setting that serves each rate at least power, and its exact batch.

    Each setting's samples bracket the rate (a setting's rate rises with its batch); the
    cheapest bracket picks the setting, regula falsi inside it gives the batch. One
    vectorised pass for all rates on a curve. Returns limit, lock (NaN: none), batch and
    physics there. Where the oracle dithers two neighbouring settings, this one setting
    serves the same rate for a little more power (``ReplicaPlan.setting_power_w``).
    """
    kind = physics.GPU_KINDS[curve.kind]
    model = physics.MODELS[curve.model]
    tok, pw, bt = curve.sample_tokens, curve.sample_power_w, curve.sample_batch
    lam = np.minimum(np.asarray(lam, dtype=float), float(tok.max()))
    n_set, n_b = tok.shape
    idx = np.sum(tok[None, :, :] < lam[:, None, None] * (1.0 - 1e-12), axis=2)
    avail = (idx < n_b) & (tok[:, -1] >= 0.0)[None, :]
    i1 = np.minimum(idx, n_b - 1)
    i0 = np.maximum(i1 - 1, 0)
    rows = np.arange(n_set)[None, :]
    x0, x1 = tok[rows, i0], tok[rows, i1]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.clip(np.where(x1 > x0, (lam[:, None] - x0) / (x1 - x0), 1.0), 0.0, 1.0)
    est = np.where(avail, pw[rows, i0] + t * (pw[rows, i1] - pw[rows, i0]), np.inf)
    s = np.argmin(est, axis=1)
    pick = np.arange(lam.size)
    lo = bt[s, i0[pick, s]].astype(float)
    hi = bt[s, i1[pick, s]].astype(float)
    limit, lock = curve.limit_w[s], curve.lock_mhz[s]
    pre = _prefill_phase(kind, model, limit, lock)

    def short(b: NDArray[np.float64]) -> NDArray[np.float64]:
        m = _mix(kind, model, curve.role, curve.prompt_ratio, b, limit, lock, pre)
        return m.rate(curve.role) - lam

    # Regula falsi (Illinois) inside the bracket: the rate is smooth and monotone in the
    # batch, so a few steps reach 1e-12; ``hi`` always serves at least ``lam``.
    f_lo, f_hi = short(lo), short(hi)
    side = np.zeros(lam.size)
    for _ in range(_REALISE_STEPS):
        with np.errstate(divide="ignore", invalid="ignore"):
            mid = np.where(f_hi > f_lo, (lo * f_hi - hi * f_lo) / (f_hi - f_lo), 0.5 * (lo + hi))
        mid = np.clip(np.nan_to_num(mid, nan=0.5), lo, hi)
        f_mid = short(mid)
        up = f_mid >= 0.0
        hi, f_hi = np.where(up, mid, hi), np.where(up, f_mid, f_hi)
        lo, f_lo = np.where(up, lo, mid), np.where(up, f_lo, f_mid)
        f_lo = np.where(up & (side > 0), 0.5 * f_lo, f_lo)  # Illinois: unstick an end
        f_hi = np.where(~up & (side < 0), 0.5 * f_hi, f_hi)
        side = np.where(up, 1.0, -1.0)
    mix = _mix(kind, model, curve.role, curve.prompt_ratio, hi, limit, lock, pre)
    return limit, lock, hi, mix


def _next_pow2(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(math.ceil(x - 1e-9), 1))))


# --------------------------------------------------------------------------------------
# The facility MILP
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    """A node's power as the MILP sees it: on, ``on_fixed_w + slope x replica GPU W``."""

    spec: NodeIn
    host: physics.HostKind
    gpu_max_w: float
    """Its GPUs' maximum power: the denominator of the host's load (as the simulator)."""
    spare_idle_w: float
    """GPUs without a replica, at idle."""
    replica_idle_w: float

    @property
    def slope(self) -> float:
        """Facility watts per replica GPU watt: the watt and its host share."""
        return 1.0 + (self.host.serving_w - self.host.idle_w) / self.gpu_max_w

    @property
    def on_fixed_w(self) -> float:
        return self.host.idle_w + self.slope * self.spare_idle_w

    @property
    def off_gpu_w(self) -> float:
        return 0.0 if self.spec.powers_down else self.spare_idle_w + self.replica_idle_w

    @property
    def off_w(self) -> float:
        if self.spec.powers_down:
            return self.spec.standby_w
        return self.off_gpu_w + self.host_w(self.off_gpu_w)

    @property
    def floor_on_w(self) -> float:
        return self.on_fixed_w + self.slope * self.replica_idle_w

    def host_w(self, gpu_w: float) -> float:
        return float(physics.host_power_w(self.host, gpu_w / self.gpu_max_w))


def _node_models(nodes: Sequence[NodeIn], replicas: Sequence[ReplicaIn]) -> dict[int, _Node]:
    by_node: dict[int, list[ReplicaIn]] = {}
    for r in replicas:
        by_node.setdefault(r.node, []).append(r)
    out: dict[int, _Node] = {}
    for n in nodes:
        reps = by_node.get(n.node, [])
        if reps:
            spare_kind = physics.GPU_KINDS[reps[0].kind]
        else:  # no replica tells the kind: the host's name does (dgx-h100 -> h100)
            spare_kind = next(
                (k for name, k in physics.GPU_KINDS.items() if n.host_kind.endswith(name)),
                physics.H100_SXM,
            )
        used = sum(physics.MODELS[r.model].tensor_parallel for r in reps)
        if used > n.gpus:
            raise ValueError(f"node {n.node} has {n.gpus} GPUs; its replicas need {used}")
        gpu_max = (n.gpus - used) * spare_kind.power_max_w
        rep_idle = 0.0
        for r in reps:
            k, tp = physics.GPU_KINDS[r.kind], physics.MODELS[r.model].tensor_parallel
            gpu_max += tp * k.power_max_w
            rep_idle += tp * k.idle_w
        out[n.node] = _Node(
            spec=n,
            host=physics.HOST_KINDS[n.host_kind],
            gpu_max_w=max(gpu_max, _TINY),
            spare_idle_w=(n.gpus - used) * spare_kind.idle_w,
            replica_idle_w=rep_idle,
        )
    return out


@dataclass
class _Group:
    """The replicas of one curve on the nodes of one class: one integer count per piece
    (how many of them run in it), the piece's vertex weights summing to that count."""

    curve: ReplicaCurve
    per_node: list[list[ReplicaIn]]
    """Members on each node of the class, in the class's node order."""
    n_col: list[int] = field(default_factory=list)
    w_cols: list[slice] = field(default_factory=list)


@dataclass
class _Class:
    """Identical alive nodes (host, GPUs, drain, and the same curves on each): one integer
    count of nodes on. Host power is linear in GPU power with one slope for all of them,
    so which of them are on and how the busy replicas spread over them does not change
    the facility's power: aggregating them is exact and leaves no symmetry to branch on."""

    nodes: list[NodeIn]
    node: _Node
    groups: list[_Group]
    m_col: int = -1


@dataclass
class _Problem:
    """The MILP as built: per column its goodput and facility-watt coefficients, bounds
    and integrality; rows as sparse dicts (one budget row is added by the caller)."""

    n_var: int = 0
    tokens: list[float] = field(default_factory=list)
    power: list[float] = field(default_factory=list)
    integer: list[int] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)
    lower: list[float] = field(default_factory=list)
    rows: list[tuple[dict[int, float], float, float]] = field(default_factory=list)

    def column(
        self, *, tokens: float = 0.0, power: float = 0.0,
        lower: float = 0.0, upper: float = np.inf, integer: bool = False,
    ) -> int:  # fmt: skip
        self.tokens.append(tokens)
        self.power.append(power)
        self.lower.append(lower)
        self.upper.append(upper)
        self.integer.append(1 if integer else 0)
        self.n_var += 1
        return self.n_var - 1

    def add(self, coef: dict[int, float], lo: float, hi: float) -> None:
        self.rows.append((coef, lo, hi))

    def constraints(self) -> list[LinearConstraint]:
        data: list[float] = []
        ri: list[int] = []
        ci: list[int] = []
        for i, (coef, _, _) in enumerate(self.rows):
            for j, v in coef.items():
                ri.append(i)
                ci.append(j)
                data.append(v)
        a = sparse.csr_array((data, (ri, ci)), shape=(len(self.rows), self.n_var))
        lo = np.array([r[1] for r in self.rows], dtype=float)
        hi = np.array([r[2] for r in self.rows], dtype=float)
        return [LinearConstraint(a, lo, hi)]


def solve(
    replicas: Sequence[ReplicaIn],
    nodes: Sequence[NodeIn],
    demands: Sequence[ModelDemand],
    slo: Slo,
    budget_w: float | None,
    *,
    margin: float = DEFAULT_MARGIN,
    variant: Variant = "full",
    rho_max: float = PREFILL_UTILISATION_MAX,
    allow_drain: bool = True,
) -> OracleResult:
    """The most good tokens/s under the budget, then the least facility power for them.

    ``budget_w`` None: no budget row (stage 1 serves every SLO-feasible demanded token).
    ``variant`` "limits" restricts the oracle to what a limits-only policy controls, so
    a comparison can report both ceilings (see the module docstring). ``allow_drain``
    False keeps every alive node on in the full variant (a policy that decides drains
    on a slower cadence than limits plans its periods in between that way).
    """
    if variant not in ("full", "limits"):
        raise ValueError(f"variant must be 'full' or 'limits', got {variant!r}")
    node_by_id = {n.node: n for n in nodes}
    for r in replicas:
        if r.node not in node_by_id:
            raise ValueError(f"replica {r.replica} is on node {r.node}, which is not given")
        if r.role not in ("mixed", "decode", "prefill"):
            raise ValueError(f"replica {r.replica}: unknown role {r.role!r}")
    full = variant == "full"
    drains = full and allow_drain
    demand_by_model = {d.model: d for d in demands}
    total_demand = sum(max(d.output_tokens_per_s, 0.0) for d in demands)
    models = _node_models(nodes, replicas)
    alive = [n for n in nodes if n.alive]

    curves: dict[int, ReplicaCurve] = {}
    for r in replicas:
        if node_by_id[r.node].alive:
            d = demand_by_model.get(r.model)
            curves[r.replica] = replica_curve(
                r.kind,
                r.model,
                slo,
                role=r.role,
                prompt_per_output=d.prompt_per_output if d is not None else 0.0,
                batch_cap=batch_cap(r, d),
                rho_max=rho_max,
                clock_locks=full,
            )
    classes = _classes(alive, replicas, models, curves)

    floor_w = sum(
        min(models[n.node].floor_on_w, models[n.node].off_w)
        if drains
        else models[n.node].floor_on_w
        for n in alive
    )
    if budget_w is not None and floor_w > budget_w * (1.0 - margin):
        on = {
            n.node: not drains or models[n.node].floor_on_w <= models[n.node].off_w for n in alive
        }
        return _assemble(
            replicas, alive, models, curves, on, {}, total_demand, variant, "over_budget"
        )

    prob = _build(classes, demand_by_model, full, drains)
    if budget_w is not None:
        const_w = sum(models[n.node].off_w for n in alive)
        cap = budget_w * (1.0 - margin) * (1.0 - 1e-9) - const_w
        prob.add({j: v for j, v in enumerate(prob.power) if v != 0.0}, -np.inf, cap)
    tokens = np.array(prob.tokens)
    power = np.array(prob.power)
    bounds = Bounds(np.array(prob.lower), np.array(prob.upper))
    integrality = np.array(prob.integer)
    # HiGHS's presolve costs more than it saves on these small models (measured).
    opts = {"mip_rel_gap": _MIP_REL_GAP, "presolve": False, "time_limit": _MIP_TIME_LIMIT_S}
    cons = prob.constraints()
    first = milp(-tokens, constraints=cons, integrality=integrality, bounds=bounds, options=opts)
    if first.x is None:
        raise RuntimeError(f"oracle stage 1 found no solution: {first.message}")
    best = float(tokens @ first.x)
    keep = LinearConstraint(tokens[None, :], best * (1.0 - STAGE2_TOKEN_SLACK), np.inf)
    second = milp(
        power, constraints=[*cons, keep], integrality=integrality, bounds=bounds, options=opts
    )
    x = second.x if second.x is not None else first.x
    on, served = _split(classes, x)
    return _assemble(replicas, alive, models, curves, on, served, total_demand, variant, "optimal")


def _classes(
    alive: Sequence[NodeIn],
    replicas: Sequence[ReplicaIn],
    models: dict[int, _Node],
    curves: dict[int, ReplicaCurve],
) -> list[_Class]:
    """Alive nodes grouped into classes of identical ones (see ``_Class``)."""
    by_node: dict[int, dict[int, list[ReplicaIn]]] = {}
    for r in replicas:
        c = curves.get(r.replica)
        if c is not None:
            by_node.setdefault(r.node, {}).setdefault(id(c), []).append(r)
    out: dict[tuple, _Class] = {}
    for n in alive:
        reps = by_node.get(n.node, {})
        sig = (
            n.host_kind,
            n.gpus,
            n.standby_w,
            n.powers_down,
            models[n.node].spare_idle_w,
            tuple(sorted((cid, len(rs)) for cid, rs in reps.items())),
        )
        cls = out.get(sig)
        if cls is None:
            groups = [_Group(curves[rs[0].replica], []) for rs in reps.values()]
            cls = out[sig] = _Class([], models[n.node], groups)
        cls.nodes.append(n)
        for g in cls.groups:
            g.per_node.append(reps[id(g.curve)])
    return list(out.values())


def _build(
    classes: Sequence[_Class],
    demand_by_model: dict[str, ModelDemand],
    full: bool,
    drains: bool,
) -> _Problem:
    """Columns: per class the nodes on; per group and piece a count and vertex weights."""
    prob = _Problem()
    value: dict[str, dict[int, float]] = {}  # per model: its served generated tokens
    decode: dict[str, dict[int, float]] = {}  # per model: its decode replicas' tokens
    prompts: dict[str, dict[int, float]] = {}  # per model: its prefill pool's prompts
    for cls in classes:
        n_nodes = float(len(cls.nodes))
        m = cls.node
        cls.m_col = prob.column(
            power=m.on_fixed_w - m.off_w,
            lower=0.0 if drains else n_nodes,
            upper=n_nodes,
            integer=drains,
        )
        for g in cls.groups:
            rep = g.per_node[0][0]
            per_node = float(len(g.per_node[0]))
            prefill = rep.role == "prefill"
            count_row = {cls.m_col: -per_node}
            for x, y in g.curve.pieces:
                nc = prob.column(upper=per_node * n_nodes, integer=True)
                start = prob.n_var
                for lam, w in zip(x, y, strict=True):
                    prob.column(tokens=0.0 if prefill else float(lam), power=m.slope * float(w))
                sl = slice(start, prob.n_var)
                g.n_col.append(nc)
                g.w_cols.append(sl)
                count_row[nc] = 1.0
                weights = dict.fromkeys(range(sl.start, sl.stop), 1.0)
                weights[nc] = -1.0
                prob.add(weights, 0.0, 0.0)  # a piece's weights sum to its count
                rates = {sl.start + i: float(v) for i, v in enumerate(x) if v != 0.0}
                (prompts if prefill else value).setdefault(rep.model, {}).update(rates)
                if rep.role == "decode":
                    decode.setdefault(rep.model, {}).update(rates)
            prob.add(count_row, 0.0, 0.0)  # every member of an on node in one piece
    for model, row in value.items():
        d = demand_by_model.get(model)
        prob.add(row, -np.inf, max(d.output_tokens_per_s, 0.0) if d is not None else 0.0)
    for model, row in decode.items():  # the prefill pool makes the decode pool's prompts
        d = demand_by_model.get(model)
        k = _bucket_ratio(d.prompt_per_output) if d is not None else 0.0
        cover = dict(prompts.get(model, {}))
        for j, v in row.items():
            cover[j] = cover.get(j, 0.0) - k * v
        prob.add(cover, 0.0, np.inf)
    return prob


def _split(
    classes: Sequence[_Class], x: NDArray[np.float64]
) -> tuple[dict[int, bool], dict[int, tuple[float, float]]]:
    """Which nodes are on (the first of each class), and per replica its rate and oracle
    power: each piece's total shared evenly by its count (a convex piece is best so)."""
    on: dict[int, bool] = {}
    served: dict[int, tuple[float, float]] = {}
    for cls in classes:
        n_on = min(round(float(x[cls.m_col])), len(cls.nodes))
        for i, n in enumerate(cls.nodes):
            on[n.node] = i < n_on
        for g in cls.groups:
            members = iter([r for rs in g.per_node[:n_on] for r in rs])
            order = sorted(range(len(g.n_col)), key=lambda p: -g.curve.pieces[p][0][-1])
            for p in order:
                count = round(float(x[g.n_col[p]]))
                if count <= 0:
                    continue
                xs, ys = g.curve.pieces[p]
                w = np.maximum(x[g.w_cols[p]], 0.0)
                share = (float(xs @ w) / count, float(ys @ w) / count)
                for _ in range(count):
                    r = next(members, None)
                    if r is not None:
                        served[r.replica] = share
            for r in members:  # rounding left some uncounted: idle
                served[r.replica] = (0.0, g.curve.idle_w)
    return on, served


def _assemble(
    replicas: Sequence[ReplicaIn],
    alive: Sequence[NodeIn],
    models: dict[int, _Node],
    curves: dict[int, ReplicaCurve],
    on: dict[int, bool],
    served: dict[int, tuple[float, float]],
    total_demand: float,
    variant: Variant,
    status: Status,
) -> OracleResult:
    """Per-replica plans (settings mapped back per curve in one pass) and the facility's
    power from the oracle's own figures."""
    rate: dict[int, float] = {}
    power: dict[int, float] = {}
    for r in replicas:
        c = curves.get(r.replica)
        if c is None or not on.get(r.node, False):
            continue
        rate[r.replica], power[r.replica] = served.get(r.replica, (0.0, c.idle_w))

    busy: dict[int, list[ReplicaIn]] = {}
    for r in replicas:
        c = curves.get(r.replica)
        if c is not None and rate.get(r.replica, 0.0) > 1e-9 * max(c.max_tokens_per_s, 1.0):
            busy.setdefault(id(c), []).append(r)
    realised: dict[int, tuple[float, float, float, _Mix, int]] = {}
    for group in busy.values():
        lam = np.array([rate[r.replica] for r in group])
        limit, lock, batch, mix = _realise(curves[group[0].replica], lam)
        for i, r in enumerate(group):
            realised[r.replica] = (float(limit[i]), float(lock[i]), float(batch[i]), mix, i)

    plans: list[ReplicaPlan] = []
    for r in replicas:
        lam = rate.get(r.replica, 0.0)
        pw = power.get(r.replica, 0.0)
        got = realised.get(r.replica)
        if got is None:
            plans.append(
                ReplicaPlan(
                    replica=r.replica,
                    served_tokens_per_s=0.0,
                    power_limit_w=None,
                    clock_lock_mhz=None,
                    inflight_limit=None,
                    batch=0.0,
                    power_w=pw,
                    tpot_s=math.inf,
                    role=r.role,
                    setting_power_w=pw,
                )
            )
            continue
        limit, lock, batch, mix, i = got
        prefill = r.role == "prefill"
        inflight: int | None = None
        if not prefill:
            inflight = _next_pow2(batch)
            if r.max_inflight is not None:
                inflight = r.max_inflight if variant == "limits" else min(inflight, r.max_inflight)
        plans.append(
            ReplicaPlan(
                replica=r.replica,
                served_tokens_per_s=0.0 if prefill else lam,
                power_limit_w=limit,
                clock_lock_mhz=None if math.isnan(lock) else round(lock),
                inflight_limit=inflight,
                batch=batch,
                power_w=pw,
                tpot_s=float(mix.tpot_s[i]),
                role=r.role,
                prompt_tokens_per_s=lam if prefill else float(mix.prompt[i]),
                prefill_fraction=float(mix.prefill_fraction[i]),
                setting_power_w=float(mix.power_w[i]),
            )
        )

    gpu_w = 0.0
    host_w = 0.0
    per_node: dict[int, float] = {}
    for r in replicas:
        per_node[r.node] = per_node.get(r.node, 0.0) + power.get(r.replica, 0.0)
    drained: set[int] = set()
    for n in alive:
        m = models[n.node]
        if on[n.node]:
            g = per_node.get(n.node, 0.0) + m.spare_idle_w
            gpu_w += g
            host_w += m.host_w(g)
        else:
            drained.add(n.node)
            gpu_w += m.off_gpu_w
            host_w += m.off_w - m.off_gpu_w
    good = sum(p.served_tokens_per_s for p in plans)
    return OracleResult(
        good_tokens_per_s=good,
        facility_power_w=gpu_w + host_w,
        gpu_power_w=gpu_w,
        host_power_w=host_w,
        replicas=tuple(plans),
        drained_nodes=frozenset(drained),
        shed_tokens_per_s=max(total_demand - good, 0.0),
        status=status,
        variant=variant,
    )


__all__ = [
    "DEFAULT_MARGIN",
    "MAX_INFLIGHT_LIMIT",
    "PREFILL_UTILISATION_MAX",
    "ModelDemand",
    "NodeIn",
    "OracleResult",
    "ReplicaCurve",
    "ReplicaIn",
    "ReplicaPlan",
    "Slo",
    "batch_cap",
    "cache_size",
    "clear_cache",
    "kv_capacity_seqs",
    "replica_curve",
    "solve",
]
