"""Clocks: the one thing that differs between a real-time run and a simulated one."""

from __future__ import annotations

import time


class WallClock:
    def now(self) -> float:
        return time.time()


class SimClock:
    """A clock that only moves when told to, so a run is as fast as the CPU and repeatable."""

    def __init__(self, start: float) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def set(self, t: float) -> None:
        if t < self.t:
            raise ValueError("a simulated clock never goes backwards")
        self.t = t
