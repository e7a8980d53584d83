"""Consolidation: serve a light load on fewer nodes, and power the rest down.

A serving node costs its host's power and its GPUs' idle power whatever it serves, so
at low load the facility makes more good tokens per joule on fewer nodes, each with a
larger batch. Whether fewer nodes can carry the load is not computed from a model of
the GPU (a prior that is off would drop requests): it is tried, cheaply and reversibly.

- **Trial.** When a pool (the nodes serving one set of models) is calm, its demand has
  not been higher in the last ``lookback_s``, and its GPU power would fit the others'
  with room, its least efficient node gets no new requests from the router (weight 0)
  for ``trial_s``. It stays powered and serving what it holds, so ending the trial
  costs nothing: its weight comes back at the next period.
- **Judgement.** The trial passes when the rest of the pool carried the whole demand
  with its latency within the SLO and its GPUs' power at most ``room_ratio`` of their
  maximum (room for the load to grow while a node wakes), once the node's own tokens
  fell to a twentieth of the demand (its load really moved). It fails at once when any
  of them stays near its SLO with no power to add, when the demand grows past the
  return threshold, or when the load never moves off the node (a router that does not
  take the weight). A pass drains the node (its actuator powers
  it down); a failure waits until the demand falls below ``retry_ratio`` of the failed
  trial's, or ``lookback_s`` has passed.
- **Return.** A consolidated node returns when its pool's demand passes ``return_ratio``
  of the demand it was drained at, at once when a serving node of its pool stays near
  its SLO with no power to add (and no budget holding it), and at once when the pool
  has fewer serving nodes than it kept at the drain (one failed): waking takes minutes,
  so the return comes before the need. The last drained returns first, one at a time.

Only the controller's own consolidation drains are returned here; the budget's drains
(``drain.py``) and a person's are never touched. Pure: the controller feeds it what the
store says and acts on what it returns.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ConsolidateSettings:
    trial_s: float = 90.0
    """How long a trial keeps new requests off its node before it is judged: long enough
    for the node's requests in flight to finish, so the rest carry the whole load."""
    floor_ratio: float = 0.15
    """A trial starts only if every serving node's GPUs draw at most this share of their
    range above their floors: the latency ceilings walked them down to their floors and
    the latency still has slack, so the pool has more than it needs. A node well above
    its floor is needed where it is (a failed trial queues requests for a minute)."""
    similar_ratio: float = 0.1
    """A pool whose least productive serving node makes less than this share of the most
    productive one's tokens is not one job (a prefill node among decode nodes, which
    the servers' metrics do not tell apart): it is not consolidated."""
    room_ratio: float = 0.5
    """A trial passes only if the rest of the pool's GPUs draw at most this share of
    their range above their floors: room for the load to grow while a node wakes."""
    high_ratio: float = 0.95
    """Mean latency (TTFT or TPOT) above this share of the SLO is a node near its limit."""
    return_ratio: float = 1.15
    """A consolidated node returns when its pool's demand passes this multiple of the
    demand it was drained at."""
    lookback_s: float = 600.0
    """No trial while the pool's demand in this window peaked above ``return_ratio`` of
    today's: a burst that came and went will come again, faster than a node wakes."""
    smoothing_s: float = 60.0
    """Time constant of the smoothed demand the decisions use."""
    retry_ratio: float = 0.9
    """After a failed trial, the next waits for the demand to fall below this share of
    the failed one's (or for ``lookback_s``)."""
    hold_s: float = 120.0
    """Least time between a drain or return and the next trial: the rest's ceilings
    settle at their new load before they are judged calm again."""
    power_allowance: float = 0.05
    """A trial fails if the pool's power per token, with the node at standby, rose by
    more than this share. Not less: the rest's ceilings rose at once with their load and
    walk down over minutes, while the node's floors and host are saved for good."""
    moved_ratio: float = 0.05
    """A trial is judged once its node makes at most this share of the pool's tokens."""
    max_trial_ratio: float = 3.0
    """A trial whose node still makes more after this many ``trial_s`` fails: the router
    does not take its weight, or its requests are very long."""
    min_serving: int = 1
    """A pool keeps at least this many serving nodes (2: a node that fails leaves one
    serving while another wakes)."""
    strained_periods: int = 2
    """Periods in a row a node must be near its SLO with no power to add before it
    counts as strained (one mean latency over a short window is noisy)."""


@dataclass(frozen=True)
class PoolNode:
    """What the controller knows of one node this period."""

    name: str
    pool: str
    serving: bool
    """Alive, not drained, its servers answer and its readings are fresh."""
    drained: bool
    held: bool
    """Drained by a person or by a budget: never returned here."""
    tokens_per_s: float | None
    gpu_power_w: float | None
    gpu_floor_w: float
    gpu_max_w: float
    power_w: float | None
    """GPUs and host (non-GPU power), fresh; None: not known."""
    steer: float | None
    """The worst mean latency (TTFT or TPOT) as a share of its SLO."""
    power_can_rise: bool
    budget_held: bool = False
    """A budget holds its GPUs below their latency ceiling: a node returned for it would
    only take watts from the others."""


@dataclass(frozen=True)
class Decision:
    kind: str
    """'trial' (weight 0 from now), 'end' (trial over, weight back), 'drain' or 'return'."""
    node: str
    reason: str


@dataclass
class Trial:
    node: str
    pool: str
    started_ts: float
    demand: float
    joules_per_token: float
    """The pool's power over its demand when the trial started."""


@dataclass
class Consolidation:
    """The consolidation state the controller keeps across periods."""

    settings: ConsolidateSettings = field(default_factory=ConsolidateSettings)
    drained: dict[str, tuple[str, float, float, int]] = field(default_factory=dict)
    """node -> (pool, demand it was drained at, when, serving nodes it left)."""
    trial: Trial | None = None
    failed: dict[str, tuple[float, float]] = field(default_factory=dict)
    """pool -> (demand at the failed trial, when)."""
    demand: dict[str, float] = field(default_factory=dict)
    """Smoothed generation tokens/s per pool."""
    history: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)
    strained: dict[str, int] = field(default_factory=dict)
    """node -> periods in a row near its SLO with no power to add."""
    waking: dict[str, tuple[str, float]] = field(default_factory=dict)
    """node -> (its pool, when it was returned), until it makes tokens again: one
    return at a time per pool (a waking node's servers are silent, so its pool is the
    one it left)."""
    last_ts: float | None = None
    last_change_ts: float = -math.inf

    def to_memory(self) -> dict[str, list]:
        return {node: list(kept) for node, kept in self.drained.items()}

    def restore(self, memory: dict[str, list]) -> int:
        taken = 0
        for node, kept in memory.items():
            try:
                pool, demand, when = str(kept[0]), float(kept[1]), float(kept[2])
                serving = int(kept[3]) if len(kept) > 3 else 1
            except (TypeError, ValueError, IndexError, KeyError):
                continue
            if math.isfinite(demand) and demand >= 0:
                self.drained[node] = (pool, demand, when, serving)
                taken += 1
        return taken

    def held_off(self) -> str | None:
        """The node on trial, whose router weight must be 0."""
        return None if self.trial is None else self.trial.node

    def update(
        self,
        nodes: list[PoolNode],
        now: float,
        last_drain_ts: float,
        standby_w: dict[str, float],
        busy: bool = False,
    ) -> list[Decision]:
        """One control period. ``last_drain_ts``: the budget's last drain change, which
        also holds trials off; ``standby_w``: what each node draws drained; ``busy``: the
        budget drained or returned a node this period, so nothing moves here."""
        s = self.settings
        for n in nodes:
            near = n.serving and n.steer is not None and n.steer > s.high_ratio
            if near and not n.power_can_rise:
                self.strained[n.name] = self.strained.get(n.name, 0) + 1
            else:
                self.strained.pop(n.name, None)
        by_pool: dict[str, list[PoolNode]] = {}
        for n in nodes:
            by_pool.setdefault(n.pool, []).append(n)
        known = {n.name for n in nodes}
        for name in [m for m in self.drained if m not in known]:
            del self.drained[name]
        # A node this rule drained that is serving again (a person or a budget returned
        # it) is no longer consolidated; one a budget or a person drains is theirs.
        for n in nodes:
            if n.name in self.drained and not n.drained:
                del self.drained[n.name]
            if n.serving and (n.tokens_per_s or 0.0) > 0.0:
                self.waking.pop(n.name, None)  # making tokens again, not only answering
        for name in [
            m for m, (_, ts) in self.waking.items() if m not in known or now - ts > s.lookback_s
        ]:
            del self.waking[name]
        self._observe(by_pool, now)
        out: list[Decision] = []
        if self.trial is not None and busy:
            # The budget moved a node: what the trial saw is no longer the pool.
            return [self._fail(self.trial, now, "the budget's drain rule moved a node")]
        if busy:
            return out
        returned = self._returns(by_pool)
        if returned is not None:
            self.last_change_ts = now
            pool = self.drained.pop(returned.node)[0]
            self.waking[returned.node] = (pool, now)
            if self.trial is not None and self.trial.pool == pool:
                out.append(self._fail(self.trial, now, "a node of its pool returns"))
            return [*out, returned]
        if self.trial is not None:
            out += self._judge(by_pool.get(self.trial.pool, []), now, standby_w)
        if self.trial is None and not out:
            started = self._start(by_pool, now, max(last_drain_ts, self.last_change_ts))
            if started is not None:
                out.append(started)
        return out

    def _observe(self, by_pool: dict[str, list[PoolNode]], now: float) -> None:
        s = self.settings
        dt = 0.0 if self.last_ts is None else max(0.0, now - self.last_ts)
        self.last_ts = now
        alpha = 1.0 - math.exp(-dt / s.smoothing_s) if dt > 0 else 1.0
        for pool, members in by_pool.items():
            rates = [n.tokens_per_s for n in members if n.serving or n.name == self.held_off()]
            if not rates or any(r is None for r in rates):
                continue  # a silent token source: the demand is not known this period
            total = float(sum(r for r in rates if r is not None))
            old = self.demand.get(pool)
            self.demand[pool] = total if old is None else old + alpha * (total - old)
            hist = self.history.setdefault(pool, deque())
            hist.append((now, self.demand[pool]))
            while hist and hist[0][0] < now - s.lookback_s:
                hist.popleft()

    def _strained(self, n: PoolNode) -> bool:
        return self.strained.get(n.name, 0) >= self.settings.strained_periods

    def _pool_power(self, members: list[PoolNode]) -> float | None:
        """The power of the pool's serving nodes (the one on trial included); None while
        any of them is not known."""
        total = 0.0
        for n in members:
            if n.serving or n.name == self.held_off():
                if n.power_w is None:
                    return None
                total += n.power_w
        return total

    def _judge(
        self, members: list[PoolNode], now: float, standby_w: dict[str, float]
    ) -> list[Decision]:
        s = self.settings
        trial = self.trial
        assert trial is not None
        me = next((n for n in members if n.name == trial.node), None)
        rest = [n for n in members if n.serving and n.name != trial.node]
        if me is None or me.drained or not rest:
            self.trial = None
            return [Decision("end", trial.node, "trial ended: the node left its pool")]
        strained = [n for n in rest if self._strained(n)]
        if strained:
            return [self._fail(trial, now, f"{strained[0].name} near its SLO without the node")]
        demand = self.demand.get(trial.pool, trial.demand)
        if demand > s.return_ratio * trial.demand:
            return [self._fail(trial, now, f"the demand grew to {demand:.0f} tokens/s")]
        if now - trial.started_ts < s.trial_s:
            return []
        if (me.tokens_per_s or 0.0) > s.moved_ratio * demand:
            if now - trial.started_ts >= s.max_trial_ratio * s.trial_s:
                return [
                    self._fail(
                        trial,
                        now,
                        f"its load never moved ({me.tokens_per_s:.0f} tokens/s still):"
                        " does the router take the controller's weights?",
                    )
                ]
            return []  # its last requests are still running
        drawn = sum((n.gpu_power_w or 0.0) - n.gpu_floor_w for n in rest)
        most = max(sum(n.gpu_max_w - n.gpu_floor_w for n in rest), 1e-9)
        rest_w = sum(n.power_w or 0.0 for n in rest)
        if any(
            n.steer is None or n.steer > s.high_ratio or n.gpu_power_w is None or n.power_w is None
            for n in rest
        ):
            return [self._fail(trial, now, "latency near the SLO on the rest of the pool")]
        if drawn > s.room_ratio * most:
            return [
                self._fail(
                    trial,
                    now,
                    f"the rest of the pool drew {drawn / most:.0%} of its GPUs' range above"
                    f" their floors (room needs at most {s.room_ratio:.0%})",
                )
            ]
        after = (rest_w + standby_w.get(trial.node, 0.0)) / max(demand, 1e-9)
        if after > (1 + s.power_allowance) * trial.joules_per_token:
            return [
                self._fail(
                    trial,
                    now,
                    f"{after:.3f} J per token without the node against {trial.joules_per_token:.3f}"
                    f" with it",
                )
            ]
        self.trial = None
        self.drained[trial.node] = (trial.pool, demand, now, len(rest))
        self.last_change_ts = now
        return [
            Decision(
                "drain",
                trial.node,
                f"low load: {len(rest)} nodes of its pool served {demand:.0f} tokens/s within"
                f" the SLO at {drawn / most:.0%} of their GPUs' range above their floors;"
                " returns above"
                f" {s.return_ratio * demand:.0f} tokens/s; {after:.3f} J per token against"
                f" {trial.joules_per_token:.3f}",
            )
        ]

    def _fail(self, trial: Trial, now: float, why: str) -> Decision:
        self.trial = None
        self.failed[trial.pool] = (self.demand.get(trial.pool, trial.demand), now)
        self.last_change_ts = now
        return Decision("end", trial.node, f"consolidation trial failed: {why}")

    def _returns(self, by_pool: dict[str, list[PoolNode]]) -> Decision | None:
        s = self.settings
        waking = {pool for pool, _ in self.waking.values()}
        for pool, members in sorted(by_pool.items()):
            mine = [n for n in members if n.drained and not n.held and n.name in self.drained]
            if not mine or pool in waking:
                continue  # the last one returned is still waking: wait for it
            last = max(mine, key=lambda n: (self.drained[n.name][2], n.name))
            _, at, _, kept = self.drained[last.name]
            demand = self.demand.get(pool)
            serving = [n for n in members if n.serving]
            strained = [n for n in serving if self._strained(n) and not n.budget_held]
            why = None
            if len(serving) < kept:
                why = f"{len(serving)} nodes of its pool serve, {kept} did when it was drained"
            elif strained:
                why = f"{strained[0].name} near its SLO with no power to add"
            elif demand is not None and demand > s.return_ratio * at:
                why = f"demand {demand:.0f} tokens/s, above {s.return_ratio:.2f}x {at:.0f}"
            if why is not None:
                return Decision("return", last.name, f"consolidation ends: {why}")
        return None

    def _start(
        self, by_pool: dict[str, list[PoolNode]], now: float, last_change_ts: float
    ) -> Decision | None:
        s = self.settings
        if now - last_change_ts < s.hold_s:
            return None
        waking = {pool for pool, _ in self.waking.values()}
        for pool, members in sorted(by_pool.items()):
            serving = [n for n in members if n.serving]
            demand = self.demand.get(pool)
            hist = self.history.get(pool)
            few = len(serving) <= max(1, s.min_serving)
            if few or demand is None or not hist or pool in waking:
                continue
            if now - hist[0][0] < 0.5 * s.lookback_s:
                continue  # too little seen to know the load is not a lull between bursts
            seen = [d for _, d in hist]
            if max(seen) > s.return_ratio * demand or demand > s.return_ratio * min(seen):
                continue  # not steady: a burst came and went, or the load is rising
            failed = self.failed.get(pool)
            if failed is not None and now - failed[1] < s.lookback_s:
                if demand > s.retry_ratio * failed[0]:
                    continue
            if any(
                n.steer is None
                or n.steer > s.high_ratio
                or not n.power_can_rise
                or n.gpu_power_w is None
                or n.tokens_per_s is None
                or n.gpu_power_w - n.gpu_floor_w > s.floor_ratio * (n.gpu_max_w - n.gpu_floor_w)
                for n in serving
            ):
                continue
            rates = [n.tokens_per_s or 0.0 for n in serving]
            if min(rates) < s.similar_ratio * max(rates):
                continue
            pool_w = self._pool_power(members)
            if pool_w is None or demand <= 0:
                continue
            candidate = min(
                serving,
                key=lambda n: (n.tokens_per_s or 0.0) / max(n.gpu_power_w or 1.0, 1.0),
            )
            self.trial = Trial(candidate.name, pool, now, demand, pool_w / demand)
            return Decision(
                "trial",
                candidate.name,
                f"low load ({demand:.0f} tokens/s in its pool): new requests go to the"
                f" other {len(serving) - 1} nodes for {s.trial_s:.0f} s to see if they"
                " carry it",
            )
        return None
