"""Reads and writes that agent, controller and CLI share, so each query exists once.

Every method opens its own short transaction: the store is the bus between processes,
and a long-held transaction would block the other side (SQLite has one writer).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, delete, func, insert, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from wattkeeper.collectors.gpu import GpuInfo, GpuSample
from wattkeeper.store.db import StoreError, describe_url
from wattkeeper.store.models import (
    AuditEntry,
    Budget,
    Gpu,
    GpuSampleRow,
    HostSampleRow,
    Node,
    Target,
    TokenSampleRow,
)

FACILITY = "facility"


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
    error: str | None = None


@dataclass(frozen=True)
class TargetSpec:
    """Desired state of one GPU, as the controller writes it."""

    uuid: str
    power_limit_w: float | None
    sm_clock_min_mhz: int | None = None
    sm_clock_max_mhz: int | None = None
    reason: str = ""


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


@dataclass(frozen=True)
class Snapshot:
    """What the store knows of the facility at one moment."""

    ts: float
    budget_w: float | None
    nodes: tuple[NodeView, ...]
    gpus: tuple[GpuView, ...]


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._session = sessionmaker(engine, expire_on_commit=False)

    def session(self) -> Session:
        return self._session()

    def _guard(self, exc: OperationalError) -> StoreError:
        orig = getattr(exc, "orig", exc)
        first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        return StoreError(f"database {describe_url(str(self.engine.url))}: {first}")

    # -- nodes and GPUs ---------------------------------------------------------------
    def register_node(
        self, name: str, backend: str, gpus: Sequence[GpuInfo], now: float
    ) -> dict[str, int]:
        """Create or refresh the node and its GPUs; returns GPU ids by UUID."""
        try:
            with self.session() as s, s.begin():
                node = s.scalar(select(Node).where(Node.name == name))
                if node is None:
                    node = Node(name=name, registered_at=now, last_seen_at=now, backend=backend)
                    s.add(node)
                    s.flush()
                node.last_seen_at = now
                node.backend = backend
                ids: dict[str, int] = {}
                existing = {
                    g.uuid: g
                    for g in s.scalars(select(Gpu).where(Gpu.uuid.in_([i.uuid for i in gpus])))
                }
                for info in gpus:
                    row = existing.get(info.uuid)
                    if row is None:
                        row = Gpu(uuid=info.uuid)
                        s.add(row)
                    row.node_id = node.id
                    row.index = info.index
                    row.name = info.name
                    row.pci_bus_id = info.pci_bus_id
                    row.memory_total_bytes = info.memory_total_bytes
                    row.power_min_w = info.power_limits.min_w
                    row.power_max_w = info.power_limits.max_w
                    row.power_default_w = info.power_limits.default_w
                    row.max_sm_clock_mhz = info.max_sm_clock_mhz
                    s.flush()
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
        except OperationalError as exc:
            raise self._guard(exc) from None

    def node_id(self, name: str) -> int | None:
        with self.session() as s:
            return s.scalar(select(Node.id).where(Node.name == name))

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
        host: tuple[float | None, float | None, str] | None = None,
        tokens: Iterable[TokenRow] = (),
    ) -> None:
        """One transaction per agent tick: all of the node's readings land together.

        Core bulk inserts, not ORM objects: this is the hot path of every agent tick.
        """
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
            for g in gpu_samples
        ]
        try:
            with self.engine.begin() as conn:
                node_id = conn.scalar(select(Node.id).where(Node.name == node_name))
                if node_id is None:
                    raise StoreError(f"node {node_name!r} is not registered")
                conn.execute(update(Node).where(Node.id == node_id).values(last_seen_at=now))
                if gpu_rows:
                    conn.execute(insert(GpuSampleRow), gpu_rows)
                if host is not None:
                    cpu, power, source = host
                    conn.execute(
                        insert(HostSampleRow),
                        [
                            {
                                "node_id": node_id,
                                "ts": now,
                                "cpu_util_ratio": cpu,
                                "non_gpu_power_w": power,
                                "power_source": source,
                            }
                        ],
                    )
                token_rows = [{"node_id": node_id, "ts": now, **t.__dict__} for t in tokens]
                if token_rows:
                    conn.execute(insert(TokenSampleRow), token_rows)
        except OperationalError as exc:
            raise self._guard(exc) from None

    def prune(self, before_ts: float) -> int:
        """Drop raw samples older than the retention window; returns rows removed."""
        removed = 0
        with self.session() as s, s.begin():
            for model in (GpuSampleRow, HostSampleRow, TokenSampleRow):
                removed += s.execute(delete(model).where(model.ts < before_ts)).rowcount or 0
            s.execute(delete(AuditEntry).where(AuditEntry.ts < before_ts - 30 * 86400))
        return removed

    # -- budgets, targets, audit --------------------------------------------------------
    def get_budget(self, scope: str = FACILITY) -> Budget | None:
        try:
            with self.session() as s:
                return s.scalar(select(Budget).where(Budget.scope == scope))
        except OperationalError as exc:
            raise self._guard(exc) from None

    def set_budget(
        self, limit_w: float, actor: str, now: float, scope: str = FACILITY
    ) -> float | None:
        """Set a budget and audit it in one transaction; returns the previous limit."""
        try:
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
                        detail={"limit_w": limit_w, "previous_w": previous},
                    )
                )
                return previous
        except OperationalError as exc:
            raise self._guard(exc) from None

    def write_targets(
        self, specs: Sequence[TargetSpec], now: float, lease_s: float, actor: str = "controller"
    ) -> int:
        """Upsert targets with a fresh lease; audit only those whose value changed."""
        changed = 0
        with self.session() as s, s.begin():
            gpus = {g.uuid: g.id for g in s.scalars(select(Gpu))}
            current = {t.gpu_id: t for t in s.scalars(select(Target))}
            for spec in specs:
                gpu_id = gpus.get(spec.uuid)
                if gpu_id is None:
                    continue
                row = current.get(gpu_id)
                if row is None:
                    row = Target(gpu_id=gpu_id)
                    s.add(row)
                old = row.power_limit_w
                is_change = (
                    old is None
                    or spec.power_limit_w is None
                    or abs(old - spec.power_limit_w) >= 1.0
                    or row.sm_clock_min_mhz != spec.sm_clock_min_mhz
                    or row.sm_clock_max_mhz != spec.sm_clock_max_mhz
                )
                row.power_limit_w = spec.power_limit_w
                row.sm_clock_min_mhz = spec.sm_clock_min_mhz
                row.sm_clock_max_mhz = spec.sm_clock_max_mhz
                row.issued_at = now
                row.lease_expires_at = now + lease_s
                row.reason = spec.reason
                if is_change:
                    changed += 1
                    s.add(
                        AuditEntry(
                            ts=now,
                            actor=actor,
                            action="target.set",
                            subject=spec.uuid,
                            detail={
                                "power_limit_w": spec.power_limit_w,
                                "previous_w": old,
                                "reason": spec.reason,
                            },
                        )
                    )
        return changed

    def targets_for_node(self, node_name: str) -> dict[str, Target]:
        with self.session() as s:
            rows = s.execute(
                select(Gpu.uuid, Target)
                .join(Target, Target.gpu_id == Gpu.id)
                .join(Node, Node.id == Gpu.node_id)
                .where(Node.name == node_name)
            ).all()
            return {uuid: target for uuid, target in rows}

    def audit(self, actor: str, action: str, subject: str, detail: dict, now: float) -> None:
        with self.session() as s, s.begin():
            s.add(AuditEntry(ts=now, actor=actor, action=action, subject=subject, detail=detail))

    def audit_log(self, limit: int = 50) -> list[AuditEntry]:
        with self.session() as s:
            return list(s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)))

    # -- the snapshot -----------------------------------------------------------------
    def snapshot(self, now: float, window_s: float = 60.0) -> Snapshot:
        """Newest sample of every GPU and node within ``window_s``, with targets and budget."""
        since = now - window_s
        try:
            with self.session() as s:
                budget = s.scalar(select(Budget.limit_w).where(Budget.scope == FACILITY))
                newest_gpu = (
                    select(GpuSampleRow.gpu_id, func.max(GpuSampleRow.ts).label("ts"))
                    .where(GpuSampleRow.ts >= since, GpuSampleRow.ts <= now)
                    .group_by(GpuSampleRow.gpu_id)
                    .subquery()
                )
                gpu_rows = s.execute(
                    select(Gpu, Node.name, GpuSampleRow, Target)
                    .join(Node, Node.id == Gpu.node_id)
                    .outerjoin(newest_gpu, newest_gpu.c.gpu_id == Gpu.id)
                    .outerjoin(
                        GpuSampleRow,
                        (GpuSampleRow.gpu_id == Gpu.id) & (GpuSampleRow.ts == newest_gpu.c.ts),
                    )
                    .outerjoin(Target, Target.gpu_id == Gpu.id)
                    .order_by(Node.name, Gpu.index)
                ).all()
                gpus: dict[str, GpuView] = {}
                for gpu, node_name, smp, tgt in gpu_rows:
                    gpus[gpu.uuid] = GpuView(
                        uuid=gpu.uuid,
                        node=node_name,
                        index=gpu.index,
                        name=gpu.name,
                        power_min_w=gpu.power_min_w,
                        power_max_w=gpu.power_max_w,
                        power_default_w=gpu.power_default_w,
                        sample_ts=smp.ts if smp else None,
                        power_w=smp.power_w if smp else None,
                        energy_j=smp.energy_j if smp else None,
                        sm_clock_mhz=smp.sm_clock_mhz if smp else None,
                        utilization_gpu_ratio=smp.utilization_gpu_ratio if smp else None,
                        power_limit_w=smp.power_limit_w if smp else None,
                        throttle_reasons=tuple(
                            filter(None, (smp.throttle_reasons if smp else "").split(","))
                        ),
                        target_power_limit_w=tgt.power_limit_w if tgt else None,
                        target_lease_expires_at=tgt.lease_expires_at if tgt else None,
                    )
                newest_host = (
                    select(HostSampleRow.node_id, func.max(HostSampleRow.ts).label("ts"))
                    .where(HostSampleRow.ts >= since, HostSampleRow.ts <= now)
                    .group_by(HostSampleRow.node_id)
                    .subquery()
                )
                host_rows = s.execute(
                    select(Node, HostSampleRow)
                    .outerjoin(newest_host, newest_host.c.node_id == Node.id)
                    .outerjoin(
                        HostSampleRow,
                        (HostSampleRow.node_id == Node.id) & (HostSampleRow.ts == newest_host.c.ts),
                    )
                    .order_by(Node.name)
                ).all()
                newest_tok = (
                    select(TokenSampleRow.node_id, func.max(TokenSampleRow.ts).label("ts"))
                    .where(TokenSampleRow.ts >= since, TokenSampleRow.ts <= now)
                    .group_by(TokenSampleRow.node_id)
                    .subquery()
                )
                tok_rows = (
                    s.execute(
                        select(TokenSampleRow).join(
                            newest_tok,
                            (newest_tok.c.node_id == TokenSampleRow.node_id)
                            & (newest_tok.c.ts == TokenSampleRow.ts),
                        )
                    )
                    .scalars()
                    .all()
                )
                tokens: dict[int, list[TokenSampleRow]] = {}
                for t in tok_rows:
                    tokens.setdefault(t.node_id, []).append(t)
                nodes = []
                for node, host in host_rows:
                    toks = tokens.get(node.id, [])
                    rates = [
                        t.generation_tokens_per_s
                        for t in toks
                        if t.generation_tokens_per_s is not None
                    ]
                    totals = [
                        t.generation_tokens_total
                        for t in toks
                        if t.generation_tokens_total is not None
                    ]
                    nodes.append(
                        NodeView(
                            name=node.name,
                            drained=node.drained,
                            last_seen_at=node.last_seen_at,
                            host_ts=host.ts if host else None,
                            non_gpu_power_w=host.non_gpu_power_w if host else None,
                            power_source=host.power_source if host else None,
                            generation_tokens_per_s=sum(rates) if rates else None,
                            generation_tokens_total=sum(totals) if totals else None,
                            endpoints_up=sum(1 for t in toks if t.up),
                            endpoints_total=len(toks),
                        )
                    )
                return Snapshot(
                    ts=now, budget_w=budget, nodes=tuple(nodes), gpus=tuple(gpus.values())
                )
        except OperationalError as exc:
            raise self._guard(exc) from None
