"""SQLAlchemy models. Times are Unix seconds (float) so a simulated clock and a real one
store the same way and Prometheus-style arithmetic needs no conversion."""

from __future__ import annotations

from typing import ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    registered_at: Mapped[float] = mapped_column(Float)
    last_seen_at: Mapped[float] = mapped_column(Float)
    drained: Mapped[bool] = mapped_column(Boolean, default=False)
    drained_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    """Who drained it: 'controller', or a person ('cli:root'), whose drain the controller
    never undoes."""
    drain_now: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """The drain may not wait for the node's requests to finish (a budget below what the
    serving nodes draw at their floors): its agent runs its drain-now actuator once."""
    standby: Mapped[bool] = mapped_column(Boolean, default=False)
    """Its agent ran a drain that powers the node down: from then on a silent node is
    budgeted at standby power, not at the caps it last had."""
    backend: Mapped[str] = mapped_column(String(32))
    agent_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    """The agent process holding the name ('host machine-id pid token'); NULL once it
    stopped cleanly. Another agent may not take a name whose holder is still live."""


class Gpu(Base):
    __tablename__ = "gpus"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(String(96), unique=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(128))
    pci_bus_id: Mapped[str] = mapped_column(String(32))
    memory_total_bytes: Mapped[int] = mapped_column(BigInteger)
    power_min_w: Mapped[float] = mapped_column(Float)
    power_max_w: Mapped[float] = mapped_column(Float)
    power_default_w: Mapped[float] = mapped_column(Float)
    max_sm_clock_mhz: Mapped[int | None] = mapped_column(Integer, nullable=True)
    original_power_limit_w: Mapped[float | None] = mapped_column(Float, nullable=True)


class GpuSampleRow(Base):
    __tablename__ = "gpu_samples"
    # Unique: a tick the agent replays after a crash (stored, but not yet trimmed from
    # its spool) must not count twice in energy, rollups and rates.
    __table_args__ = (Index("uq_gpu_samples_gpu_ts", "gpu_id", "ts", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    gpu_id: Mapped[int] = mapped_column(ForeignKey("gpus.id", ondelete="CASCADE"))
    ts: Mapped[float] = mapped_column(Float, index=True)
    power_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    power_instant_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    energy_j: Mapped[float | None] = mapped_column(Float, nullable=True)
    sm_clock_mhz: Mapped[float | None] = mapped_column(Float, nullable=True)
    mem_clock_mhz: Mapped[float | None] = mapped_column(Float, nullable=True)
    utilization_gpu_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    temperature_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    power_limit_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    throttle_reasons: Mapped[str] = mapped_column(String(255), default="")


class HostSampleRow(Base):
    __tablename__ = "host_samples"
    __table_args__ = (Index("uq_host_samples_node_ts", "node_id", "ts", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    ts: Mapped[float] = mapped_column(Float, index=True)
    cpu_util_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    non_gpu_power_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    power_source: Mapped[str] = mapped_column(String(16), default="model")


class TokenSampleRow(Base):
    __tablename__ = "token_samples"
    __table_args__ = (
        Index(
            "uq_token_samples_node_ts", "node_id", "ts", "endpoint", "model", "series", unique=True
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    ts: Mapped[float] = mapped_column(Float, index=True)
    endpoint: Mapped[str] = mapped_column(String(512))
    model: Mapped[str] = mapped_column(String(255))
    up: Mapped[bool] = mapped_column(Boolean, default=True)
    prompt_tokens_total: Mapped[float | None] = mapped_column(Float, nullable=True)
    generation_tokens_total: Mapped[float | None] = mapped_column(Float, nullable=True)
    generation_tokens_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Reset-aware rate since the agent's previous scrape, so readers need no counter history."""
    requests_running: Mapped[float | None] = mapped_column(Float, nullable=True)
    requests_waiting: Mapped[float | None] = mapped_column(Float, nullable=True)
    kv_cache_usage_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    ttft_p90_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    """90th percentile of time to first token over the requests that finished their
    prefill since the agent's previous scrape (from the server's histogram)."""
    tpot_p90_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    """90th percentile of time per output token since the previous scrape."""
    ttft_mean_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Mean over the same window, exact where the quantiles are only as fine as the
    server's buckets."""
    tpot_mean_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    ttft_p90_floor_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    """The lower bound of the bucket the p90 falls in: what the buckets prove."""
    tpot_p90_floor_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_requests: Mapped[float | None] = mapped_column(Float, nullable=True)
    """How many observations the TPOT (else TTFT) quantile rests on."""
    error: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    series: Mapped[str] = mapped_column(String(255), default="", server_default="")
    """The labels that tell apart series of one model on one endpoint (``engine="0"``
    for a data-parallel vLLM engine, ``version="2"`` for a Triton model version)."""


class Budget(Base):
    __tablename__ = "budgets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(255), unique=True)
    """'facility' today; room/PDU/rack/node scopes join it as the budget tree grows."""
    limit_w: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    updated_by: Mapped[str] = mapped_column(String(255))


class BudgetSchedule(Base):
    """A budget that holds during a window: once (``at_ts``) or on a cron schedule."""

    __tablename__ = "budget_schedules"
    __table_args__: ClassVar[dict[str, bool]] = {"sqlite_autoincrement": True}
    """A removed schedule's id is never given to a new one: the audit log names them."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(255))
    limit_w: Mapped[float] = mapped_column(Float)
    duration_s: Mapped[float] = mapped_column(Float)
    cron: Mapped[str | None] = mapped_column(String(255), nullable=True)
    at_ts: Mapped[float | None] = mapped_column(Float, nullable=True)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(255))


class Target(Base):
    __tablename__ = "targets"
    __table_args__ = (UniqueConstraint("gpu_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    gpu_id: Mapped[int] = mapped_column(ForeignKey("gpus.id", ondelete="CASCADE"))
    power_limit_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    sm_clock_min_mhz: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sm_clock_max_mhz: Mapped[int | None] = mapped_column(Integer, nullable=True)
    issued_at: Mapped[float] = mapped_column(Float)
    lease_expires_at: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(String(1024), default="")
    epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """The leader epoch that wrote it; agents ignore a target from an older epoch."""


class Route(Base):
    """What the router in front of a node's servers should do: its weight and how many
    requests each of its servers may run. Written by the controller, published to the
    load balancer (HAProxy's runtime API, a JSON file, the HTTP endpoint)."""

    __tablename__ = "routes"

    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    weight: Mapped[int] = mapped_column(Integer)
    max_inflight: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Per server; NULL: the servers' own limit."""
    updated_at: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(String(1024), default="")


class Leader(Base):
    """The one row saying which controller plans: a lease with an epoch (fencing token)
    that grows with every change of holder."""

    __tablename__ = "leader"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)


class ControllerMemory(Base):
    """What the leading controller learned, so a restarted or new leader starts warm."""

    __tablename__ = "controller_memory"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)
    data: Mapped[dict] = mapped_column(JSON)


class AgentRole(Base):
    """On PostgreSQL, the login role each node's agent connects as (made by ``wattkeeper
    db add-agent``): row-level security lets it see and write that node's rows only."""

    __tablename__ = "agent_roles"

    role_name: Mapped[str] = mapped_column(String(63), primary_key=True)
    node: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(255))
    """Who or what caused it: 'cli:root', 'controller', 'agent:node-1'."""
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


# -- rollups: one row per minute where the raw samples have aged out ---------------------
# The leading controller writes them from the raw rows of each whole minute older than
# retention.raw_s, in the transaction that deletes those rows, and deletes them once
# older than retention.rollup_s. ``ts`` is the start of the minute; ``samples`` the raw
# rows behind the row. Means and maxima skip the readings a sample did not have;
# counters (energy, tokens) are their value at the minute's end: they only grow, so
# that is their largest value in the minute, and the energy of a minute is the
# difference between it and the previous row's.


class GpuRollupRow(Base):
    __tablename__ = "gpu_samples_1m"

    gpu_id: Mapped[int] = mapped_column(ForeignKey("gpus.id", ondelete="CASCADE"), primary_key=True)
    ts: Mapped[float] = mapped_column(Float, primary_key=True, index=True)
    samples: Mapped[int] = mapped_column(Integer)
    power_mean_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    power_max_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    energy_j: Mapped[float | None] = mapped_column(Float, nullable=True)
    sm_clock_mean_mhz: Mapped[float | None] = mapped_column(Float, nullable=True)
    mem_clock_mean_mhz: Mapped[float | None] = mapped_column(Float, nullable=True)
    utilization_gpu_mean_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    temperature_mean_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    temperature_max_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    power_limit_min_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    power_limit_max_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    power_capped_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Share of the minute's samples throttled by the power cap (``sw_power_cap``)."""


class HostRollupRow(Base):
    __tablename__ = "host_samples_1m"

    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    ts: Mapped[float] = mapped_column(Float, primary_key=True, index=True)
    samples: Mapped[int] = mapped_column(Integer)
    cpu_util_mean_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    non_gpu_power_mean_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    non_gpu_power_max_w: Mapped[float | None] = mapped_column(Float, nullable=True)


class TokenRollupRow(Base):
    __tablename__ = "token_samples_1m"

    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    endpoint: Mapped[str] = mapped_column(String(512), primary_key=True)
    model: Mapped[str] = mapped_column(String(255), primary_key=True)
    ts: Mapped[float] = mapped_column(Float, primary_key=True, index=True)
    samples: Mapped[int] = mapped_column(Integer)
    up_ratio: Mapped[float] = mapped_column(Float)
    """Share of the minute's reads that found the server up."""
    prompt_tokens_total: Mapped[float | None] = mapped_column(Float, nullable=True)
    generation_tokens_total: Mapped[float | None] = mapped_column(Float, nullable=True)
    generation_tokens_mean_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    requests_running_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    requests_waiting_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    kv_cache_usage_max_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    ttft_p90_max_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    """The worst of the reads' p90s: a quantile of quantiles is no quantile."""
    tpot_p90_max_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    ttft_mean_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Mean of the reads' means."""
    tpot_mean_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_requests: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Observations behind the reads' quantiles, summed over the minute."""
