"""Clock locks that follow the caps: the clock a binding power cap holds at peak load,
kept through the lulls.

A power cap lowers the SM clock only while the GPU would draw more than the cap, that
is at peak load. In the lulls of a bursty load the cap does not bind, the clock boosts
back to its maximum and the joules per token rise with it, though decode, bound by
memory, hardly runs faster for it. Locking the clock at the one the cap chose at peak
draws the same power at peak and less in between (``nvidia-smi -lgc``, the lever the
published decode studies use).

Per GPU, at each control period:

- where the planned cap is the latency ceiling and binds (the GPU reports a power-cap
  throttle and no other slowdown, and the limit in force is the planned one) two
  periods in a row, lock at the higher of the two clocks it ran at, when that is 2% or
  more below the lock held: the lock only ever follows the cap down. A cap at the top
  of the GPU's range locks nothing, since no rise could release it.
  A cap set
  by a budget's share locks nothing: shares move every period with the other GPUs'
  draw, and a lock found under one would hold the GPU below the next, larger one;
- the lowest clock the ceiling's cap held the GPU at in the last ``peak_periods`` (two
  binding periods in a row, with or without slack: a burst's peak) is remembered: a lock
  set after a burst, when the cap binds at the lull's higher clock or not at all, is
  that clock, and a lock set higher is lowered to it, provided today's cap is no
  higher than the one it was found under;
- where the planned cap rose above the one the lock was found under (the latency
  ceiling stepped up, or the budget gave the GPU more), release the lock: its servers,
  or its share, want more than the lock gives, and the cap alone decides until it binds
  again;
- a GPU without a latency ceiling (no SLO, or no token source on its node) gets no
  lock: nothing would tell the policy what a lock costs in latency. Locks are set and
  lowered only while the node's latency has slack, and released at once when its
  ceiling rises (latency near the SLO, or requests queueing): in the lulls after a
  burst, the boost a lock forbids is what drains the queue.

The power limit stays in place under the lock: it, not the clock, keeps the budget. It
is a feedback rule with no model of the GPU, so a prior that is off changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClockInput:
    """One GPU at this period: its plan and its newest sample."""

    uuid: str
    min_w: float
    max_w: float
    target_w: float
    """The limit planned for it this period."""
    limit_w: float | None
    """The limit in force when it was sampled."""
    sm_clock_mhz: float | None
    power_capped: bool
    fresh: bool
    has_ceiling: bool
    ceiling_binds: bool = True
    """The planned limit is the GPU's latency ceiling, not a budget's share."""
    other_slowdown: bool = False
    """A thermal, hardware or power-brake slowdown was active too: the clock it read
    says nothing about the cap."""
    slack: bool = True
    """Its node's latency has slack this period (policies/slo.py): it can give up the
    boost between peaks."""
    pressed: bool = False
    """Its node's latency ceiling rose this period (near the SLO, or a queue): the lulls'
    boost is what drains a backlog, so a lock goes at once."""


@dataclass(frozen=True)
class ClockSettings:
    release_ratio: float = 0.02
    """A planned cap this share of the GPU's power range above the one the lock was
    found under releases the lock (smaller moves are the plan's noise)."""
    in_force_w: float = 1.0
    """The limit in force is the planned one when within this."""
    lower_ratio: float = 0.02
    """A lock moves down only to a clock this share below it: a cap that binds holds
    the clock where it must in any case, and a lock that chased every few megahertz of
    it would be a new target, an actuation and an audit row every period."""
    peak_periods: int = 60
    """How many periods back the lowest clock a binding cap held a GPU at counts (a
    burst's peak), so that a lock set after a burst is that clock, not the lull's."""


@dataclass
class Lock:
    mhz: int
    found_under_w: float
    """The planned cap that held the GPU at ``mhz``."""


@dataclass
class ClockLocks:
    settings: ClockSettings = field(default_factory=ClockSettings)
    locks: dict[str, Lock] = field(default_factory=dict)
    seen_at: dict[str, int] = field(default_factory=dict)
    """The clock a binding cap held a GPU at last period, below its lock (or with none):
    a lock moves only on two periods in a row, to the higher of their clocks, so one
    reading at the bottom of a burst's noise does not set it."""
    peaks: dict[str, tuple[int, float, int]] = field(default_factory=dict)
    """Per GPU, the lowest clock its latency ceiling held it at lately, binding two
    periods in a row (the higher of the two), slack or not, a burst's peak included:
    (MHz, the cap, the period)."""
    binding_at: dict[str, int] = field(default_factory=dict)
    """The clock a binding ceiling held the GPU at last period, for ``peaks``."""
    period: int = 0

    def update(self, gpus: list[ClockInput]) -> dict[str, str]:
        """Move the locks one period; returns, per GPU whose lock changed, why."""
        why: dict[str, str] = {}
        seen = set()
        self.period += 1
        for g in gpus:
            seen.add(g.uuid)
            self._remember_peak(g)
            held = self.locks.get(g.uuid)
            if not g.has_ceiling:
                if held is not None:
                    del self.locks[g.uuid]
                    why[g.uuid] = "no latency reading: clock lock released"
                continue
            rise = self.settings.release_ratio * (g.max_w - g.min_w)
            if held is not None and g.pressed:
                del self.locks[g.uuid]
                why[g.uuid] = "latency near the SLO or a queue: clock lock released"
                continue
            if held is not None and g.target_w > held.found_under_w + rise:
                del self.locks[g.uuid]
                why[g.uuid] = (
                    f"cap raised to {g.target_w:.0f} W from the {held.found_under_w:.0f} W "
                    f"the {held.mhz} MHz lock was found under: lock released"
                )
                continue
            if not self._binding(g) or g.target_w >= g.max_w - rise:
                # At its top the cap cannot rise, so nothing could release a lock set
                # there (and a GPU whose range is a point is not managed at all).
                self.seen_at.pop(g.uuid, None)
                if g.target_w < g.max_w - rise:
                    self._lock_at_peak(g, held, why)
                continue
            assert g.sm_clock_mhz is not None
            mhz = math.floor(g.sm_clock_mhz)
            if held is not None and mhz >= held.mhz * (1 - self.settings.lower_ratio):
                self.seen_at.pop(g.uuid, None)
                if g.target_w < held.found_under_w:
                    held.found_under_w = g.target_w
                continue
            last = self.seen_at.pop(g.uuid, None)
            if last is None:
                self.seen_at[g.uuid] = mhz
                continue
            mhz = max(mhz, last)
            peak = self._peak(g)
            if peak is not None:
                mhz = min(mhz, peak)
            if held is None or mhz < held.mhz:
                self.locks[g.uuid] = Lock(mhz, g.target_w)
                why[g.uuid] = (
                    f"its {g.target_w:.0f} W cap holds it at {mhz} MHz at peak load: "
                    "clock locked there so the lulls do not boost"
                )
        for table in (self.locks, self.seen_at, self.peaks, self.binding_at):
            for gone in set(table) - seen:
                del table[gone]
        return why

    def clear(self) -> None:
        self.locks.clear()
        self.seen_at.clear()
        self.peaks.clear()
        self.binding_at.clear()

    def _remember_peak(self, g: ClockInput) -> None:
        if not (g.has_ceiling and self._cap_binds(g)):
            self.binding_at.pop(g.uuid, None)
            return
        assert g.sm_clock_mhz is not None
        now = math.floor(g.sm_clock_mhz)
        last = self.binding_at.get(g.uuid)
        self.binding_at[g.uuid] = now
        if last is None:
            return
        mhz = max(now, last)
        old = self.peaks.get(g.uuid)
        if old is None or self.period - old[2] > self.settings.peak_periods or mhz <= old[0]:
            self.peaks[g.uuid] = (mhz, g.target_w, self.period)

    def _peak(self, g: ClockInput) -> int | None:
        """The last peak's clock, where it was found under a cap no lower than this
        period's: this cap at that load would hold the GPU at that clock or below, so a
        lock there costs nothing at the peak and saves the lulls' boost."""
        peak = self.peaks.get(g.uuid)
        if peak is None or self.period - peak[2] > self.settings.peak_periods:
            return None
        mhz, cap_w, _ = peak
        return mhz if cap_w >= g.target_w - self.settings.in_force_w else None

    def _lock_at_peak(self, g: ClockInput, held: Lock | None, why: dict[str, str]) -> None:
        """In a lull (the cap not binding), with slack: lock at, or lower a lock to, the
        clock this cap held at the last peak."""
        if not (g.fresh and g.ceiling_binds and g.slack and not g.pressed):
            return
        peak = self._peak(g)
        if peak is None:
            return
        if held is not None and peak >= held.mhz * (1 - self.settings.lower_ratio):
            return
        self.locks[g.uuid] = Lock(peak, g.target_w)
        why[g.uuid] = (
            f"its {g.target_w:.0f} W cap held it at {peak} MHz at the last peak: clock "
            "locked there so the lulls do not boost"
        )

    def _binding(self, g: ClockInput) -> bool:
        """The latency ceiling's cap binds, with slack: a lock may be set or lowered."""
        return g.slack and not g.pressed and self._cap_binds(g)

    def _cap_binds(self, g: ClockInput) -> bool:
        """The latency ceiling's cap, in force, holds the GPU's clock now."""
        return (
            g.fresh
            and g.ceiling_binds
            and g.power_capped
            and not g.other_slowdown
            and g.sm_clock_mhz is not None
            and g.sm_clock_mhz > 0
            and g.limit_w is not None
            and abs(g.limit_w - g.target_w) <= self.settings.in_force_w
        )

    def current(self) -> dict[str, int]:
        return {uuid: lock.mhz for uuid, lock in self.locks.items()}
