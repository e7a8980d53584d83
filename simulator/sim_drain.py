"""The simulated node's drain actuator: the facility's router stops sending it work,
and once empty (or at once, ``drain_now``: its requests back to the router) it powers
down to standby (``scenario.standby_w``)."""

from __future__ import annotations

from typing import Any


class SimDrain:
    powers_down = True
    can_drain_now = True
    inline = True
    """Applied within the tick: the simulated clock must not race a worker thread."""

    def __init__(self, facility: Any, node: int) -> None:
        self.facility = facility
        self.node = node

    def set_drained(self, drained: bool) -> None:
        self.facility.set_drained(self.node, drained)

    def drain_now(self) -> None:
        self.facility.drain_now(self.node)
