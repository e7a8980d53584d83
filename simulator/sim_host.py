"""A node's non-GPU power as the host collector would report it, from the simulated facility."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wattkeeper.collectors.host import HostSample

if TYPE_CHECKING:
    from wattkeeper.simulator.facility import SimFacility


class SimHost:
    def __init__(self, facility: SimFacility, node: int) -> None:
        self.facility = facility
        self.node = node

    def sample(self, now: float) -> HostSample:
        f = self.facility
        f.advance_to(now)
        gpus = f.node_gpu_indices(self.node)
        busy = float(min(1.0, f.batch[f.replica_of[gpus.start]] / 64.0))
        return HostSample(
            timestamp=now,
            cpu_util_ratio=0.1 + 0.4 * busy,
            memory_used_bytes=512 * 2**30,
            memory_total_bytes=2048 * 2**30,
            non_gpu_power_w=float(f.host_power[self.node]),
            power_source="model",
        )
