"""The simulated GPU backend: one node's GPUs of a simulated facility, behind GpuBackend.

It enforces the same constraints and raises the same errors as the NVML backend, so
the agent cannot tell them apart; actuation is tested here, never on real hardware.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from wattkeeper.collectors.gpu import (
    GpuInfo,
    GpuLostError,
    GpuNotFoundError,
    GpuSample,
    OriginalSettings,
    PowerLimitConstraints,
)

if TYPE_CHECKING:
    from wattkeeper.simulator.facility import SimFacility


class SimGpuBackend:
    name = "sim"

    def __init__(self, facility: SimFacility, node: int, clock: Callable[[], float]) -> None:
        self.facility = facility
        self.node = node
        self.clock = clock
        self._index: dict[str, int] = {}
        self._infos: list[GpuInfo] = []
        for local, global_idx in enumerate(facility.node_gpu_indices(node)):
            kind = facility.gpu_kind(global_idx)
            uuid = facility.uuids[global_idx]
            self._index[uuid] = global_idx
            self._infos.append(
                GpuInfo(
                    uuid=uuid,
                    index=local,
                    name=kind.product_name,
                    pci_bus_id=f"00000000:{0x18 + 0x10 * local:02X}:00.0",
                    memory_total_bytes=kind.memory_bytes,
                    power_limits=PowerLimitConstraints(
                        kind.power_min_w, kind.power_max_w, kind.power_default_w
                    ),
                    supported_sm_clocks_mhz=kind.supported_sm_clocks_mhz(),
                    max_sm_clock_mhz=kind.max_sm_clock_mhz,
                )
            )
        self._by_uuid = {i.uuid: i for i in self._infos}
        self._originals: dict[str, OriginalSettings] = {}

    def _idx(self, uuid: str) -> int:
        try:
            return self._index[uuid]
        except KeyError:
            raise GpuNotFoundError(
                f"no GPU with UUID {uuid} on simulated node {self.node}"
            ) from None

    def _check_up(self) -> None:
        """A node that failed or sleeps in standby has no GPUs to talk to."""
        f = self.facility
        if not f.node_up(self.node):
            raise GpuLostError(f"simulated node {self.node} is {f.node_state(self.node)}")

    def gpus(self) -> list[GpuInfo]:
        return list(self._infos)

    def sample(self, uuid: str) -> GpuSample:
        i = self._idx(uuid)
        f = self.facility
        f.advance_to(self.clock())
        self._check_up()
        lock = None
        if not np.isnan(f.clock_lock[i]):
            lock = (int(f.clock_lock_min[i]), int(f.clock_lock[i]))
        reasons: list[str] = []
        busy = float(f.gpu_busy[i])
        if busy <= 0:
            reasons.append("gpu_idle")
        if f.power_capped[i]:
            reasons.append("sw_power_cap")
        return GpuSample(
            uuid=uuid,
            timestamp=f.now,
            power_w=float(f.power_avg_1s()[i]),
            power_instant_w=float(f.power_true[i]),
            energy_j=float(f.energy_j[i]),
            sm_clock_mhz=float(f.clock_mhz[i]),
            mem_clock_mhz=float(f.gpu_kind(i).mem_clock_mhz),
            utilization_gpu_ratio=busy,
            utilization_mem_ratio=busy * 0.8,
            temperature_c=30.0 + 0.06 * float(f.power_avg_1s()[i]),
            power_limit_w=float(f.limit_requested[i]),
            power_limit_requested_w=float(f.limit_requested[i]),
            locked_sm_clocks_mhz=lock,
            throttle_reasons=tuple(reasons),
        )

    def _remember(self, uuid: str) -> None:
        if uuid not in self._originals:
            i = self._idx(uuid)
            f = self.facility
            lock = (
                None
                if np.isnan(f.clock_lock[i])
                else (int(f.clock_lock_min[i]), int(f.clock_lock[i]))
            )
            self._originals[uuid] = OriginalSettings(float(f.limit_requested[i]), lock)

    def set_power_limit(self, uuid: str, watts: float) -> None:
        i = self._idx(uuid)
        self._by_uuid[uuid].power_limits.check(watts)
        self.facility.advance_to(self.clock())
        self._check_up()
        self._remember(uuid)
        self.facility.limit_requested[i] = float(watts)

    def lock_sm_clocks(self, uuid: str, min_mhz: int, max_mhz: int) -> None:
        i = self._idx(uuid)
        self._by_uuid[uuid].check_clock_range(min_mhz, max_mhz)
        self.facility.advance_to(self.clock())
        self._check_up()
        self._remember(uuid)
        self.facility.clock_lock_min[i] = min_mhz
        self.facility.clock_lock[i] = max_mhz

    def reset_sm_clocks(self, uuid: str) -> None:
        i = self._idx(uuid)
        self._check_up()
        self._remember(uuid)
        self.facility.clock_lock_min[i] = np.nan
        self.facility.clock_lock[i] = np.nan

    def original_settings(self, uuid: str) -> OriginalSettings | None:
        self._idx(uuid)
        return self._originals.get(uuid)

    def restore(self, uuid: str) -> None:
        original = self._originals.get(uuid)
        if original is None:
            return
        i = self._idx(uuid)
        self._check_up()
        if original.power_limit_w is not None:
            self.facility.limit_requested[i] = original.power_limit_w
        if original.locked_sm_clocks_mhz is None:
            self.facility.clock_lock_min[i] = np.nan
            self.facility.clock_lock[i] = np.nan
        else:
            self.facility.clock_lock_min[i], self.facility.clock_lock[i] = (
                original.locked_sm_clocks_mhz
            )

    def close(self) -> None:
        """Nothing to release: the facility outlives its views."""
