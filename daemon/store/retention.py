"""Retention: raw samples become one row per minute once older than the raw window, and
those rows go once older than the rollup window, so the store's size per GPU is bounded
whatever the run's length (docs/retention.md has the bytes per GPU per day).

One declaration per rollup column says how a minute is reduced (a mean, a maximum, ...)
and how a minute met twice is merged: samples that reach the store after their minute
was rolled up (an agent's spool flushed after a long outage) add to its row rather than
fail the transaction or double a count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, Engine, Float, case, cast, delete, func, literal, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from wattkeeper.store.models import (
    Base,
    GpuRollupRow,
    GpuSampleRow,
    HostRollupRow,
    HostSampleRow,
    TokenRollupRow,
    TokenSampleRow,
)

ROLLUP_S = 60.0
MAX_MINUTES_PER_CALL = 60
"""Minutes of each table rolled up per call: a backlog (after an outage or when retention
is first turned on) is caught up sixty times faster than it grows, in short
transactions."""

Reduce = Literal["mean", "max", "min", "sum"]


@dataclass(frozen=True)
class Column:
    into: str
    reduce: Reduce
    source: Callable[[Any], ColumnElement[Any]]
    """The raw expression reduced, given the raw model."""


@dataclass(frozen=True)
class RollupTable:
    raw: type[Base]
    rollup: type[Base]
    keys: tuple[str, ...]
    columns: tuple[Column, ...]


def _col(name: str) -> Callable[[Any], ColumnElement[Any]]:
    return lambda model: getattr(model, name)


def _share(condition: Callable[[Any], ColumnElement[bool]]) -> Callable[[Any], ColumnElement]:
    return lambda model: case((condition(model), 1.0), else_=0.0)


TABLES = (
    RollupTable(
        GpuSampleRow,
        GpuRollupRow,
        ("gpu_id",),
        (
            Column("power_mean_w", "mean", _col("power_w")),
            Column("power_max_w", "max", _col("power_w")),
            # Counters only grow between resets: their value at the minute's end is the
            # minute's largest, and consecutive rows difference to the minute's energy.
            Column("energy_j", "max", _col("energy_j")),
            Column("sm_clock_mean_mhz", "mean", _col("sm_clock_mhz")),
            Column("mem_clock_mean_mhz", "mean", _col("mem_clock_mhz")),
            Column("utilization_gpu_mean_ratio", "mean", _col("utilization_gpu_ratio")),
            Column("temperature_mean_c", "mean", _col("temperature_c")),
            Column("temperature_max_c", "max", _col("temperature_c")),
            Column("power_limit_min_w", "min", _col("power_limit_w")),
            Column("power_limit_max_w", "max", _col("power_limit_w")),
            Column(
                "power_capped_ratio",
                "mean",
                _share(lambda m: m.throttle_reasons.contains("sw_power_cap", autoescape=True)),
            ),
        ),
    ),
    RollupTable(
        HostSampleRow,
        HostRollupRow,
        ("node_id",),
        (
            Column("cpu_util_mean_ratio", "mean", _col("cpu_util_ratio")),
            Column("non_gpu_power_mean_w", "mean", _col("non_gpu_power_w")),
            Column("non_gpu_power_max_w", "max", _col("non_gpu_power_w")),
        ),
    ),
    RollupTable(
        TokenSampleRow,
        TokenRollupRow,
        ("node_id", "endpoint", "model"),
        (
            Column("up_ratio", "mean", _share(lambda m: m.up)),
            Column("prompt_tokens_total", "max", _col("prompt_tokens_total")),
            Column("generation_tokens_total", "max", _col("generation_tokens_total")),
            Column("generation_tokens_mean_per_s", "mean", _col("generation_tokens_per_s")),
            Column("requests_running_mean", "mean", _col("requests_running")),
            Column("requests_waiting_mean", "mean", _col("requests_waiting")),
            Column("kv_cache_usage_max_ratio", "max", _col("kv_cache_usage_ratio")),
            Column("ttft_p90_max_s", "max", _col("ttft_p90_s")),
            Column("tpot_p90_max_s", "max", _col("tpot_p90_s")),
            Column("ttft_mean_s", "mean", _col("ttft_mean_s")),
            Column("tpot_mean_s", "mean", _col("tpot_mean_s")),
            Column("latency_requests", "sum", _col("latency_requests")),
        ),
    ),
)

_AGGREGATE = {"mean": func.avg, "max": func.max, "min": func.min, "sum": func.sum}


def _merged(reduce: Reduce, old: Any, new: Any, old_n: Any, new_n: Any) -> ColumnElement:
    """A minute's row met again: either side may be NULL (no reading), and then the other
    stands; means are weighted by the samples behind them."""
    if reduce == "mean":
        both: ColumnElement = (old * old_n + new * new_n) / cast(old_n + new_n, Float)
    elif reduce == "sum":
        both = old + new
    elif reduce == "max":
        both = case((old >= new, old), else_=new)
    else:
        both = case((old <= new, old), else_=new)
    return case((old.is_(None), new), (new.is_(None), old), else_=both)


def _roll_minute(conn: Connection, table: RollupTable, minute: float) -> int:
    """Roll up every raw row before ``minute`` + 60 s into rows at ``minute`` and delete
    them; the caller found no raw row older than ``minute``. Returns raw rows removed."""
    raw, rollup = table.raw, table.rollup
    end = minute + ROLLUP_S
    keys = [getattr(raw, k) for k in table.keys]
    query = (
        select(
            *keys,
            literal(minute, Float).label("ts"),
            func.count().label("samples"),
            *(_AGGREGATE[c.reduce](c.source(raw)).label(c.into) for c in table.columns),
        )
        .where(raw.ts >= minute, raw.ts < end)
        .group_by(*keys)
    )
    names = [*table.keys, "ts", "samples", *(c.into for c in table.columns)]
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(rollup).from_select(names, query)
    held = rollup.__table__.c
    old_n, new_n = held.samples, stmt.excluded.samples
    stmt = stmt.on_conflict_do_update(
        index_elements=[*table.keys, "ts"],
        set_={
            "samples": old_n + new_n,
            **{
                c.into: _merged(c.reduce, held[c.into], stmt.excluded[c.into], old_n, new_n)
                for c in table.columns
            },
        },
    )
    conn.execute(stmt)
    return conn.execute(delete(raw).where(raw.ts >= minute, raw.ts < end)).rowcount or 0


class _Transaction:
    """A connection and its transaction as one context: committed on success, rolled
    back on error, closed either way."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def __enter__(self) -> Connection:
        self.conn.begin()
        return self.conn

    def __exit__(self, kind: Any, *_: Any) -> None:
        try:
            if kind is None:
                self.conn.commit()
            else:
                self.conn.rollback()
        finally:
            self.conn.close()


@dataclass(frozen=True)
class Retained:
    minutes: int
    """Minutes rolled up, summed over the three tables."""
    raw_rows: int
    """Raw rows those minutes held (now deleted)."""
    rollup_rows: int
    """Rollup rows older than the rollup window, deleted."""
    caught_up: bool
    """False when a backlog is left for the next call."""


def roll_up(
    engine: Engine,
    now: float,
    raw_s: float,
    rollup_s: float,
    max_minutes: int = MAX_MINUTES_PER_CALL,
) -> Retained:
    """Roll up the whole minutes older than ``raw_s``, one minute of one table per
    transaction (short: the agents' inserts and the controller's writes never wait long
    behind it), then drop rollups older than ``rollup_s``.

    On PostgreSQL each transaction is REPEATABLE READ, so the rows it rolls up and the
    rows it deletes are the same (under READ COMMITTED a late row committed between the
    two statements would be deleted uncounted; now it waits for the next pass and is
    merged into its minute). It first takes a transaction-scoped advisory lock and
    skips the minute when another controller holds it, so two processes never roll one
    minute up twice. On SQLite the single writer does both.
    """

    def connect() -> Any:
        conn = engine.connect()
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        return _Transaction(conn)

    cutoff = math.floor((now - raw_s) / ROLLUP_S) * ROLLUP_S
    minutes = raw_rows = 0
    caught_up = True
    for table in TABLES:
        for _ in range(max_minutes):
            with connect() as conn:
                if conn.dialect.name == "postgresql" and not conn.scalar(
                    text("SELECT pg_try_advisory_xact_lock(hashtext('wattkeeper.retention'))")
                ):
                    return Retained(minutes, raw_rows, 0, caught_up=False)
                oldest = conn.scalar(select(func.min(table.raw.ts)).where(table.raw.ts < cutoff))
                if oldest is None:
                    break
                minute = math.floor(oldest / ROLLUP_S) * ROLLUP_S
                raw_rows += _roll_minute(conn, table, minute)
                minutes += 1
        else:
            caught_up = False
    dropped = 0
    with connect() as conn:
        for table in TABLES:
            rollup = table.rollup
            dropped += conn.execute(delete(rollup).where(rollup.ts < now - rollup_s)).rowcount or 0
    return Retained(minutes, raw_rows, dropped, caught_up)
