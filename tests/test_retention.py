"""Retention: raw samples become minutes once older than the raw window, minutes go once
older than the rollup window, on SQLite and a real PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from wattkeeper.collectors.gpu import GpuInfo, GpuSample, PowerLimitConstraints
from wattkeeper.config import ConfigError, load_config
from wattkeeper.store.db import make_engine, upgrade
from wattkeeper.store.models import (
    AuditEntry,
    GpuRollupRow,
    GpuSampleRow,
    HostRollupRow,
    TokenRollupRow,
    TokenSampleRow,
)
from wattkeeper.store.repository import Store, TokenRow

T0 = 1_800_000_000.0  # a whole minute
UUIDS = ("GPU-ret-0", "GPU-ret-1")


def _info(uuid: str, index: int) -> GpuInfo:
    return GpuInfo(
        uuid=uuid,
        index=index,
        name="NVIDIA H100 80GB HBM3",
        pci_bus_id=f"00000000:1{index}:00.0",
        memory_total_bytes=80 * 2**30,
        power_limits=PowerLimitConstraints(200.0, 700.0, 700.0),
        max_sm_clock_mhz=1980,
    )


@pytest.fixture
def store(db_url) -> Store:
    engine = make_engine(db_url)
    upgrade(engine)
    s = Store(engine)
    return s


def _write(store: Store, ids: dict[str, int], t: float, power: float, **gpu: object) -> None:
    samples = [
        GpuSample(
            uuid=u,
            timestamp=t,
            power_w=power + 100 * i,
            energy_j=1000.0 * (t - T0),
            temperature_c=60.0 + i,
            power_limit_w=700.0,
            throttle_reasons=("sw_power_cap",) if power > 500 else (),
            **gpu,
        )
        for i, u in enumerate(UUIDS)
    ]
    store.write_samples(
        "n0",
        ids,
        samples,
        t,
        host=(0.5, 900.0 + power, "model"),
        tokens=[
            TokenRow(
                endpoint="http://n0:8000/metrics",
                model="m",
                up=t % 20 != 0,
                generation_tokens_total=10 * (t - T0),
                generation_tokens_per_s=power,
                latency_requests=3.0,
                tpot_p90_s=power / 10_000,
            )
        ],
    )


def _count(store: Store, model) -> int:
    with store.engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(model))


def test_minutes_past_the_raw_window_become_one_row_each(store):
    ids = store.register_node("n0", "sim", [_info(u, i) for i, u in enumerate(UUIDS)], T0)
    for k in range(180):  # three minutes at 1 Hz: 400 W, 600 W, 400 W
        t = T0 + k
        _write(store, ids, t, 600.0 if 60 <= k < 120 else 400.0)

    # Raw window 90 s at T0 + 180: minute 0 is wholly older, minute 1 only in part.
    done = store.retain(T0 + 180, raw_s=90.0, rollup_s=3600.0)
    assert done.caught_up and done.minutes == 3  # one minute of each table
    assert done.raw_rows == 60 * 2 + 60 + 60
    with store.engine.connect() as conn:
        rows = conn.execute(select(GpuRollupRow).order_by(GpuRollupRow.gpu_id)).all()
        kept_from = conn.scalar(select(func.min(GpuSampleRow.ts)))
        tok = conn.execute(select(TokenRollupRow)).one()
        host = conn.execute(select(HostRollupRow)).one()
    assert kept_from == T0 + 60  # the partial minute stays raw
    assert [(r.ts, r.samples) for r in rows] == [(T0, 60), (T0, 60)]
    first, second = rows
    assert first.power_mean_w == pytest.approx(400.0) and second.power_mean_w == pytest.approx(500)
    assert first.energy_j == pytest.approx(1000.0 * 59)  # the counter at the minute's end
    assert first.temperature_max_c == 60.0 and second.temperature_max_c == 61.0
    assert first.power_capped_ratio == 0.0
    assert tok.samples == 60 and tok.up_ratio == pytest.approx(57 / 60)
    assert tok.latency_requests == pytest.approx(180.0)
    assert tok.generation_tokens_total == pytest.approx(590.0)
    assert host.non_gpu_power_max_w == pytest.approx(1300.0)

    # Later: the capped minute is rolled up too, and it says so.
    store.retain(T0 + 240, raw_s=90.0, rollup_s=3600.0)
    with store.engine.connect() as conn:
        capped = conn.scalar(
            select(GpuRollupRow.power_capped_ratio).where(GpuRollupRow.ts == T0 + 60).limit(1)
        )
    assert capped == pytest.approx(1.0)

    # Rollups older than their window go; so would audit entries, but not before 30 days.
    store.audit("test", "x.y", "n0", {}, T0)
    store.retain(T0 + 3600 + 30, raw_s=90.0, rollup_s=3600.0)
    with store.engine.connect() as conn:
        left = conn.scalars(select(GpuRollupRow.ts).distinct()).all()
    assert T0 not in left and T0 + 60 in left
    assert _count(store, AuditEntry) >= 1


def test_a_minute_met_again_is_merged_not_refused(store):
    """Samples of a minute already rolled up (an agent's spool flushed after a long
    outage) add to its row: the rollup neither fails nor counts anything twice."""
    ids = store.register_node("n0", "sim", [_info(u, i) for i, u in enumerate(UUIDS)], T0)
    for k in range(0, 30):
        _write(store, ids, T0 + k, 400.0)
    store.retain(T0 + 200, raw_s=90.0, rollup_s=3600.0)
    for k in range(30, 60):  # the late half of minute 0
        _write(store, ids, T0 + k, 800.0)
    done = store.retain(T0 + 200, raw_s=90.0, rollup_s=3600.0)
    assert done.minutes == 3 and done.raw_rows == 60 + 30 + 30
    with store.engine.connect() as conn:
        row = conn.execute(select(GpuRollupRow).where(GpuRollupRow.gpu_id == ids[UUIDS[0]])).one()
        tok = conn.execute(select(TokenRollupRow)).one()
    assert row.samples == 60
    assert row.power_mean_w == pytest.approx(600.0)
    assert row.power_max_w == 800.0
    assert row.power_capped_ratio == pytest.approx(0.5)
    assert row.energy_j == pytest.approx(1000.0 * 59)
    assert tok.latency_requests == pytest.approx(180.0)
    assert _count(store, TokenSampleRow) == 0


def test_a_backlog_is_caught_up_a_bounded_piece_at_a_time(store, monkeypatch):
    from wattkeeper.store import retention

    monkeypatch.setattr(retention, "MAX_MINUTES_PER_CALL", 2)
    ids = store.register_node("n0", "sim", [_info(u, i) for i, u in enumerate(UUIDS)], T0)
    for k in range(0, 300, 10):  # five minutes, gaps between samples
        _write(store, ids, T0 + k, 400.0)
    done = retention.roll_up(store.engine, T0 + 400, 60.0, 3600.0, max_minutes=2)
    assert not done.caught_up and done.minutes == 6  # two of each table
    while not done.caught_up:
        done = retention.roll_up(store.engine, T0 + 400, 60.0, 3600.0, max_minutes=2)
    assert _count(store, GpuSampleRow) == 0
    assert _count(store, GpuRollupRow) == 5 * 2


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[retention]\nraw_s = "1d"\nrollup_s = "1h"\n', "rollup_s"),
        ('[retention]\nraw_s = "30s"\n', "raw_s"),
        ('[store]\nretention_s = "2h"\n[retention]\nraw_s = "3h"\n', "older name"),
    ],
)
def test_retention_that_cannot_work_is_refused(tmp_path, toml, needle):
    path = tmp_path / "wattkeeper.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=needle):
        load_config(path, environ={})


def test_the_older_setting_still_sets_the_raw_window(tmp_path):
    path = tmp_path / "wattkeeper.toml"
    path.write_text('[store]\nretention_s = "2h"\n')
    cfg = load_config(path, environ={})
    assert cfg.retention.raw_s == 7200.0 == cfg.store.retention_s
    assert cfg.retention.rollup_s == 30 * 86400.0


def test_a_run_keeps_its_store_to_the_windows(tmp_path, sqlite_url):
    """The controller rolls up as it runs, on the run's own clock: after six simulated
    minutes with a one-minute raw window, older minutes are rollups and no raw row is
    older than the window plus the minute being filled."""
    import json

    from typer.testing import CliRunner

    from wattkeeper.cli import app

    path = tmp_path / "wattkeeper.toml"
    path.write_text('[retention]\nraw_s = "1m"\nrollup_s = "1h"\n')
    r = CliRunner().invoke(
        app,
        [
            "run",
            "--simulate",
            "1x2",
            "--duration",
            "6m",
            "--fast",
            "--db",
            sqlite_url,
            "--config",
            str(path),
            "-o",
            "json",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tokens"] > 0
    store = Store(make_engine(sqlite_url, must_exist=True))
    with store.engine.connect() as conn:
        newest = conn.scalar(select(func.max(GpuSampleRow.ts)))
        oldest = conn.scalar(select(func.min(GpuSampleRow.ts)))
        minutes = conn.scalars(select(GpuRollupRow.ts).distinct()).all()
    assert newest - oldest < 60 + 60 + 60  # raw window, the minute filling, one period
    assert len(minutes) >= 3
    assert all(m % 60 == 0 for m in minutes)
