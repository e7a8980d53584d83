"""A simulated inference facility: nodes of GPUs, replicas, a router and request traffic.

It holds the true state (power, energy, limits, requests, tokens) as numpy arrays so a
whole facility steps together in fixed steps of ``STEP_S``; the simulated GPU backend,
host collector and inference servers are thin views onto it, so the agent reads it
through the same interfaces as real hardware. The per-second facility power it records
is the ground truth that a run's ``max_power_w`` and ``over_budget_s`` come from.

The request model is a fluid (cohort) model, vectorised over replicas, because an hour
of a 32-GPU facility is millions of requests stepped tens of thousands of times:

- **Arrivals**: per step and model a Poisson count with lognormal prompt and output
  lengths (``workload.py``); they form one cohort (arrival time, count, token sums) at
  the tail of that model's router queue (FIFO).
- **Router**: each step it admits from the head of the queue into the alive,
  non-drained replicas of the model's entry pool (mixed, or prefill when disaggregated),
  filling the least-loaded first (the fluid form of least-in-flight routing) up to each
  replica's ``max_inflight``. Counts are fractional. ``replica_batch`` (the servers'
  running-requests gauge) is the mean in flight over the last step, so a prefill replica
  that empties within each step still shows the requests it held.
- **Prefill**: each replica prefills its admitted prompts FIFO. It spends the share of
  the step its backlog needs (at most ``MIXED_PREFILL_SHARE_MAX`` on a mixed replica,
  all of it on a prefill replica) and decodes the rest of the time; the physics gets
  that share as ``prefill_fraction``. The cohort pieces admitted to a replica carry
  their arrival time; the step in which the replica's prefill counter passes a piece's
  mark is when its requests get their first token, so TTFT (queue wait + prefill) is
  measured per piece: when the replica kept up with its prompts, as the piece's own
  prompt at the full prefill rate plus half a decode step (chunked prefill starts it at
  the next engine step); behind a backlog, interpolated within the step.
  APPROXIMATION: the requests of one piece share one TTFT (their mean prompt length),
  so the TTFT histograms are coarser than a real server's.
- **Decode**: requests whose prefill is done decode in one batch per replica (lockstep
  TP groups through ``physics.group_operating_point``). Tokens come from the physics;
  completions are memoryless: ``finished = generated · decoding / remaining tokens``
  (every remaining token is equally likely to be some request's last), which is exact
  in the mean for exponential output lengths and keeps ``remaining / decoding`` at the
  mean output length in steady state. APPROXIMATION: for lognormal lengths the
  real residual life of in-flight requests is longer, so the fluid finishes long
  requests slightly early; token throughput is unaffected.
- **SLO**: a finished request is within SLO when its TTFT met ``slo.ttft_s`` (tracked per
  piece, carried as "late" counts through the decode pool) and the replica's TPOT,
  averaged over about one decode lifetime (an exponential average of the per-sequence
  token rate, inverted: decode time over tokens), met ``slo.tpot_s``.
  APPROXIMATION: every request finishing on a replica in one step shares that average.
- **Disaggregated pools**: a request is admitted to a prefill replica, gets its first
  token there, then waits in a FIFO hand-off queue for a decode replica (again least
  in-flight, up to ``max_inflight``). ASSUMPTION: the KV-cache transfer costs no GPU
  time and one step of latency; a hand-off wait is spread over the request's output
  tokens and charged against the TPOT SLO when it is admitted to decode.
- **Failures** re-queue a node's requests at the head of the router queue (those that
  were decoding restart from scratch, count as late, and their tokens are lost);
  **draining** stops admissions and lets in-flight requests finish, then the node is
  powered down to standby (``scenario.standby_w``) and needs ``scenario.wake_s`` to
  serve again once un-drained. A node that comes back (recovery or wake) has lost its
  power limits and clock locks (NVML settings do not survive a reboot) and its servers'
  counters restart at zero.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from wattkeeper.simulator import physics
from wattkeeper.simulator.scenario import DEFAULT_HOSTS, NodeGroup, Scenario, Slo
from wattkeeper.simulator.workload import LengthDist, Stream, Workload

STEP_S = 0.25
"""Physics step. Coarse enough for an hour of a 32-GPU facility in seconds, fine enough
that NVML's 1-second power average spans four steps (``power_avg_1s`` is exact for reads
on step boundaries) and that a new limit (time constant 1/3 s) settles within a second."""

MIXED_PREFILL_SHARE_MAX = 0.9
"""Most of a mixed replica's time that prefill may take. ASSUMPTION standing in for
chunked prefill: vLLM V1 schedules running decodes first and fills the rest of
max_num_batched_tokens (8,192 on an H100 server) with prefill chunks, i.e. ~8k prefill
tokens (~300 ms for Llama-3.1-8B) per ~25 ms decode step: about 90% prefill when
prompts pile up, never a full decode stall."""

DRAIN_DONE_REQUESTS = 0.5
"""A draining node is empty once fewer than half a request is in flight on it (the fluid
decays exponentially and never reaches zero); the remainder goes back to the router."""

TPOT_AVERAGE_S = (1.0, 300.0)
"""Bounds of the time constant of a replica's TPOT average (about one mean decode
lifetime, remaining tokens per request times TPOT); keeps it responsive and finite."""

VLLM_GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default ``gpu_memory_utilization`` (vLLM engine arguments): the share of GPU
memory for weights plus KV cache, used for the KV-cache usage gauge."""

KV_BYTES_PER_TOKEN = {
    # 2 (K and V) x layers x KV heads x head dim x 2 bytes (BF16 KV cache), from the
    # models' Hugging Face config.json: 8B 32 layers, 70B 80, 405B 126; all 8 KV heads
    # of dimension 128.
    "llama-8b": 2 * 32 * 8 * 128 * 2,
    "llama-70b": 2 * 80 * 8 * 128 * 2,
    "llama-405b-fp8": 2 * 126 * 8 * 128 * 2,
}
WEIGHT_BYTES = {
    # Parameter counts from the model cards (8.03B, 70.6B, 405.9B), BF16 = 2 bytes,
    # FP8 = 1 byte per parameter.
    "llama-8b": 8.03e9 * 2,
    "llama-70b": 70.6e9 * 2,
    "llama-405b-fp8": 405.9e9,
}

# Histogram bounds (seconds) as the servers export them: vLLM V1
# (vllm/v1/metrics/loggers.py) and SGLang (docs/references/production_metrics.md
# example, tests/fixtures/metrics/sglang_metrics.txt). The facility keeps the union so
# that each page renders its own server's buckets exactly.
VLLM_TTFT_BOUNDS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
VLLM_ITL_BOUNDS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
SGLANG_TTFT_BOUNDS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 25.0, 30.0,
)  # fmt: skip
SGLANG_TPOT_BOUNDS_S = (
    0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
TTFT_BOUNDS_S = tuple(sorted(set(VLLM_TTFT_BOUNDS_S) | set(SGLANG_TTFT_BOUNDS_S)))
LATENCY_BOUNDS_S = np.geomspace(1e-4, 1e4, 801)
"""Fine log-spaced bounds (about 2.3% wide) of the ground-truth latency histograms that
the comparison reads its percentiles from; the servers' own coarse buckets above are
what the agents see."""
TPOT_BOUNDS_S = tuple(sorted(set(VLLM_ITL_BOUNDS_S) | set(SGLANG_TPOT_BOUNDS_S)))

_ROLE_CODE = {"mixed": 0, "prefill": 1, "decode": 2}
_PREFILL_SHARE_CAP = np.array([MIXED_PREFILL_SHARE_MAX, 1.0, 0.0])
_TINY = 1e-9

SIMPLE_LOAD_RATIO = 0.8
"""``FacilitySpec``'s steady load as a share of the replicas' uncapped capacity at their
in-flight limit: busy enough that an uncapped 4x8 H100 facility draws about 30 kW (GPUs
near their 700 W limit), with headroom so the router queue stays short."""

SIMPLE_PROMPT = LengthDist(mean=200.0, sigma=0.8)
SIMPLE_OUTPUT = LengthDist(mean=400.0, sigma=0.7)
"""``FacilitySpec``'s chat traffic. ASSUMPTION: short prompts and longer answers, the
shape of ShareGPT-like chat traces; it puts about 13% of an 8B replica's time in prefill."""


MAX_SIMULATED_GPUS = 10_000
"""Beyond this one simulated facility takes minutes and gigabytes before the first tick."""
MAX_SIMULATED_GPUS_PER_NODE = 72


@dataclass(frozen=True)
class FacilitySpec:
    """The CLI's ``--simulate NODESxGPUS``: one kind, one model, steady chat traffic."""

    nodes: int
    gpus_per_node: int
    gpu_kind: str = "h100"
    model: str = "llama-8b"
    host_kind: str | None = None
    seed: int = 0
    load_ratio: float = SIMPLE_LOAD_RATIO
    max_inflight: int = 256
    """vLLM's default ``max_num_seqs`` (256), as the router's starting limit."""

    @classmethod
    def parse(cls, text: str, **kw: object) -> FacilitySpec:
        """'4x8' means 4 nodes of 8 GPUs."""
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise ValueError(f"invalid --simulate {text!r}: expected NODESxGPUS, for example 4x8")
        nodes, per_node = int(m.group(1)), int(m.group(2))
        if per_node > MAX_SIMULATED_GPUS_PER_NODE or nodes * per_node > MAX_SIMULATED_GPUS:
            raise ValueError(
                f"--simulate {text}: at most {MAX_SIMULATED_GPUS_PER_NODE} GPUs per node and "
                f"{MAX_SIMULATED_GPUS:,} in all (one process simulates them all)"
            )
        return cls(nodes=int(m.group(1)), gpus_per_node=int(m.group(2)), **kw)  # type: ignore[arg-type]

    def scenario(self) -> Scenario:
        """The equivalent scenario: no budget (the CLI sets one), no events, one stream."""
        kind = physics.GPU_KINDS[self.gpu_kind]
        model = physics.MODELS[self.model]
        tp = model.tensor_parallel
        if self.gpus_per_node % tp:
            raise ValueError(
                f"{self.model} needs {tp} GPUs per replica; {self.gpus_per_node} per node "
                "is not a multiple of it"
            )
        replicas = self.nodes * self.gpus_per_node // tp
        per_replica = _replica_capacity_rps(
            kind, model, self.max_inflight, SIMPLE_PROMPT.mean, SIMPLE_OUTPUT.mean
        )
        group = NodeGroup(
            name="sim",
            count=self.nodes,
            gpus_per_node=self.gpus_per_node,
            gpu=self.gpu_kind,
            host=self.host_kind or DEFAULT_HOSTS[self.gpu_kind],
            model=self.model,
            role="mixed",
            max_inflight=self.max_inflight,
            server="vllm",
        )
        stream = Stream(
            model=self.model,
            rate_per_s=self.load_ratio * per_replica * replicas,
            prompt=SIMPLE_PROMPT,
            output=SIMPLE_OUTPUT,
        )
        return Scenario(
            name=f"simulate-{self.nodes}x{self.gpus_per_node}",
            description="steady chat traffic on one kind of GPU (wattkeeper run --simulate)",
            duration_s=3600.0,
            seed=self.seed,
            fleet=(group,),
            workload=(stream,),
            slo=Slo(ttft_s=2.0, tpot_s=0.05),
        )


def _replica_capacity_rps(
    kind: physics.GpuKind, model: physics.ModelProfile, batch: int, prompt: float, output: float
) -> float:
    """Requests/s one uncapped mixed replica serves at ``batch`` in flight.

    Time per request = prompt/prefill rate + output·TPOT/batch (the decode share is
    shared by the batch); both rates from the physics at the default limit.
    """
    pre = physics.operating_point(kind, model, batch=1, prefill_fraction=1.0)
    dec = physics.operating_point(kind, model, batch=batch, prefill_fraction=0.0)
    seconds = prompt / float(pre.prefill_tokens_per_s) + output / float(dec.decode_tokens_per_s)
    return 1.0 / seconds


@dataclass
class FacilityStats:
    """Ground truth accumulated as the facility steps (totals since the start)."""

    energy_j: float = 0.0
    gpu_energy_j: float = 0.0
    host_energy_j: float = 0.0
    generated_tokens: float = 0.0
    prompt_tokens: float = 0.0
    requests_arrived: float = 0.0
    first_tokens: float = 0.0
    """Prefills completed (requests that got their first token, retries included)."""
    ttft_sum_s: float = 0.0
    ttft_within_slo: float = 0.0
    requests_finished: float = 0.0
    requests_within_slo: float = 0.0
    requests_requeued: float = 0.0
    """Requests sent back to the router by failures or the end of a drain."""
    second_power_w: list[float] = field(default_factory=list)
    """Facility power averaged over each whole simulated second since the start."""
    second_budget_w: list[float | None] = field(default_factory=list)
    """The scenario's budget in force at the start of each of those seconds."""
    second_tokens: list[float] = field(default_factory=list)
    """Generated tokens in each of those seconds."""
    requests_shed: float = 0.0
    """Requests the router dropped because their queue wait already exceeded the TTFT SLO
    (what a router answering 429 does): never served, never counted as finished."""
    second_good_tokens: list[float] = field(default_factory=list)
    """Good tokens of the requests that finished in each second."""
    window_arrived: float = 0.0
    window_finished: float = 0.0
    window_within_slo: float = 0.0
    window_shed: float = 0.0
    window_good_tokens: float = 0.0
    window_tokens: float = 0.0
    """Requests that arrived within ``SimFacility.window`` and what became of them: how
    many finished, met both SLOs or were shed, and their output tokens (all, and those of
    the requests within SLO). See ``SimFacility.window_totals`` for the ones still
    decoding when the run ends."""
    ttft_hist: NDArray[np.float64] = field(
        default_factory=lambda: np.zeros(len(LATENCY_BOUNDS_S) + 1)
    )
    """Requests by TTFT (``LATENCY_BOUNDS_S``), counted from ``measure_from``."""
    tpot_hist: NDArray[np.float64] = field(
        default_factory=lambda: np.zeros(len(LATENCY_BOUNDS_S) + 1)
    )
    """Finished requests by their mean time per output token, from ``measure_from``."""
    minute_ttft_hist: list[NDArray[np.float64]] = field(default_factory=list)
    """The same per simulated minute since the start (for plots over time)."""
    minute_tpot_hist: list[NDArray[np.float64]] = field(default_factory=list)


@dataclass(frozen=True)
class _PhysicsClass:
    """Replicas of one model on one GPU kind: one physics call per step serves them all."""

    kind: physics.GpuKind
    model: physics.ModelProfile
    reps: NDArray[np.int64]
    gpus: NDArray[np.int64]  # (len(reps), tensor_parallel)


def water_fill(
    level: NDArray, cap: NDArray, amount: float, weight: NDArray | None = None
) -> NDArray:
    """Amounts that raise the lowest ``level / weight`` first, each up to its ``cap``,
    summing to ``amount``.

    The fluid form of weighted least-in-flight routing (HAProxy's ``leastconn`` with
    server weights: the server with the fewest connections per unit of weight gets the
    next request); a replica of weight 0 gets nothing. Exact, O(n log n), through the
    piecewise linear total ``f(L) = Σ w·clip(L - level/w, 0, (cap - level)/w)``.
    """
    w = np.ones_like(level) if weight is None else np.asarray(weight, dtype=float)
    room = np.where(w > 0, np.maximum(cap - level, 0.0), 0.0)
    if amount >= room.sum():
        return room
    live = w > 0
    wl = w[live]
    lo_n = level[live] / wl
    hi_n = lo_n + room[live] / wl
    o_lo = np.argsort(lo_n)
    o_hi = np.argsort(hi_n)
    lo, w_lo = lo_n[o_lo], wl[o_lo]
    hi, w_hi = hi_n[o_hi], wl[o_hi]
    c_w_lo = np.concatenate(([0.0], np.cumsum(w_lo)))
    c_wx_lo = np.concatenate(([0.0], np.cumsum(w_lo * lo)))
    c_w_hi = np.concatenate(([0.0], np.cumsum(w_hi)))
    c_wx_hi = np.concatenate(([0.0], np.cumsum(w_hi * hi)))
    points = np.sort(np.concatenate((lo, hi)))
    i = np.searchsorted(lo, points, side="right")
    j = np.searchsorted(hi, points, side="right")
    total = c_w_lo[i] * points - c_wx_lo[i] - (c_w_hi[j] * points - c_wx_hi[j])
    k = int(np.searchsorted(total, amount, side="left"))
    k = min(max(k, 1), len(points) - 1)
    x0, x1, f0, f1 = points[k - 1], points[k], total[k - 1], total[k]
    water = x1 if f1 <= f0 else x0 + (amount - f0) * (x1 - x0) / (f1 - f0)
    out = np.zeros_like(level, dtype=float)
    out[live] = np.clip(wl * (water - lo_n), 0.0, room[live])
    return out


class SimFacility:
    """The facility's true state, stepped in fixed steps by ``advance_to``."""

    def __init__(self, scenario: Scenario, start_ts: float) -> None:
        self.scenario = scenario
        self.slo = scenario.slo
        self.start_ts = start_ts
        self.now = start_ts
        seeds = np.random.SeedSequence(scenario.seed).spawn(2)
        id_rng = np.random.default_rng(seeds[0])
        self.workload = Workload(scenario.workload, np.random.default_rng(seeds[1]))
        self._build_layout(scenario, id_rng)
        self._init_state()
        self.stats = FacilityStats()
        self.observers: list[Callable[[SimFacility], None]] = []
        self._second_acc = 0.0
        self._second_tokens = 0.0
        self._second_t = 0.0
        self._second_good = 0.0
        self.measure_from = start_ts
        """Latency histograms count from this time on (the comparison's warm-up)."""
        self.window = (start_ts, math.inf)
        """Requests arriving in ``[start, end)`` are followed to their end for the
        comparison's goodput (``FacilityStats.window_*``)."""
        self._event_pos = 0
        self._demand_cache: tuple[float, dict[str, NDArray]] | None = None
        self._warm_start()
        self._compute(0.0)
        # Each replica's TPOT average starts where the warm start's steady state is, as
        # for a facility that was serving before the run.
        self._tpot_avg = np.where(
            np.isfinite(self.replica_tpot_s) & (self.replica_tpot_s > 0),
            self.replica_tpot_s,
            self._tpot_avg,
        )

    @classmethod
    def simple(cls, spec: FacilitySpec, start_ts: float) -> SimFacility:
        """``wattkeeper run --simulate NxG``: see ``FacilitySpec``."""
        return cls(spec.scenario(), start_ts)

    # -- layout -----------------------------------------------------------------------
    def _build_layout(self, scenario: Scenario, rng: np.random.Generator) -> None:
        node_of: list[int] = []
        gpu_kinds: list[str] = []
        self.node_host_kind: list[str] = []
        self.node_server: list[str] = []
        self.node_group: list[NodeGroup] = []
        self._node_first_gpu: list[int] = []
        self._node_n_gpus: list[int] = []
        rep_node: list[int] = []
        self.replica_model: list[str] = []
        self.replica_role: list[str] = []
        rep_first: list[int] = []
        rep_tp: list[int] = []
        max_inflight: list[float] = []
        for group in scenario.fleet:
            tp = physics.MODELS[group.model].tensor_parallel
            for _ in range(group.count):
                node = len(self.node_host_kind)
                first = len(node_of)
                self.node_host_kind.append(group.host)
                self.node_server.append(group.server)
                self.node_group.append(group)
                self._node_first_gpu.append(first)
                self._node_n_gpus.append(group.gpus_per_node)
                node_of.extend([node] * group.gpus_per_node)
                gpu_kinds.extend([group.gpu] * group.gpus_per_node)
                for k in range(group.gpus_per_node // tp):
                    rep_node.append(node)
                    self.replica_model.append(group.model)
                    self.replica_role.append(group.role)
                    rep_first.append(first + k * tp)
                    rep_tp.append(tp)
                    max_inflight.append(float(group.max_inflight))
        self.n_nodes = len(self.node_host_kind)
        self.n_gpus = len(node_of)
        self.n_replicas = len(rep_node)
        self.node_of = np.array(node_of, dtype=np.int64)
        self.gpu_kind_names = gpu_kinds
        self.replica_node = np.array(rep_node, dtype=np.int64)
        self.replica_of = np.empty(self.n_gpus, dtype=np.int64)
        for r, (first, tp) in enumerate(zip(rep_first, rep_tp, strict=True)):
            self.replica_of[first : first + tp] = r
        self._rep_first_gpu = np.array(rep_first, dtype=np.int64)
        self._role = np.array([_ROLE_CODE[r] for r in self.replica_role], dtype=np.int64)
        self.max_inflight = np.array(max_inflight, dtype=float)
        self.route_weight = np.ones(len(max_inflight))
        """Router weight of each replica (weighted least-in-flight; 0 sends it nothing)."""
        self.models: tuple[str, ...] = tuple(dict.fromkeys(self.replica_model))
        reps_all = np.arange(self.n_replicas)
        model_arr = np.array(self.replica_model)
        self._entry_reps = {m: reps_all[(model_arr == m) & (self._role != 2)] for m in self.models}
        self._decode_reps = {m: reps_all[(model_arr == m) & (self._role == 2)] for m in self.models}
        self._disaggregated = {m: len(self._decode_reps[m]) > 0 for m in self.models}

        classes: dict[tuple[str, str], list[int]] = {}
        for r in range(self.n_replicas):
            kind = gpu_kinds[rep_first[r]]
            classes.setdefault((kind, self.replica_model[r]), []).append(r)
        self._classes = []
        for (kind, model), reps in classes.items():
            prof = physics.MODELS[model]
            reps_a = np.array(reps, dtype=np.int64)
            gpus = self._rep_first_gpu[reps_a][:, None] + np.arange(prof.tensor_parallel)[None, :]
            self._classes.append(_PhysicsClass(physics.GPU_KINDS[kind], prof, reps_a, gpus))

        kinds = [physics.GPU_KINDS[k] for k in gpu_kinds]
        self._power_min = np.array([k.power_min_w for k in kinds])
        self._power_default = np.array([k.power_default_w for k in kinds])
        self._power_max = np.array([k.power_max_w for k in kinds])
        self._idle_w = np.array([k.idle_w for k in kinds])
        self._max_clock = np.array([float(k.max_sm_clock_mhz) for k in kinds])
        self._limit_tau = np.array([k.limit_time_constant_s for k in kinds])
        self._clock_tau = np.array([k.clock_time_constant_s for k in kinds])
        self._node_gpu_max_w = np.bincount(
            self.node_of, weights=self._power_max, minlength=self.n_nodes
        )
        self._host_groups = {
            name: np.array([n for n, h in enumerate(self.node_host_kind) if h == name])
            for name in dict.fromkeys(self.node_host_kind)
        }
        self._host_idle_w = np.array([physics.HOST_KINDS[h].idle_w for h in self.node_host_kind])
        seed = scenario.seed
        local = [i - self._node_first_gpu[node_of[i]] for i in range(self.n_gpus)]
        self.uuids = [
            f"GPU-5151{seed % 0x10000:04x}-{node_of[i]:04x}-{local[i]:04x}-"
            f"{int(rng.integers(0, 2**48)):012x}"
            for i in range(self.n_gpus)
        ]
        self._energy_start = rng.uniform(1e6, 5e7, self.n_gpus)  # NVML counters since driver load

    def _init_state(self) -> None:
        n, nr, nn = self.n_gpus, self.n_replicas, self.n_nodes
        # GPU settings and state
        self.limit_requested = self._power_default.copy()
        self.limit_effective = self._power_default.copy()
        self.clock_lock = np.full(n, np.nan)  # upper end of the locked range, MHz
        self.clock_lock_min = np.full(n, np.nan)
        self.clock_effective_cap = self._max_clock.copy()
        self.energy_j = self._energy_start.copy()
        self.power_true = self._idle_w.copy()
        self._window = np.tile(
            self._idle_w, (round(physics.NVML_POWER_AVERAGE_WINDOW_S / STEP_S), 1)
        )
        self._window_pos = 0
        self.clock_mhz = self._max_clock.copy()
        self.power_capped = np.zeros(n, dtype=bool)
        self.gpu_busy = np.zeros(n)
        # nodes
        self.node_alive = np.ones(nn, dtype=bool)
        self.drained = np.zeros(nn, dtype=bool)
        self.node_standby = np.zeros(nn, dtype=bool)
        self._wake_until = np.full(nn, -math.inf)
        self.host_power = self._host_idle_w.copy()
        # replicas: requests
        self._n_pre = np.zeros(nr)  # admitted, prefill not done
        self._n_dec = np.zeros(nr)  # decoding
        self._n_dec_ok = np.zeros(nr)  # decoding and still within SLO so far
        self._remaining = np.zeros(nr)  # output tokens the decoding requests still owe
        self._out_total = np.zeros(nr)  # whole output tokens of the decoding requests
        self._n_dec_win = np.zeros(nr)  # decoding requests that arrived in the window
        self._n_dec_okwin = np.zeros(nr)  # ... and are still within SLO so far
        self._admitted_tokens = np.zeros(nr)  # prompt tokens admitted (cumulative)
        self._prefilled_tokens = np.zeros(nr)  # prompt tokens prefilled (cumulative)
        self.replica_batch = np.zeros(nr)
        self._left_in_step = np.zeros(nr)
        self.replica_prefill_fraction = np.zeros(nr)
        self.replica_physics_batch = np.zeros(nr)
        self.replica_busy = np.zeros(nr)
        self.replica_decode_tps = np.zeros(nr)
        self.replica_prefill_tps = np.zeros(nr)
        self.replica_tpot_s = np.full(nr, np.inf)
        self._tpot_avg = np.zeros(nr)
        self._prefill_rate = np.zeros(nr)
        for cls in self._classes:
            op = physics.operating_point(cls.kind, cls.model, batch=1.0, prefill_fraction=1.0)
            self._prefill_rate[cls.reps] = float(op.prefill_tokens_per_s)
            op1 = physics.operating_point(cls.kind, cls.model, batch=1.0)
            self._tpot_avg[cls.reps] = float(op1.tpot_s)
        self._uncapped_prefill_rate = self._prefill_rate.copy()
        # replicas: server counters (since the server started) and histograms
        self.replica_generated = np.zeros(nr)
        self.replica_prompt = np.zeros(nr)
        self.replica_requests = np.zeros(nr)
        self.replica_ttft_hist = np.zeros((nr, len(TTFT_BOUNDS_S) + 1))
        self.replica_ttft_sum = np.zeros(nr)
        self.replica_tpot_hist = np.zeros((nr, len(TPOT_BOUNDS_S) + 1))
        self.replica_tpot_sum = np.zeros(nr)
        # router
        self._queue: dict[str, deque[list[float]]] = {m: deque() for m in self.models}
        self._queue_n = {m: 0.0 for m in self.models}
        self._arrived_by_second: dict[str, list[list[float]]] = {m: [] for m in self.models}
        self._handoff: dict[str, deque[list[float]]] = {m: deque() for m in self.models}
        self._handoff_n = {m: 0.0 for m in self.models}
        # prefill pieces in flight: replica, prompt mark, arrival and admission time,
        # count, prompt and output tokens, late count
        self._pc = {
            "rep": np.zeros(0, dtype=np.int64),
            "mark": np.zeros(0),
            "t": np.zeros(0),
            "adm": np.zeros(0),
            "n": np.zeros(0),
            "prompt": np.zeros(0),
            "out": np.zeros(0),
            "late": np.zeros(0),
            "win": np.zeros(0),
        }

    # -- public views -----------------------------------------------------------------
    def gpu_kind(self, g: int) -> physics.GpuKind:
        return physics.GPU_KINDS[self.gpu_kind_names[g]]

    def node_gpu_indices(self, node: int) -> range:
        first = self._node_first_gpu[node]
        return range(first, first + self._node_n_gpus[node])

    def node_replicas(self, node: int) -> list[int]:
        return [int(r) for r in np.flatnonzero(self.replica_node == node)]

    @property
    def router_queue(self) -> dict[str, float]:
        """Requests per model waiting in the router for a first admission."""
        return {m: max(0.0, self._queue_n[m]) for m in self.models}

    @property
    def handoff_queue(self) -> dict[str, float]:
        """Requests per disaggregated model waiting for a decode replica after prefill."""
        return {m: max(0.0, self._handoff_n[m]) for m in self.models}

    def node_serving(self) -> NDArray[np.bool_]:
        """Nodes the router may send new requests to (alive, not drained, not asleep)."""
        return self.node_alive & ~self.drained & ~self.node_standby & (self._wake_until <= self.now)

    def node_state(self, node: int) -> str:
        """'failed', 'standby', 'waking', 'draining' or 'serving', for people and tests."""
        if not self.node_alive[node]:
            return "failed"
        if self.node_standby[node]:
            return "standby"
        if self._wake_until[node] > self.now:
            return "waking"
        return "draining" if self.drained[node] else "serving"

    def node_up(self, node: int) -> bool:
        """Whether the node's servers and GPUs answer (alive, powered, finished waking)."""
        return bool(
            self.node_alive[node]
            and not self.node_standby[node]
            and self._wake_until[node] <= self.now
        )

    def budget_at(self, t: float) -> float | None:
        """The scenario's budget in force at timestamp ``t``."""
        return self.scenario.budget_at(t - self.start_ts)

    def power_avg_1s(self) -> NDArray[np.float64]:
        """What NVML reports as power usage: the mean over the last second (4 steps)."""
        return self._window.mean(axis=0)

    def facility_power_w(self) -> float:
        return float(self.power_true.sum() + self.host_power.sum())

    def kv_cache_usage(self) -> NDArray[np.float64]:
        """Estimated KV-cache use per replica (0-1): in-flight requests hold their prompt
        and, on average, half their output. An estimate for the server gauges only."""
        out = np.zeros(self.n_replicas)
        t_rel = self.now - self.start_ts
        for cls in self._classes:
            name = cls.model.name
            prompt, output = self.workload.mean_lengths(name, t_rel)
            memory = cls.kind.memory_bytes * cls.model.tensor_parallel
            capacity = (memory * VLLM_GPU_MEMORY_UTILIZATION - WEIGHT_BYTES[name]) / float(
                KV_BYTES_PER_TOKEN[name]
            )
            out[cls.reps] = self.replica_batch[cls.reps] * (prompt + output / 2.0) / capacity
        return np.clip(out, 0.0, 1.0)

    # -- actuation --------------------------------------------------------------------
    def set_drained(self, node: int, drained: bool) -> None:
        """Drain (no new requests; powered down once empty) or return a node to service.

        Un-draining a node that reached standby wakes it: ``scenario.wake_s`` at idle
        power before it serves, with its GPU settings and server counters reset.
        """
        node = int(node)
        self.drained[node] = bool(drained)
        if not drained and self.node_standby[node]:
            self.node_standby[node] = False
            self._wake_until[node] = self.now + self.scenario.wake_s
            self._reboot(node)
        self._demand_cache = None

    def drain_now(self, node: int) -> None:
        """End a drain at once: the node's requests in flight go back to the router (to
        be served elsewhere, from the start) and the node powers down to standby."""
        node = int(node)
        if not self.drained[node] or not self.node_alive[node] or self.node_standby[node]:
            return
        self._requeue(self.replica_node == node)
        self.node_standby[node] = True
        self._wake_until[node] = -math.inf
        self._demand_cache = None

    def set_max_inflight(self, replica: int, limit: float) -> None:
        """The router's in-flight limit for one replica (the batch lever). Lowering it
        below the current in-flight count lets the excess finish; it is not preempted."""
        if limit < 1:
            raise ValueError(f"max_inflight must be at least 1, got {limit}")
        self.max_inflight[int(replica)] = float(limit)
        self._demand_cache = None

    def fail_node(self, node: int) -> None:
        """The node dies: 0 W, its requests back to the router, its servers unreachable."""
        node = int(node)
        if not self.node_alive[node]:
            return
        self._requeue(self.replica_node == node)
        self.node_alive[node] = False
        self.node_standby[node] = False
        self._wake_until[node] = -math.inf
        self._demand_cache = None

    def recover_node(self, node: int) -> None:
        """The node is back and serving (or straight to standby if it is drained)."""
        node = int(node)
        if self.node_alive[node]:
            return
        self.node_alive[node] = True
        self._reboot(node)
        self.node_standby[node] = bool(self.drained[node])
        self._demand_cache = None

    def _reboot(self, node: int) -> None:
        """What a restart loses: NVML limits and locks, the servers' counters."""
        gpus = self.node_gpu_indices(node)
        sl = slice(gpus.start, gpus.stop)
        self.limit_requested[sl] = self._power_default[sl]
        self.limit_effective[sl] = self._power_default[sl]
        self.clock_lock[sl] = np.nan
        self.clock_lock_min[sl] = np.nan
        self.clock_effective_cap[sl] = self._max_clock[sl]
        reps = self.replica_node == node
        for arr in (self.replica_generated, self.replica_prompt, self.replica_requests):
            arr[reps] = 0.0
        for arr in (self.replica_ttft_hist, self.replica_tpot_hist):
            arr[reps] = 0.0
        self.replica_ttft_sum[reps] = 0.0
        self.replica_tpot_sum[reps] = 0.0

    # -- demand -----------------------------------------------------------------------
    def _demand(self, at: float | None = None) -> dict[str, NDArray]:
        """Uncapped steady state of the current load, per replica (cached per step).

        The current arrival rate of each model (not the sampled arrivals, nor the router
        backlog) at the default power limits and no clock locks. Least-in-flight routing
        equalises in-flight counts in steady state, so the replicas of a pool share one
        in-flight level (up to their ``max_inflight``) and the faster ones take more of
        the requests; the level is the one whose total throughput serves the load
        (Little's law), found by bisection. A mixed replica's prefill share follows the
        requests it takes; a prefill pool splits prompts in proportion to prefill speed.
        """
        at = self.now if at is None else at
        if self._demand_cache is not None and self._demand_cache[0] == at:
            return self._demand_cache[1]
        nr = self.n_replicas
        t_rel = at - self.start_ts
        serving = self.node_serving()[self.replica_node]
        rate_full = np.maximum(self._uncapped_prefill_rate, _TINY)
        cap = _PREFILL_SHARE_CAP[self._role]
        pool = np.full(nr, -1)  # which model's decoding pool a replica is in (-1: none)
        gen_load = np.zeros(len(self.models))
        prompt_per_output = np.zeros(nr)  # prompt tokens per generated token (mixed)
        fixed_share = np.zeros(nr)  # prefill share of prefill-pool replicas
        for i, m in enumerate(self.models):
            rate = self.workload.rate(m, t_rel)
            prompt, output = self.workload.mean_lengths(m, t_rel)
            entry = self._entry_reps[m][serving[self._entry_reps[m]]]
            if self._disaggregated[m]:
                if len(entry):
                    speed = rate_full[entry]
                    fixed_share[entry] = rate * prompt * speed / speed.sum() / speed
                decoders = self._decode_reps[m][serving[self._decode_reps[m]]]
            else:
                decoders = entry
                prompt_per_output[entry] = prompt / output
            pool[decoders] = i
            gen_load[i] = rate * output
        in_pool = pool >= 0
        pool_idx = np.where(in_pool, pool, 0)
        fixed_share = np.minimum(fixed_share, cap)

        def serve(level: NDArray) -> tuple[NDArray, NDArray, NDArray]:
            """Per replica at a pool level: batch, prefill share, decode tokens/s."""
            n = np.where(in_pool, np.minimum(level[pool_idx], self.max_inflight), 0.0)
            share = fixed_share.copy()
            tps = self._uncapped_decode_tps(n, share)
            for _ in range(4):  # a mixed replica prefills what it serves
                share = np.where(
                    prompt_per_output > 0,
                    np.minimum(cap, tps * prompt_per_output / rate_full),
                    fixed_share,
                )
                tps = self._uncapped_decode_tps(n, share)
            return n, share, tps

        def pool_sum(x: NDArray) -> NDArray:
            return np.bincount(pool_idx[in_pool], weights=x[in_pool], minlength=len(self.models))

        top = np.full(len(self.models), float(self.max_inflight.max()))
        _, _, tps_top = serve(top)
        lo = np.zeros(len(self.models))
        hi = top.copy()
        for _ in range(30):
            mid = (lo + hi) / 2.0
            ok = pool_sum(serve(mid)[2]) >= gen_load
            hi = np.where(ok, mid, hi)
            lo = np.where(ok, lo, mid)
        saturated = pool_sum(tps_top) < gen_load
        batch, share, tps = serve(np.where(saturated, top, hi))
        share = np.where(in_pool, share, fixed_share)
        b_phys, pf = _physics_inputs(batch, share)
        result = {
            "batch": batch,
            "prefill_share": share,
            "physics_batch": b_phys,
            "prefill_fraction": pf,
            "tokens_per_s": tps,
            "prompt_tokens_per_s": share * rate_full,
        }
        self._demand_cache = (at, result)
        return result

    def _uncapped_decode_tps(self, n_dec: NDArray, share: NDArray) -> NDArray:
        """Decode tokens/s at the default limit and no lock (a TP group runs uniform)."""
        b_phys, pf = _physics_inputs(n_dec, share)
        out = np.zeros(self.n_replicas)
        for cls in self._classes:
            op = physics.operating_point(
                cls.kind, cls.model, batch=b_phys[cls.reps], prefill_fraction=pf[cls.reps]
            )
            out[cls.reps] = op.decode_tokens_per_s
        return out

    def demand_power_w(self, t: float | None = None) -> float:
        """Facility power if nothing were capped, for the load at timestamp ``t`` (default
        now) on the nodes serving now; the other nodes count at their present draw. Says
        whether (and by how much) a budget binds."""
        d = self._demand(t)
        gpu_w = np.zeros(self.n_gpus)
        for cls in self._classes:
            op = physics.operating_point(
                cls.kind,
                cls.model,
                batch=d["physics_batch"][cls.reps],
                prefill_fraction=d["prefill_fraction"][cls.reps],
            )
            gpu_w[cls.gpus] = np.asarray(op.power_w, dtype=float)[:, None]
        load = np.bincount(self.node_of, weights=gpu_w, minlength=self.n_nodes)
        host = np.empty(self.n_nodes)
        for name, nodes in self._host_groups.items():
            ratio = load[nodes] / self._node_gpu_max_w[nodes]
            host[nodes] = physics.host_power_w(physics.HOST_KINDS[name], ratio)
        serving = self.node_serving()
        now_w = np.bincount(self.node_of, weights=self.power_true, minlength=self.n_nodes)
        per_node = np.where(serving, load + host, now_w + self.host_power)
        return float(per_node.sum())

    def demand_tokens_per_s(self) -> NDArray[np.float64]:
        """Generated tokens/s each replica would serve uncapped at the current load."""
        return self._demand()["tokens_per_s"].copy()

    def demand_batch(self) -> NDArray[np.float64]:
        """In-flight requests each replica would run uncapped at the current load."""
        return self._demand()["batch"].copy()

    def demand_prefill_fraction(self) -> NDArray[np.float64]:
        """``prefill_fraction`` for the physics at ``demand_physics_batch()`` (uncapped)."""
        return self._demand()["prefill_fraction"].copy()

    def demand_physics_batch(self) -> NDArray[np.float64]:
        """``batch`` for the physics at the uncapped demand (see ``replica_physics_batch``)."""
        return self._demand()["physics_batch"].copy()

    def _warm_start(self) -> None:
        """Start in the uncapped steady state of the load at t=0, as a facility that was
        serving before the daemon started (no minute-long ramp in every run)."""
        d = self._demand()
        t_rel = 0.0
        for m in self.models:
            _, output = self.workload.mean_lengths(m, t_rel)
            decoders = self._decode_reps[m] if self._disaggregated[m] else self._entry_reps[m]
            n = d["batch"][decoders]
            self._n_dec[decoders] = n
            self._n_dec_ok[decoders] = n
            self._remaining[decoders] = n * output
            self._out_total[decoders] = n * output
        self.replica_batch = self._n_pre + self._n_dec

    # -- stepping ---------------------------------------------------------------------
    def advance_to(self, t: float) -> None:
        """Step the physics up to ``t`` (no-op when ``t`` is not ahead of the facility)."""
        while self.now + STEP_S <= t + 1e-9:
            self._step(STEP_S)

    def _step(self, dt: float) -> None:
        t0 = self.now
        self._apply_events(t0 + dt)
        self.limit_effective = np.asarray(
            physics.approach(self.limit_effective, self.limit_requested, dt, self._limit_tau)
        )
        target_cap = np.where(np.isnan(self.clock_lock), self._max_clock, self.clock_lock)
        self.clock_effective_cap = np.asarray(
            physics.approach(self.clock_effective_cap, target_cap, dt, self._clock_tau)
        )
        self._arrivals(t0, dt)
        router_ok = self.node_serving()[self.replica_node]
        for m in self.models:
            self._admit(m, t0, router_ok)
        self.now = t0 + dt
        self._compute(dt)

    def _apply_events(self, t_end: float) -> None:
        events = self.scenario.events
        while self._event_pos < len(events):
            ev = events[self._event_pos]
            if self.start_ts + ev.at_s > t_end + 1e-9:
                break
            if ev.kind == "fail":
                self.fail_node(ev.node)
            else:
                self.recover_node(ev.node)
            self._event_pos += 1

    def _arrivals(self, t0: float, dt: float) -> None:
        arrived = self.workload.sample(t0 - self.start_ts, dt)
        for m, a in arrived.items():
            if a.count <= 0:
                continue
            t = t0 + dt / 2.0
            second = self._arrived_by_second[m]
            k = int((t - self.start_ts) // 1.0)
            while len(second) <= k:
                second.append([0.0, 0.0])
            second[k][0] += a.output_tokens
            second[k][1] += a.prompt_tokens
            win = float(a.count) if self.window[0] <= t < self.window[1] else 0.0
            self.stats.window_arrived += win
            self._queue[m].append([t, float(a.count), a.prompt_tokens, a.output_tokens, 0.0, win])
            self._queue_n[m] += a.count
            self.stats.requests_arrived += a.count

    @staticmethod
    def _dequeue(q: deque[list[float]], amount: float) -> NDArray[np.float64]:
        """Take ``amount`` requests from the head of a FIFO of cohorts, splitting the last.

        Returns rows (time, count, prompt tokens, output tokens, late count, count of
        requests that arrived in the measurement window)."""
        rows = []
        left = amount
        while left > _TINY and q:
            c = q[0]
            if c[1] <= left + _TINY:
                rows.append(list(c))
                q.popleft()
                left -= c[1]
            else:
                f = left / c[1]
                rows.append([c[0], left, c[2] * f, c[3] * f, c[4] * f, c[5] * f])
                c[1] -= left
                c[2] *= 1.0 - f
                c[3] *= 1.0 - f
                c[4] *= 1.0 - f
                c[5] *= 1.0 - f
                left = 0.0
        return np.array(rows, dtype=float).reshape(-1, 6)

    def _admit(self, m: str, t0: float, router_ok: NDArray[np.bool_]) -> None:
        """Router admissions for one model: entry pool from the queue, decode pool from
        the hand-off queue."""
        if self._queue_n[m] > _TINY:
            self._shed(m, t0)
        if self._queue_n[m] > _TINY:
            reps = self._entry_reps[m]
            reps = reps[router_ok[reps]]
            amounts, rows = self._route(reps, self._queue[m], m, "_queue_n")
            if rows is not None:
                self._new_pieces(reps, amounts, rows, t0)
        if self._disaggregated[m] and self._handoff_n[m] > _TINY:
            reps = self._decode_reps[m]
            reps = reps[router_ok[reps]]
            amounts, rows = self._route(reps, self._handoff[m], m, "_handoff_n")
            if rows is not None:
                self._join_decode(reps, amounts, rows, t0)

    def _shed(self, m: str, t0: float) -> None:
        """Drop from the router queue every request whose wait already exceeds the TTFT
        SLO: it can no longer be served in time, and a router that keeps it only delays
        everyone behind it (the queue would grow without bound whenever capacity falls
        short). One rule for every policy under test. The whole queue is scanned, not
        only its head: a failure or drain puts re-queued requests at the head, timed
        now, ahead of older rows."""
        q = self._queue[m]
        oldest = t0 - self.slo.ttft_s
        late = [row for row in q if row[0] < oldest]
        if not late:
            return
        keep = [row for row in q if row[0] >= oldest]
        q.clear()
        q.extend(keep)
        shed = sum(row[1] for row in late)
        self.stats.window_shed += sum(row[5] for row in late)
        self._queue_n[m] = max(self._queue_n[m] - shed, 0.0) if q else 0.0
        self.stats.requests_shed += shed

    def _route(
        self, reps: NDArray, q: deque[list[float]], m: str, counter: str
    ) -> tuple[NDArray, NDArray | None]:
        if len(reps) == 0:
            return np.zeros(0), None
        level = self._n_pre[reps] + self._n_dec[reps]
        cap = self.max_inflight[reps]
        totals = getattr(self, counter)
        room = np.where(self.route_weight[reps] > 0, np.maximum(cap - level, 0.0), 0.0)
        amount = min(totals[m], float(room.sum()))
        if amount <= _TINY:
            return np.zeros(0), None
        amounts = water_fill(level, cap, amount, self.route_weight[reps])
        rows = self._dequeue(q, amount)
        totals[m] = totals[m] - amount if q else 0.0
        return amounts, rows

    def _new_pieces(self, reps: NDArray, amounts: NDArray, rows: NDArray, t0: float) -> None:
        """Split admitted cohorts over replicas in proportion to what each got."""
        sel = amounts > _TINY
        reps, w = reps[sel], amounts[sel] / amounts.sum()
        k, nr = rows.shape[0], len(reps)
        n = np.outer(rows[:, 1], w)
        prompt = np.outer(rows[:, 2], w)
        marks = self._admitted_tokens[reps][None, :] + np.cumsum(prompt, axis=0)
        self._admitted_tokens[reps] = marks[-1]
        self._n_pre[reps] += n.sum(axis=0)
        pc = self._pc
        pc["rep"] = np.concatenate((pc["rep"], np.tile(reps, k)))
        pc["mark"] = np.concatenate((pc["mark"], marks.ravel()))
        pc["t"] = np.concatenate((pc["t"], np.repeat(rows[:, 0], nr)))
        pc["adm"] = np.concatenate((pc["adm"], np.repeat(np.maximum(rows[:, 0], t0), nr)))
        pc["n"] = np.concatenate((pc["n"], n.ravel()))
        pc["prompt"] = np.concatenate((pc["prompt"], prompt.ravel()))
        pc["out"] = np.concatenate((pc["out"], np.outer(rows[:, 3], w).ravel()))
        pc["late"] = np.concatenate((pc["late"], np.outer(rows[:, 4], w).ravel()))
        pc["win"] = np.concatenate((pc["win"], np.outer(rows[:, 5], w).ravel()))

    def _join_decode(self, reps: NDArray, amounts: NDArray, rows: NDArray, t0: float) -> None:
        """Hand-off to decode replicas; the wait, spread over the output, counts against TPOT."""
        sel = amounts > _TINY
        reps, w = reps[sel], amounts[sel] / amounts.sum()
        n = np.outer(rows[:, 1], w)
        out = np.outer(rows[:, 3], w)
        late = np.outer(rows[:, 4], w)
        win = np.outer(rows[:, 5], w)
        per_req_out = np.maximum(rows[:, 3] / np.maximum(rows[:, 1], _TINY), 1.0)
        stall = np.maximum(t0 - rows[:, 0], 0.0) / per_req_out
        ok = (stall[:, None] + self._tpot_avg[reps][None, :]) <= self.slo.tpot_s
        self._n_dec[reps] += n.sum(axis=0)
        self._remaining[reps] += out.sum(axis=0)
        self._out_total[reps] += out.sum(axis=0)
        self._n_dec_ok[reps] += np.where(ok, n - late, 0.0).sum(axis=0)
        self._n_dec_win[reps] += win.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ok_win = np.where(ok & (n > _TINY), win * (n - late) / np.maximum(n, _TINY), 0.0)
        self._n_dec_okwin[reps] += ok_win.sum(axis=0)

    def _requeue(self, rep_mask: NDArray[np.bool_]) -> None:
        """Send the requests on these replicas back to the head of their router queues.

        Those still in prefill keep their arrival time; those decoding restart (their
        KV cache is gone), count as late and are re-timed from now."""
        t_rel = self.now - self.start_ts
        pc = self._pc
        hit = rep_mask[pc["rep"]]
        for m in self.models:
            mrep = np.zeros(self.n_replicas, dtype=bool)
            mrep[[r for r in range(self.n_replicas) if self.replica_model[r] == m]] = True
            heads: list[list[float]] = []
            decoding = rep_mask & mrep
            n_dec = float(self._n_dec[decoding].sum())
            if n_dec > _TINY:
                prompt, output = self.workload.mean_lengths(m, t_rel)
                win = float(self._n_dec_win[decoding].sum())
                heads.append([self.now, n_dec, n_dec * prompt, n_dec * output, n_dec, win])
            sel = hit & mrep[pc["rep"]]
            if sel.any():
                times = pc["t"][sel]
                for t in np.unique(times):
                    s = times == t
                    heads.append(
                        [
                            float(t),
                            float(pc["n"][sel][s].sum()),
                            float(pc["prompt"][sel][s].sum()),
                            float(pc["out"][sel][s].sum()),
                            float(pc["late"][sel][s].sum()),
                            float(pc["win"][sel][s].sum()),
                        ]
                    )
            total = sum(h[1] for h in heads)
            if total <= _TINY:
                continue
            for h in reversed(heads):
                self._queue[m].appendleft(h)
            self._queue_n[m] += total
            self.stats.requests_requeued += total
        for key in pc:
            pc[key] = pc[key][~hit]
        self._n_pre[rep_mask] = 0.0
        self._n_dec[rep_mask] = 0.0
        self._n_dec_ok[rep_mask] = 0.0
        self._remaining[rep_mask] = 0.0
        self._out_total[rep_mask] = 0.0
        self._n_dec_win[rep_mask] = 0.0
        self._n_dec_okwin[rep_mask] = 0.0
        self._admitted_tokens[rep_mask] = self._prefilled_tokens[rep_mask]
        self.replica_batch[rep_mask] = 0.0

    def _compute(self, dt: float) -> None:
        """Physics for the current state, then (for dt > 0) the step's work and accounting."""
        node_working = self.node_alive & ~self.node_standby & (self._wake_until <= self.now)
        node_powered = self.node_alive & ~self.node_standby
        rep_working = node_working[self.replica_node]

        backlog = np.maximum(self._admitted_tokens - self._prefilled_tokens, 0.0)
        need = backlog / (np.maximum(self._prefill_rate, _TINY) * max(dt, STEP_S))
        share = np.where(rep_working, np.minimum(_PREFILL_SHARE_CAP[self._role], need), 0.0)
        n_dec = np.where(rep_working, self._n_dec, 0.0)
        b_phys, pf = _physics_inputs(n_dec, share)
        self.replica_physics_batch = b_phys
        self.replica_prefill_fraction = pf

        power = np.empty(self.n_gpus)
        clock = np.empty(self.n_gpus)
        capped = np.zeros(self.n_gpus, dtype=bool)
        dec_tps = np.zeros(self.n_replicas)
        pre_tps = np.zeros(self.n_replicas)
        for cls in self._classes:
            g = cls.gpus
            op = physics.group_operating_point(
                cls.kind,
                cls.model,
                batch=b_phys[cls.reps][:, None],
                prefill_fraction=pf[cls.reps][:, None],
                clock_cap_mhz=self.clock_effective_cap[g],
                power_limit_w=self.limit_effective[g],
            )
            power[g] = op.power_w
            clock[g] = op.effective_clock_mhz
            capped[g] = op.power_capped
            dec_tps[cls.reps] = np.asarray(op.decode_tokens_per_s)[:, 0]
            pre_tps[cls.reps] = np.asarray(op.prefill_tokens_per_s)[:, 0]
        gpu_powered = node_powered[self.node_of]
        self.power_true = np.where(gpu_powered, power, 0.0)
        self.clock_mhz = np.where(gpu_powered, clock, 0.0)
        self.power_capped = capped & gpu_powered & (b_phys[self.replica_of] > 0)
        busy = np.clip(b_phys, 0.0, 1.0)
        self.replica_busy = busy
        self.gpu_busy = busy[self.replica_of]
        self.replica_decode_tps = dec_tps
        self.replica_prefill_tps = pre_tps
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot = np.where(dec_tps > 0, n_dec / dec_tps, np.inf)
        self.replica_tpot_s = tpot
        has_share = share > 1e-6
        self._prefill_rate = np.where(
            has_share & (pre_tps > 0), pre_tps / np.maximum(share, _TINY), self._prefill_rate
        )

        # Fans and CPUs follow the heat the GPUs make: load is GPU power over its maximum.
        load = np.bincount(self.node_of, weights=self.power_true, minlength=self.n_nodes)
        load = load / self._node_gpu_max_w
        host = np.empty(self.n_nodes)
        for name, nodes in self._host_groups.items():
            host[nodes] = physics.host_power_w(physics.HOST_KINDS[name], load[nodes])
        host = np.where(self.node_standby, self.scenario.standby_w, host)
        self.host_power = np.where(self.node_alive, host, 0.0)
        self._window[self._window_pos] = self.power_true
        self._window_pos = (self._window_pos + 1) % self._window.shape[0]
        if dt <= 0:
            return

        t0 = self.now - dt
        saturated = need > _PREFILL_SHARE_CAP[self._role]
        self._left_in_step = np.zeros(self.n_replicas)
        self._prefill_step(pre_tps, backlog, saturated, tpot, t0, dt)
        generated = self._decode_step(dec_tps, n_dec, tpot, dt)
        self._finish_drains()
        # The gauge is the mean over the step: requests that left during it count for
        # the part of it they were there (a prefill replica empties within most steps).
        self.replica_batch = self._n_pre + self._n_dec + self._left_in_step

        gpu_w = float(self.power_true.sum())
        host_w = float(self.host_power.sum())
        self.energy_j += self.power_true * dt
        facility_w = gpu_w + host_w
        st = self.stats
        st.energy_j += facility_w * dt
        st.gpu_energy_j += gpu_w * dt
        st.host_energy_j += host_w * dt
        self._second_acc += facility_w * dt
        self._second_tokens += generated
        self._second_t += dt
        if self._second_t >= 1.0 - 1e-9:
            st.second_power_w.append(self._second_acc / self._second_t)
            st.second_tokens.append(self._second_tokens)
            st.second_good_tokens.append(self._second_good)
            self._second_good = 0.0
            start = self.start_ts + len(st.second_budget_w)
            st.second_budget_w.append(self.budget_at(start))
            self._second_acc = 0.0
            self._second_tokens = 0.0
            self._second_t = 0.0
        for observer in self.observers:
            observer(self)

    def _prefill_step(
        self,
        pre_tps: NDArray,
        backlog: NDArray,
        saturated: NDArray,
        tpot: NDArray,
        t0: float,
        dt: float,
    ) -> None:
        """Advance each replica's FIFO prefill; pieces whose mark is passed get first tokens.

        TTFT of a piece: when the replica kept up with its prompts this step and the piece
        was admitted in it, the wait for admission plus its own prompt at the full prefill
        rate plus half a decode step (a new request joins at the next engine step), as
        chunked prefill interleaves it at once; otherwise (a backlog that took more than
        this step's share, or a piece carried over) the time the backlog ahead of it took,
        interpolated within the step. Stepping would otherwise add half a step to every
        TTFT.
        """
        done_before = self._prefilled_tokens.copy()
        processed = np.minimum(backlog, pre_tps * dt)
        self._prefilled_tokens += processed
        self.replica_prompt += processed
        self.stats.prompt_tokens += float(processed.sum())
        pc = self._pc
        if len(pc["rep"]) == 0:
            return
        rep = pc["rep"]
        done = pc["mark"] <= self._prefilled_tokens[rep] + 1e-6
        if not done.any():
            return
        d = {k: v[done] for k, v in pc.items()}
        for key in pc:
            pc[key] = pc[key][~done]
        r = d["rep"]
        frac = np.clip((d["mark"] - done_before[r]) / np.maximum(processed[r], _TINY), 0.0, 1.0)
        own = d["prompt"] / np.maximum(d["n"], _TINY) / np.maximum(self._prefill_rate[r], _TINY)
        quick = (~saturated[r]) & (d["adm"] >= t0 - 1e-9)
        quick_finish = d["adm"] + own + 0.5 * np.minimum(tpot[r], 1.0)
        finish = np.where(quick, quick_finish, np.maximum(t0 + frac * dt, d["adm"] + own))
        ttft = finish - d["t"]
        ok = ttft <= self.slo.ttft_s
        nr = self.n_replicas
        n_by_rep = np.bincount(r, weights=d["n"], minlength=nr)
        self._n_pre = np.maximum(self._n_pre - n_by_rep, 0.0)
        idx = np.searchsorted(TTFT_BOUNDS_S, ttft, side="left")
        np.add.at(self.replica_ttft_hist, (r, idx), d["n"])
        self.replica_ttft_sum += np.bincount(r, weights=d["n"] * ttft, minlength=nr)
        if self.now >= self.measure_from:
            fine = np.searchsorted(LATENCY_BOUNDS_S, ttft, side="left")
            np.add.at(self.stats.ttft_hist, fine, d["n"])
            np.add.at(self._minute_hist("ttft"), fine, d["n"])
        st = self.stats
        st.first_tokens += float(d["n"].sum())
        st.ttft_sum_s += float((d["n"] * ttft).sum())
        st.ttft_within_slo += float(d["n"][ok].sum())
        late = np.where(ok, d["late"], d["n"])
        mixed = self._role[r] == 0
        if mixed.any():
            self._n_dec += np.bincount(r[mixed], weights=d["n"][mixed], minlength=nr)
            out_mixed = np.bincount(r[mixed], weights=d["out"][mixed], minlength=nr)
            self._remaining += out_mixed
            self._out_total += out_mixed
            self._n_dec_ok += np.bincount(r[mixed], weights=(d["n"] - late)[mixed], minlength=nr)
            self._n_dec_win += np.bincount(r[mixed], weights=d["win"][mixed], minlength=nr)
            with np.errstate(divide="ignore", invalid="ignore"):
                ok_win = np.where(
                    d["n"] > _TINY, d["win"] * (d["n"] - late) / np.maximum(d["n"], _TINY), 0.0
                )
            self._n_dec_okwin += np.bincount(r[mixed], weights=ok_win[mixed], minlength=nr)
        pre = ~mixed
        if pre.any():
            stay = np.clip(finish - np.maximum(d["adm"], t0), 0.0, dt) / dt
            self._left_in_step += np.bincount(r[pre], weights=(d["n"] * stay)[pre], minlength=nr)
            for i in np.flatnonzero(pre):
                m = self.replica_model[int(r[i])]
                self._handoff[m].append(
                    [
                        float(finish[i]),
                        float(d["n"][i]),
                        float(d["prompt"][i]),
                        float(d["out"][i]),
                        float(late[i]),
                        float(d["win"][i]),
                    ]
                )
                self._handoff_n[m] += float(d["n"][i])

    def _decode_step(self, dec_tps: NDArray, n_dec: NDArray, tpot: NDArray, dt: float) -> float:
        gen = np.minimum(dec_tps * dt, self._remaining)
        with np.errstate(divide="ignore", invalid="ignore"):
            finished = np.where(self._remaining > _TINY, gen * n_dec / self._remaining, 0.0)
        finished = np.where(self._remaining - gen <= 1e-6, self._n_dec, finished)
        finished = np.minimum(finished, self._n_dec)
        # TPOT averaged over about one decode lifetime of the replica's requests.
        decoding = n_dec > _TINY
        mean_left = np.where(decoding, self._remaining / np.maximum(n_dec, _TINY), 0.0)
        tau = np.clip(mean_left * np.minimum(self._tpot_avg, 10.0), *TPOT_AVERAGE_S)
        tpot_now = np.minimum(tpot, 1e3)
        keep = np.exp(-dt / tau)
        # Averaged as a rate (tokens per second per sequence), then inverted: a request's
        # mean time per output token is its decode time over its tokens, so a step that
        # prefills and makes no token counts as time without tokens. Averaging the step
        # times themselves would weigh prefill-heavy steps by their huge per-token time
        # (Jensen) and put a replica whose prefill comes in bursts far over its true TPOT.
        with np.errstate(divide="ignore"):
            rate_now = np.where(tpot > 0, 1.0 / np.maximum(tpot, 1e-9), 0.0)
        rate_avg = 1.0 / np.maximum(self._tpot_avg, 1e-9)
        rate_avg = np.where(decoding, rate_now + (rate_avg - rate_now) * keep, rate_avg)
        self._tpot_avg = np.minimum(1.0 / np.maximum(rate_avg, 1e-3), 1e3)
        tpot_ok = self._tpot_avg <= self.slo.tpot_s
        with np.errstate(divide="ignore", invalid="ignore"):
            ok_share = np.where(self._n_dec > _TINY, self._n_dec_ok / self._n_dec, 0.0)
        ok_done = finished * np.clip(ok_share, 0.0, 1.0)
        # A finishing request's whole output: the decoding requests' mean (memoryless
        # completions take requests of every length alike).
        with np.errstate(divide="ignore", invalid="ignore"):
            out_each = np.where(self._n_dec > _TINY, self._out_total / self._n_dec, 0.0)
        self._out_total = np.maximum(self._out_total - finished * out_each, 0.0)
        good = float((ok_done * out_each)[tpot_ok].sum())
        self._n_dec_ok = np.maximum(self._n_dec_ok - ok_done, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            win_share = np.where(self._n_dec > _TINY, self._n_dec_win / self._n_dec, 0.0)
            okwin_share = np.where(self._n_dec > _TINY, self._n_dec_okwin / self._n_dec, 0.0)
        win_done = finished * np.clip(win_share, 0.0, 1.0)
        okwin_done = finished * np.clip(okwin_share, 0.0, 1.0)
        self._n_dec_win = np.maximum(self._n_dec_win - win_done, 0.0)
        self._n_dec_okwin = np.maximum(self._n_dec_okwin - okwin_done, 0.0)
        st = self.stats
        st.window_finished += float(win_done.sum())
        st.window_tokens += float((win_done * out_each).sum())
        st.window_within_slo += float(okwin_done[tpot_ok].sum())
        st.window_good_tokens += float((okwin_done * out_each)[tpot_ok].sum())
        self._n_dec = np.maximum(self._n_dec - finished, 0.0)
        self._remaining = np.maximum(self._remaining - gen, 0.0)
        self.replica_generated += gen
        self.replica_requests += finished
        self._left_in_step += 0.5 * finished
        idx = np.searchsorted(TPOT_BOUNDS_S, tpot_now, side="left")
        self.replica_tpot_hist[np.arange(self.n_replicas), idx] += gen
        self.replica_tpot_sum += np.where(gen > 0, gen * tpot_now, 0.0)
        total = float(gen.sum())
        st = self.stats
        st.generated_tokens += total
        st.requests_finished += float(finished.sum())
        st.requests_within_slo += float(ok_done[tpot_ok].sum())
        self._second_good += good
        if self.now >= self.measure_from and finished.sum() > _TINY:
            # Per cohort: the requests finishing on a replica in this step share its
            # TPOT, averaged over about one decode lifetime.
            fine = np.searchsorted(LATENCY_BOUNDS_S, np.minimum(self._tpot_avg, 1e4), side="left")
            np.add.at(self.stats.tpot_hist, fine, finished)
            np.add.at(self._minute_hist("tpot"), fine, finished)
        return total

    def arrived_tokens_per_s(self, model: str, t0_rel: float, t1_rel: float) -> tuple[float, float]:
        """Mean output and prompt tokens/s that arrived for ``model`` in ``[t0, t1)``
        seconds into the run (the seed's actual traffic, for the comparison's bound)."""
        rows = self._arrived_by_second.get(model, [])
        lo, hi = max(int(t0_rel), 0), min(max(int(t1_rel), 0), len(rows))
        span = rows[lo:hi]
        seconds = max(hi - lo, 1)  # the run's own seconds only: none after its end
        return sum(r[0] for r in span) / seconds, sum(r[1] for r in span) / seconds

    def window_totals(self) -> dict[str, float]:
        """The window's requests as the run leaves them, counting those still decoding as
        finishing at their replica's current time per token.

        Without that, a policy that holds more requests in flight (a larger batch at a
        lower clock, as Little's law gives) would be charged for tokens it has only
        deferred. The run goes on a few TTFT SLOs past the window (``measure_window``), so
        most requests of the window have been shed or have reached decode by then; the
        comparison counts the rest (``arrived`` less the others) as missing their SLO."""
        st = self.stats
        with np.errstate(divide="ignore", invalid="ignore"):
            out_each = np.where(self._n_dec > _TINY, self._out_total / self._n_dec, 0.0)
        tpot_ok = self._tpot_avg <= self.slo.tpot_s
        return {
            "arrived": st.window_arrived,
            "finished": st.window_finished + float(self._n_dec_win.sum()),
            "within_slo": st.window_within_slo + float(self._n_dec_okwin[tpot_ok].sum()),
            "shed": st.window_shed,
            "tokens": st.window_tokens + float((self._n_dec_win * out_each).sum()),
            "good_tokens": st.window_good_tokens
            + float((self._n_dec_okwin * out_each)[tpot_ok].sum()),
        }

    def _minute_hist(self, which: str) -> NDArray[np.float64]:
        """This simulated minute's histogram of ``which`` (``ttft`` or ``tpot``)."""
        hists = self.stats.minute_ttft_hist if which == "ttft" else self.stats.minute_tpot_hist
        minute = int((self.now - self.start_ts - 1e-9) // 60)
        while len(hists) <= minute:
            hists.append(np.zeros(len(LATENCY_BOUNDS_S) + 1))
        return hists[minute]

    def _finish_drains(self) -> None:
        """A draining node that has (almost) emptied powers down to standby."""
        draining = self.node_alive & self.drained & ~self.node_standby
        if not draining.any():
            return
        load = np.bincount(
            self.replica_node, weights=self._n_pre + self._n_dec, minlength=self.n_nodes
        )
        for node in np.flatnonzero(draining & (load < DRAIN_DONE_REQUESTS)):
            self.drain_now(node)


def _physics_inputs(n_dec: NDArray, share: NDArray) -> tuple[NDArray, NDArray]:
    """Physics ``batch`` and ``prefill_fraction`` for ``n_dec`` decoding requests and a
    prefill share ``share`` of wall time.

    The physics takes a mean batch (below one: busy part of the time) and the share of
    busy time in prefill. With fewer than one request decoding, the replica is busy for
    the prefill share plus the decode part of the rest: ``busy = s + (1 - s)·n``, passed as
    the batch so that decode gets ``(1 - s)·n`` of a batch-1 step's rate and prefill ``s``.
    """
    busy = share + (1.0 - share) * np.minimum(n_dec, 1.0)
    b_phys = np.where(n_dec >= 1.0, n_dec, busy)
    with np.errstate(divide="ignore", invalid="ignore"):
        pf = np.where(n_dec >= 1.0, share, np.where(busy > 0, share / busy, 0.0))
    return b_phys, np.clip(pf, 0.0, 1.0)


__all__ = [
    "STEP_S",
    "FacilitySpec",
    "FacilityStats",
    "SimFacility",
    "water_fill",
]
