"""The host collector: CPU use, memory, and the node's non-GPU power.

Budgets count whole nodes, and a node at its GPU floor still draws host power;
the drain decision depends on how much. Two sources, and ``power_source`` in
every sample says which one produced the number:

- ``"rapl"``: Intel/AMD RAPL energy counters through the powercap sysfs tree
  (``<powercap_root>/intel-rapl:N/energy_uj``), differenced between samples and
  corrected for wraparound with ``max_energy_range_uj``. Package zones are
  summed, plus DRAM sub-zones where the platform has them; core/uncore
  sub-zones are inside the package and ``psys`` overlaps it, so they are
  skipped. RAPL covers the CPU packages (and DRAM where present) only: not
  fans, NICs, disks, BMC, PSU conversion losses or the GPUs' share of the
  board, so on a GPU server it is a lower bound and a calibrated overhead
  model is often the better estimate. Since 2020 kernels make ``energy_uj``
  readable by root only (CVE-2020-8694), so an unprivileged agent usually
  falls back to the model.
- ``"model"``: ``HostPowerModel``: ``idle_w + per_cpu_util_w * cpu_util``,
  configured per node class (from a wall-power meter or a BMC reading).

Set ``use_rapl=False`` to always use the model. The sysfs root is a parameter
so tests run against a fixture tree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

POWERCAP_ROOT = Path("/sys/class/powercap")

_PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")
_SUB_ZONE = re.compile(r"^intel-rapl:\d+:\d+$")


@dataclass(frozen=True)
class HostPowerModel:
    """Non-GPU node power as a line in CPU utilization: fitted per node class."""

    idle_w: float
    per_cpu_util_w: float

    def __post_init__(self) -> None:
        for name in ("idle_w", "per_cpu_util_w"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"HostPowerModel.{name} must be a finite number >= 0, got {value}")

    def power_w(self, cpu_util_ratio: float) -> float:
        return self.idle_w + self.per_cpu_util_w * min(max(cpu_util_ratio, 0.0), 1.0)


@dataclass(frozen=True)
class HostSample:
    """One reading of the host. ``non_gpu_power_w`` is ``None`` only on the first RAPL sample
    (a rate needs two readings) or when the counters could not be differenced."""

    timestamp: float
    cpu_util_ratio: float
    memory_used_bytes: int
    memory_total_bytes: int
    non_gpu_power_w: float | None
    power_source: str


@dataclass(frozen=True)
class RaplZone:
    """A powercap zone whose energy counts towards non-GPU power."""

    path: Path
    name: str
    max_energy_range_uj: int | None


def _read_text(path: Path) -> str:
    return path.read_text().strip()


def discover_rapl_zones(powercap_root: Path) -> tuple[RaplZone, ...]:
    """Package zones (not psys) plus DRAM sub-zones, each readable now; empty if none."""
    try:
        entries = sorted(powercap_root.iterdir())
    except OSError:
        return ()
    zones: list[RaplZone] = []
    for entry in entries:
        is_package = bool(_PACKAGE_ZONE.match(entry.name))
        if not is_package and not _SUB_ZONE.match(entry.name):
            continue
        try:
            name = _read_text(entry / "name")
        except OSError:
            name = "package" if is_package else ""
        if is_package and name == "psys":
            continue  # platform domain: overlaps the packages
        if not is_package and name != "dram":
            continue  # core/uncore are inside the package already
        try:
            int(_read_text(entry / "energy_uj"))
        except (OSError, ValueError):
            continue
        try:
            max_range: int | None = int(_read_text(entry / "max_energy_range_uj"))
        except (OSError, ValueError):
            max_range = None
        zones.append(RaplZone(path=entry, name=name, max_energy_range_uj=max_range))
    return tuple(zones)


def energy_delta_uj(previous: int, current: int, max_energy_range_uj: int | None) -> int | None:
    """Energy between two counter readings; the counter wraps at ``max_energy_range_uj``.

    ``None`` when the counter went down and the wrap range is unknown: a wrap
    cannot be told apart from a reset then, and a guess would be a wrong watt value.
    """
    if current >= previous:
        return current - previous
    if not max_energy_range_uj:
        return None
    return current + max_energy_range_uj - previous


def _cpu_total_and_busy(times: Any) -> tuple[float, float]:
    """Like psutil's own cpu_percent: guest time is already inside user/nice on Linux."""
    fields = times._asdict()
    total = math.fsum(fields.values()) - fields.get("guest", 0.0) - fields.get("guest_nice", 0.0)
    idle = fields.get("idle", 0.0) + fields.get("iowait", 0.0)
    return total, total - idle


class HostCollector:
    """Samples the host on the agent's tick; keeps the previous counters for differences.

    CPU utilization is measured between consecutive samples from ``cpu_times``
    (the first sample measures since construction), rather than with
    ``psutil.cpu_percent``, whose hidden module-wide state other callers share.
    """

    def __init__(
        self,
        model: HostPowerModel,
        powercap_root: Path = POWERCAP_ROOT,
        use_rapl: bool = True,
    ) -> None:
        self.model = model
        self.powercap_root = powercap_root
        self.use_rapl = use_rapl
        self._zones: tuple[RaplZone, ...] = discover_rapl_zones(powercap_root) if use_rapl else ()
        self._last_energy: tuple[float, dict[Path, int]] | None = None
        self._last_cpu = _cpu_total_and_busy(psutil.cpu_times())

    @property
    def rapl_zones(self) -> tuple[RaplZone, ...]:
        return self._zones

    @property
    def power_source(self) -> str:
        """The source the next sample will use: "rapl" when counters were readable at start."""
        return "rapl" if self._zones else "model"

    def _cpu_util(self) -> float:
        total, busy = _cpu_total_and_busy(psutil.cpu_times())
        last_total, last_busy = self._last_cpu
        self._last_cpu = (total, busy)
        d_total, d_busy = total - last_total, busy - last_busy
        if d_total <= 0:
            # no tick elapsed since the last sample: fall back to the average since boot
            d_total, d_busy = total, busy
        if d_total <= 0:
            return 0.0
        return min(max(d_busy / d_total, 0.0), 1.0)

    def _read_energy(self) -> dict[Path, int] | None:
        readings: dict[Path, int] = {}
        for zone in self._zones:
            try:
                readings[zone.path] = int(_read_text(zone.path / "energy_uj"))
            except (OSError, ValueError):
                return None
        return readings

    def _rapl_power_w(self, now: float) -> tuple[bool, float | None]:
        """(usable, watts): usable is False when the counters cannot be read this time."""
        readings = self._read_energy()
        if readings is None:
            self._last_energy = None
            return False, None
        previous = self._last_energy
        self._last_energy = (now, readings)
        if previous is None:
            return True, None
        previous_ts, previous_readings = previous
        elapsed_s = now - previous_ts
        if elapsed_s <= 0:
            return True, None
        total_uj = 0
        for zone in self._zones:
            delta = energy_delta_uj(
                previous_readings[zone.path], readings[zone.path], zone.max_energy_range_uj
            )
            if delta is None:
                return True, None
            total_uj += delta
        return True, total_uj / 1e6 / elapsed_s

    def sample(self, now: float) -> HostSample:
        """Read CPU, memory and power at time ``now`` (injected, as everywhere in the agent)."""
        cpu_util = self._cpu_util()
        memory = psutil.virtual_memory()
        # "used" differs between platforms; total - available is what a new process can't have
        used_bytes = int(memory.total - memory.available)
        power_w: float | None
        source = "model"
        if self._zones:
            usable, power_w = self._rapl_power_w(now)
            if usable:
                source = "rapl"
        if source == "model":
            power_w = self.model.power_w(cpu_util)
        return HostSample(
            timestamp=now,
            cpu_util_ratio=cpu_util,
            memory_used_bytes=used_bytes,
            memory_total_bytes=int(memory.total),
            non_gpu_power_w=power_w,
            power_source=source,
        )
