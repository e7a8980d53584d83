"""The simulated node's drain actuator: the facility's router stops sending it work,
and once empty it powers down to standby (``scenario.standby_w``)."""

from __future__ import annotations

from typing import Any


class SimDrain:
    powers_down = True
    inline = True
    """Applied within the tick: the simulated clock must not race a worker thread."""

    def __init__(self, facility: Any, node: int) -> None:
        self.facility = facility
        self.node = node

    def set_drained(self, drained: bool) -> None:
        self.facility.set_drained(self.node, drained)
