"""Reads and writes that agent, controller and CLI share, so each query exists once.

Every method opens its own short transaction: the store is the bus between processes,
and a long-held transaction would block the other side (SQLite has one writer).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Engine,
    FromClause,
    Integer,
    Select,
    Table,
    and_,
    any_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from wattkeeper.collectors.gpu import GpuInfo, GpuSample
from wattkeeper.policies.route import RouteTarget
from wattkeeper.policies.schedule import Schedule
from wattkeeper.store.db import StoreError, engine_name, error_line, insert_rows
from wattkeeper.store.models import (
    AuditEntry,
    Budget,
    BudgetSchedule,
    ControllerMemory,
    Gpu,
    GpuRollupRow,
    GpuSampleRow,
    HostRollupRow,
    HostSampleRow,
    Leader,
    Node,
    Route,
    Target,
    TokenRollupRow,
    TokenSampleRow,
)
from wattkeeper.store.retention import Retained, roll_up

FACILITY = "facility"
AUDIT_KEPT_S = 30 * 86400.0
"""The audit log outlives the samples: who changed a budget is asked months later."""


def _why(detail: dict, reason: str | None) -> dict:
    """An audit row's detail with the person's reason, when they gave one."""
    return {**detail, "reason": reason} if reason else detail


class NodeClaimedError(StoreError):
    """Another live agent holds this node's name."""


class NodeGoneError(StoreError):
    """The node is not in the store (never registered, or removed since): its agent
    registers it again."""


class NotLeaderError(StoreError):
    """This controller no longer holds the leader lease: another one took over."""


@dataclass(frozen=True)
class LeaderRow:
    holder: str
    name: str
    host: str
    pid: int
    epoch: int
    acquired_at: float
    expires_at: float


LIMIT_TOLERANCE_W = 1.0
"""Power limits closer than this are the same limit: not re-applied, not re-audited."""
CLAIM_LIVE_S = 30.0
"""A node name's holder that wrote this recently is live: another agent may not take it."""
REASON_REFRESH_S = 60.0
"""An unchanged route's stored reason is brought up to date at most this often."""
WEIGHT_TOLERANCE = 8
"""Routing weights (0-256) closer than this are the same weight: a smoothed efficiency
moves a little every period, and the router need not hear of it."""


@dataclass(frozen=True)
class TokenRow:
    """One endpoint/model reading as the agent stores it."""

    endpoint: str
    model: str
    up: bool
    prompt_tokens_total: float | None = None
    generation_tokens_total: float | None = None
    generation_tokens_per_s: float | None = None
    requests_running: float | None = None
    requests_waiting: float | None = None
    kv_cache_usage_ratio: float | None = None
    ttft_p90_s: float | None = None
    tpot_p90_s: float | None = None
    ttft_mean_s: float | None = None
    tpot_mean_s: float | None = None
    ttft_p90_floor_s: float | None = None
    tpot_p90_floor_s: float | None = None
    latency_requests: float | None = None
    error: str | None = None
    series: str = ""
    """The labels that tell apart series of one model on one endpoint (a vLLM engine, a
    Triton version), so each is a row of its own."""


@dataclass(frozen=True)
class NodeTick:
    """One agent tick of a node: what the agent read at ``ts``, as the store keeps it.
    The agent spools these while the store is away and hands them over as they are."""

    ts: float
    samples: tuple[GpuSample, ...]
    host: tuple[float | None, float | None, str | None] | None = None
    """(CPU utilisation, non-GPU power in W, where that power came from)."""
    tokens: tuple[TokenRow, ...] = ()


@dataclass(frozen=True)
class LeasedTarget:
    """A GPU's target as its agent reads it."""

    power_limit_w: float | None
    lease_expires_at: float
    reason: str | None
    epoch: int | None
    issued_at: float
    sm_clock_max_mhz: int | None = None
    """The highest SM clock the GPU may run at (None: no clock lock)."""


class NodeOrders(NamedTuple):
    """What an agent reads every tick (``Store.orders_for_node``)."""

    targets: dict[str, LeasedTarget]
    drained: bool
    drain_now: bool
    """Drained, and the requests in flight may not finish there (``Store.drain_now``)."""


@dataclass(frozen=True)
class TargetSpec:
    """Desired state of one GPU, as the controller writes it."""

    uuid: str
    power_limit_w: float | None
    sm_clock_min_mhz: int | None = None
    sm_clock_max_mhz: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class RouteRow:
    """One node's published route."""

    node: str
    weight: int
    max_inflight: int | None
    updated_at: float
    reason: str


@dataclass(frozen=True)
class GpuView:
    """One GPU with its newest sample and current target, for the controller and status."""

    uuid: str
    node: str
    index: int
    name: str
    power_min_w: float
    power_max_w: float
    power_default_w: float
    sample_ts: float | None
    power_w: float | None
    energy_j: float | None
    sm_clock_mhz: float | None
    utilization_gpu_ratio: float | None
    power_limit_w: float | None
    throttle_reasons: tuple[str, ...]
    target_power_limit_w: float | None
    target_lease_expires_at: float | None


@dataclass(frozen=True)
class NodeView:
    name: str
    drained: bool
    last_seen_at: float
    host_ts: float | None
    non_gpu_power_w: float | None
    power_source: str | None
    generation_tokens_per_s: float | None
    generation_tokens_total: float | None
    endpoints_up: int
    endpoints_total: int
    drained_by: str | None = None
    standby: bool = False
    drain_now: bool = False
    """The drain was asked to end at once (``Store.drain_now``)."""
    token_ts: float | None = None
    """When the node's servers were last read (None: no token source)."""
    requests_waiting: float | None = None
    requests_running: float | None = None
    kv_cache_usage_ratio: float | None = None
    """The fullest KV cache of the node's servers."""
    ttft_p90_s: float | None = None
    """The slowest of the node's servers, since their previous read (None: not measured)."""
    tpot_p90_s: float | None = None
    ttft_mean_s: float | None = None
    tpot_mean_s: float | None = None
    ttft_p90_floor_s: float | None = None
    tpot_p90_floor_s: float | None = None
    latency_requests: float | None = None
    """Observations behind those quantiles, summed over the node's servers."""
    models: tuple[str, ...] = ()
    """The models the node's servers serve (its pool, for routing weights)."""


@dataclass(frozen=True)
class Snapshot:
    """What the store knows of the facility at one moment."""

    ts: float
    budget_w: float | None
    nodes: tuple[NodeView, ...]
    gpus: tuple[GpuView, ...]


def _translated(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: Store, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except SQLAlchemyError as exc:
            raise self._guard(exc) from None

    return call


def _translate_errors(cls: type[Store]) -> type[Store]:
    """Every public method of the store raises ``StoreError`` on any database failure.

    Done once here, for the whole class, as ``collectors/nvml.py`` maps NVML errors in
    one place: callers (the agent around reconcile, the controller's outage logging, the
    CLI) catch one exception type, and a method added later cannot forget it.
    """
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(member):
            setattr(cls, name, _translated(member))
    return cls


@_translate_errors
class Store:
    """Reads and writes of the store; any database failure is a ``StoreError``."""

    def __init__(self, engine: Engine, *, schema_checked: bool = True) -> None:
        self.engine = engine
        self._session = sessionmaker(engine, expire_on_commit=False)
        self.schema_checked = schema_checked
        """False when the daemon started while the database was unreachable: its schema
        is checked before the controller first plans on it."""

    def session(self) -> Session:
        return self._session()

    def _guard(self, exc: SQLAlchemyError) -> StoreError:
        error = StoreError(f"database {engine_name(self.engine)}: {error_line(exc, self.engine)}")
        error.refused = isinstance(exc, (IntegrityError, DataError))
        return error

    # -- nodes and GPUs ---------------------------------------------------------------
    def register_node(
        self,
        name: str,
        backend: str,
        gpus: Sequence[GpuInfo],
        now: float,
        *,
        agent_id: str | None = None,
        holder_gone: Callable[[str], bool] | None = None,
    ) -> dict[str, int]:
        """Create or refresh the node and its GPUs; returns GPU ids by UUID.

        With ``agent_id`` the caller claims the node's name. A name whose holder is
        another agent that wrote within ``CLAIM_LIVE_S`` is refused
        (``NodeClaimedError``), and nothing of that node changes: two agents under one
        name (cloned hosts, a second ``run``) would otherwise delete each other's GPUs.
        ``holder_gone`` may say the holder is certainly dead (a process of this machine
        that no longer exists), so a restart takes over at once."""
        with self.session() as s, s.begin():
            node = s.scalar(select(Node).where(Node.name == name).with_for_update())
            if node is None:
                node = Node(name=name, registered_at=now, last_seen_at=now, backend=backend)
                s.add(node)
                s.flush()
            elif agent_id is not None:
                holder = node.agent_id
                if (
                    holder is not None
                    and holder != agent_id
                    and abs(now - node.last_seen_at) < CLAIM_LIVE_S
                    and not (holder_gone is not None and holder_gone(holder))
                ):
                    raise NodeClaimedError(
                        f"node {name!r} is held by another live agent ({holder}, last seen"
                        f" {abs(now - node.last_seen_at):.0f} s ago): stop that one, or give"
                        " this one its own name (--node or agent.node)"
                    )
            node.last_seen_at = now
            node.backend = backend
            if agent_id is not None:
                node.agent_id = agent_id
            ids: dict[str, int] = {}
            existing = {
                g.uuid: g
                for g in s.scalars(select(Gpu).where(Gpu.uuid.in_([i.uuid for i in gpus])))
            }
            for info in gpus:
                row = existing.get(info.uuid)
                new = row is None
                if row is None:
                    row = Gpu(uuid=info.uuid)
                row.node_id = node.id
                row.index = info.index
                row.name = info.name
                row.pci_bus_id = info.pci_bus_id
                row.memory_total_bytes = info.memory_total_bytes
                row.power_min_w = info.power_limits.min_w
                row.power_max_w = info.power_limits.max_w
                row.power_default_w = info.power_limits.default_w
                row.max_sm_clock_mhz = info.max_sm_clock_mhz
                if new:
                    s.add(row)
                try:
                    s.flush()
                except IntegrityError as exc:
                    if not new or "uuid" not in str(exc.orig):
                        raise
                    # Only where the GPU's row is out of sight: an agent's role under
                    # row-level security sees its own node's GPUs, not another's.
                    raise StoreError(
                        f"GPU {info.uuid} is registered under another node, which "
                        "this agent's database role may not see or change (a GPU "
                        "moved between hosts, or two hosts report one UUID): an "
                        "administrator removes the old node with `wattkeeper node "
                        "remove NODE` (`wattkeeper status` lists the nodes). Until "
                        f"then {name!r} is not registered and its GPUs hold the "
                        "safe cap"
                    ) from None
                ids[info.uuid] = row.id
            gone = list(
                s.scalars(
                    select(Gpu.uuid).where(Gpu.node_id == node.id, Gpu.uuid.not_in(list(ids)))
                )
            )
            if gone:
                # A GPU the node no longer enumerates (replaced, or fell off the bus) must
                # not hold budget: drop it, its samples and targets, and say so.
                s.execute(delete(Gpu).where(Gpu.uuid.in_(gone)))
                s.add_all(
                    AuditEntry(
                        ts=now,
                        actor=f"agent:{name}",
                        action="gpu.removed",
                        subject=uuid,
                        detail={"node": name},
                    )
                    for uuid in gone
                )
            return ids

    def set_drained(
        self,
        name: str,
        drained: bool,
        actor: str,
        now: float,
        only_own: bool = False,
        reason: str | None = None,
    ) -> bool:
        """Mark a node drained (no new work; its agent's drain actuator acts on it) or back
        in service; audited. Returns whether anything changed. Raises ``KeyError`` for a
        node the store does not know.

        A drain made by someone else is taken over: a person draining a node the
        controller drained makes it theirs, so the controller never returns it.
        ``only_own`` (the controller) returns a node only if ``actor`` drained it, checked
        in the same statement as the change, so a person's drain made a moment before
        is never undone."""
        with self.session() as s, s.begin():
            node = s.scalar(select(Node).where(Node.name == name).with_for_update())
            if node is None:
                raise KeyError(name)
            if not drained and only_own and node.drained and node.drained_by != actor:
                return False
            if node.drained == drained and (not drained or node.drained_by == actor):
                return False
            node.drained = drained
            node.drained_by = actor if drained else None
            node.drain_now = False
            s.add(
                AuditEntry(
                    ts=now,
                    actor=actor,
                    action="node.drain" if drained else "node.undrain",
                    subject=name,
                    detail=_why({}, reason),
                )
            )
            return True

    def drain_now(
        self,
        name: str,
        actor: str,
        now: float,
        only_own: bool = False,
        reason: str | None = None,
    ) -> bool:
        """End a drain at once: the node's agent runs its drain-now actuator, which sends
        the requests still in flight back to the router, instead of letting them finish
        while the node draws power. Only a drained node can be hurried, and ``only_own``
        (the controller) hurries only its own drains: a person's drain goes at the
        person's pace. Returns whether anything changed; ``KeyError`` for an unknown
        node."""
        with self.session() as s, s.begin():
            node = s.scalar(select(Node).where(Node.name == name).with_for_update())
            if node is None:
                raise KeyError(name)
            if not node.drained or node.drain_now or (only_own and node.drained_by != actor):
                return False
            node.drain_now = True
            s.add(
                AuditEntry(
                    ts=now,
                    actor=actor,
                    action="node.drain.now",
                    subject=name,
                    detail=_why({}, reason),
                )
            )
            return True

    def set_standby(self, name: str, standby: bool) -> None:
        """Record whether the node's drain powered it down (its agent says so)."""
        with self.session() as s, s.begin():
            s.execute(update(Node).where(Node.name == name).values(standby=standby))

    def node_drained(self, name: str) -> bool:
        with self.session() as s:
            return bool(s.scalar(select(Node.drained).where(Node.name == name)))

    def node_id(self, name: str) -> int | None:
        with self.session() as s:
            return s.scalar(select(Node.id).where(Node.name == name))

    def original_power_limits(self, node_name: str) -> dict[str, float | None]:
        """Original limits an agent persisted for the node's GPUs before it first capped
        them (only GPUs that still have one recorded)."""
        with self.session() as s:
            rows = s.execute(
                select(Gpu.uuid, Gpu.original_power_limit_w)
                .join(Node, Node.id == Gpu.node_id)
                .where(Node.name == node_name, Gpu.original_power_limit_w.is_not(None))
            ).all()
        return dict(rows)

    def clear_original_power_limits(self, gpu_ids: Sequence[int]) -> None:
        """Forget persisted originals once they are restored, so the next capping
        records whatever an admin set in between."""
        if not gpu_ids:
            return
        with self.engine.begin() as conn:
            conn.execute(
                update(Gpu).where(Gpu.id.in_(list(gpu_ids))).values(original_power_limit_w=None)
            )

    def node_backends(self) -> dict[str, str]:
        """Every registered node and the GPU backend it reported (``nvml``, ``sim``)."""
        with self.session() as s:
            return dict(s.execute(select(Node.name, Node.backend)).all())

    # -- the leader lease -------------------------------------------------------------
    def lead(
        self, holder: str, name: str, host: str, pid: int, now: float, lease_s: float
    ) -> int | None:
        """Take or renew the leader lease: the epoch this controller leads in, or None
        while another one holds an unexpired lease. Each change of holder raises the
        epoch, and every target write checks it in its own transaction, so a deposed
        leader that comes back can never write again."""
        try:
            return self._lead(holder, name, host, pid, now, lease_s)
        except IntegrityError:
            # Two first controllers both found no lease row and inserted one: the loser
            # now finds the winner's row, and its unexpired lease, like any standby.
            return self._lead(holder, name, host, pid, now, lease_s)

    def _lead(
        self, holder: str, name: str, host: str, pid: int, now: float, lease_s: float
    ) -> int | None:
        with self.session() as s, s.begin():
            row = s.scalar(select(Leader).where(Leader.id == 1).with_for_update())
            if row is not None and row.holder == holder:
                row.expires_at = now + lease_s
                return row.epoch
            if row is not None and row.expires_at >= now:
                return None
            previous = None if row is None else row.holder
            if row is None:
                row = Leader(id=1, epoch=0)
                s.add(row)
            row.holder, row.name, row.host, row.pid = holder, name, host, pid
            row.epoch += 1
            row.acquired_at, row.expires_at = now, now + lease_s
            s.add(
                AuditEntry(
                    ts=now,
                    actor=f"controller:{name}",
                    action="leader.acquired",
                    subject=host,
                    detail={"epoch": row.epoch, "previous": previous, "pid": pid},
                )
            )
            return row.epoch

    def resign(self, holder: str, now: float) -> None:
        """A clean stop ends the lease now, so a standby takes over at its next try."""
        with self.session() as s, s.begin():
            s.execute(
                update(Leader)
                .where(Leader.id == 1, Leader.holder == holder)
                .values(expires_at=now - 1e-3)
            )

    def leader(self) -> LeaderRow | None:
        with self.session() as s:
            row = s.scalar(select(Leader).where(Leader.id == 1))
            if row is None:
                return None
            return LeaderRow(
                row.holder, row.name, row.host, row.pid, row.epoch, row.acquired_at, row.expires_at
            )

    def node_claims(self) -> dict[str, tuple[str | None, float]]:
        """Each node's claim: the agent holding its name (None: released) and when the
        node last wrote."""
        with self.session() as s:
            rows = s.execute(select(Node.name, Node.agent_id, Node.last_seen_at)).all()
        return {name: (agent_id, seen) for name, agent_id, seen in rows}

    def release_node(self, name: str, agent_id: str) -> None:
        """A clean stop gives the name back, so the next start takes it at once."""
        with self.session() as s, s.begin():
            s.execute(
                update(Node)
                .where(Node.name == name, Node.agent_id == agent_id)
                .values(agent_id=None)
            )

    def remove_nodes(
        self, names: Sequence[str], actor: str, now: float, *, reason: str | None = None
    ) -> int:
        """Drop nodes with their GPUs, samples, rollups, targets and routes, and audit
        it; returns how many GPUs went with them."""
        if not names:
            return 0
        with self.session() as s, s.begin():
            node_ids = list(s.scalars(select(Node.id).where(Node.name.in_(list(names)))))
            gpu_ids = list(s.scalars(select(Gpu.id).where(Gpu.node_id.in_(node_ids))))
            # Children first: this must not depend on the database enforcing cascades.
            for model in (GpuSampleRow, GpuRollupRow, Target):
                s.execute(delete(model).where(model.gpu_id.in_(gpu_ids)))
            for model in (HostSampleRow, TokenSampleRow, HostRollupRow, TokenRollupRow, Route, Gpu):
                s.execute(delete(model).where(model.node_id.in_(node_ids)))
            s.execute(delete(Node).where(Node.id.in_(node_ids)))
            s.add_all(
                AuditEntry(
                    ts=now,
                    actor=actor,
                    action="node.removed",
                    subject=name,
                    detail=_why({"gpus": len(gpu_ids)}, reason),
                )
                for name in names
            )
        return len(gpu_ids)

    def set_original_power_limit(self, gpu_id: int, watts: float | None) -> None:
        with self.session() as s, s.begin():
            row = s.get(Gpu, gpu_id)
            if row is not None and row.original_power_limit_w is None:
                row.original_power_limit_w = watts

    # -- samples ----------------------------------------------------------------------
    def write_samples(
        self,
        node_name: str,
        gpu_ids: dict[str, int],
        gpu_samples: Iterable[GpuSample],
        now: float,
        *,
        host: tuple[float | None, float | None, str | None] | None = None,
        tokens: Iterable[TokenRow] = (),
        agent_id: str | None = None,
    ) -> None:
        """One tick's readings: ``write_ticks`` with a single tick."""
        self.write_ticks(
            node_name,
            gpu_ids,
            [NodeTick(now, tuple(gpu_samples), host, tuple(tokens))],
            agent_id=agent_id,
        )

    def write_ticks(
        self,
        node_name: str,
        gpu_ids: dict[str, int],
        ticks: Sequence[NodeTick],
        *,
        agent_id: str | None = None,
    ) -> None:
        """Any number of a node's ticks in one transaction: all land or none. With
        ``agent_id``, refused (``NodeClaimedError``) when another agent holds the node's
        name now; ``NodeGoneError`` when the node is not in the store.

        The cost of ingest is per transaction, not per row (PostgreSQL: about 1 ms for an
        8-row tick from one connection, most of it round trips), so an agent that writes
        every few seconds, or replays an outage's backlog, pays it once for all of its
        ticks. The node's row is touched by one ``UPDATE ... WHERE`` that also checks the
        holder; the reason is looked up only when it matches nothing. Samples of a GPU not
        in ``gpu_ids`` are left out, and a sample already stored (the same GPU, or node
        and endpoint, at the same time: a backlog replayed after a crash) is skipped.
        Core bulk inserts, not ORM objects: this is the hot path of every agent.
        """
        if not ticks:
            return
        gpu_rows = [
            {
                "gpu_id": gpu_ids[g.uuid],
                "ts": g.timestamp,
                "power_w": g.power_w,
                "power_instant_w": g.power_instant_w,
                "energy_j": g.energy_j,
                "sm_clock_mhz": g.sm_clock_mhz,
                "mem_clock_mhz": g.mem_clock_mhz,
                "utilization_gpu_ratio": g.utilization_gpu_ratio,
                "temperature_c": g.temperature_c,
                "power_limit_w": g.power_limit_w,
                "throttle_reasons": ",".join(g.throttle_reasons),
            }
            for tick in ticks
            for g in tick.samples
            # A GPU the node no longer has (replaced during an outage whose backlog this
            # is): its samples have nowhere to go, and must not block the rest.
            if g.uuid in gpu_ids
        ]
        newest = max(t.ts for t in ticks)
        held_here = Node.name == node_name
        if agent_id is not None:
            held_here = and_(held_here, or_(Node.agent_id.is_(None), Node.agent_id == agent_id))
        with self.engine.begin() as conn:
            # An outage's backlog arrives after newer ticks: last seen never goes back.
            touch = (
                update(Node)
                .where(held_here)
                .values(
                    last_seen_at=case((Node.last_seen_at < newest, newest), else_=Node.last_seen_at)
                )
            )
            if conn.dialect.update_returning:
                node_id = conn.execute(touch.returning(Node.id)).scalar()
            else:  # SQLite before 3.35: one statement more
                done = conn.execute(touch).rowcount
                node_id = conn.execute(select(Node.id).where(held_here)).scalar() if done else None
            if node_id is None:
                holder = conn.execute(select(Node.agent_id).where(Node.name == node_name)).first()
                if holder is None:
                    raise NodeGoneError(f"node {node_name!r} is not registered")
                raise NodeClaimedError(
                    f"node {node_name!r} was taken over by another agent ({holder[0]}):"
                    " this one stops writing under its name"
                )
            insert_rows(conn, GpuSampleRow, gpu_rows)
            host_rows = [
                {
                    "node_id": node_id,
                    "ts": t.ts,
                    "cpu_util_ratio": t.host[0],
                    "non_gpu_power_w": t.host[1],
                    "power_source": t.host[2],
                }
                for t in ticks
                if t.host is not None
            ]
            insert_rows(conn, HostSampleRow, host_rows)
            token_rows = [
                {"node_id": node_id, "ts": t.ts, **row.__dict__} for t in ticks for row in t.tokens
            ]
            insert_rows(conn, TokenSampleRow, token_rows)

    def retain(self, now: float, raw_s: float, rollup_s: float) -> Retained:
        """Roll raw samples older than ``raw_s`` up into minutes, drop minutes older than
        ``rollup_s`` and audit entries older than that or 30 days, whichever is longer
        (store/retention.py says how)."""
        done = roll_up(self.engine, now, raw_s, rollup_s)
        with self.engine.begin() as conn:
            conn.execute(
                delete(AuditEntry).where(AuditEntry.ts < now - max(rollup_s, AUDIT_KEPT_S))
            )
        return done

    # -- budgets, targets, audit --------------------------------------------------------
    def get_budget(self, scope: str = FACILITY) -> Budget | None:
        with self.session() as s:
            return s.scalar(select(Budget).where(Budget.scope == scope))

    def set_budget(
        self,
        limit_w: float,
        actor: str,
        now: float,
        scope: str = FACILITY,
        reason: str | None = None,
    ) -> float | None:
        """Set a budget and audit it in one transaction; returns the previous limit."""
        with self.session() as s, s.begin():
            row = s.scalar(select(Budget).where(Budget.scope == scope))
            previous = row.limit_w if row else None
            if row is None:
                row = Budget(scope=scope, limit_w=limit_w, updated_at=now, updated_by=actor)
                s.add(row)
            row.limit_w = limit_w
            row.updated_at = now
            row.updated_by = actor
            s.add(
                AuditEntry(
                    ts=now,
                    actor=actor,
                    action="budget.set",
                    subject=scope,
                    detail=_why({"limit_w": limit_w, "previous_w": previous}, reason),
                )
            )
            return previous

    def budgets(self) -> dict[str, float]:
        """Every budget set in the store, by scope (the facility and any domains)."""
        with self.session() as s:
            return {b.scope: b.limit_w for b in s.scalars(select(Budget))}

    def add_schedule(
        self, schedule: Schedule, actor: str, now: float, reason: str | None = None
    ) -> int:
        """Store a budget schedule (its ``id`` is ignored) and audit it; returns its id."""
        with self.session() as s, s.begin():
            row = BudgetSchedule(
                scope=schedule.scope,
                limit_w=schedule.limit_w,
                duration_s=schedule.duration_s,
                cron=schedule.cron,
                at_ts=schedule.at_ts,
                timezone=schedule.timezone,
                created_at=now,
                created_by=actor,
            )
            s.add(row)
            s.flush()
            detail = {
                "limit_w": schedule.limit_w,
                "duration_s": schedule.duration_s,
                "cron": schedule.cron,
                "at_ts": schedule.at_ts,
                "timezone": schedule.timezone,
            }
            s.add(
                AuditEntry(
                    ts=now,
                    actor=actor,
                    action="budget.schedule.add",
                    subject=schedule.scope,
                    detail=_why({"id": row.id, **detail}, reason),
                )
            )
            return row.id

    def schedules(self) -> list[Schedule]:
        with self.session() as s:
            return [
                Schedule(
                    id=r.id,
                    scope=r.scope,
                    limit_w=r.limit_w,
                    duration_s=r.duration_s,
                    cron=r.cron,
                    at_ts=r.at_ts,
                    timezone=r.timezone,
                )
                for r in s.scalars(select(BudgetSchedule).order_by(BudgetSchedule.id))
            ]

    def remove_schedule(
        self, schedule_id: int, actor: str, now: float, reason: str | None = None
    ) -> bool:
        """Delete a schedule and audit it; False when there is none with that id."""
        with self.session() as s, s.begin():
            row = s.get(BudgetSchedule, schedule_id)
            if row is None:
                return False
            s.delete(row)
            s.add(
                AuditEntry(
                    ts=now,
                    actor=actor,
                    action="budget.schedule.remove",
                    subject=row.scope,
                    detail=_why({"id": schedule_id, "limit_w": row.limit_w}, reason),
                )
            )
            return True

    def write_targets(
        self,
        specs: Sequence[TargetSpec],
        now: float,
        lease_s: float,
        actor: str = "controller",
        epoch: int | None = None,
    ) -> int:
        """Renew the lease of every GPU in ``specs``; write and audit only changed targets.

        A target changes when its power limit moves by 1 W or more, when either side has no
        limit, or when a clock bound differs. Unchanged targets keep their stored value and
        reason and only get ``issued_at``/``lease_expires_at`` renewed, all in one
        statement, so a tick where nothing changed costs one read and one ``UPDATE``.
        Returns the number of changed targets (one ``target.set`` audit entry each).
        """
        lease = now + lease_s
        with self.engine.begin() as conn:
            if epoch is not None:
                _fence(conn, epoch)
            rows = conn.execute(
                select(
                    Gpu.uuid,
                    Gpu.id,
                    Target.id,
                    Target.power_limit_w,
                    Target.sm_clock_min_mhz,
                    Target.sm_clock_max_mhz,
                ).outerjoin(Target, Target.gpu_id == Gpu.id)
            ).all()
            gpu_ids = {uuid: gpu_id for uuid, gpu_id, *_ in rows}
            stored = {gpu_id: tuple(rest) for _, gpu_id, tid, *rest in rows if tid is not None}
            current = {gpu_id: (None, None, None) for gpu_id in gpu_ids.values()} | stored
            renew: set[int] = set()
            changes: dict[int, dict] = {}
            audit: list[dict] = []
            for spec in specs:
                gpu_id = gpu_ids.get(spec.uuid)
                if gpu_id is None:
                    continue
                old, clock_min, clock_max = current[gpu_id]
                if not (
                    old is None
                    or spec.power_limit_w is None
                    or abs(old - spec.power_limit_w) >= LIMIT_TOLERANCE_W
                    or clock_min != spec.sm_clock_min_mhz
                    or clock_max != spec.sm_clock_max_mhz
                ):
                    renew.add(gpu_id)
                    continue
                current[gpu_id] = (spec.power_limit_w, spec.sm_clock_min_mhz, spec.sm_clock_max_mhz)
                changes[gpu_id] = {
                    "power_limit_w": spec.power_limit_w,
                    "sm_clock_min_mhz": spec.sm_clock_min_mhz,
                    "sm_clock_max_mhz": spec.sm_clock_max_mhz,
                    "issued_at": now,
                    "lease_expires_at": lease,
                    "reason": spec.reason,
                    "epoch": epoch,
                }
                audit.append(
                    {
                        "ts": now,
                        "actor": actor,
                        "action": "target.set",
                        "subject": spec.uuid,
                        "detail": {
                            "power_limit_w": spec.power_limit_w,
                            "previous_w": old,
                            "reason": spec.reason,
                        },
                    }
                )
            renew.difference_update(changes)
            for among in _id_in(Target.gpu_id, sorted(renew), conn.dialect.name):
                conn.execute(
                    update(Target)
                    .where(among)
                    .values(issued_at=now, lease_expires_at=lease, epoch=epoch)
                )
            updated = [{"b_gpu_id": g, **v} for g, v in changes.items() if g in stored]
            if updated:
                # Core executemany; the SET clause comes from the other parameter names.
                conn.execute(update(Target).where(Target.gpu_id == bindparam("b_gpu_id")), updated)
            inserted = [{"gpu_id": g, **v} for g, v in changes.items() if g not in stored]
            if inserted:
                conn.execute(insert(Target), inserted)
            if audit:
                conn.execute(insert(AuditEntry), audit)
        return len(audit)

    def orders_for_node(self, node_name: str, agent_id: str | None = None) -> NodeOrders:
        """What an agent reads every tick: its GPUs' targets and whether its node is
        drained (and whether at once), in one statement (at a thousand nodes these reads
        are a thousand queries a second). Refused when the node is gone (``NodeGoneError``) or, with
        ``agent_id``, held by another agent (``NodeClaimedError``): another agent's
        targets and drain mark are not this one's to apply."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    Node.agent_id,
                    Node.drained,
                    Node.drain_now,
                    Gpu.uuid,
                    Target.power_limit_w,
                    Target.lease_expires_at,
                    Target.reason,
                    Target.epoch,
                    Target.issued_at,
                    Target.sm_clock_max_mhz,
                )
                .select_from(Node)
                .outerjoin(Gpu, Gpu.node_id == Node.id)
                .outerjoin(Target, Target.gpu_id == Gpu.id)
                .where(Node.name == node_name)
            ).all()
        if not rows:
            raise NodeGoneError(f"node {node_name!r} is not registered")
        holder = rows[0][0]
        if agent_id is not None and holder is not None and holder != agent_id:
            raise NodeClaimedError(
                f"node {node_name!r} was taken over by another agent ({holder}):"
                " this one stops reading its targets"
            )
        targets = {
            uuid: LeasedTarget(limit, lease, reason, epoch, issued, clock)
            for _, _, _, uuid, limit, lease, reason, epoch, issued, clock in rows
            if uuid is not None and lease is not None
        }
        drained = bool(rows[0][1])
        return NodeOrders(targets, drained, drained and bool(rows[0][2]))

    def targets_for_node(self, node_name: str) -> dict[str, Target]:
        with self.session() as s:
            rows = s.execute(
                select(Gpu.uuid, Target)
                .join(Target, Target.gpu_id == Gpu.id)
                .join(Node, Node.id == Gpu.node_id)
                .where(Node.name == node_name)
            ).all()
            return {uuid: target for uuid, target in rows}

    def write_routes(
        self,
        targets: Sequence[RouteTarget],
        now: float,
        actor: str = "controller",
        epoch: int | None = None,
    ) -> int:
        """Store each node's route; write and audit only those that changed (a weight by
        ``WEIGHT_TOLERANCE`` or more, to or from 0, or another in-flight limit). Returns
        how many changed. Plain rows, one statement per kind: a tick at thousands of nodes
        where nothing changed costs two reads."""
        with self.engine.begin() as conn:
            if epoch is not None:
                _fence(conn, epoch)
            ids = {name: node_id for name, node_id in conn.execute(select(Node.name, Node.id))}
            stored = {
                node_id: (weight, inflight, reason, updated_at)
                for node_id, weight, inflight, reason, updated_at in conn.execute(
                    select(
                        Route.node_id,
                        Route.weight,
                        Route.max_inflight,
                        Route.reason,
                        Route.updated_at,
                    )
                )
            }
            new: list[dict] = []
            changed: list[dict] = []
            reasons: list[dict] = []
            audit: list[dict] = []
            for t in targets:
                node_id = ids.get(t.node)
                if node_id is None:
                    continue
                old = stored.get(node_id)
                if old is not None and (
                    abs(old[0] - t.weight) < WEIGHT_TOLERANCE
                    and (old[0] == 0) == (t.weight == 0)
                    and old[1] == t.max_inflight
                ):
                    if old[2] != t.reason and now - old[3] >= REASON_REFRESH_S:
                        # The same route, for a reason that moved on (a first measure of
                        # tokens per joule): explain says it, the audit need not.
                        reasons.append(
                            {"b_node_id": node_id, "reason": t.reason, "updated_at": now}
                        )
                    continue
                row = {
                    "weight": t.weight,
                    "max_inflight": t.max_inflight,
                    "updated_at": now,
                    "reason": t.reason,
                }
                if old is None:
                    new.append({"node_id": node_id, **row})
                else:
                    changed.append({"b_node_id": node_id, **row})
                audit.append(
                    {
                        "ts": now,
                        "actor": actor,
                        "action": "route.set",
                        "subject": t.node,
                        "detail": {
                            "weight": t.weight,
                            "max_inflight": t.max_inflight,
                            "previous_weight": None if old is None else old[0],
                            "reason": t.reason,
                        },
                    }
                )
            if new:
                conn.execute(insert(Route), new)
            if changed:
                conn.execute(
                    update(Route).where(Route.node_id == bindparam("b_node_id")),
                    changed,
                )
            if reasons:
                conn.execute(update(Route).where(Route.node_id == bindparam("b_node_id")), reasons)
            if audit:
                conn.execute(insert(AuditEntry), audit)
        return len(audit)

    def routes(self) -> list[RouteRow]:
        """Every node's published route, by node name."""
        with self.session() as s:
            rows = s.execute(
                select(Node.name, Route.weight, Route.max_inflight, Route.updated_at, Route.reason)
                .join(Route, Route.node_id == Node.id)
                .order_by(Node.name)
            ).all()
        return [RouteRow(*row) for row in rows]

    def remember(self, key: str, data: dict, now: float, *, epoch: int | None = None) -> None:
        """Keep what the controller learned under ``key``; with ``epoch``, only while
        that epoch leads (a deposed leader must not overwrite its successor's)."""
        with self.engine.begin() as conn:
            if epoch is not None:
                _fence(conn, epoch)
            values = {"epoch": epoch, "updated_at": now, "data": data}
            done = conn.execute(
                update(ControllerMemory).where(ControllerMemory.key == key).values(**values)
            )
            if done.rowcount == 0:
                conn.execute(insert(ControllerMemory).values(key=key, **values))

    def recall(self, key: str) -> tuple[dict, float] | None:
        """What was kept under ``key``, and when."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(ControllerMemory.data, ControllerMemory.updated_at).where(
                    ControllerMemory.key == key
                )
            ).first()
        return None if row is None else (dict(row[0]), float(row[1]))

    def audit(self, actor: str, action: str, subject: str, detail: dict, now: float) -> None:
        with self.session() as s, s.begin():
            s.add(AuditEntry(ts=now, actor=actor, action=action, subject=subject, detail=detail))

    def audit_log(
        self,
        limit: int = 50,
        subjects: Sequence[str] | None = None,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[AuditEntry]:
        """Newest first; only entries about ``subjects`` (node names, GPU UUIDs) if given.

        ``actor`` matches whole or up to its ``:`` (``cli`` finds every person's
        changes, ``cli:alice`` hers); ``action`` whole or by dotted prefix (``budget``
        finds ``budget.set`` and the schedules), so the filters follow the names' own
        hierarchy rather than substrings that would match by accident."""
        # By when it happened: an agent back from an outage files its records late.
        order = (AuditEntry.ts.desc(), AuditEntry.id.desc())
        query = select(AuditEntry).order_by(*order).limit(limit)
        if subjects is not None:
            query = query.where(AuditEntry.subject.in_(list(subjects)))
        if actor is not None:
            under = AuditEntry.actor.startswith(f"{actor}:", autoescape=True)
            query = query.where(or_(AuditEntry.actor == actor, under))
        if action is not None:
            under = AuditEntry.action.startswith(f"{action}.", autoescape=True)
            query = query.where(or_(AuditEntry.action == action, under))
        if since is not None:
            query = query.where(AuditEntry.ts >= since)
        if until is not None:
            query = query.where(AuditEntry.ts <= until)
        with self.session() as s:
            return list(s.scalars(query))

    def newest_sample_ts(self) -> float | None:
        """Time of the newest GPU or host sample of any node (one probe of each ts index)."""
        with self.engine.connect() as conn:
            stamps = [
                conn.scalar(select(func.max(model.ts))) for model in (GpuSampleRow, HostSampleRow)
            ]
        found = [ts for ts in stamps if ts is not None]
        return max(found) if found else None

    # -- the snapshot -----------------------------------------------------------------
    def snapshot(self, now: float, window_s: float = 60.0) -> Snapshot:
        """Newest sample of every GPU and node within ``window_s``, with targets and budget.

        Samples count when ``now - window_s <= ts <= now``. Each GPU's (and node's) newest
        one is found by one backward probe of its ``(gpu_id|node_id, ts)`` index, so the
        cost follows the fleet size, not the rows in the window or the retention; rows are
        read as plain columns, not ORM entities (see bench/README.md).
        """
        since = now - window_s
        with self.engine.connect() as conn:
            dialect = conn.dialect.name
            budget = conn.scalar(select(Budget.limit_w).where(Budget.scope == FACILITY))
            gpus = [
                GpuView(
                    uuid=uuid,
                    node=node,
                    index=index,
                    name=name,
                    power_min_w=power_min_w,
                    power_max_w=power_max_w,
                    power_default_w=power_default_w,
                    sample_ts=sample_ts,
                    power_w=power_w,
                    energy_j=energy_j,
                    sm_clock_mhz=sm_clock_mhz,
                    utilization_gpu_ratio=utilization,
                    power_limit_w=power_limit_w,
                    throttle_reasons=tuple(filter(None, (throttle or "").split(","))),
                    target_power_limit_w=target_w,
                    target_lease_expires_at=lease,
                )
                for (
                    uuid,
                    node,
                    index,
                    name,
                    power_min_w,
                    power_max_w,
                    power_default_w,
                    sample_ts,
                    power_w,
                    energy_j,
                    sm_clock_mhz,
                    utilization,
                    power_limit_w,
                    throttle,
                    target_w,
                    lease,
                ) in conn.execute(_gpu_snapshot_statement(dialect, since, now))
            ]
            tokens: dict[int, list[Any]] = {}
            for node_id, token_id, *row in conn.execute(
                _token_snapshot_statement(dialect, since, now)
            ):
                if token_id is not None:
                    tokens.setdefault(node_id, []).append(row)
            nodes = []
            for (
                node_id,
                name,
                drained,
                drained_by,
                drain_now,
                standby,
                last_seen_at,
                host_ts,
                non_gpu_w,
                source,
            ) in conn.execute(_node_snapshot_statement(dialect, since, now)):
                toks = tokens.get(node_id, [])
                column = _columns(toks)
                nodes.append(
                    NodeView(
                        name=name,
                        drained=drained,
                        drained_by=drained_by if drained else None,
                        standby=bool(standby) and drained,
                        drain_now=bool(drain_now) and drained,
                        last_seen_at=last_seen_at,
                        host_ts=host_ts,
                        non_gpu_power_w=non_gpu_w,
                        power_source=source,
                        generation_tokens_per_s=_sum(column("generation_tokens_per_s")),
                        generation_tokens_total=_sum(column("generation_tokens_total")),
                        endpoints_up=sum(1 for up in column("up") if up),
                        endpoints_total=len(toks),
                        token_ts=toks[0][0] if toks else None,
                        requests_waiting=_sum(column("requests_waiting")),
                        requests_running=_sum(column("requests_running")),
                        kv_cache_usage_ratio=_max(column("kv_cache_usage_ratio")),
                        ttft_p90_s=_max(column("ttft_p90_s")),
                        tpot_p90_s=_max(column("tpot_p90_s")),
                        ttft_mean_s=_max(column("ttft_mean_s")),
                        tpot_mean_s=_max(column("tpot_mean_s")),
                        ttft_p90_floor_s=_max(column("ttft_p90_floor_s")),
                        tpot_p90_floor_s=_max(column("tpot_p90_floor_s")),
                        latency_requests=_sum(column("latency_requests")),
                        models=tuple(sorted({m for m in column("model") if m})),
                    )
                )
            return Snapshot(ts=now, budget_w=budget, nodes=tuple(nodes), gpus=tuple(gpus))


def _fence(conn: Any, epoch: int) -> None:
    """Within the caller's transaction: refuse unless ``epoch`` is still the leader's.
    The row lock (PostgreSQL) holds a takeover back until this write commits."""
    current = conn.scalar(select(Leader.epoch).where(Leader.id == 1).with_for_update())
    if current != epoch:
        raise NotLeaderError(
            f"leader epoch is now {current}, this controller's was {epoch}: it stands down"
        )


# -- snapshot queries -----------------------------------------------------------------
def _columns(rows: list[Any]) -> Callable[[str], list[Any]]:
    """Column accessor over token rows shaped as ``TOKEN_SNAPSHOT_COLUMNS`` without the id."""
    names = TOKEN_SNAPSHOT_COLUMNS[1:]

    def column(name: str) -> list[Any]:
        i = names.index(name)
        return [r[i] for r in rows if r[i] is not None]

    return column


def _sum(values: list[float]) -> float | None:
    return sum(values) if values else None


def _max(values: list[float]) -> float | None:
    return max(values) if values else None


_GPUS = Gpu.__table__
_NODES = Node.__table__
_GPU_SAMPLES = GpuSampleRow.__table__
_HOST_SAMPLES = HostSampleRow.__table__
_TOKEN_SAMPLES = TokenSampleRow.__table__


def _newest(
    dialect: str,
    samples: Table,
    key: str,
    owner: Table,
    columns: Sequence[str],
    since: float,
    now: float,
    *,
    with_ties: bool = False,
) -> tuple[FromClause, ColumnElement[bool]]:
    """``(FROM item, ON clause)`` to outer-join each row of ``owner`` to its newest row of
    ``samples`` (``samples.<key> = owner.id``) with ``since <= ts <= now``; ``with_ties``
    joins every row at that newest ``ts`` (token rows: one per endpoint and model per
    tick). Only ``columns`` (and the key) are selectable from the FROM item.

    The snapshot's one dialect switch. Either way each owner costs one backward probe of
    the ``(<key>, ts)`` index (``ORDER BY ts DESC LIMIT 1``), whatever the retention.
    PostgreSQL gets it as a LATERAL subquery (``FETCH FIRST 1 ROWS WITH TIES``, from
    PostgreSQL 13, for the ties): as a correlated scalar in a join condition, its
    planner hashes or scans the whole sample table instead once the table is big. SQLite
    has no LATERAL, but it only does nested loops, and a LEFT JOIN keeps ``owner`` the
    outer loop, so the correlated scalar is evaluated once per owner and probes.
    """
    if dialect == "postgresql":
        rows = (
            select(*(samples.c[c] for c in columns))
            .where(samples.c[key] == owner.c.id, samples.c.ts >= since, samples.c.ts <= now)
            .order_by(samples.c.ts.desc())
        )
        rows = rows.fetch(1, with_ties=True) if with_ties else rows.limit(1)
        return rows.correlate(owner).lateral(f"newest_{samples.name}"), true()
    probe = samples.alias(f"{samples.name}_probe")
    newest = (
        select(probe.c.ts if with_ties else probe.c.id)
        .where(probe.c[key] == owner.c.id, probe.c.ts >= since, probe.c.ts <= now)
        .order_by(probe.c.ts.desc())
        .limit(1)
        .correlate(owner)
        .scalar_subquery()
    )
    if with_ties:
        return samples, and_(samples.c[key] == owner.c.id, samples.c.ts == newest)
    return samples, samples.c.id == newest


def _gpu_snapshot_statement(dialect: str, since: float, now: float) -> Select:
    sample, on = _newest(
        dialect,
        _GPU_SAMPLES,
        "gpu_id",
        _GPUS,
        (
            "ts",
            "power_w",
            "energy_j",
            "sm_clock_mhz",
            "utilization_gpu_ratio",
            "power_limit_w",
            "throttle_reasons",
        ),
        since,
        now,
    )
    return (
        select(
            _GPUS.c.uuid,
            _NODES.c.name,
            _GPUS.c.index,
            _GPUS.c.name,
            _GPUS.c.power_min_w,
            _GPUS.c.power_max_w,
            _GPUS.c.power_default_w,
            sample.c.ts,
            sample.c.power_w,
            sample.c.energy_j,
            sample.c.sm_clock_mhz,
            sample.c.utilization_gpu_ratio,
            sample.c.power_limit_w,
            sample.c.throttle_reasons,
            Target.power_limit_w,
            Target.lease_expires_at,
        )
        .select_from(_GPUS)
        .join(_NODES, _NODES.c.id == _GPUS.c.node_id)
        .outerjoin(sample, on)
        .outerjoin(Target, Target.gpu_id == _GPUS.c.id)
        .order_by(_NODES.c.name, _GPUS.c.index, _GPUS.c.id)
    )


def _node_snapshot_statement(dialect: str, since: float, now: float) -> Select:
    host, on = _newest(
        dialect,
        _HOST_SAMPLES,
        "node_id",
        _NODES,
        ("ts", "non_gpu_power_w", "power_source"),
        since,
        now,
    )
    return (
        select(
            _NODES.c.id,
            _NODES.c.name,
            _NODES.c.drained,
            _NODES.c.drained_by,
            _NODES.c.drain_now,
            _NODES.c.standby,
            _NODES.c.last_seen_at,
            host.c.ts,
            host.c.non_gpu_power_w,
            host.c.power_source,
        )
        .select_from(_NODES)
        .outerjoin(host, on)
        .order_by(_NODES.c.name)
    )


TOKEN_SNAPSHOT_COLUMNS = (
    "id",
    "ts",
    "up",
    "generation_tokens_per_s",
    "generation_tokens_total",
    "requests_waiting",
    "requests_running",
    "kv_cache_usage_ratio",
    "ttft_p90_s",
    "tpot_p90_s",
    "ttft_mean_s",
    "tpot_mean_s",
    "ttft_p90_floor_s",
    "tpot_p90_floor_s",
    "latency_requests",
    "model",
)


def _token_snapshot_statement(dialect: str, since: float, now: float) -> Select:
    """Every token row at each node's newest token ``ts``, in insertion (id) order so the
    per-node sums add up the same way each time. Outer join (SQLite keeps nodes as the
    outer loop that way): a node without token rows comes back once with NULLs."""
    tok, on = _newest(
        dialect,
        _TOKEN_SAMPLES,
        "node_id",
        _NODES,
        TOKEN_SNAPSHOT_COLUMNS,
        since,
        now,
        with_ties=True,
    )
    return (
        select(
            _NODES.c.id,
            *(tok.c[name] for name in TOKEN_SNAPSHOT_COLUMNS),
        )
        .select_from(_NODES)
        .outerjoin(tok, on)
        .order_by(tok.c.id)
    )


_MAX_IDS_PER_STATEMENT = 30_000
"""Bound parameters per ``IN`` list: under SQLite's limit of 32,766."""


def _id_in(
    column: ColumnElement[int], ids: Sequence[int], dialect: str
) -> Iterator[ColumnElement[bool]]:
    """``column IN ids`` as WHERE clauses, one per statement to run (none when ``ids`` is
    empty). PostgreSQL takes the ids as one array parameter (``= ANY(:ids)``): at 10k ids
    it runs the lease renewal in 40 ms where the 10k-parameter ``IN`` list takes 80-150 ms.
    Elsewhere ``IN`` lists of at most ``_MAX_IDS_PER_STATEMENT`` ids."""
    if not ids:
        return
    if dialect == "postgresql":
        yield column == any_(bindparam("ids", list(ids), type_=ARRAY(Integer), unique=True))
        return
    for i in range(0, len(ids), _MAX_IDS_PER_STATEMENT):
        yield column.in_(ids[i : i + _MAX_IDS_PER_STATEMENT])
