"""The controller: read the newest samples, plan per-GPU limits, write targets with a lease."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from wattkeeper.policies.clocks import ClockInput, ClockLocks
from wattkeeper.policies.consolidate import Consolidation, PoolNode
from wattkeeper.policies.drain import DrainNode, DrainSettings, decide_tree
from wattkeeper.policies.plan import (
    Domain,
    Plan,
    PlanGpu,
    PlanNode,
    PlanSettings,
    domain_members,
    fresh_gpu_power,
    fresh_node_power,
    plan,
)
from wattkeeper.policies.route import RouteNode, Routes
from wattkeeper.policies.schedule import Schedule, ScheduleError, effective_budget, window_start
from wattkeeper.policies.slo import Ceilings, NodeLatency
from wattkeeper.store.db import StoreError
from wattkeeper.store.repository import (
    FACILITY,
    NotLeaderError,
    RouteRow,
    Snapshot,
    Store,
    TargetSpec,
)

log = logging.getLogger(__name__)


OTHER_SLOWDOWNS = frozenset(
    ("hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown")
)
"""Throttle reasons that lower the clock for something other than the power cap."""


class RouteActuator(Protocol):
    """Something that makes the router obey the published routes: HAProxy's runtime API,
    a JSON file for other routers, the simulated facility's router."""

    def apply(self, routes: Sequence[RouteRow], now: float) -> None: ...


@dataclass
class ControllerState:
    last_plan: Plan | None = None
    last_tick_ts: float | None = None
    targets_changed: int = 0
    no_budget_warned: bool = False
    coupling: float | None = None
    """Learned rise of non-GPU power per watt of GPU power (None until observed)."""
    emergencies: int = 0
    last_drain_ts: float = float("-inf")
    active_schedule: int | None = None
    bad_schedules: set[int] = field(default_factory=set)
    was_drained: set[str] = field(default_factory=set)
    serving_host_w: dict[str, float] = field(default_factory=dict)
    """Each node's non-GPU power when last seen serving: a drained node in standby
    measures far less, and undraining it brings the serving figure back."""
    _last_measure: tuple[tuple[frozenset[str], frozenset[str]], float, float] | None = None
    epoch: int | None = None
    """The leader epoch this controller plans in; None while it stands by (or runs
    without a lease)."""
    said: dict[str, float] = field(default_factory=dict)
    """When each standing warning was last logged."""
    periods: PeriodTimes = field(default_factory=lambda: PeriodTimes())
    """How long the control periods this controller led took, for the exporter."""


PERIOD_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class PeriodTimes:
    """A histogram of whole control periods (snapshot, learn, plan, write), so an SRE
    sees from Prometheus when the leader's period nears its interval, the point where
    the fleet has outgrown it. Buckets as Prometheus expects them: cumulative."""

    counts: list[int] = field(default_factory=lambda: [0] * len(PERIOD_BUCKETS_S))
    total: int = 0
    sum_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.total += 1
        self.sum_s += seconds
        for k, le in enumerate(PERIOD_BUCKETS_S):
            if seconds <= le:
                self.counts[k] += 1


MEMORY_KEY = "learned"
MEMORY_EVERY_S = 30.0
"""How often the leader keeps what it learned in the store."""
MEMORY_KEPT_S = 3600.0
"""Memory older than this is not taken back: the fleet and its load have moved on."""

SAY_EVERY_S = 60.0
"""A standing condition (over budget, a budget under the floors) is logged this often."""

CONTROLLER = "controller"
"""The actor name the controller writes and audits under."""

COUPLING_MAX = 2.0
LEARN_STEP_RATIO = 0.02
"""GPU power must move by this share of the budget before a coupling is read off it."""


@dataclass(frozen=True)
class Leadership:
    """Who this controller is, for the leader lease."""

    name: str
    host: str
    pid: int
    lease_s: float
    token: str = ""

    @property
    def holder(self) -> str:
        return f"{self.name} {self.host} {self.pid} {self.token}"


class Controller:
    def __init__(
        self,
        store: Store,
        settings: PlanSettings,
        lease_s: float,
        forget_after_s: float = 3600.0,
        ceilings: Ceilings | None = None,
        drains: DrainSettings | None = None,
        reaction_s: float = 0.0,
        domains: Sequence[Domain] = (),
        routes: Routes | None = None,
        routers: Sequence[RouteActuator] = (),
        leadership: Leadership | None = None,
        clocks: ClockLocks | None = None,
        consolidation: Consolidation | None = None,
    ) -> None:
        self.store = store
        self.forget_after_s = forget_after_s
        self.settings = settings
        self.lease_s = lease_s
        self.ceilings = ceilings
        """Latency ceilings per node; None when no SLO is configured."""
        self.drains = drains
        """Drain decisions; None: the controller never drains."""
        self.domains = tuple(domains)
        """Budget domains below the facility, with their configured limits (the store's,
        set at run time, take precedence)."""
        self._members = domain_members(self.domains)
        self._schedules: list[Schedule] = []
        self.reaction_s = reaction_s
        """How far ahead a scheduled budget step is applied, so it is met when due."""
        self.routes = routes
        """Routing weights and in-flight limits; None: the controller publishes none
        (they need the latency SLO)."""
        self.routers = list(routers)
        self.clocks = clocks
        """Clock locks that follow the binding caps; None: power limits only (they need
        the latency ceilings)."""
        self.consolidation = consolidation
        """Serving a low load on fewer nodes; None: never (it needs the drains and the
        routes)."""
        if consolidation is not None and (drains is None or routes is None):
            raise ValueError("consolidation needs drains and routes")
        self.leadership = leadership
        """With it, the controller plans only while it holds the leader lease (several
        may run on one store); without it, it always plans (one process on a store)."""
        self.state = ControllerState()
        self._recalled: tuple[int | None] | None = None
        """The epoch whose start read the memory back (a 1-tuple; None: not yet)."""
        self._remembered_at = float("-inf")
        self._last_route_nodes: list[RouteNode] | None = None

    @property
    def leading(self) -> bool:
        return self.leadership is None or self.state.epoch is not None

    def _lead(self, now: float) -> bool:
        """Take or renew the leader lease; whether this controller may plan now."""
        me = self.leadership
        if me is None:
            return True
        epoch = self.store.lead(me.holder, me.name, me.host, me.pid, now, me.lease_s)
        if epoch is None:
            if self.state.epoch is not None:
                log.warning("another controller holds the leader lease: standing by")
            self.state.epoch = None
            return False
        if epoch != self.state.epoch:
            log.info("leading (epoch %d)", epoch)
        self.state.epoch = epoch
        return True

    def resign(self, now: float) -> None:
        self._end_trial(now)
        if self.leadership is not None and self.state.epoch is not None:
            self._remember(now, self.state.epoch)  # the newest, for whoever leads next
            self.store.resign(self.leadership.holder, now)
            self.state.epoch = None

    # -- memory: what was learned outlives this process --------------------------------
    def _remember(self, now: float, epoch: int | None) -> None:
        """Keep what was learned in the store, fenced by the epoch the caller led in.
        Never by a controller that has not read back its predecessor's (it would
        overwrite that with less), nor without an epoch where there is a lease. Best
        effort: a store that fails here costs a warm start, never a plan."""
        if self._recalled != (epoch,) or (self.leadership is not None and epoch is None):
            return
        self._remembered_at = now
        data = {
            "ceilings": self.ceilings.to_memory() if self.ceilings is not None else {},
            "routes": self.routes.to_memory() if self.routes is not None else {},
            "coupling": self.state.coupling,
            "consolidated": (
                self.consolidation.to_memory() if self.consolidation is not None else {}
            ),
        }
        try:
            self.store.remember(MEMORY_KEY, data, now, epoch=epoch)
        except NotLeaderError:
            raise
        except StoreError as exc:
            log.warning("could not keep what the controller learned: %s", exc)

    def _recall(self, now: float) -> None:
        """On taking the lease (or starting alone): take back what the last leader
        kept, in place of anything this process learned before (a standby's own is
        older than what its successor-turned-predecessor wrote)."""
        epoch = self.state.epoch
        kept = self.store.recall(MEMORY_KEY)  # a StoreError leaves it to the next period
        self._recalled = (epoch,)
        if self.clocks is not None:
            # Locks are not kept: this epoch's targets start from its own plan, never from
            # locks this process held when it last led, hours ago perhaps.
            self.clocks.clear()
        if self.consolidation is not None:
            # What this process saw when it last led (a trial, demand, strain) is long
            # over; what it drained comes back from the memory below.
            self.consolidation = Consolidation(self.consolidation.settings)
        if kept is None:
            return
        data, when = kept
        age = now - when
        if not -MEMORY_KEPT_S < age < MEMORY_KEPT_S:
            log.info("controller memory from %.0f s ago: too old to take back", age)
            return
        ceilings = routes = 0
        if self.ceilings is not None and isinstance(data.get("ceilings"), dict):
            self.ceilings.nodes.clear()
            ceilings = self.ceilings.restore(data["ceilings"])
        if self.routes is not None and isinstance(data.get("routes"), dict):
            self.routes.nodes.clear()
            routes = self.routes.restore(data["routes"])
        if self.consolidation is not None and isinstance(data.get("consolidated"), dict):
            self.consolidation.drained.clear()
            self.consolidation.restore(data["consolidated"])
        coupling = data.get("coupling")
        if isinstance(coupling, (int, float)) and 0.0 <= coupling <= COUPLING_MAX:
            self.state.coupling = float(coupling)
        log.info(
            "took back what the controller learned %.0f s ago: %d latency ceilings, "
            "%d routes, coupling %s",
            age,
            ceilings,
            routes,
            "unknown" if self.state.coupling is None else f"{self.state.coupling:.2f}",
        )

    def _snapshot(self, now: float) -> Snapshot:
        return self.store.snapshot(now, window_s=max(60.0, 3 * self.settings.stale_after_s))

    def tick(self, now: float) -> Plan | None:
        """The control period: plan and write targets (only while leading)."""
        started = time.perf_counter()
        if not self._lead(now):
            return None
        epoch = self.state.epoch
        try:
            if self._recalled != (epoch,):
                self._recall(now)
            snap = self._with_schedules(self._snapshot(now), now)
            result = self._plan(now, snap, self._domain_limits(now), periodic=True)
            if now - self._remembered_at >= MEMORY_EVERY_S:
                self._remember(now, epoch)
            return result
        except NotLeaderError as exc:
            log.warning("%s", exc)
            self.state.epoch = None
            return None
        finally:
            self.state.periods.observe(time.perf_counter() - started)

    def _plan(
        self,
        now: float,
        snap: Snapshot,
        domains: list[Domain],
        periodic: bool,
        breached: Sequence[tuple[str, float, float]] = (),
    ) -> Plan | None:
        """Plan on ``snap`` (budgets in force already applied) and write targets. Only the
        periodic tick moves latency ceilings and drains: the emergency re-plan between
        periods reuses them, so their pace stays the period's. ``breached``: the budgets
        measured over (name, watts, limit), from the emergency path."""
        self.state.last_tick_ts = now
        limited = any(d.limit_w is not None for d in domains)
        if snap.budget_w is None and self.ceilings is None and not limited:
            if self.drains is not None and periodic:
                # No budget holds the controller's drains any more: return them.
                nodes, gpus = planning_inputs(snap, self.forget_after_s)
                self._drain(snap, nodes, gpus, None, [], now)
            if not self.state.no_budget_warned:
                log.warning("no facility budget set: nothing to enforce (wattkeeper budget set)")
                self.state.no_budget_warned = True
            return None
        self.state.no_budget_warned = False
        nodes, gpus = planning_inputs(snap, self.forget_after_s)
        if self.ceilings is not None:
            gpus = self._with_ceilings(snap, gpus, now, periodic)
        drains_moved = False
        if self.drains is not None and periodic:
            before = nodes
            nodes = self._drain(snap, nodes, gpus, snap.budget_w, domains, now)
            drains_moved = any(a.drained != b.drained for a, b in zip(before, nodes, strict=True))
        scale = snap.budget_w if snap.budget_w is not None else sum(g.max_w for g in gpus)
        self._learn_coupling(nodes, gpus, scale)
        settings = self.settings
        if self.state.coupling is not None and self.state.coupling > settings.non_gpu_w_per_gpu_w:
            settings = replace(settings, non_gpu_w_per_gpu_w=self.state.coupling)
        result = plan(nodes, gpus, snap.budget_w, settings, domains)
        self.state.last_plan = result
        specs = self._with_clocks(snap, gpus, result, periodic)
        self.state.targets_changed += self.store.write_targets(
            specs, now, self.lease_s, epoch=self.state.epoch
        )
        if periodic and self.routes is not None:
            route_nodes = self._route_nodes(snap, gpus, result)
            if self.consolidation is not None:
                route_nodes = self._consolidate(
                    snap, gpus, result, route_nodes, now, busy=drains_moved
                )
            self._route(route_nodes, now)
        if breached and self.drains is not None:
            self._hurry_drains(snap, nodes, gpus, result, breached, now)
        if not result.feasible:
            self._say("infeasible", result.explanation, now)
        else:
            self.state.said.pop("infeasible", None)
        return result

    def _say(self, key: str, message: str, now: float) -> None:
        """A standing condition is said when it starts and then once a minute, not at
        every period and emergency check (a budget under the floors lasts hours)."""
        last = self.state.said.get(key)
        if last is None or now - last >= SAY_EVERY_S or now < last:
            log.warning("%s", message)
            self.state.said[key] = now
        else:
            log.debug("%s", message)

    def guard(self, now: float) -> Plan | None:
        """The emergency path, run between control periods: when measured facility power
        is over the budget, re-plan at once on the measurement instead of waiting. It
        also renews the leader lease, so a standby can take over within one lease."""
        if not self._lead(now):
            return None
        try:
            return self._guard(now)
        except NotLeaderError as exc:
            log.warning("%s", exc)
            self.state.epoch = None
            return None

    def _guard(self, now: float) -> Plan | None:
        snap = self._with_schedules(self._snapshot(now), now)
        all_domains = self._domain_limits(now)
        domains = [d for d in all_domains if d.limit_w is not None]
        if snap.budget_w is None and not domains:
            return None
        nodes, gpus = planning_inputs(snap, self.forget_after_s)
        node_w: dict[str, float] = {}
        for n in nodes:
            if n.non_gpu_power_w is not None and self.settings.is_fresh(n.sample_age_s):
                node_w[n.name] = n.non_gpu_power_w
        for g in gpus:
            if g.power_w is not None and self.settings.is_fresh(g.sample_age_s):
                node_w[g.node] = node_w.get(g.node, 0.0) + g.power_w
        over = []
        if snap.budget_w is not None and sum(node_w.values()) > snap.budget_w:
            over.append(("facility", sum(node_w.values()), snap.budget_w))
        for d in domains:
            assert d.limit_w is not None
            measured = sum(node_w.get(n, 0.0) for n in self._members[d.name])
            if measured > d.limit_w:
                over.append((d.name, measured, d.limit_w))
        if not over:
            return None
        self.state.emergencies += 1
        for name, measured, limit in over:
            self._say(
                f"over:{name}",
                f"{name} at {measured:.0f} W over its {limit:.0f} W budget: re-planning now",
                now,
            )
        return self._plan(now, snap, all_domains, periodic=False, breached=over)

    def _with_schedules(self, snap: Snapshot, now: float) -> Snapshot:
        """The snapshot with the budget in force: the standing one, or a scheduled window's
        when lower (looking ahead by the reaction time)."""
        self._schedules = [s for s in self.store.schedules() if self._usable_schedule(s, now)]
        schedules = [s for s in self._schedules if s.scope == FACILITY]
        if not schedules:
            return snap
        budget, source = effective_budget(snap.budget_w, schedules, now, self.reaction_s)
        active = None if source is None else source.id
        if active != self.state.active_schedule:
            if source is not None:
                log.warning("budget schedule %d in force: %.0f W", source.id, source.limit_w)
            else:
                log.warning("budget schedule ended: standing budget in force")
            self.state.active_schedule = active
        return replace(snap, budget_w=budget)

    def _usable_schedule(self, schedule: Schedule, now: float) -> bool:
        """A stored schedule that no longer parses (a time zone gone from this host's
        database, a row edited by hand) is skipped and said once, never a reason to stop
        planning."""
        try:
            window_start(schedule, now)
        except ScheduleError as exc:
            if schedule.id not in self.state.bad_schedules:
                self.state.bad_schedules.add(schedule.id)
                log.error("budget schedule %d ignored: %s", schedule.id, exc)
            return False
        self.state.bad_schedules.discard(schedule.id)
        return True

    def _domain_limits(self, now: float) -> list[Domain]:
        """Each domain's budget in force: set at run time, else configured, lowered by
        any of its schedules' windows."""
        if not self.domains:
            return []
        stored = self.store.budgets()
        out = []
        for d in self.domains:
            standing = stored.get(d.name, d.limit_w)
            mine = [s for s in self._schedules if s.scope == d.name]
            limit, _ = effective_budget(standing, mine, now, self.reaction_s)
            out.append(replace(d, limit_w=limit))
        return out

    def _drain(
        self,
        snap: Snapshot,
        nodes: list[PlanNode],
        gpus: list[PlanGpu],
        budget_w: float | None,
        domains: list[Domain],
        now: float,
    ) -> list[PlanNode]:
        """Drain nodes a budget (the facility's or a domain's) cannot serve, or return one
        to service; the plan of this period already holds a newly drained node's GPUs at
        their floor."""
        assert self.drains is not None
        views = {n.name: n for n in snap.nodes}
        consolidated = self.consolidation.drained if self.consolidation is not None else {}
        by_node: dict[str, list[PlanGpu]] = {}
        for g in gpus:
            by_node.setdefault(g.node, []).append(g)
        candidates = []
        for n in nodes:
            members = by_node.get(n.name, [])
            v = views[n.name]
            fresh_host = n.non_gpu_power_w if self.settings.is_fresh(n.sample_age_s) else None
            if not n.drained and fresh_host is not None:
                self.state.serving_host_w[n.name] = fresh_host
            host = self.state.serving_host_w.get(n.name, self.settings.default_node_overhead_w)
            gpu_w = sum(g.power_w or 0.0 for g in members)
            candidates.append(
                DrainNode(
                    name=n.name,
                    drained=n.drained,
                    # A drain of unknown origin (before drains were attributed) is a person's.
                    # Consolidation returns its own drains, when the load needs them.
                    by_person=n.drained and (v.drained_by != CONTROLLER or n.name in consolidated),
                    gpu_floor_w=sum(g.min_w for g in members),
                    gpu_max_w=sum(g.max_w for g in members),
                    host_w=host,
                    tokens_per_s=v.generation_tokens_per_s,
                    power_w=gpu_w + (fresh_host or host),
                )
            )
        keep = 1 - self.settings.margin_ratio
        budgets: list[tuple[str, float, set[str] | None]] = []
        if budget_w is not None:
            budgets.append((FACILITY, budget_w * keep, None))
        for dom in domains:
            if dom.limit_w is not None:
                budgets.append((dom.name, dom.limit_w * keep, self._members[dom.name]))
        changed = {}
        for d in decide_tree(candidates, budgets, now, self.state.last_drain_ts, self.drains):
            if self.store.set_drained(d.name, d.drain, CONTROLLER, now, only_own=True):
                log.warning("%s %s: %s", "draining" if d.drain else "returning", d.name, d.reason)
                self.store.audit(CONTROLLER, "drain.reason", d.name, {"reason": d.reason}, now)
                changed[d.name] = d.drain
                self.state.last_drain_ts = now
        return [replace(n, drained=changed.get(n.name, n.drained)) for n in nodes]

    def _hurry_drains(
        self,
        snap: Snapshot,
        nodes: list[PlanNode],
        gpus: list[PlanGpu],
        result: Plan,
        breached: Sequence[tuple[str, float, float]],
        now: float,
    ) -> None:
        """End the controller's drains under a breached budget now, when capping cannot
        bring it back: its GPUs at their floors plus the non-GPU power, the draining
        nodes' included, exceed it. Letting their requests finish would keep it over
        for a minute or more; budget comes before those requests' SLO. Drains under a
        budget the caps can meet keep their pace."""
        stuck = {name for name, _, _ in breached} & set(result.infeasible_budgets)
        if not stuck:
            return
        under: set[str] = set()
        for name in stuck:
            under |= {n.name for n in nodes} if name == FACILITY else set(self._members[name])
        # A node whose GPUs no longer report has powered down: nothing left to end.
        drawing = {g.node for g in gpus if g.power_w and self.settings.is_fresh(g.sample_age_s)}
        limits = {name: limit for name, _, limit in breached}
        for v in snap.nodes:
            mine = v.drained and v.drained_by == CONTROLLER
            if v.name not in under or not mine or v.drain_now or v.name not in drawing:
                continue
            reason = (
                "over "
                + ", ".join(f"{b} ({limits[b]:.0f} W)" for b in sorted(stuck))
                + " with every serving GPU at its floor: its requests in flight go back to"
                " the router"
            )
            if self.store.drain_now(v.name, CONTROLLER, now, only_own=True, reason=reason):
                log.warning("ending the drain of %s now: %s", v.name, reason)

    def _with_ceilings(
        self, snap: Snapshot, gpus: list[PlanGpu], now: float, periodic: bool
    ) -> list[PlanGpu]:
        """Each GPU's latency ceiling, moved one period's step on its node's servers'
        latency. Nodes without a token source get none: the budget alone decides."""
        assert self.ceilings is not None
        drained = {n.name for n in snap.nodes if n.drained}
        for name in self.state.was_drained - drained:
            # Back in service: its own drain put its GPUs at their floors, which is not
            # where its servers need them. Start from the top and walk down again.
            self.ceilings.reset(name, 1.0, now)
        self.state.was_drained = drained
        views = {n.name: n for n in snap.nodes if n.endpoints_total > 0 and n.name not in drained}
        by_node: dict[str, list[PlanGpu]] = {}
        for g in gpus:
            by_node.setdefault(g.node, []).append(g)
        self.ceilings.forget(set(views))
        out: list[PlanGpu] = []
        for name, members in by_node.items():
            v = views.get(name)
            if v is None:
                out.extend(members)
                continue
            latency = NodeLatency(
                name=name,
                ttft_p90_s=v.ttft_p90_s,
                tpot_p90_s=v.tpot_p90_s,
                ttft_mean_s=v.ttft_mean_s,
                tpot_mean_s=v.tpot_mean_s,
                ttft_p90_floor_s=v.ttft_p90_floor_s,
                tpot_p90_floor_s=v.tpot_p90_floor_s,
                observations=v.latency_requests,
                requests_running=v.requests_running,
                kv_cache_usage_ratio=v.kv_cache_usage_ratio,
                age_s=None if v.token_ts is None else snap.ts - v.token_ts,
            )
            in_force = _in_force_ratio(members)
            if periodic and name != self._on_trial():
                state = self.ceilings.update(latency, in_force, now)
            else:
                state = self.ceilings.current(name, in_force, now)
            # Built field by field: dataclasses.replace costs several times more, and this
            # runs for every GPU of the facility every period.
            out.extend(
                PlanGpu(
                    g.uuid,
                    g.node,
                    g.min_w,
                    g.max_w,
                    g.power_w,
                    g.limit_w,
                    g.target_w,
                    g.sample_age_s,
                    g.power_capped,
                    g.min_w + state.ratio * (g.max_w - g.min_w),
                    state.reason,
                )
                for g in members
            )
        return out

    def _end_trial(self, now: float) -> None:
        """A controller that stops during a consolidation trial gives the node its weight
        back: the routers keep the last weights they were given, and a serving node left
        at 0 would be out of service until a controller runs again. Best effort."""
        cons = self.consolidation
        if cons is None or cons.trial is None or self.routes is None:
            return
        node = cons.trial.node
        cons.trial = None
        if self._last_route_nodes is None:
            return
        try:
            self._route(self._last_route_nodes, now)
            log.info("%s: consolidation trial ended with this controller", node)
        except Exception as exc:  # stopping must not fail on a router or the store
            log.warning("could not give %s its router weight back: %s", node, exc)

    def _on_trial(self) -> str | None:
        """The node a consolidation trial holds off: its ceiling stays where it was, so
        ending the trial gives its requests back to a node still set to serve them (an
        idle node's ceiling would walk down to its floor)."""
        return None if self.consolidation is None else self.consolidation.held_off()

    def _with_clocks(
        self, snap: Snapshot, gpus: list[PlanGpu], result: Plan, periodic: bool
    ) -> list[TargetSpec]:
        """The plan's targets with their clock locks, moved one step each period (the
        emergency re-plan keeps them: a lower cap binds, and the next period follows)."""
        if self.clocks is None:
            return [TargetSpec(t.uuid, t.power_limit_w, reason=t.reason) for t in result.targets]
        why: dict[str, str] = {}
        if periodic:
            views = {g.uuid: g for g in snap.gpus}
            planned = {g.uuid: g for g in gpus}
            inputs = []
            assert self.ceilings is not None  # clocks are built only with them
            for t in result.targets:
                g, v = planned.get(t.uuid), views.get(t.uuid)
                if g is None or v is None:
                    continue
                node = self.ceilings.nodes.get(g.node)
                inputs.append(
                    ClockInput(
                        t.uuid,
                        g.min_w,
                        g.max_w,
                        t.power_limit_w,
                        g.limit_w,
                        v.sm_clock_mhz,
                        g.power_capped,
                        self.settings.is_fresh(g.sample_age_s),
                        g.ceiling_w is not None,
                        g.ceiling_w is not None and t.power_limit_w >= g.ceiling_w - 1.0,
                        bool(OTHER_SLOWDOWNS.intersection(v.throttle_reasons)),
                        node is not None and node.slack,
                        node is not None and node.pressed,
                    )
                )
            why = self.clocks.update(inputs)
        locks = self.clocks.current()
        specs = []
        for t in result.targets:
            lock = locks.get(t.uuid)
            reason = t.reason
            if t.uuid in why:
                reason = f"{reason}; {why[t.uuid]}"
            elif lock is not None:
                reason = f"{reason}; SM clock locked at {lock} MHz"
            specs.append(TargetSpec(t.uuid, t.power_limit_w, sm_clock_max_mhz=lock, reason=reason))
        return specs

    def _route_nodes(self, snap: Snapshot, gpus: list[PlanGpu], result: Plan) -> list[RouteNode]:
        """What the routes (and consolidation) know of each node this period."""
        assert self.routes is not None and self.ceilings is not None
        slo = self.ceilings.slo
        planned = {t.uuid: t.power_limit_w for t in result.targets}
        by_node: dict[str, list[PlanGpu]] = {}
        for g in gpus:
            by_node.setdefault(g.node, []).append(g)
        fresh_s = self.settings.stale_after_s
        routed = set(self.routes.nodes)
        views = {v.name: v for v in snap.nodes}
        nodes = []
        for name in sorted(routed - {n for n, v in views.items() if v.endpoints_total}):
            # Its servers said nothing lately (or the node is gone): no new requests.
            nodes.append(RouteNode(name, False, 0, None, None, None, None, False, None))
        for v in snap.nodes:
            if v.endpoints_total == 0:
                continue
            members = by_node.get(v.name, [])
            age = None if v.token_ts is None else snap.ts - v.token_ts
            fresh = age is not None and age <= self.ceilings.settings.blind_after_s
            alive = any(g.sample_age_s is not None and g.sample_age_s <= fresh_s for g in members)
            enough = (
                fresh and (v.latency_requests or 0.0) >= self.ceilings.settings.min_observations
            )
            ttft = v.ttft_mean_s / slo.ttft_s if enough and v.ttft_mean_s is not None else None
            tpot = v.tpot_mean_s / slo.tpot_s if enough and v.tpot_mean_s is not None else None
            power = [
                g.power_w
                for g in members
                if g.power_w is not None and (g.sample_age_s or 0.0) <= fresh_s
            ]
            nodes.append(
                RouteNode(
                    name=v.name,
                    serving=not v.drained and v.endpoints_up > 0 and fresh and alive,
                    servers=v.endpoints_up,
                    tokens_per_s=v.generation_tokens_per_s if fresh else None,
                    gpu_power_w=sum(power) if power and len(power) == len(members) else None,
                    steer=max((x for x in (ttft, tpot) if x is not None), default=None),
                    tpot_ratio=tpot,
                    power_can_rise=_power_can_rise(members, planned),
                    requests_running=v.requests_running if fresh else None,
                    pool=",".join(v.models),
                )
            )
        return nodes

    def _route(self, nodes: list[RouteNode], now: float) -> None:
        """New weights and in-flight limits from this period's latency and plan, stored
        and handed to every router actuator (which never stop the controller)."""
        assert self.routes is not None
        self._last_route_nodes = nodes
        if self.consolidation is not None and self.consolidation.trial is not None:
            trial = self.consolidation.trial
            said = (
                f"consolidation trial since {trial.started_ts:.0f}: its new requests go to"
                " the rest of its pool"
            )
            nodes = [replace(n, held_off=said) if n.name == trial.node else n for n in nodes]
        self.store.write_routes(self.routes.update(nodes), now, epoch=self.state.epoch)
        if not self.routers:
            return
        rows = self.store.routes()
        for router in self.routers:
            try:
                router.apply(rows, now)
            except Exception as exc:  # a router's fault must not stop control
                log.warning("router %s failed: %s", type(router).__name__, exc)

    def _consolidate(
        self,
        snap: Snapshot,
        gpus: list[PlanGpu],
        result: Plan,
        route_nodes: list[RouteNode],
        now: float,
        busy: bool,
    ) -> list[RouteNode]:
        """Try a pool on one node fewer, drain the node when the rest carry the load, and
        return it when they no longer would (``policies/consolidate.py``). ``busy``: the
        budget's drain rule drained or returned a node this period. Returns the route
        nodes as this period's decisions leave them."""
        assert self.consolidation is not None
        cons = self.consolidation
        assert self.drains is not None
        routed = {n.name: n for n in route_nodes}
        max_w: dict[str, float] = {}
        min_w: dict[str, float] = {}
        held: set[str] = set()
        planned = {t.uuid: t.power_limit_w for t in result.targets}
        for g in gpus:
            max_w[g.node] = max_w.get(g.node, 0.0) + g.max_w
            min_w[g.node] = min_w.get(g.node, 0.0) + g.min_w
            target = planned.get(g.uuid)
            if target is not None and g.ceiling_w is not None and target < g.ceiling_w - 1.0:
                held.add(g.node)  # a budget holds it below its latency ceiling
        power: dict[str, float] = {}
        standby: dict[str, float] = {}
        for v in snap.nodes:
            r = routed.get(v.name)
            host = v.non_gpu_power_w
            if r is not None and r.gpu_power_w is not None and host is not None:
                power[v.name] = r.gpu_power_w + host
            # A drain that does not power the node down leaves its host drawing.
            standby[v.name] = (
                self.drains.drained_node_w
                if self.drains.drained_node_w is not None
                else self.state.serving_host_w.get(v.name, self.settings.default_node_overhead_w)
            )
        pool_nodes = []
        for v in snap.nodes:
            r = routed.get(v.name)
            mine = cons.drained.get(v.name)
            # A powered-down node's servers say nothing: its pool is the one it left.
            pool = mine[0] if mine is not None else (r.pool if r is not None else "")
            if r is None and mine is None:
                continue
            pool_nodes.append(
                PoolNode(
                    name=v.name,
                    pool=pool,
                    serving=r is not None and r.serving,
                    drained=v.drained,
                    held=v.drained and (v.drained_by != CONTROLLER or mine is None),
                    tokens_per_s=r.tokens_per_s if r is not None else None,
                    gpu_power_w=r.gpu_power_w if r is not None else None,
                    gpu_floor_w=min_w.get(v.name, 0.0),
                    gpu_max_w=max_w.get(v.name, 0.0),
                    power_w=power.get(v.name),
                    steer=r.steer if r is not None else None,
                    power_can_rise=r.power_can_rise if r is not None else False,
                    budget_held=v.name in held,
                )
            )
        decided = cons.update(pool_nodes, now, self.state.last_drain_ts, standby, busy=busy)
        drained = {d.node for d in decided if d.kind == "drain"}
        ended = {d.node for d in decided if d.kind == "end"}
        for d in decided:
            if d.kind in ("trial", "end"):
                log.info("%s: %s", d.node, d.reason)
                self.store.audit(
                    CONTROLLER, f"consolidate.{d.kind}", d.node, {"reason": d.reason}, now
                )
                continue
            drain = d.kind == "drain"
            if self.store.set_drained(d.node, drain, CONTROLLER, now, only_own=True):
                log.warning("%s %s: %s", "draining" if drain else "returning", d.node, d.reason)
                self.store.audit(CONTROLLER, "drain.reason", d.node, {"reason": d.reason}, now)
                self.state.last_drain_ts = now
                # Kept at the end of this period, not within 30 s: a controller that
                # restarts must know this drain is consolidation's to return.
                self._remembered_at = float("-inf")
            elif drain:
                cons.drained.pop(d.node, None)  # someone else holds it: not ours to return
        # A node drained now gets no new requests from this period on, and a trial's run
        # down batch says nothing of a node's tokens per joule.
        return [
            replace(n, serving=False)
            if n.name in drained
            else replace(n, tokens_per_s=None)
            if n.name in ended
            else n
            for n in route_nodes
        ]

    def _learn_coupling(self, nodes: list[PlanNode], gpus: list[PlanGpu], budget_w: float) -> None:
        """Read how much non-GPU power (fans, PSU losses) follows GPU power, from how the
        two moved together since the last plan; the configured value is a floor."""
        gpu_w = sum(fresh_gpu_power(gpus, self.settings))
        host = list(fresh_node_power(nodes, self.settings))
        if len(host) != len(nodes) or not gpus:
            return
        host_w = sum(host)
        # Only movements of the same machines teach anything: a node that falls silent,
        # is forgotten or joins changes both sums by a whole host, which is no coupling
        # (read as one, it would hold every other node at its floor).
        fresh = self.settings.is_fresh
        measured = (
            frozenset(n.name for n in nodes),
            frozenset(g.uuid for g in gpus if g.power_w is not None and fresh(g.sample_age_s)),
        )
        last = self.state._last_measure
        self.state._last_measure = (measured, gpu_w, host_w)
        if last is None or last[0] != measured:
            return
        d_gpu, d_host = gpu_w - last[1], host_w - last[2]
        if abs(d_gpu) < LEARN_STEP_RATIO * budget_w:
            return
        observed = min(max(d_host / d_gpu, 0.0), COUPLING_MAX)
        prior = self.state.coupling if self.state.coupling is not None else observed
        self.state.coupling = 0.5 * prior + 0.5 * observed


def _power_can_rise(members: list[PlanGpu], planned: dict[str, float]) -> bool:
    """Whether the latency ceiling may still give the node's GPUs more power: some GPU's
    limit is its ceiling (no budget holds it lower) and that is below its maximum."""
    for g in members:
        target = planned.get(g.uuid)
        if target is None or g.ceiling_w is None or g.ceiling_w >= g.max_w - 1.0:
            continue
        if target >= g.ceiling_w - 1.0:
            return True
    return False


def _in_force_ratio(gpus: list[PlanGpu]) -> float:
    """Where a node's limits are (target, else limit, else maximum), as the mean share of
    each GPU's range from floor to maximum."""
    shares = []
    for g in gpus:
        limit = g.target_w if g.target_w is not None else g.limit_w
        span = g.max_w - g.min_w
        shares.append(1.0 if limit is None or span <= 0 else (limit - g.min_w) / span)
    return min(1.0, max(0.0, sum(shares) / len(shares)))


def planning_inputs(
    snap: Snapshot, forget_after_s: float = float("inf")
) -> tuple[list[PlanNode], list[PlanGpu]]:
    """Planner inputs from a snapshot; nodes silent for ``forget_after_s`` no longer count.

    A node that stopped reporting a moment ago still holds its cap and its power is
    assumed; one silent for longer than ``forget_after_s`` is taken as gone
    (decommissioned, or a simulation that ended) so it stops holding budget forever.
    """
    now = snap.ts
    live = [n for n in snap.nodes if now - n.last_seen_at <= forget_after_s]
    names = {n.name for n in live}
    nodes = [
        PlanNode(
            n.name,
            n.non_gpu_power_w,
            None if n.host_ts is None else now - n.host_ts,
            drained=n.drained,
            standby=n.standby,
        )
        for n in live
    ]
    gpus = [
        PlanGpu(
            uuid=g.uuid,
            node=g.node,
            min_w=g.power_min_w,
            max_w=g.power_max_w,
            power_w=g.power_w,
            limit_w=g.power_limit_w,
            target_w=g.target_power_limit_w,
            sample_age_s=None if g.sample_ts is None else now - g.sample_ts,
            power_capped="sw_power_cap" in g.throttle_reasons,
        )
        for g in snap.gpus
        if g.node in names
    ]
    return nodes, gpus
