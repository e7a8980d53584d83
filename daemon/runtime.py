"""Wiring: one process with agents and controller, on a real or a simulated clock.

``--fast`` and real time build the very same Runtime; only the driver differs: a loop
that sets a simulated clock, or APScheduler on the wall clock.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wattkeeper.agent import SHUTDOWN_STORE_S, Agent, TokenEndpoint, holder_gone
from wattkeeper.bounded import Hung, SingleFlight, call_within
from wattkeeper.clock import SimClock, WallClock
from wattkeeper.collectors.drain import CommandDrain, DrainActuator
from wattkeeper.config import Config
from wattkeeper.controller import Controller, Leadership, RouteActuator
from wattkeeper.paths import node_state_file
from wattkeeper.policies.clocks import ClockLocks
from wattkeeper.policies.consolidate import ConsolidateSettings, Consolidation
from wattkeeper.policies.drain import DrainSettings
from wattkeeper.policies.plan import Domain, PlanSettings
from wattkeeper.policies.route import Routes, RouteSettings
from wattkeeper.policies.slo import Ceilings, Slo, SloSettings
from wattkeeper.store.db import (
    SchemaOutdatedError,
    StoreError,
    check_schema,
    create_if_empty,
    describe_url,
    head_revision,
    make_engine,
)
from wattkeeper.store.repository import CLAIM_LIVE_S, Store

log = logging.getLogger(__name__)

RETAIN_EVERY_S = 60.0


class SetupError(Exception):
    """The run cannot start (no GPUs, bad option); the message says what to do instead."""


@dataclass
class Runtime:
    cfg: Config
    store: Store
    clock: SimClock | WallClock
    agents: list[Agent]
    controller: Controller | None
    """None in `wattkeeper agent`: the controller runs elsewhere."""
    facility: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    controller_calls: threading.Lock | None = None
    """Held by the real-time driver's controller calls; shutdown takes it before ending
    the leader lease, so a period still in flight cannot renew it afterwards."""
    retain_in_tick: bool = True
    """Retention runs after the controller's tick on a simulated clock; in real time it
    has a job of its own, so a long rollup never delays a plan."""
    _last_retain: float = float("-inf")
    _next_period: float = float("-inf")

    def tick_agents(self) -> bool:
        """Tick every local agent; one failing agent never stops the others."""
        ok = True
        with self.lock:
            now = self.clock.now()
            for agent in self.agents:
                try:
                    agent.tick(now)
                except Exception:
                    ok = False
                    log.exception("agent %s: tick failed", agent.node)
        return ok

    def step(self, controller_due: bool) -> None:
        """One agent interval on a simulated clock: agents, then the controller's period
        or, between periods, its emergency check."""
        self.tick_agents()
        if self.controller is None:
            return
        if controller_due:
            self.tick_controller()
        else:
            self.controller.guard(self.clock.now())

    def advance(self, t: float) -> None:
        """One agent interval of a simulated run, ending at ``t``: the clock and the
        facility move to ``t``, then ``step``, with the controller's period due every
        ``controller.interval_s`` from the first call. The one driver of every run on a
        simulated clock (``run --fast``, the comparison, the tests), so they cannot
        differ in when the controller plans."""
        assert isinstance(self.clock, SimClock), "advance drives a simulated clock only"
        self.clock.set(t)
        if self.facility is not None:
            self.facility.advance_to(t)
        due = t >= self._next_period - 1e-9
        if due:
            # On the period's own grid (an agent interval that does not divide it must
            # not stretch it), from the first call or after a gap.
            c = self.cfg.controller.interval_s
            nxt = self._next_period + c
            self._next_period = nxt if t < nxt <= t + c else t + c
        self.step(due)

    def tick_controller(self) -> None:
        if self.controller is None:
            return
        now = self.clock.now()
        if not self.store.schema_checked:
            check_schema(self.store.engine, migrate=self.cfg.store.migrate_on_start)
            self.store.schema_checked = True
            log.warning("store reachable: schema at head, planning")
        self.controller.tick(now)
        if self.retain_in_tick and now - self._last_retain >= RETAIN_EVERY_S:
            self._last_retain = now
            self.retain(now)

    def retain(self, now: float) -> None:
        """Roll old samples up and drop what has aged out: the leading controller's job
        (one per store, so standbys never race it for the same minutes)."""
        controller = self.controller
        if controller is None or not controller.leading:
            return
        kept = self.cfg.retention
        done = self.store.retain(now, kept.raw_s, kept.rollup_s)
        if done.minutes or done.rollup_rows:
            log.info(
                "retention: %d minute(s) of samples rolled up (%d raw rows), %d old rollup "
                "rows dropped%s",
                done.minutes,
                done.raw_rows,
                done.rollup_rows,
                "" if done.caught_up else "; a backlog is left for the next minute",
            )

    def shutdown(self) -> None:
        """Restore every agent's GPUs first, then record it and end a leading
        controller's lease (so a standby takes over at once); an error in one agent never
        skips the next, and a store that does not answer costs the records, never the
        restore or the exit."""
        with self.lock:
            now = self.clock.now()
            records = []
            for agent in self.agents:
                try:
                    records.append((agent, agent.restore_gpus(now)))
                except Exception:
                    log.exception("agent %s: shutdown failed", agent.node)
                finally:
                    agent.backend.close()
            # One wait for all of them: a frozen store must not hold a process of many
            # agents past systemd's stop timeout (what is not recorded is on disk).
            deadline = time.monotonic() + SHUTDOWN_STORE_S
            for agent, record in records:
                try:
                    agent.record_stop(record, max(0.1, deadline - time.monotonic()))
                except Exception:
                    log.exception("agent %s: recording its stop failed", agent.node)
        controller = self.controller
        if controller is not None:
            calls = self.controller_calls
            # After the GPUs: a period still in flight would renew the lease after it
            # ends; wait for it, never for long (the store may be frozen).
            held = calls.acquire(timeout=SHUTDOWN_STORE_S) if calls is not None else False
            try:
                call_within(lambda: controller.resign(now), SHUTDOWN_STORE_S, "resign")
            except (StoreError, Hung) as exc:
                log.warning("could not end the leader lease: %s", exc)
            finally:
                if held and calls is not None:
                    calls.release()
        self.store.engine.dispose()


def claim_store(rt: Runtime, remove_leftovers: bool = True) -> None:
    """Keep simulated and real nodes out of each other's store.

    A simulated run on a store that real nodes report to would set their budget and
    targets, so it is refused. Simulated nodes left in a store by an earlier run (of
    another shape, or before real agents took over) are removed: they are not hardware,
    and until forgotten they would hold budget.
    """
    backends = rt.store.node_backends()
    mine = {a.node for a in rt.agents}
    simulated = rt.facility is not None
    if simulated:
        real = sorted(n for n, b in backends.items() if b != "sim")
        if real:
            where = describe_url(str(rt.store.engine.url))
            raise SetupError(
                f"the database {where} holds real nodes ({', '.join(real[:5])}): a simulated"
                " run would change their budget; give the simulation its own database,"
                " e.g. --db sqlite:///./simulation.db"
            )
    now = rt.clock.now()
    claims = rt.store.node_claims()

    def live(name: str) -> bool:
        holder, seen = claims.get(name, (None, 0.0))
        return holder is not None and abs(now - seen) < CLAIM_LIVE_S

    for agent in rt.agents:
        holder = claims.get(agent.node, (None, 0.0))[0]
        if live(agent.node) and holder != agent.agent_id and not holder_gone(holder or ""):
            raise SetupError(
                f"node {agent.node!r} is held by another live agent ({holder}): stop that"
                " one, or give this one its own name (--node or agent.node)"
            )
    if not remove_leftovers:
        # One agent among many (wattkeeper agent): the other nodes are not its business.
        return
    leftovers = [n for n, b in backends.items() if b == "sim" and n not in mine]
    busy = [n for n in leftovers if live(n)]
    if busy:
        raise SetupError(
            f"another simulated run is using this store ({busy[0]!r} wrote"
            f" {abs(now - claims[busy[0]][1]):.0f} s ago): give this one its own database,"
            " e.g. --db sqlite:///./simulation-2.db"
        )
    if leftovers:
        log.warning("removing %d simulated node(s) left by an earlier run", len(leftovers))
        rt.store.remove_nodes(leftovers, "wattkeeper run", rt.clock.now())


def open_store(
    cfg: Config,
    url: str | None = None,
    *,
    create: bool = False,
    announce: Callable[[str], None] | None = None,
    outage_ok: str | None = None,
) -> Store:
    """Engine for the configured store, refusing a schema that is not at head.

    ``create`` (the daemon's first start) builds a missing or empty SQLite store at head
    and tells ``announce`` so in one line; without it nothing is ever created.

    ``outage_ok`` (a daemon on a database server; what it does meanwhile, for the one
    line it says): a server that does not answer is an outage, not a mistake. The store
    is returned unchecked, agents start on the safe cap, and the schema is checked once
    the server answers. A bad URL, an unknown driver, a missing database or a refused
    login still fail here, before anything is touched.
    """
    # Only a daemon's first start may create a file; every other command needs the store
    # to be there already, and must not leave an empty file where a path was mistyped.
    engine = make_engine(url or cfg.store.resolved_url(), must_exist=not create)
    try:
        if create and create_if_empty(engine):
            if announce is not None:
                where = engine.url.database or describe_url(str(engine.url))
                announce(f"created a new store at {where} (schema {head_revision()})")
        check_schema(engine, migrate=cfg.store.migrate_on_start)
    except SchemaOutdatedError:
        raise
    except StoreError as exc:
        if not outage_ok or not exc.outage:
            raise
        if announce is not None:
            announce(f"{exc}; an outage, so {outage_ok}")
        return Store(engine, schema_checked=False)
    return Store(engine)


def plan_settings(cfg: Config) -> PlanSettings:
    host = cfg.agent.host
    return PlanSettings(
        margin_ratio=cfg.controller.margin_ratio,
        stale_after_s=cfg.controller.stale_after_s,
        default_node_overhead_w=host.idle_w + host.per_cpu_util_w,
        non_gpu_w_per_gpu_w=cfg.controller.non_gpu_w_per_gpu_w,
        drained_node_w=cfg.controller.drained_node_w,
        oversubscribe=cfg.controller.oversubscribe,
    )


def build_simulated(cfg: Config, store: Store, spec: Any, clock: SimClock | WallClock) -> Runtime:
    """Agents (one per node) and a controller on a new simulated facility.

    ``spec`` is a ``FacilitySpec`` (``--simulate 4x8``), a ``Scenario``, or a scenario
    name or file path.
    """
    from wattkeeper.simulator.facility import FacilitySpec, SimFacility
    from wattkeeper.simulator.scenario import Scenario, load_scenario

    if isinstance(spec, FacilitySpec):
        facility = SimFacility.simple(spec, start_ts=clock.now())
    elif isinstance(spec, Scenario):
        facility = SimFacility(spec, start_ts=clock.now())
    else:
        facility = SimFacility(load_scenario(spec), start_ts=clock.now())
    return build_on_facility(cfg, store, facility, clock)


def build_on_facility(
    cfg: Config,
    store: Store,
    facility: Any,
    clock: SimClock | WallClock,
    names: Sequence[str] | None = None,
    with_controller: bool = True,
) -> Runtime:
    """Agents and a controller on an existing simulated facility (the comparison harness
    owns the facility and steps it). Each node's token endpoint speaks the server format
    its scenario names (vLLM or SGLang) and is parsed as that kind; pages are read every
    ``agent.tokens_interval_s``, as on a real node."""
    from wattkeeper.collectors.sim_gpu import SimGpuBackend
    from wattkeeper.simulator.server import make_server
    from wattkeeper.simulator.sim_drain import SimDrain
    from wattkeeper.simulator.sim_host import SimHost
    from wattkeeper.simulator.sim_router import SimRouter

    agents = []
    for node in range(facility.n_nodes):
        server = make_server(facility, node, clock.now)
        agents.append(
            make_agent(
                cfg,
                store,
                names[node] if names is not None else f"sim-node-{node}",
                SimGpuBackend(facility, node, clock.now),
                SimHost(facility, node),
                [TokenEndpoint(server.url, server.kind, server.render)],
                drain=SimDrain(facility, node),
                wall_clock=isinstance(clock, WallClock),
            )
        )
    controller = None
    if with_controller:
        if cfg.router.file is not None or cfg.router.haproxy:
            log.warning(
                "a simulated run publishes its routes to the simulated router and /routes"
                " only, not to router.file or router.haproxy (they route real traffic)"
            )
        router = SimRouter(facility, [a.node for a in agents])
        controller = make_controller(cfg, store, routers=[router], configured_routers=False)
    return Runtime(cfg, store, clock, agents, controller, facility=facility)


def make_agent(
    cfg: Config,
    store: Store,
    node: str,
    backend: Any,
    host: Any,
    endpoints: list[TokenEndpoint],
    drain: DrainActuator | None = None,
    wall_clock: bool = True,
) -> Agent:
    """One agent with the configured agent settings, whatever its backend. On the wall
    clock its store calls run on a thread of their own; on a simulated clock inline, so
    a run stays deterministic."""
    simulated = getattr(backend, "name", "") == "sim"
    return Agent(
        node,
        backend,
        store,
        host=host,
        endpoints=endpoints,
        fallback_power_limit_ratio=cfg.agent.fallback_power_limit_ratio,
        restore_on_exit=cfg.agent.restore_on_exit,
        tokens_interval_s=cfg.agent.tokens_interval_s,
        drain=drain,
        store_timeout_s=cfg.agent.store_timeout_s if wall_clock else None,
        spool_ticks=cfg.agent.spool_ticks,
        write_interval_s=cfg.agent.write_interval_s or 0.0,
        monotonic=time.monotonic if wall_clock else None,
        originals_path=None if simulated else node_state_file("originals", node, ".json"),
        spool_path=None if simulated else node_state_file("spool", node, ".jsonl"),
    )


def config_routers(cfg: Config) -> list[RouteActuator]:
    """The route actuators the configuration names: HAProxys and a JSON file."""
    from wattkeeper.routers import FileRouter, HaproxyRouter

    r = cfg.router
    out: list[RouteActuator] = [
        HaproxyRouter(h.socket, h.backend, h.servers, h.timeout_s, h.resync_s, h.maxconn)
        for h in r.haproxy
    ]
    if r.file is not None:
        out.append(FileRouter(r.file, route_servers(cfg)))
    return out


def route_servers(cfg: Config) -> dict[str, list[str]]:
    """Each node's server names as the configured HAProxys know them (first one wins)."""
    servers: dict[str, list[str]] = {}
    for h in cfg.router.haproxy:
        for node, names in h.servers.items():
            servers.setdefault(node, list(names))
    return servers


def make_controller(
    cfg: Config,
    store: Store,
    routers: Sequence[RouteActuator] = (),
    configured_routers: bool = True,
) -> Controller:
    """The controller with the configured settings. ``configured_routers`` off (a
    simulated facility): its routes go to ``routers`` only, never to the HAProxy or
    file the configuration names, which route real traffic."""
    ceilings = None
    if cfg.slo.ttft_s is not None and cfg.slo.tpot_s is not None:
        ceilings = Ceilings(
            Slo(cfg.slo.ttft_s, cfg.slo.tpot_s), SloSettings(target_ratio=cfg.slo.target_ratio)
        )
    drains = None
    if cfg.controller.drain_nodes:
        drains = DrainSettings(drained_node_w=cfg.controller.drained_node_w)
    consolidation = None
    if cfg.controller.consolidate:
        if routers or (configured_routers and (cfg.router.haproxy or cfg.router.file)):
            consolidation = Consolidation(
                ConsolidateSettings(min_serving=cfg.controller.consolidate_min_nodes)
            )
        else:
            log.warning(
                "controller.consolidate is on but no router takes the controller's weights"
                " (router.haproxy or router.file): a node cannot be tried out of service,"
                " so nothing is consolidated"
            )
    return Controller(
        store,
        plan_settings(cfg),
        cfg.controller.lease_s,
        cfg.controller.forget_after_s,
        ceilings=ceilings,
        drains=drains,
        reaction_s=cfg.controller.interval_s + cfg.agent.interval_s,
        domains=config_domains(cfg),
        routes=None if ceilings is None else Routes(route_settings(cfg)),
        clocks=ClockLocks() if ceilings is not None and cfg.controller.clock_locks else None,
        consolidation=consolidation,
        routers=[*routers, *(config_routers(cfg) if configured_routers else [])],
        leadership=Leadership(
            cfg.controller.name,
            socket.gethostname(),
            os.getpid(),
            cfg.controller.leader_lease_s,
            secrets.token_hex(3),
        ),
    )


def route_settings(cfg: Config) -> RouteSettings:
    r = cfg.router
    return RouteSettings(
        weights=r.weights,
        inflight_limits=r.inflight_limits,
        target_ratio=cfg.slo.target_ratio,
    )


def config_domains(cfg: Config) -> list[Domain]:
    """The configured budget domains, with their configured limits."""
    return [Domain(d.name, d.parent, d.limit, tuple(d.nodes)) for d in cfg.budget.domains]


def build_local(cfg: Config, store: Store, with_controller: bool = True) -> Runtime:
    """The real node: NVML GPUs, the psutil host collector, configured token endpoints."""
    from wattkeeper.collectors.gpu import BackendUnavailableError
    from wattkeeper.collectors.host import HostCollector, HostPowerModel
    from wattkeeper.collectors.nvml import NvmlBackend
    from wattkeeper.collectors.tokens import fetch_page

    try:
        backend = NvmlBackend()
    except BackendUnavailableError as exc:
        raise SetupError(str(exc)) from None
    host_cfg = cfg.agent.host
    host = HostCollector(
        HostPowerModel(host_cfg.idle_w, host_cfg.per_cpu_util_w), use_rapl=host_cfg.use_rapl
    )

    def reader(url: str, timeout_s: float) -> Callable[[], str]:
        return lambda: fetch_page(url, timeout_s=timeout_s)

    endpoints = [
        TokenEndpoint(e.url, e.kind, reader(e.url, e.timeout_s)) for e in cfg.agent.endpoints
    ]
    drain = None
    if cfg.agent.drain_command is not None and cfg.agent.resume_command is not None:
        drain = CommandDrain(
            cfg.agent.node,
            cfg.agent.drain_command,
            cfg.agent.resume_command,
            powers_down=cfg.agent.drain_powers_down,
            drain_now=cfg.agent.drain_now_command,
        )
    agent = make_agent(cfg, store, cfg.agent.node, backend, host, endpoints, drain)
    controller = make_controller(cfg, store) if with_controller else None
    return Runtime(cfg, store, WallClock(), [agent], controller)


def run_fast(
    rt: Runtime, duration_s: float, progress: Callable[[float], None] | None = None
) -> dict:
    """Drive agents and controller on the simulated clock; return the ground-truth summary."""
    start = rt.clock.now()
    a = rt.cfg.agent.interval_s
    steps = round(duration_s / a)
    for k in range(steps + 1):
        rt.advance(start + k * a)
        if progress is not None:
            progress((k * a) / duration_s)
    return summarize(rt, duration_s)


def summarize(rt: Runtime, duration_s: float) -> dict:
    """Ground truth of a simulated run, as a versioned JSON contract (add keys, never rename).

    Seconds over budget are counted against the store's budget when one is set (the CLI's
    ``--budget``), otherwise against the scenario's budget in force each second.
    """
    f = rt.facility
    budget = rt.store.get_budget()
    budget_w = budget.limit_w if budget else None
    settle_s = round(rt.cfg.controller.interval_s)
    seconds = f.stats.second_power_w
    if budget_w is not None:
        budgets: list[float | None] = [budget_w] * len(seconds)
    else:
        budgets = list(f.stats.second_budget_w)
    after = seconds[settle_s:]
    max_w = max(after) if after else None

    def over(lo: int, hi: int) -> int:
        return sum(
            1
            for p, b in zip(seconds[lo:hi], budgets[lo:hi], strict=True)
            if b is not None and p > b
        )

    energy = f.stats.energy_j
    tokens = f.stats.generated_tokens
    elapsed = len(seconds)
    scenario = f.scenario
    kinds = sorted(set(f.gpu_kind_names))
    models = sorted(set(f.replica_model))
    return {
        "format_version": 1,
        "budget_w": budget_w,
        "duration_s": float(duration_s),
        "settle_s": float(settle_s),
        "max_power_w": round(max_w, 1) if max_w is not None else None,
        "mean_power_w": round(energy / elapsed, 1) if elapsed else None,
        "over_budget_s": over(settle_s, elapsed),
        "over_budget_s_during_settle": over(0, settle_s),
        "tokens": int(tokens),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
        "energy_j": round(energy, 1),
        "tokens_per_joule": round(tokens / energy, 4) if energy else None,
        "nodes": f.n_nodes,
        "gpus": f.n_gpus,
        "gpu_kind": ",".join(kinds),
        "model": ",".join(models),
        "seed": scenario.seed,
        "clock": "simulated",
        "scenario": scenario.name,
        # The fluid workload counts requests as a continuous quantity: whole requests here.
        "requests_finished": round(f.stats.requests_finished),
        "requests_within_slo": round(min(f.stats.requests_within_slo, f.stats.requests_finished)),
    }


def run_realtime(
    rt: Runtime,
    duration_s: float | None,
    on_refresh: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """APScheduler drives the same ticks on the wall clock until ``duration_s`` or ``stop``."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.background import BackgroundScheduler

    from wattkeeper.sdnotify import notify

    stop = stop or threading.Event()
    # Set by each agents' tick that sampled and reconciled; the watchdog is pinged only
    # after one. A process without agents (`wattkeeper controller`) counts as ticking.
    healthy = threading.Event()
    # When the controller's job last ran to its end, whatever the store said: a
    # controller waiting out a database outage is healthy, a wedged scheduler is not.
    planned = [time.monotonic()]

    # Three jobs on three threads: the agents' loop never waits on the controller or its
    # store calls, so a hung database leaves sampling, caps and the watchdog running.
    # The controller's calls run on daemon threads of their own, and its jobs wait for
    # them only so long: a frozen database holds no scheduler thread, and stopping never
    # waits for it. The emergency check and the control period fall due at the same
    # instants: each has its own flight, so neither takes the other's result for its
    # own (the period was lost whenever the check got there first), and one lock keeps
    # them from working on the controller's state at once.
    guard_flight = SingleFlight("emergency check")
    tick_flight = SingleFlight("controller")
    controller_calls = threading.Lock()
    rt.controller_calls = controller_calls

    def serial(fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            with controller_calls:
                return fn()

        return call

    controller_down: list[str] = []

    def down(exc: Exception) -> None:
        # One line when the store goes away and one when it is back, not a traceback
        # every period: the agents keep enforcing the leased targets.
        if not controller_down:
            log.error("controller: %s (caps held by the agents' leases)", exc)
            controller_down.append(str(exc))

    def agents_job() -> None:
        if rt.tick_agents():
            healthy.set()

    def alive() -> bool:
        """Whether to ping the watchdog. Where there are agents, their loop decides: it
        holds the caps, and it goes on while the store hangs (a restart would cost the
        GPUs their restore). A controller alone is alive while its periods finish, with
        or without the store; one stuck in a call that never returns is restarted."""
        if rt.agents:
            return healthy.is_set()
        if rt.controller is None:
            return True
        return time.monotonic() - planned[0] <= 2 * rt.cfg.controller.interval_s + 5.0

    def guard_job() -> None:
        controller = rt.controller
        if controller is None:
            return
        try:
            guard_flight.call(
                serial(lambda: controller.guard(rt.clock.now())), rt.cfg.agent.interval_s
            )
        except (StoreError, Hung):
            pass  # the controller job reports the store; the agents hold the caps
        except Exception:
            log.exception("emergency check failed")

    def controller_job() -> None:
        try:
            tick_flight.call(serial(rt.tick_controller), rt.cfg.controller.interval_s)
        except Hung as exc:
            down(exc)  # not finished: the watchdog hears nothing of it
            return
        except StoreError as exc:
            planned[0] = time.monotonic()  # finished: the store answered, with an error
            down(exc)
            return
        except Exception:
            planned[0] = time.monotonic()
            log.exception("controller tick failed")
            return
        planned[0] = time.monotonic()
        if controller_down:
            log.warning("controller: store reachable again")
            controller_down.clear()

    retention = SingleFlight("retention")

    def retention_job() -> None:
        # On its own flight: a long rollup or a frozen database holds neither a scheduler
        # thread (the wait is short, the work goes on) nor the controller's calls.
        try:
            retention.call(lambda: rt.retain(rt.clock.now()), 1.0)
        except Hung:
            pass
        except StoreError as exc:
            log.debug("retention: %s", exc)
        except Exception:
            log.exception("retention failed")

    rt.retain_in_tick = False
    sched = BackgroundScheduler(
        timezone="UTC",
        executors={"default": ThreadPoolExecutor(4)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 5},
    )
    sched.add_job(agents_job, "interval", seconds=rt.cfg.agent.interval_s, id="agents")
    sched.add_job(guard_job, "interval", seconds=rt.cfg.agent.interval_s, id="guard")
    sched.add_job(controller_job, "interval", seconds=rt.cfg.controller.interval_s, id="controller")
    if rt.controller is not None:
        sched.add_job(retention_job, "interval", seconds=RETAIN_EVERY_S, id="retention")
    agents_job()
    controller_job()
    sched.start()
    notify("READY=1")
    started = time.monotonic()
    try:
        while not stop.is_set():
            if duration_s is not None and time.monotonic() - started >= duration_s:
                break
            if alive():
                notify("WATCHDOG=1")
                healthy.clear()
            if on_refresh is not None:
                on_refresh()
            stop.wait(1.0)
    finally:
        notify("STOPPING=1")
        sched.shutdown(wait=True)
