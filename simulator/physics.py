"""The simulator's physics: how GPUs serving LLMs turn watts and clocks into tokens.

This is the one place where the simulator's numbers live. Every constant names its
source (a publication, a dataset, a datasheet or public ``nvidia-smi -q`` dumps);
anything not measured anywhere is marked ASSUMPTION. The policies are proved on this
model, so a constant without a source is a claim nobody can check.

The model (F = effective SM clock / max SM clock, B = running sequences):

- Decode step time: ``TPOT(B, F) = m(F)·(t_w + B·s_kv) + B·s_c/F``. ``t_w`` reads the
  weights, ``s_kv`` the KV cache (both memory-bound), ``s_c`` is per-sequence compute.
  ``m(F) = max(1, F_knee/F)``: below a knee clock the SMs cannot issue loads fast
  enough to keep HBM busy and the memory-bound terms start to stretch too.
- Power: ``P = P_idle + P_mem + D·F^alpha``. In decode ``D = d_base + d_span·u(B)`` where
  ``u(B)`` is the compute share of a step at full clock, so power rises with batch the
  way the ML.ENERGY rows do. In prefill ``D`` is a per-GPU constant (compute-bound).
- A power limit L lowers F until P fits: ``F = ((r·L - P_idle - P_mem)/D)^(1/alpha)``
  (r: the controller's set point, just under the limit), never below the minimum
  clock. If even the minimum clock does not fit (a memory-bound phase at a very low
  limit), the GPU stalls part of the time at idle power: without that the simulated
  GPU would break a limit inside the range NVML allows.
- Prefill throughput is proportional to F.
- A mean batch below one means the replica is idle part of the time (continuous in B).

Throughput is per replica (the tensor-parallel group); power and clocks are per GPU.
All functions take floats or numpy arrays and broadcast: the facility simulator calls
them once per step for every GPU at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatOrArray = float | NDArray[np.float64]
BoolOrArray = bool | NDArray[np.bool_]

# --------------------------------------------------------------------------------------
# Constants and their sources
# --------------------------------------------------------------------------------------

NVML_POWER_AVERAGE_WINDOW_S = 1.0
"""``nvmlDeviceGetPowerUsage`` is a 1-second average on Ampere (except GA100) and newer;
the instantaneous value is field ``NVML_FI_DEV_POWER_INSTANT`` (nvml.h, NVML API v13)."""

POWER_ALPHA = 2.5
"""Exponent of dynamic power in the clock fraction. ASSUMPTION: P_dyn ∝ f·V² with V
roughly linear in f over the DVFS range gives 2-3; 2.5 is the middle."""

LIMIT_SETPOINT_RATIO = 0.9826
"""Where the power controller holds a power-limited GPU, as a fraction of the limit.
Fitted: ML.ENERGY Leaderboard V3 Llama-3.1-8B rows at batch >= 192 average 685-691 W
(mean 687.8 W) under the H100's 700 W default limit. ASSUMPTION that the same ratio holds
at other limits and on the A100."""

DECODE_COMPUTE_SHARE = 0.36
"""Share of the decode per-sequence slope that is compute (``s_c``) rather than KV-cache
reads (``s_kv``), at full clock. ASSUMPTION (0.032 of 0.089 ms for Llama-3.1-8B); the
ML.ENERGY fit barely depends on it (8B worst row 4.0% at 0.30, 3.7% at 0.50). It sets
how much decode slows with the clock: at 0.36, 8B at batch 16 loses ~4% at 60% clock."""

LIMIT_TIME_CONSTANT_S = 1.0 / 3.0
"""First-order time constant of a new power limit. ASSUMPTION: a limit takes effect
"within about a second" (what NVML's 1 s averaged readings show), so three time
constants (95%) fit in one second."""

CLOCK_TIME_CONSTANT_S = 0.01
"""First-order time constant of a locked clock. ASSUMPTION: "tens of milliseconds", so
95% within 30 ms."""

# Splitwise (Patel et al., ISCA 2024), simulator data in Mutinifni/splitwise-sim:
# configs/power_model/constant.yaml and data/perf_model.csv.
SPLITWISE_H100_PREFILL_70B_TP2_TOKENS_PER_S = 8192 / 1.339
"""Llama2-70B TP2 on H100: prefill of 8,192 tokens in 1,339 ms (data/perf_model.csv)."""
SPLITWISE_A100_OVER_H100_PREFILL = 1.339 / 2.990
"""Same prefill on A100: 2,990 ms, so the A100 prefills at 0.448x the H100's rate."""
SPLITWISE_A100_OVER_H100_DECODE_TIME = (54.9 / 37.0 + 65.5 / 42.0 + 72.1 / 52.3) / 3
"""Llama2-70B TP2 time between tokens at batch 1/16/32: H100 37.0/42.0/52.3 ms, A100
54.9/65.5/72.1 ms; the mean ratio (1.47) stretches every decode time term on the A100."""
SPLITWISE_DECODE_POWER_H100_W = 380.0
SPLITWISE_DECODE_POWER_A100_W = 250.0
"""Per-GPU decode power in Splitwise's constant power model (configs/power_model/
constant.yaml); their ratio of dynamic parts scales the decode power on the A100."""

PREFILL_TP_EFFICIENCY = 0.9
"""Prefill tokens/s of a TP group relative to tp x one GPU's rate. ASSUMPTION (all-reduce
overhead); the Splitwise TP2 figure it is scaled from already includes TP2's overhead."""

# --------------------------------------------------------------------------------------
# GPUs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuKind:
    """One GPU product as NVML reports it, plus the power model constants of its kind."""

    name: str
    product_name: str
    power_min_w: float
    power_default_w: float
    power_max_w: float
    idle_w: float
    max_sm_clock_mhz: int
    min_sm_clock_mhz: int
    clock_step_mhz: int
    mem_clock_mhz: int
    memory_bytes: int
    mem_bandwidth_gbs: float
    alpha: float
    limit_time_constant_s: float
    clock_time_constant_s: float
    decode_memory_w: float
    """P_mem in decode: HBM and memory-system power while streaming weights and KV."""
    prefill_memory_w: float
    """P_mem in prefill (compute-bound, less memory traffic per second)."""
    prefill_dynamic_w: float
    """D in prefill: sized so that prefill at full clock draws the GPU's TDP."""
    memory_knee_mhz: int
    """Below this SM clock the memory-bound decode terms start to stretch."""
    limit_setpoint_ratio: float = LIMIT_SETPOINT_RATIO

    def supported_sm_clocks_mhz(self) -> tuple[int, ...]:
        """Clocks a lock may name, in NVML's order (descending)."""
        return tuple(range(self.max_sm_clock_mhz, self.min_sm_clock_mhz - 1, -self.clock_step_mhz))

    @property
    def min_clock_fraction(self) -> float:
        return self.min_sm_clock_mhz / self.max_sm_clock_mhz


H100_SXM = GpuKind(
    name="h100",
    product_name="NVIDIA H100 80GB HBM3",  # public nvidia-smi -q dumps (driver 565)
    power_min_w=200.0,  # nvidia-smi -q dumps: Min/Default/Max Power Limit 200/700/700 W
    power_default_w=700.0,
    power_max_w=700.0,
    idle_w=75.0,  # Splitwise constant.yaml H100 idle 75 W; dumps show 71-101 W in P0
    max_sm_clock_mhz=1980,  # nvidia-smi -q dumps: Max Clocks SM 1980 MHz
    # nvidia-smi -q dumps show 345 MHz at idle. ASSUMPTION: that is the lowest supported
    # clock and the list steps by 15 MHz (as NVML lists them on H100 PCIe and A100).
    min_sm_clock_mhz=345,
    clock_step_mhz=15,
    mem_clock_mhz=2619,  # nvidia-smi -q dumps: Max Clocks Memory 2619 MHz
    memory_bytes=81559 * 2**20,  # nvidia-smi -q dumps: FB Memory Total 81559 MiB
    mem_bandwidth_gbs=3350.0,  # NVIDIA H100 Tensor Core GPU datasheet (SXM): 3.35 TB/s
    alpha=POWER_ALPHA,
    limit_time_constant_s=LIMIT_TIME_CONSTANT_S,
    clock_time_constant_s=CLOCK_TIME_CONSTANT_S,
    # ASSUMPTION: 150 W in decode, 100 W in prefill, bounded by H200 decode drawing only
    # 137-300 W of 700 W (arXiv 2605.11999).
    decode_memory_w=150.0,
    prefill_memory_w=100.0,
    # 700 - 75 - 100: prefill at full clock reaches the 700 W TDP (Splitwise prefill 700 W).
    prefill_dynamic_w=525.0,
    memory_knee_mhz=1000,  # ASSUMPTION: no public data on where decode becomes clock-bound
)

_A100_MEMORY_SCALE = 2039.0 / 3350.0
"""ASSUMPTION: memory-system power scales with bandwidth (A100 80GB SXM datasheet
2,039 GB/s, H100 SXM 3,350 GB/s) at similar energy per bit."""

A100_SXM = GpuKind(
    name="a100",
    product_name="NVIDIA A100-SXM4-80GB",  # public nvidia-smi -q dumps
    power_min_w=100.0,  # nvidia-smi -q dumps: Min/Default/Max Power Limit 100/400/400 W
    power_default_w=400.0,
    power_max_w=400.0,
    idle_w=63.0,  # Splitwise constant.yaml A100 idle 63 W; dumps show 52-68 W
    max_sm_clock_mhz=1410,  # nvidia-smi -q dumps: Max Clocks SM 1410 MHz
    min_sm_clock_mhz=210,  # ASSUMPTION: lowest supported clock, 15 MHz steps from 1410
    clock_step_mhz=15,  # public SUPPORTED_CLOCKS dumps list 1410, 1395, 1380, ... MHz
    mem_clock_mhz=1593,  # nvidia-smi -q dumps (80GB SXM4)
    memory_bytes=81920 * 2**20,  # nvidia-smi -q dumps: FB Memory Total 81920 MiB
    mem_bandwidth_gbs=2039.0,  # NVIDIA A100 Tensor Core GPU datasheet (80GB SXM)
    alpha=POWER_ALPHA,
    limit_time_constant_s=LIMIT_TIME_CONSTANT_S,
    clock_time_constant_s=CLOCK_TIME_CONSTANT_S,
    decode_memory_w=float(round(150.0 * _A100_MEMORY_SCALE)),  # 91 W, ASSUMPTION (see scale)
    prefill_memory_w=float(round(100.0 * _A100_MEMORY_SCALE)),  # 61 W, ASSUMPTION
    # 400 - 63 - 61: prefill at full clock reaches the 400 W TDP (Splitwise prefill 400 W).
    prefill_dynamic_w=276.0,
    # ASSUMPTION: the knee sits at the same fraction of max clock as on the H100.
    memory_knee_mhz=round(1410 * 1000 / 1980),
)

GPU_KINDS: Mapping[str, GpuKind] = MappingProxyType({"h100": H100_SXM, "a100": A100_SXM})

# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelOnGpu:
    """One model's serving constants on one GPU kind (times at full clock)."""

    decode_step_s: float
    """t_w: weight reads per decode step, batch-independent."""
    decode_per_seq_s: float
    """s_kv + s_c: added step time per running sequence."""
    decode_dynamic_base_w: float
    """d_base: dynamic decode power (W per GPU at full clock) with no compute share."""
    decode_dynamic_span_w: float
    """d_span: dynamic decode power per unit of compute share u(B)."""
    prefill_tokens_per_s: float
    """Prompt tokens/s of the whole replica at full clock."""

    @property
    def decode_compute_per_seq_s(self) -> float:
        return DECODE_COMPUTE_SHARE * self.decode_per_seq_s

    @property
    def decode_kv_per_seq_s(self) -> float:
        return (1.0 - DECODE_COMPUTE_SHARE) * self.decode_per_seq_s


@dataclass(frozen=True)
class ModelProfile:
    """A served model: how many GPUs a replica spans and its constants per GPU kind."""

    name: str
    hf_name: str
    tensor_parallel: int
    per_gpu: Mapping[str, ModelOnGpu] = field(hash=False)

    def supports(self, kind: GpuKind | str) -> bool:
        return (kind.name if isinstance(kind, GpuKind) else kind) in self.per_gpu

    def on(self, kind: GpuKind | str) -> ModelOnGpu:
        """Constants on ``kind``; a ValueError says which kinds are modelled."""
        key = kind.name if isinstance(kind, GpuKind) else kind
        try:
            return self.per_gpu[key]
        except KeyError:
            known = ", ".join(sorted(self.per_gpu))
            raise ValueError(
                f"model {self.name} is not modelled on {key} (only on: {known})"
            ) from None


def _prefill_tokens_per_s_h100(params_b: float, tensor_parallel: int, fp8: bool = False) -> float:
    """Scale Splitwise's Llama2-70B TP2 prefill to another model and TP degree.

    Prefill costs ~2·params FLOPs per token, so per-GPU tokens/s ∝ 1/params; FP8 doubles
    dense tensor throughput (H100 SXM datasheet: 1,979 vs 989 TFLOPS). An estimate.
    """
    per_gpu = SPLITWISE_H100_PREFILL_70B_TP2_TOKENS_PER_S / 2 * 70.0 / params_b
    per_gpu *= 2.0 if fp8 else 1.0
    efficiency = 1.0 if tensor_parallel == 1 else PREFILL_TP_EFFICIENCY
    return per_gpu * tensor_parallel * efficiency


def _a100_from_h100(h100: ModelOnGpu) -> ModelOnGpu:
    """Derive A100 constants from the H100 calibration (no public A100 serving sweep).

    Decode times stretch by Splitwise's A100/H100 TBT ratio (1.47 at every batch they
    measured, so t_w and the slope both scale); prefill by their prefill ratio (0.448);
    dynamic decode power by the ratio of Splitwise's decode power above idle + P_mem.
    """
    t = SPLITWISE_A100_OVER_H100_DECODE_TIME
    dyn = (SPLITWISE_DECODE_POWER_A100_W - A100_SXM.idle_w - A100_SXM.decode_memory_w) / (
        SPLITWISE_DECODE_POWER_H100_W - H100_SXM.idle_w - H100_SXM.decode_memory_w
    )
    return ModelOnGpu(
        decode_step_s=h100.decode_step_s * t,
        decode_per_seq_s=h100.decode_per_seq_s * t,
        decode_dynamic_base_w=h100.decode_dynamic_base_w * dyn,
        decode_dynamic_span_w=h100.decode_dynamic_span_w * dyn,
        prefill_tokens_per_s=h100.prefill_tokens_per_s * SPLITWISE_A100_OVER_H100_PREFILL,
    )


# Decode constants on H100 SXM: fitted (minimax relative error over throughput and
# per-GPU power, with POWER_ALPHA, DECODE_COMPUTE_SHARE, LIMIT_SETPOINT_RATIO and the
# H100 constants above held fixed) to the ML.ENERGY Leaderboard V3 rows (vLLM 0.11.1,
# BF16 / FP8, chat workload, H100 SXM at the 700 W default limit) as plotted in the
# ML.ENERGY blog post "LLM Inference Energy: A Longitudinal Analysis" (2026-02-09).
# Worst row: 4.0% (8B), 4.2% (70B), 3.1% (405B-FP8).
_LLAMA_8B_H100 = ModelOnGpu(
    decode_step_s=6.47e-3,
    decode_per_seq_s=0.0883e-3,
    decode_dynamic_base_w=186.0,
    decode_dynamic_span_w=1264.0,
    prefill_tokens_per_s=_prefill_tokens_per_s_h100(8.0, 1),
)
_LLAMA_70B_H100 = ModelOnGpu(
    decode_step_s=17.02e-3,
    decode_per_seq_s=0.1362e-3,
    decode_dynamic_base_w=191.0,
    decode_dynamic_span_w=685.0,
    prefill_tokens_per_s=_prefill_tokens_per_s_h100(70.0, 4),
)
_LLAMA_405B_FP8_H100 = ModelOnGpu(
    decode_step_s=30.11e-3,
    decode_per_seq_s=0.2936e-3,
    decode_dynamic_base_w=167.0,
    decode_dynamic_span_w=872.0,
    prefill_tokens_per_s=_prefill_tokens_per_s_h100(405.0, 8, fp8=True),
)

MODELS: Mapping[str, ModelProfile] = MappingProxyType(
    {
        "llama-8b": ModelProfile(
            "llama-8b",
            "meta-llama/Llama-3.1-8B-Instruct",
            1,
            MappingProxyType({"h100": _LLAMA_8B_H100, "a100": _a100_from_h100(_LLAMA_8B_H100)}),
        ),
        "llama-70b": ModelProfile(
            "llama-70b",
            "meta-llama/Llama-3.1-70B-Instruct",
            4,
            MappingProxyType({"h100": _LLAMA_70B_H100, "a100": _a100_from_h100(_LLAMA_70B_H100)}),
        ),
        # H100 only: FP8 tensor cores are Hopper's, and there is no A100 measurement.
        "llama-405b-fp8": ModelProfile(
            "llama-405b-fp8",
            "meta-llama/Llama-3.1-405B-Instruct-FP8",
            8,
            MappingProxyType({"h100": _LLAMA_405B_FP8_H100}),
        ),
    }
)

# --------------------------------------------------------------------------------------
# Operating points
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatingPoint:
    """Steady state of one GPU (power, clock) and of its replica (tokens/s, TPOT).

    For a tensor-parallel model, ``power_w`` and ``effective_clock_mhz`` are one GPU's
    and the token rates are the whole group's (do not sum them over the group's GPUs).
    Values are numpy scalars for scalar inputs, arrays of the broadcast shape otherwise.
    """

    decode_tokens_per_s: FloatOrArray
    """Generated tokens/s of the replica."""
    prefill_tokens_per_s: FloatOrArray
    """Prompt tokens/s of the replica."""
    power_w: FloatOrArray
    """True (instantaneous, steady-state) power of this GPU; NVML averages it over 1 s."""
    effective_clock_mhz: FloatOrArray
    """SM clock while working, time-weighted over the phases; the idle clock at batch 0."""
    tpot_s: FloatOrArray
    """Mean time between a sequence's tokens, prefill interruptions included; inf where
    nothing decodes (batch 0 or prefill_fraction 1)."""
    power_capped: BoolOrArray
    """The power limit, not a clock lock or the max clock, sets the clock for at least
    half of the busy time (what a sampled SwPowerCap clock event reason would mostly show)."""
    capped_share: FloatOrArray = 0.0
    """Share of the busy time in which the power limit sets the clock (0 when idle)."""

    @property
    def tokens_per_s(self) -> FloatOrArray:
        """Prompt plus generated tokens/s."""
        return self.decode_tokens_per_s + self.prefill_tokens_per_s


@dataclass(frozen=True)
class _Phase:
    """Clock of one phase: F, the share of time not stalled, and whether the limit binds."""

    fraction: NDArray[np.float64]
    run_share: NDArray[np.float64]
    capped: NDArray[np.bool_]


def _requested_fraction(kind: GpuKind, clock_cap_mhz: ArrayLike | None) -> NDArray[np.float64]:
    if clock_cap_mhz is None:
        return np.asarray(1.0)
    cap = np.asarray(clock_cap_mhz, dtype=float)
    cap = np.where(np.isnan(cap), kind.max_sm_clock_mhz, cap)
    return np.clip(cap / kind.max_sm_clock_mhz, kind.min_clock_fraction, 1.0)


def _limit_w(kind: GpuKind, power_limit_w: ArrayLike | None) -> NDArray[np.float64]:
    if power_limit_w is None:
        return np.asarray(kind.power_default_w)
    limit = np.asarray(power_limit_w, dtype=float)
    limit = np.where(np.isnan(limit), kind.power_default_w, limit)
    return np.clip(limit, kind.power_min_w, kind.power_max_w)


def _decode_dynamic_w(prof: ModelOnGpu, busy_batch: NDArray[np.float64]) -> NDArray[np.float64]:
    """D for decode: dynamic power grows with the compute share of a step at full clock."""
    compute = busy_batch * prof.decode_compute_per_seq_s
    share = compute / (prof.decode_step_s + busy_batch * prof.decode_per_seq_s)
    return prof.decode_dynamic_base_w + prof.decode_dynamic_span_w * share


def _phase_clock(
    kind: GpuKind,
    static_w: float,
    dynamic_w: NDArray[np.float64],
    f_request: NDArray[np.float64],
    limit_w: NDArray[np.float64],
) -> _Phase:
    """Closed-form clock under a power limit (P is monotone in F), then the stall floor."""
    alpha = kind.alpha
    f_min = kind.min_clock_fraction
    target_w = limit_w * kind.limit_setpoint_ratio
    headroom = np.maximum(target_w - kind.idle_w - static_w, 0.0)
    f_power = (headroom / dynamic_w) ** (1.0 / alpha)
    capped = f_power < f_request - 1e-12
    fraction = np.clip(np.minimum(f_request, f_power), f_min, 1.0)
    # Below the minimum clock the only way left to hold the limit is to stop part of
    # the time (at idle power); ASSUMPTION standing in for HW slowdown.
    at_min_w = kind.idle_w + static_w + dynamic_w * f_min**alpha
    over = at_min_w > target_w
    run_share = np.where(
        over,
        np.clip((target_w - kind.idle_w) / np.maximum(at_min_w - kind.idle_w, 1e-9), 0.0, 1.0),
        1.0,
    )
    return _Phase(fraction=fraction, run_share=run_share, capped=capped)


def _decode_tpot_s(
    kind: GpuKind, prof: ModelOnGpu, busy_batch: NDArray[np.float64], f: NDArray[np.float64]
) -> NDArray[np.float64]:
    stretch = np.maximum(1.0, kind.memory_knee_mhz / (f * kind.max_sm_clock_mhz))
    memory = stretch * (prof.decode_step_s + busy_batch * prof.decode_kv_per_seq_s)
    return memory + busy_batch * prof.decode_compute_per_seq_s / f


def _scalar_or_array(x: NDArray) -> FloatOrArray:
    return x[()] if x.ndim == 0 else x


def _phases(
    kind: GpuKind,
    prof: ModelOnGpu,
    batch: NDArray[np.float64],
    f_request: NDArray[np.float64],
    limit_w: NDArray[np.float64],
) -> tuple[_Phase, _Phase, NDArray[np.float64]]:
    busy_batch = np.maximum(batch, 1.0)
    d_dec = _decode_dynamic_w(prof, busy_batch)
    decode = _phase_clock(kind, kind.decode_memory_w, d_dec, f_request, limit_w)
    d_pre = np.broadcast_to(np.asarray(kind.prefill_dynamic_w, dtype=float), np.shape(batch))
    prefill = _phase_clock(kind, kind.prefill_memory_w, d_pre, f_request, limit_w)
    return decode, prefill, d_dec


def _assemble(
    kind: GpuKind,
    prof: ModelOnGpu,
    batch: NDArray[np.float64],
    prefill_fraction: NDArray[np.float64],
    decode: _Phase,
    prefill: _Phase,
    d_dec: NDArray[np.float64],
) -> OperatingPoint:
    busy = np.clip(batch, 0.0, 1.0)  # a mean batch below one: idle part of the time
    busy_batch = np.maximum(batch, 1.0)
    pf = np.clip(prefill_fraction, 0.0, 1.0)
    alpha = kind.alpha

    fd, fp = decode.fraction, prefill.fraction
    tpot_step = _decode_tpot_s(kind, prof, busy_batch, fd)
    decode_rate = busy_batch / tpot_step * decode.run_share  # tokens/s while decoding
    prefill_rate = prof.prefill_tokens_per_s * fp * prefill.run_share

    p_dec = kind.idle_w + decode.run_share * (kind.decode_memory_w + d_dec * fd**alpha)
    p_pre = kind.idle_w + prefill.run_share * (
        kind.prefill_memory_w + kind.prefill_dynamic_w * fp**alpha
    )
    p_busy = (1.0 - pf) * p_dec + pf * p_pre
    power = kind.idle_w + busy * (p_busy - kind.idle_w)

    decode_tps = busy * (1.0 - pf) * decode_rate
    prefill_tps = busy * pf * prefill_rate
    working = batch > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(working & (decode_tps > 0), batch / decode_tps, np.inf)
    clock = np.where(
        working, ((1.0 - pf) * fd + pf * fp) * kind.max_sm_clock_mhz, kind.min_sm_clock_mhz
    )
    capped_share = np.where(working, (1.0 - pf) * decode.capped + pf * prefill.capped, 0.0)
    return OperatingPoint(
        decode_tokens_per_s=_scalar_or_array(np.asarray(decode_tps, dtype=float)),
        prefill_tokens_per_s=_scalar_or_array(np.asarray(prefill_tps, dtype=float)),
        power_w=_scalar_or_array(np.asarray(power, dtype=float)),
        effective_clock_mhz=_scalar_or_array(np.asarray(clock, dtype=float)),
        tpot_s=_scalar_or_array(np.asarray(tpot, dtype=float)),
        power_capped=_scalar_or_array(np.asarray(working & (capped_share >= 0.5), dtype=bool)),
        capped_share=_scalar_or_array(np.asarray(capped_share, dtype=float)),
    )


def operating_point(
    kind: GpuKind,
    model: ModelProfile,
    *,
    batch: ArrayLike,
    prefill_fraction: ArrayLike = 0.0,
    clock_cap_mhz: ArrayLike | None = None,
    power_limit_w: ArrayLike | None = None,
) -> OperatingPoint:
    """Steady state of GPUs of one kind serving one model, each on its own.

    ``batch`` is the mean number of running sequences of the replica, ``prefill_fraction``
    the share of its busy time spent in prefill; each phase meets the power limit on its
    own and the result is their time-weighted mix. ``clock_cap_mhz`` (a lock's upper end)
    and ``power_limit_w`` are clipped into the GPU's range; None or NaN means no lock /
    the default limit. A tensor-parallel group runs in lockstep: use
    :func:`group_operating_point`, or call this again with every GPU capped at
    :func:`group_clock_fraction` of the group's clocks.
    """
    prof = model.on(kind)
    b, pf, f_req, lim = np.broadcast_arrays(
        np.maximum(np.asarray(batch, dtype=float), 0.0),
        np.asarray(prefill_fraction, dtype=float),
        _requested_fraction(kind, clock_cap_mhz),
        _limit_w(kind, power_limit_w),
    )
    decode, prefill, d_dec = _phases(kind, prof, b, f_req, lim)
    return _assemble(kind, prof, b, pf, decode, prefill, d_dec)


def group_clock_fraction(fractions: ArrayLike, axis: int = -1) -> FloatOrArray:
    """Clock fraction a tensor-parallel group runs at: its slowest GPU's (lockstep)."""
    return _scalar_or_array(np.asarray(np.min(np.asarray(fractions, dtype=float), axis=axis)))


def group_operating_point(
    kind: GpuKind,
    model: ModelProfile,
    *,
    batch: ArrayLike,
    prefill_fraction: ArrayLike = 0.0,
    clock_cap_mhz: ArrayLike | None = None,
    power_limit_w: ArrayLike | None = None,
) -> OperatingPoint:
    """Like :func:`operating_point` for tensor-parallel groups in lockstep.

    The last axis of the broadcast inputs is the group (length ``tensor_parallel``);
    every GPU of a group runs each phase at the slowest GPU's clock and stall share.
    Token rates and TPOT are the group's, repeated along the last axis; power and clock
    are each GPU's; ``power_capped`` marks the GPUs whose own limit sets the group's pace.
    """
    prof = model.on(kind)
    b, pf, f_req, lim = np.broadcast_arrays(
        np.maximum(np.asarray(batch, dtype=float), 0.0),
        np.asarray(prefill_fraction, dtype=float),
        _requested_fraction(kind, clock_cap_mhz),
        _limit_w(kind, power_limit_w),
    )
    if b.ndim == 0 or b.shape[-1] != model.tensor_parallel:
        raise ValueError(
            f"{model.name} runs on groups of {model.tensor_parallel} GPUs: the inputs' last "
            f"axis must have that length (got shape {b.shape})"
        )
    decode, prefill, d_dec = _phases(kind, prof, b, f_req, lim)

    def lockstep(p: _Phase) -> _Phase:
        f = np.broadcast_to(p.fraction.min(axis=-1, keepdims=True), b.shape)
        run = np.broadcast_to(p.run_share.min(axis=-1, keepdims=True), b.shape)
        sets_pace = p.capped & (p.fraction <= f + 1e-12) & (p.run_share <= run + 1e-12)
        return _Phase(fraction=f, run_share=run, capped=sets_pace)

    return _assemble(kind, prof, b, pf, lockstep(decode), lockstep(prefill), d_dec)


def approach(
    current: ArrayLike, target: ArrayLike, dt_s: ArrayLike, time_constant_s: ArrayLike
) -> FloatOrArray:
    """First-order lag, exact for a step held over ``dt_s`` (any step size is stable)."""
    cur = np.asarray(current, dtype=float)
    tgt = np.asarray(target, dtype=float)
    tau = np.asarray(time_constant_s, dtype=float)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        keep = np.where(tau > 0, np.exp(-np.asarray(dt_s, dtype=float) / tau), 0.0)
    return _scalar_or_array(np.asarray(tgt + (cur - tgt) * keep))


# --------------------------------------------------------------------------------------
# Hosts: the node's power besides its GPUs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostKind:
    """Non-GPU power of one node (CPUs, memory, NVSwitches, NICs, fans, PSU losses)."""

    name: str
    idle_w: float
    max_w: float
    """Nameplate: the datasheet's system maximum less the GPUs' maximum."""
    serving_w: float
    """What the rest of the node draws when its GPUs run flat out on inference."""


HOST_KINDS: Mapping[str, HostKind] = MappingProxyType(
    {
        # NVIDIA DGX H100 datasheet: ~10.2 kW max system power, with 8 H100 SXM at 700 W
        # (5.6 kW), leaving 4.6 kW for the rest at full load. Idle 1.2 kW: ASSUMPTION
        # (2 CPUs, 2 TB DDR5, 4 NVSwitches, 10 NICs and fans at low load).
        # Serving 2.4 kW: ASSUMPTION. The 10.2 kW nameplate sizes the power supplies; in
        # inference the CPUs are lightly loaded (~2 x 200 W), 4 NVSwitches ~100 W each,
        # 10 NICs ~25 W each, fans ~600 W at full GPU heat, DRAM ~200 W, PSU losses ~8%.
        "dgx-h100": HostKind(
            "dgx-h100", idle_w=1200.0, max_w=10200.0 - 8 * 700.0, serving_w=2400.0
        ),
        # NVIDIA DGX A100 datasheet: 6.5 kW max system power, with 8 A100 SXM4 at 400 W
        # (3.2 kW), leaving 3.3 kW. Idle 0.9 kW: ASSUMPTION (same reasoning, smaller parts).
        # Serving 1.8 kW: ASSUMPTION, by the same reasoning with smaller parts.
        "dgx-a100": HostKind("dgx-a100", idle_w=900.0, max_w=6500.0 - 8 * 400.0, serving_w=1800.0),
    }
)


def host_power_w(host: HostKind, load_ratio: ArrayLike) -> FloatOrArray:
    """Non-GPU node power, linear from idle to ``serving_w`` in the node's load (0..1, clipped).

    ASSUMPTION: linear; fans and CPUs follow the GPUs' load, which is what the caller
    should pass (e.g. the node's GPU power over its GPUs' maximum).
    """
    load = np.clip(np.asarray(load_ratio, dtype=float), 0.0, 1.0)
    return _scalar_or_array(np.asarray(host.idle_w + (host.serving_w - host.idle_w) * load))


def clock_fraction(kind: GpuKind, clock_mhz: ArrayLike) -> FloatOrArray:
    """F for a clock in MHz (no clipping)."""
    return _scalar_or_array(np.asarray(clock_mhz, dtype=float) / kind.max_sm_clock_mhz)


__all__ = [
    "CLOCK_TIME_CONSTANT_S",
    "DECODE_COMPUTE_SHARE",
    "GPU_KINDS",
    "HOST_KINDS",
    "LIMIT_SETPOINT_RATIO",
    "LIMIT_TIME_CONSTANT_S",
    "MODELS",
    "NVML_POWER_AVERAGE_WINDOW_S",
    "POWER_ALPHA",
    "GpuKind",
    "HostKind",
    "ModelOnGpu",
    "ModelProfile",
    "OperatingPoint",
    "approach",
    "clock_fraction",
    "group_clock_fraction",
    "group_operating_point",
    "host_power_w",
    "operating_point",
]
