"""Latency-driven power ceilings: the least power per node that still meets the SLO.

A budget says how much power the facility may draw; it does not say how much the
work needs. At a steady load a GPU makes the same tokens per second under any cap
that keeps up with the arrivals, so every watt above the lowest such cap is wasted:
it shortens time per output token below what anyone asked for. This module walks
each node's ceiling down while the servers' own latency (mean TTFT and TPOT since the
previous read, from their histograms) has slack against the SLO, and back up at once
when it has none or their p90 misses it. The budget's water-filling then works under
these ceilings, so the watts one node does not need go to the nodes that do.

It is a feedback rule, not a model: it needs no curve of the GPU or the model, and
a prior that is off changes nothing. Steps down are proportional to the slack and
wait until the batch has settled at the new cap (a capped replica's batch grows for
about one request's lifetime); steps up are immediate and large, because a missed
SLO costs goodput while a watt too many only costs a watt.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float


@dataclass(frozen=True)
class SloSettings:
    target_ratio: float = 0.85
    """Aim for the mean latency at this share of the SLO: the rest absorbs the spread of
    requests around the mean, noise and steps."""
    high_ratio: float = 0.95
    """Above this share of the SLO the ceiling rises at once."""
    down_gain: float = 0.5
    """Ceiling step down (share of the GPU's power range) per unit of slack."""
    max_down_step: float = 0.15
    min_down_step: float = 0.01
    up_step: float = 0.1
    settle_s: float = 20.0
    """Time after a step down before the next one: the batch grows into a new cap."""
    min_observations: float = 5.0
    """Fewer requests than this in a read's window say too little to act on."""
    blind_after_s: float = 30.0
    """Without a usable latency reading this long, the ceiling relaxes step by step."""
    kv_full_ratio: float = 0.98
    """A KV cache this full cannot take a larger batch: as good as a missed SLO."""
    queue_ttft_ratio: float = 3.0
    """Mean TTFT this many times the node's unqueued TTFT says requests are queueing:
    the node no longer keeps up at its cap, long before TTFT reaches the SLO."""
    queue_ttft_min_share: float = 0.5
    """...and at least this share of the TTFT SLO. A short queue (a surge of a minute)
    that keeps TTFT within half the SLO costs no goodput, and a raise against it would
    only cost watts; one that grows past it gets a raise at every period while it grows
    (``queue_growing_ratio``), so it is met before it reaches the SLO."""
    batch_full_ratio: float = 0.92
    """A batch this share of the largest one seen while requests queued is near the
    servers' in-flight limit: a lower cap would not grow it further, only queue."""
    queue_growing_ratio: float = 1.2
    """While queueing, mean TTFT this many times that of the last step up says the
    queue still grows: step up again at once."""
    floor_memory_s: float = 600.0
    """How long the ceiling at which a node last queued stays a floor for steps down."""


@dataclass(frozen=True)
class NodeLatency:
    """What the servers of one node said at their newest read."""

    name: str
    ttft_p90_s: float | None
    tpot_p90_s: float | None
    ttft_mean_s: float | None
    tpot_mean_s: float | None
    ttft_p90_floor_s: float | None
    """The p90 is at least this (the lower bound of its bucket)."""
    tpot_p90_floor_s: float | None
    observations: float | None
    requests_running: float | None
    kv_cache_usage_ratio: float | None
    age_s: float | None
    """Seconds since that read (None: the node has no token source)."""


@dataclass
class CeilingState:
    ratio: float
    """Share of each GPU's power range [floor, maximum] the node's limits may reach."""
    last_down_ts: float = float("-inf")
    last_seen_ts: float = float("-inf")
    pressure: float | None = None
    reason: str = "no latency reading yet"
    unqueued_ttft_s: float | None = None
    """The lowest mean TTFT seen lately (prefill alone), rising 1% a period to follow
    the prompt mix."""
    floor: float = 0.0
    floor_ts: float = float("-inf")
    batch_limit: float | None = None
    """Requests running when the node last queued: its servers' in-flight limit, learned."""
    queue_ttft_s: float | None = None
    """Mean TTFT at the last step up for a queue (None: not queueing)."""
    slack: bool = False
    """This period the mean latency was under the target share, with no queue and no
    batch near the in-flight limit: the node can give up speed."""
    pressed: bool = False
    """This period the ceiling rose (latency near or over the SLO, or a queue): the node
    needs all the speed its cap allows."""


@dataclass
class Ceilings:
    """Per-node latency ceilings, kept across control periods by the controller."""

    slo: Slo
    settings: SloSettings = field(default_factory=SloSettings)
    nodes: dict[str, CeilingState] = field(default_factory=dict)

    def pressure(self, n: NodeLatency) -> tuple[float, float, float] | None:
        """(steer, tail, proven): the worst mean latency, the worst p90 and the worst
        lower bound of the p90's bucket, each as a share of its SLO. The means are exact
        and steer the ceiling. The tail guard is the p90 interpolated within its bucket:
        where the SLO sits inside a bucket (SGLang's 50-75 ms around 60 or 80 ms) it may
        call a miss that is not one, which costs watts; the bucket's lower bound would
        miss most real ones, which costs goodput, and goodput comes first. ``proven`` at
        1.0 or more means a tenth of the requests certainly missed. A full KV cache
        counts as a missed SLO. None when the reading is stale or rests on too few
        requests."""
        s = self.settings
        if n.age_s is None or n.age_s > s.blind_after_s:
            return None
        steer: list[float] = []
        tail: list[float] = []
        proven: list[float] = []
        if n.observations is not None and n.observations >= s.min_observations:
            for values, out in (
                ((n.ttft_mean_s, n.tpot_mean_s), steer),
                ((n.ttft_p90_s, n.tpot_p90_s), tail),
                ((n.ttft_p90_floor_s, n.tpot_p90_floor_s), proven),
            ):
                for value, slo in zip(values, (self.slo.ttft_s, self.slo.tpot_s), strict=True):
                    if value is not None:
                        out.append(value / slo)
        if n.kv_cache_usage_ratio is not None and n.kv_cache_usage_ratio >= s.kv_full_ratio:
            tail.append(1.01)
        if not steer and not tail:
            return None
        return max(steer, default=0.0), max(tail, default=0.0), max(proven, default=0.0)

    def current(self, name: str, in_force_ratio: float, now: float) -> CeilingState:
        """The node's ceiling as it stands, without a step (a new node starts where its
        GPUs are, and its time without readings counts from now)."""
        if name not in self.nodes:
            self.nodes[name] = CeilingState(ratio=min(1.0, in_force_ratio), last_seen_ts=now)
        return self.nodes[name]

    def reset(self, name: str, ratio: float, now: float) -> None:
        self.nodes[name] = CeilingState(ratio=ratio, last_seen_ts=now)

    def update(self, n: NodeLatency, in_force_ratio: float, now: float) -> CeilingState:
        """Move node ``n``'s ceiling for this period. ``in_force_ratio`` is where its
        limits are now (as a share of the range): a step down starts from there, so a
        ceiling above a budget-bound limit does not first have to walk down to it."""
        s = self.settings
        # A restarted controller starts where the GPUs are, never above them.
        state = self.current(n.name, in_force_ratio, now)
        pressure = self.pressure(n)
        state.pressure = None if pressure is None else max(pressure)
        state.slack = state.pressed = False
        if pressure is None:
            if now - state.last_seen_ts > s.blind_after_s and state.ratio < 1.0:
                state.ratio = min(1.0, state.ratio + s.min_down_step)
                state.reason = "no recent latency reading: ceiling relaxing"
            return state
        state.last_seen_ts = now
        steer, tail, proven = pressure
        said = f"mean latency at {steer:.0%} of the SLO, p90 at {tail:.0%}"
        if now - state.floor_ts > s.floor_memory_s:
            state.floor = 0.0
        queueing = self._queueing(state, n.ttft_mean_s)
        if not queueing:
            state.queue_ttft_s = None
        if queueing:
            assert n.ttft_mean_s is not None
            # A queue still growing after a step (mean TTFT up by a fifth since) says
            # that step was too small: step again without waiting for the batch.
            growing = (
                state.queue_ttft_s is not None
                and n.ttft_mean_s > s.queue_growing_ratio * state.queue_ttft_s
            )
            if now - state.floor_ts >= s.settle_s or growing:
                state.queue_ttft_s = n.ttft_mean_s
                # Out of capacity at this cap: back up, and do not come this low again.
                # Until the backlog has drained TTFT stays high: hold, do not ratchet up.
                state.floor = max(state.floor, in_force_ratio + s.min_down_step)
                state.floor_ts = now
                if n.requests_running is not None:
                    state.batch_limit = max(state.batch_limit or 0.0, n.requests_running)
                state.ratio = min(1.0, max(state.ratio, in_force_ratio) + s.up_step)
            state.reason = f"requests queueing (mean TTFT {n.ttft_mean_s:.2f} s): ceiling raised"
            state.pressed = True
        elif tail > 1.0 or steer > s.high_ratio:
            step = s.up_step * (2.0 if proven >= 1.0 or steer > 1.0 else 1.0)
            state.ratio = min(1.0, max(state.ratio, in_force_ratio) + step)
            state.reason = f"{said}: ceiling raised"
            state.pressed = True
        elif self._batch_full(state, n.requests_running):
            state.reason = (
                f"{said}, batch {n.requests_running:.0f} near the in-flight limit "
                f"{state.batch_limit:.0f}: ceiling held"
            )
        elif steer < s.target_ratio and now - state.last_down_ts >= s.settle_s:
            slack = s.target_ratio - steer
            step = min(s.max_down_step, max(s.min_down_step, s.down_gain * slack))
            if state.batch_limit is not None:
                # The in-flight limit is near: probe towards it in small steps.
                step = min(step, 2 * s.min_down_step)
            state.ratio = max(state.floor, min(state.ratio, in_force_ratio) - step)
            state.last_down_ts = now
            state.reason = f"{said}: ceiling lowered"
            state.slack = True
        else:
            state.reason = f"{said}: ceiling held"
            state.slack = steer < s.target_ratio
        return state

    def _queueing(self, state: CeilingState, ttft_mean_s: float | None) -> bool:
        if ttft_mean_s is None:
            return False
        s = self.settings
        base = state.unqueued_ttft_s
        base = ttft_mean_s if base is None else min(base * 1.01, ttft_mean_s)
        state.unqueued_ttft_s = base
        return ttft_mean_s > max(
            s.queue_ttft_ratio * base, s.queue_ttft_min_share * self.slo.ttft_s
        )

    def _batch_full(self, state: CeilingState, running: float | None) -> bool:
        if running is None or state.batch_limit is None:
            return False
        if running > state.batch_limit:
            state.batch_limit = running  # a larger batch served without queueing
            return False
        return running >= self.settings.batch_full_ratio * state.batch_limit

    def forget(self, keep: set[str]) -> None:
        for name in set(self.nodes) - keep:
            del self.nodes[name]

    def to_memory(self) -> dict[str, dict]:
        """Every node's ceiling as plain JSON: no infinities (None stands for "never")
        and no NaN, which PostgreSQL's json type refuses."""
        return {
            name: {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(st).items()
            }
            for name, st in self.nodes.items()
        }

    def restore(self, memory: dict[str, dict]) -> int:
        """Take back ceilings a controller kept (``to_memory``): a node already known
        here keeps its own. Entries that do not read as a ceiling are skipped, never
        half-taken. Returns how many were taken."""
        names = {f.name: f for f in fields(CeilingState)}
        taken = 0
        for node, kept in memory.items():
            if node in self.nodes or not isinstance(kept, dict):
                continue
            try:
                values = {
                    k: (float("-inf") if v is None and k.endswith("_ts") else v)
                    for k, v in kept.items()
                    if k in names
                }
                state = CeilingState(**values)
                if not 0.0 <= float(state.ratio) <= 1.0:
                    continue
            except (TypeError, ValueError):
                continue
            self.nodes[node] = state
            taken += 1
        return taken
