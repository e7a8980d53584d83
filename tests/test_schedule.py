"""Budget schedules: windows in a time zone, the lead that makes a step down on time,
the store on both databases, the CLI's refusals, and the controller on the simulated
clock obeying a window."""

from __future__ import annotations

import datetime as dt
import json
from zoneinfo import ZoneInfo

import pytest
from typer.testing import CliRunner

from wattkeeper.cli import app
from wattkeeper.clock import SimClock
from wattkeeper.config import load_config
from wattkeeper.policies.schedule import (
    Schedule,
    ScheduleError,
    effective_budget,
    next_start,
    window_start,
)
from wattkeeper.runtime import build_simulated, open_store
from wattkeeper.simulator.facility import FacilitySpec
from wattkeeper.store.db import make_engine, upgrade
from wattkeeper.store.repository import Store

PARIS = ZoneInfo("Europe/Paris")


def ts(*args: int, tz: ZoneInfo = PARIS) -> float:
    return dt.datetime(*args, tzinfo=tz).timestamp()


def test_a_cron_window_is_in_force_in_its_time_zone() -> None:
    weekdays_5pm = Schedule(
        1, "facility", 12_000.0, 3 * 3600.0, cron="0 17 * * 1-5", timezone="Europe/Paris"
    )
    # Tuesday 1 December 2026, Paris time.
    assert window_start(weekdays_5pm, ts(2026, 12, 1, 16, 59)) is None
    assert window_start(weekdays_5pm, ts(2026, 12, 1, 17, 30)) == ts(2026, 12, 1, 17, 0)
    assert window_start(weekdays_5pm, ts(2026, 12, 1, 19, 59)) == ts(2026, 12, 1, 17, 0)
    assert window_start(weekdays_5pm, ts(2026, 12, 1, 20, 0)) is None  # ends on time
    assert window_start(weekdays_5pm, ts(2026, 12, 5, 17, 30)) is None  # a Saturday
    assert next_start(weekdays_5pm, ts(2026, 12, 4, 21, 0)) == ts(2026, 12, 7, 17, 0)
    sundays = Schedule(3, "facility", 1.0, 3600.0, cron="0 9 * * 0", timezone="Europe/Paris")
    assert window_start(sundays, ts(2026, 12, 6, 9, 30)) is not None  # crontab: 0 is Sunday
    assert window_start(sundays, ts(2026, 12, 7, 9, 30)) is None
    utc = Schedule(2, "facility", 1.0, 3600.0, cron="0 17 * * *")
    assert window_start(utc, ts(2026, 12, 1, 17, 30, tz=ZoneInfo("UTC"))) is not None


def test_a_bad_cron_or_zone_names_the_problem() -> None:
    with pytest.raises(ScheduleError, match="five"):
        window_start(Schedule(1, "facility", 1.0, 60.0, cron="0 17 * *"), 0.0)
    with pytest.raises(ScheduleError, match="weekday"):
        window_start(Schedule(1, "facility", 1.0, 60.0, cron="0 17 * * 3-9"), 0.0)
    with pytest.raises(ScheduleError, match="not both"):  # crontab ORs them, APScheduler ANDs
        window_start(Schedule(1, "facility", 1.0, 60.0, cron="0 0 1 * 1"), 0.0)
    with pytest.raises(ScheduleError, match="numbers or names"):
        window_start(Schedule(1, "facility", 1.0, 60.0, cron="0 0 * * 1-fri"), 0.0)
    with pytest.raises(ScheduleError, match="Europe"):  # a folder of the zone database
        window_start(Schedule(1, "facility", 1.0, 60.0, cron="0 0 * * *", timezone="Europe"), 0.0)
    with pytest.raises(ScheduleError, match="61"):
        window_start(Schedule(1, "facility", 1.0, 60.0, cron="61 * * * *"), 0.0)
    with pytest.raises(ScheduleError, match="Mars/Olympus"):
        window_start(
            Schedule(1, "facility", 1.0, 60.0, cron="* * * * *", timezone="Mars/Olympus"), 0.0
        )


def test_the_lowest_budget_holds_and_a_step_is_taken_ahead_by_the_lead() -> None:
    soon = Schedule(1, "facility", 9_000.0, 600.0, at_ts=1_000.0)
    lower = Schedule(2, "facility", 8_000.0, 100.0, at_ts=1_200.0)
    assert effective_budget(20_000.0, [soon], 990.0, lead_s=6.0) == (20_000.0, None)
    assert effective_budget(20_000.0, [soon], 995.0, lead_s=6.0) == (9_000.0, soon)
    assert effective_budget(20_000.0, [soon, lower], 1_250.0, 6.0) == (8_000.0, lower)
    assert effective_budget(5_000.0, [soon], 1_100.0, 6.0) == (5_000.0, None)  # standing lower
    assert effective_budget(None, [soon], 1_100.0, 6.0) == (9_000.0, soon)
    # The window ends on time: the lead does not hold it longer.
    assert effective_budget(20_000.0, [soon], 1_600.0, 6.0) == (20_000.0, None)


def test_schedules_are_kept_in_the_store(db_url: str) -> None:
    upgrade(make_engine(db_url))
    store = Store(make_engine(db_url))
    a = store.add_schedule(Schedule(0, "facility", 9_000.0, 3600.0, cron="0 17 * * 1-5"), "t", 1.0)
    b = store.add_schedule(Schedule(0, "facility", 8_000.0, 60.0, at_ts=5.0), "t", 2.0)
    assert [(s.id, s.limit_w, s.cron, s.at_ts) for s in store.schedules()] == [
        (a, 9_000.0, "0 17 * * 1-5", None),
        (b, 8_000.0, None, 5.0),
    ]
    assert store.remove_schedule(a, "t", 3.0) and not store.remove_schedule(a, "t", 4.0)
    assert [s.id for s in store.schedules()] == [b]
    assert store.remove_schedule(b, "t", 5.0)
    # Ids are never reused: the audit log names schedules by id.
    c = store.add_schedule(Schedule(0, "facility", 7_000.0, 60.0, at_ts=9.0), "t", 6.0)
    assert c not in (a, b)
    store.remove_schedule(c, "t", 7.0)
    actions = [e.action.removeprefix("budget.schedule.") for e in store.audit_log(6)]
    assert actions == ["remove", "add", "remove", "remove", "add", "add"]


def test_the_cli_adds_lists_and_removes_and_refuses_what_cannot_work(sqlite_url: str) -> None:
    upgrade(make_engine(sqlite_url))
    store = Store(make_engine(sqlite_url))
    from wattkeeper.collectors.gpu import GpuInfo, PowerLimitConstraints

    gpus = [
        GpuInfo(
            f"GPU-s-{i}",
            i,
            "H100",
            f"0:{i}",
            80 * 2**30,
            PowerLimitConstraints(200.0, 700.0, 700.0),
            1980,
        )
        for i in range(8)
    ]
    store.register_node("n1", "sim", gpus, 1e12)  # seen "now" for any wall clock
    runner = CliRunner()

    def cli(*args: str):
        return runner.invoke(app, ["budget", "schedule", *args, "--db", sqlite_url])

    r = cli("add", "12kW", "--cron", "0 17 * * 1-5", "--for", "3h")
    assert r.exit_code == 0 and "schedule 1: facility 12.0 kW" in r.stdout
    # 8 GPUs at their 200 W floor and a node's assumed 2 kW host: 3.6 kW at least.
    r = cli("add", "facility", "1kW", "--at", "2030-01-01T17:00", "--for", "1h")
    assert r.exit_code == 1 and "3.60 kW" in r.output and "--force" in r.output
    assert cli("add", "1kW", "--at", "2030-01-01T17:00", "--for", "1h", "--force").exit_code == 0
    for bad, says in (
        (["room-1", "9kW", "--at", "2030-01-01T17:00", "--for", "1h"], "unknown budget domain"),
        (["9kW", "--cron", "61 * * * *", "--for", "1h"], "61"),
        (["9kW", "--at", "tomorrow", "--for", "1h"], "ISO 8601"),
        (["9kW", "--for", "1h"], "exactly one of --cron and --at"),
        (["9kW", "--at", "2030-01-01T17:00"], "--for"),
        (["9kW", "--at", "2020-01-01T17:00", "--for", "1h"], "over already"),
        (["9", "--at", "2030-01-01T17:00", "--for", "1h"], "unit"),
    ):
        r = cli("add", *bad)
        assert r.exit_code != 0 and says in r.output, (bad, r.output)
    assert len(store.schedules()) == 2  # nothing refused was written
    # A window open now is the budget in force in status (and on /metrics).
    started = dt.datetime.now(ZoneInfo("UTC")) - dt.timedelta(minutes=1)
    at = started.replace(tzinfo=None).isoformat(timespec="seconds")
    r = cli("add", "2kW", "--at", at, "--for", "1h", "--force")
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["status", "-o", "json", "--db", sqlite_url])
    assert r.exit_code == 0 and json.loads(r.stdout)["budget_w"] == 2000.0
    store.remove_schedule(3, "test", 0.0)
    r = cli("list", "-o", "json")
    assert r.exit_code == 0 and '"cron": "0 17 * * 1-5"' in r.stdout
    assert cli("remove", "1").exit_code == 0
    r = cli("remove", "1")
    assert r.exit_code == 1 and "no budget schedule 1" in r.output


def test_the_controller_meets_a_scheduled_window_on_time_and_lets_go_after(
    sqlite_url: str,
) -> None:
    """A one-off window 60-180 s into a simulated run, well below the draw: the facility
    is inside it from the first second of the window (the step is applied ahead by the
    reaction time) and back above it once the window has closed."""
    upgrade(make_engine(sqlite_url))
    cfg = load_config(None, environ={})
    store = open_store(cfg, sqlite_url)
    start = 20_000.0
    rt = build_simulated(cfg, store, FacilitySpec(1, 8), SimClock(start))
    store.set_budget(1e6, "test", start)
    low = 7_000.0
    store.add_schedule(Schedule(0, "facility", low, 120.0, at_ts=start + 60.0), "test", start)
    seen = []
    for k in range(1, 241):
        rt.advance(start + k)
        seen.append((k, rt.facility.stats.second_power_w[-1]))
    during = [p for k, p in seen if 61 <= k < 180]
    after = [p for k, p in seen if k >= 200]
    assert max(during) <= low
    assert min(after) > low
    rt.store.engine.dispose()


def test_a_schedule_that_no_longer_parses_is_skipped_not_fatal(sqlite_url: str) -> None:
    """A row whose time zone this host does not know: said once, and planning goes on."""
    upgrade(make_engine(sqlite_url))
    cfg = load_config(None, environ={})
    store = open_store(cfg, sqlite_url)
    start = 40_000.0
    rt = build_simulated(cfg, store, FacilitySpec(1, 4), SimClock(start))
    store.set_budget(3_000.0, "test", start)
    bad = Schedule(0, "facility", 2_000.0, 3600.0, cron="* * * * *", timezone="Mars/Olympus")
    store.add_schedule(bad, "test", start)
    for k in range(1, 12):
        rt.advance(start + k)
    plan = rt.controller.state.last_plan
    assert plan is not None and plan.budget_w == 3_000.0
    for command in (["budget", "show"], ["status"], ["budget", "schedule", "list"]):
        r = CliRunner().invoke(app, [*command, "--db", sqlite_url])
        assert r.exit_code == 0 and "Traceback" not in r.output, (command, r.output)
    r = CliRunner().invoke(app, ["budget", "schedule", "list", "--db", sqlite_url])
    assert "ignored: unknown time zone 'Mars/Olympus'" in r.stdout
    rt.store.engine.dispose()
