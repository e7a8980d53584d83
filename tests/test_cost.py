"""Cost per million tokens: the arithmetic, hourly prices in the configured time zone,
and refusal of a price list that is not one per hour."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from wattkeeper.config import ConfigError, load_config
from wattkeeper.store.repository import GpuView, NodeView, Snapshot
from wattkeeper.summary import cost_options, facility_summary

T = 1_800_000_000.0


def snapshot(tps: float | None) -> Snapshot:
    node = NodeView("n1", False, T, T, 2000.0, "model", tps, None, 1, 1)
    gpu = GpuView(
        uuid="GPU-1", node="n1", index=0, name="H100", power_min_w=200.0, power_max_w=700.0,
        power_default_w=700.0, sample_ts=T, power_w=3000.0, energy_j=None, sm_clock_mhz=None,
        utilization_gpu_ratio=None, power_limit_w=700.0, throttle_reasons=(),
        target_power_limit_w=None, target_lease_expires_at=None,
    )  # fmt: skip
    return Snapshot(T, None, (node,), (gpu,))


def test_cost_per_million_tokens_counts_facility_power_through_the_pue() -> None:
    s = facility_summary(snapshot(10_000.0), price_per_kwh=0.12, pue=1.5)
    # 5 kW of IT power, 7.5 kW at the meter: 7.5 kWh/h at 0.12 = 0.9 per hour for 36M tokens.
    assert s["cost_per_million_tokens"] == pytest.approx(0.9 / 36, abs=1e-4)
    assert s["nodes"][0]["cost_per_million_tokens"] == s["cost_per_million_tokens"]
    assert facility_summary(snapshot(10_000.0))["cost_per_million_tokens"] is None  # no price
    assert facility_summary(snapshot(None), price_per_kwh=0.12)["cost_per_million_tokens"] is None


def test_hourly_prices_follow_the_configured_time_zone(tmp_path: Path) -> None:
    prices = [0.10] * 24
    prices[18] = 0.40  # the evening peak, local time
    path = tmp_path / "wattkeeper.toml"
    path.write_text(
        f'[controller]\ntimezone = "America/New_York"\n[cost]\nhourly_price_per_kwh = {prices}\n'
    )
    cfg = load_config(path, environ={})
    six_pm = dt.datetime(2026, 12, 1, 18, 30, tzinfo=ZoneInfo("America/New_York")).timestamp()
    assert cost_options(cfg, six_pm)["price_per_kwh"] == 0.40
    assert cost_options(cfg, six_pm - 3600)["price_per_kwh"] == 0.10


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (f"[cost]\nhourly_price_per_kwh = {[0.1] * 23}\n", "24 prices"),
        ("[cost]\npue = 0.9\n", "cost.pue"),
        ('[controller]\ntimezone = "Mars/Olympus"\n', "Mars/Olympus"),
    ],
)
def test_bad_cost_settings_name_the_key(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "wattkeeper.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=says):
        load_config(path, environ={})
