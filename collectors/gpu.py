"""The GPU backend interface that the agent programs against.

Two backends implement it: ``nvml`` (real GPUs through ``nvidia-ml-py``) and
``sim`` (the simulated facility). Nothing above this module knows which one is
in use, so every value crosses this boundary in base units (watts, joules,
MHz, 0-1 ratios) and a reading the device cannot give is ``None``, never a
zero that would look like a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# Clock event (throttle) reason bits, nvml.h (nvmlClocksEventReasons).
THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def decode_throttle_reasons(mask: int) -> tuple[str, ...]:
    """Name every set bit, keeping unknown bits visible as hex rather than dropping them."""
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASONS)
    if unknown:
        names.append(f"unknown_0x{unknown:x}")
    return tuple(names)


class GpuError(Exception):
    """Base of every error a GPU backend raises; callers never see a vendor exception."""


class GpuNotFoundError(GpuError):
    """The UUID names no GPU this backend knows."""


class GpuNotSupportedError(GpuError):
    """The device cannot do this (a reading or a setting); not a failure of the device."""


class GpuPermissionError(GpuError):
    """The process lacks the privilege a setter needs (CAP_SYS_ADMIN or root)."""


class GpuLostError(GpuError):
    """The GPU fell off the bus, or the driver was reloaded under us."""


class GpuValueError(GpuError, ValueError):
    """A requested limit or clock lies outside what the device reports it accepts."""


class BackendUnavailableError(GpuError):
    """The backend cannot start at all (no driver, no library)."""


@dataclass(frozen=True)
class PowerLimitConstraints:
    """What the device accepts for its power limit, in watts."""

    min_w: float
    max_w: float
    default_w: float

    def check(self, watts: float) -> None:
        """Refuse a limit the device would reject, before it reaches the device."""
        if not (self.min_w <= watts <= self.max_w):
            raise GpuValueError(
                f"power limit {watts:.0f} W is outside the device's range "
                f"{self.min_w:.0f}-{self.max_w:.0f} W"
            )


@dataclass(frozen=True)
class GpuInfo:
    """Static facts about one GPU, read once at enumeration."""

    uuid: str
    index: int
    name: str
    pci_bus_id: str
    memory_total_bytes: int
    power_limits: PowerLimitConstraints
    supported_sm_clocks_mhz: tuple[int, ...] = ()
    max_sm_clock_mhz: int | None = None

    def check_clock_range(self, min_mhz: int, max_mhz: int) -> None:
        """Refuse a clock lock outside the supported list, before it reaches the device."""
        if min_mhz > max_mhz:
            raise GpuValueError(f"clock range {min_mhz}-{max_mhz} MHz has min above max")
        if self.supported_sm_clocks_mhz:
            lo, hi = min(self.supported_sm_clocks_mhz), max(self.supported_sm_clocks_mhz)
            if min_mhz < lo or max_mhz > hi:
                raise GpuValueError(
                    f"clock range {min_mhz}-{max_mhz} MHz is outside the device's "
                    f"supported {lo}-{hi} MHz"
                )


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU. ``None`` means the device does not offer that reading."""

    uuid: str
    timestamp: float
    power_w: float | None  # NVML's 1-second average
    power_instant_w: float | None = None
    energy_j: float | None = None  # counter since driver load
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    utilization_gpu_ratio: float | None = None
    utilization_mem_ratio: float | None = None
    temperature_c: float | None = None
    power_limit_w: float | None = None  # enforced (the most conservative of all limits)
    power_limit_requested_w: float | None = None
    locked_sm_clocks_mhz: tuple[int, int] | None = None
    throttle_reasons: tuple[str, ...] = field(default_factory=tuple)
    # True when the energy counter went backwards since the previous sample of this GPU
    # (driver reload or GPU reset): the caller must not difference across this sample.
    energy_counter_reset: bool = False


@dataclass(frozen=True)
class OriginalSettings:
    """What a GPU had before the agent first touched it, so a clean stop can restore it."""

    power_limit_w: float | None
    locked_sm_clocks_mhz: tuple[int, int] | None


@runtime_checkable
class GpuBackend(Protocol):
    """What the agent needs from GPUs: enumerate, read, and apply limits within constraints."""

    name: str

    def gpus(self) -> list[GpuInfo]:
        """Every GPU this backend sees, in index order."""
        ...

    def sample(self, uuid: str) -> GpuSample:
        """Read one GPU now."""
        ...

    def set_power_limit(self, uuid: str, watts: float) -> None:
        """Apply a power limit; raises GpuValueError outside the device's constraints."""
        ...

    def lock_sm_clocks(self, uuid: str, min_mhz: int, max_mhz: int) -> None:
        """Lock the SM clock into a range; raises GpuValueError outside the supported list."""
        ...

    def reset_sm_clocks(self, uuid: str) -> None:
        """Undo a clock lock."""
        ...

    def original_settings(self, uuid: str) -> OriginalSettings | None:
        """What the GPU had before this backend first changed it; None if never changed."""
        ...

    def restore(self, uuid: str) -> None:
        """Put back what the GPU had before this backend first changed it."""
        ...

    def close(self) -> None:
        """Release the library or device handles."""
        ...
