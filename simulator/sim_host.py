"""A node's non-GPU power as the host collector would report it, from the simulated facility."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from wattkeeper.collectors.host import HostSample

if TYPE_CHECKING:
    from wattkeeper.simulator.facility import SimFacility

HOST_MEMORY_TOTAL_BYTES = 2048 * 2**30
"""DGX H100 and DGX A100 datasheets: 2 TB of system memory."""
HOST_MEMORY_USED_BYTES = 512 * 2**30
"""ASSUMPTION: the serving processes, page cache of the weights and the OS."""
CPU_UTIL_IDLE = 0.1
CPU_UTIL_SPAN = 0.4
"""ASSUMPTION: inference servers keep the CPUs lightly busy (tokenising, scheduling,
HTTP), from 10% with idle GPUs to 50% with every GPU busy."""


class SimHost:
    def __init__(self, facility: SimFacility, node: int) -> None:
        self.facility = facility
        self.node = node

    def sample(self, now: float) -> HostSample:
        """The node's host reading; OSError while the node is down (its agent is gone too)."""
        f = self.facility
        f.advance_to(now)
        if not f.node_up(self.node):
            raise OSError(f"simulated node {self.node} is {f.node_state(self.node)}")
        gpus = f.node_gpu_indices(self.node)
        busy = float(np.mean(f.gpu_busy[gpus.start : gpus.stop]))
        return HostSample(
            timestamp=now,
            cpu_util_ratio=CPU_UTIL_IDLE + CPU_UTIL_SPAN * busy,
            memory_used_bytes=HOST_MEMORY_USED_BYTES,
            memory_total_bytes=HOST_MEMORY_TOTAL_BYTES,
            non_gpu_power_w=float(f.host_power[self.node]),
            power_source="model",
        )
