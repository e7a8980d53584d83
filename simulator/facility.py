"""A simulated facility: nodes of GPUs serving LLM traffic, stepped on any clock.

It holds the true state (power, energy, limits, tokens) as numpy arrays so hundreds of
GPUs step together; the simulated GPU backend and the simulated inference servers are
thin views onto it, so the agent reads it through the same interfaces as real hardware.
The per-second true facility power it records is the ground truth that a run's
``max_power_w`` and ``over_budget_s`` are computed from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from wattkeeper.simulator import physics

STEP_S = 0.1
"""Physics step: fine enough to resolve NVML's 1-second averaging window."""


@dataclass(frozen=True)
class FacilitySpec:
    """Shape of a simulated facility: ``nodes`` x ``gpus_per_node`` of one kind and model."""

    nodes: int
    gpus_per_node: int
    gpu_kind: str = "h100"
    model: str = "llama-8b"
    host_kind: str = "dgx-h100"
    batch_range: tuple[int, int] = (96, 320)
    """Range of the mean number of sequences in flight per replica (uncapped demand)."""
    prefill_fraction: float = 0.12
    load_swing: float = 0.3
    """Relative amplitude of each replica's slow load oscillation."""
    load_period_s: tuple[float, float] = (120.0, 600.0)
    seed: int = 0

    @classmethod
    def parse(cls, text: str, **kw: object) -> FacilitySpec:
        """'4x8' means 4 nodes of 8 GPUs."""
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise ValueError(f"invalid --simulate {text!r}: expected NODESxGPUS, for example 4x8")
        return cls(nodes=int(m.group(1)), gpus_per_node=int(m.group(2)), **kw)  # type: ignore[arg-type]


@dataclass
class FacilityStats:
    """Ground truth accumulated as the facility steps."""

    energy_j: float = 0.0
    gpu_energy_j: float = 0.0
    generated_tokens: float = 0.0
    prompt_tokens: float = 0.0
    second_power_w: list[float] = field(default_factory=list)
    """Facility power averaged over each whole simulated second since the start."""


class SimFacility:
    def __init__(self, spec: FacilitySpec, start_ts: float) -> None:
        self.spec = spec
        self.kind = physics.GPU_KINDS[spec.gpu_kind]
        self.model = physics.MODELS[spec.model]
        self.host = physics.HOST_KINDS[spec.host_kind]
        tp = self.model.tensor_parallel
        if spec.gpus_per_node % tp:
            raise ValueError(
                f"{spec.model} needs {tp} GPUs per replica; {spec.gpus_per_node} per node "
                "is not a multiple of it"
            )
        n = spec.nodes * spec.gpus_per_node
        self.n_gpus = n
        self.start_ts = start_ts
        self.now = start_ts
        rng = np.random.default_rng(spec.seed)
        self.node_of = np.repeat(np.arange(spec.nodes), spec.gpus_per_node)
        self.replica_of = np.arange(n) // tp
        n_rep = n // tp
        self.n_replicas = n_rep
        self.replica_node = np.arange(n_rep) * tp // spec.gpus_per_node
        lo, hi = spec.batch_range
        self._base_batch = rng.uniform(lo, hi, n_rep)
        self._period = rng.uniform(*spec.load_period_s, n_rep)
        self._phase = rng.uniform(0, 2 * math.pi, n_rep)
        self.uuids = [
            f"GPU-5151{spec.seed:04x}-{i // spec.gpus_per_node:04x}-{i % spec.gpus_per_node:04x}-"
            f"{rng.integers(0, 2**48):012x}"
            for i in range(n)
        ]
        k = self.kind
        self.limit_requested = np.full(n, k.power_default_w)
        self.limit_effective = np.full(n, k.power_default_w)
        self.clock_lock = np.full(n, np.nan)  # max of the locked range, MHz
        self.clock_lock_min = np.full(n, np.nan)
        self.clock_effective_cap = np.full(n, float(k.max_sm_clock_mhz))
        self.energy_j = rng.uniform(1e6, 5e7, n)  # counters start at an arbitrary value
        self.power_true = np.full(n, k.idle_w)
        self._window = np.full((round(1.0 / STEP_S), n), k.idle_w)
        self._window_pos = 0
        self.clock_mhz = np.full(n, float(k.max_sm_clock_mhz))
        self.power_capped = np.zeros(n, dtype=bool)
        self.batch = np.zeros(n_rep)
        self.replica_decode_tps = np.zeros(n_rep)
        self.replica_prefill_tps = np.zeros(n_rep)
        self.replica_generated = np.zeros(n_rep)
        self.replica_prompt = np.zeros(n_rep)
        self.replica_requests = np.zeros(n_rep)
        self.host_power = np.full(spec.nodes, physics.host_power_w(self.host, 0.0))
        self.node_alive = np.ones(spec.nodes, dtype=bool)
        self.stats = FacilityStats()
        self._second_acc = 0.0
        self._second_t = 0.0
        self.observers: list[Callable[[SimFacility], None]] = []
        self._compute(0.0)

    # -- the workload ----------------------------------------------------------------
    def demand_batch(self, t: float) -> np.ndarray:
        """Sequences in flight per replica at time ``t`` (uncapped demand)."""
        x = (t - self.start_ts) / self._period * 2 * math.pi + self._phase
        return np.maximum(0.0, self._base_batch * (1 + self.spec.load_swing * np.sin(x)))

    # -- stepping --------------------------------------------------------------------
    def advance_to(self, t: float) -> None:
        """Step the physics up to ``t`` (no-op when ``t`` is not ahead of the facility)."""
        while self.now + STEP_S <= t + 1e-9:
            self._step(STEP_S)

    def _step(self, dt: float) -> None:
        k = self.kind
        self.limit_effective = physics.approach(
            self.limit_effective, self.limit_requested, dt, k.limit_time_constant_s
        )
        target_cap = np.where(np.isnan(self.clock_lock), float(k.max_sm_clock_mhz), self.clock_lock)
        self.clock_effective_cap = physics.approach(
            self.clock_effective_cap, target_cap, dt, k.clock_time_constant_s
        )
        self.now += dt
        self._compute(dt)

    def _compute(self, dt: float) -> None:
        rep_batch = self.demand_batch(self.now)
        rep_batch[~self.node_alive[self.replica_node]] = 0.0
        self.batch = rep_batch
        gpu_batch = rep_batch[self.replica_of]
        pf = np.where(gpu_batch > 0, self.spec.prefill_fraction, 0.0)
        first = physics.operating_point(
            self.kind,
            self.model,
            batch=gpu_batch,
            prefill_fraction=pf,
            clock_cap_mhz=self.clock_effective_cap,
            power_limit_w=self.limit_effective,
        )
        clock = np.asarray(first.effective_clock_mhz, dtype=float)
        if self.model.tensor_parallel > 1:
            # A tensor-parallel group runs in lockstep: the slowest GPU sets the pace.
            group_min = np.full(self.n_replicas, np.inf)
            np.minimum.at(group_min, self.replica_of, clock)
            op = physics.operating_point(
                self.kind,
                self.model,
                batch=gpu_batch,
                prefill_fraction=pf,
                clock_cap_mhz=group_min[self.replica_of],
                power_limit_w=self.limit_effective,
            )
            op_capped = np.asarray(first.power_capped, dtype=bool)
        else:
            op = first
            op_capped = np.asarray(op.power_capped, dtype=bool)
        dead = ~self.node_alive[self.node_of]
        power = np.where(dead, 0.0, np.asarray(op.power_w, dtype=float))
        self.power_true = power
        self.clock_mhz = np.asarray(op.effective_clock_mhz, dtype=float)
        self.power_capped = op_capped & (gpu_batch > 0)
        tp = self.model.tensor_parallel
        self.replica_decode_tps = np.asarray(op.decode_tokens_per_s, dtype=float)[::tp]
        self.replica_prefill_tps = np.asarray(op.prefill_tokens_per_s, dtype=float)[::tp]
        # Fans and CPUs follow the heat the GPUs make: load is GPU power over its maximum.
        load = np.bincount(self.node_of, weights=power, minlength=self.spec.nodes) / (
            self.spec.gpus_per_node * self.kind.power_max_w
        )
        self.host_power = np.where(self.node_alive, physics.host_power_w(self.host, load), 0.0)
        self._window[self._window_pos] = power
        self._window_pos = (self._window_pos + 1) % self._window.shape[0]
        if dt <= 0:
            return
        self.energy_j += power * dt
        gen = self.replica_decode_tps * dt
        self.replica_generated += gen
        self.replica_prompt += self.replica_prefill_tps * dt
        self.replica_requests += gen / 250.0  # mean output length of the chat workload (assumption)
        facility_w = float(power.sum() + self.host_power.sum())
        st = self.stats
        st.energy_j += facility_w * dt
        st.gpu_energy_j += float(power.sum()) * dt
        st.generated_tokens += float(gen.sum())
        st.prompt_tokens += float((self.replica_prefill_tps * dt).sum())
        self._second_acc += facility_w * dt
        self._second_t += dt
        if self._second_t >= 1.0 - 1e-9:
            st.second_power_w.append(self._second_acc / self._second_t)
            self._second_acc = 0.0
            self._second_t = 0.0
        for observer in self.observers:
            observer(self)

    # -- what the views read ----------------------------------------------------------
    def power_avg_1s(self) -> np.ndarray:
        """What NVML reports as power usage: the mean over the last second."""
        return self._window.mean(axis=0)

    def facility_power_w(self) -> float:
        return float(self.power_true.sum() + self.host_power.sum())

    def node_gpu_indices(self, node: int) -> range:
        g = self.spec.gpus_per_node
        return range(node * g, (node + 1) * g)
