"""Budget schedules: a budget that holds during a window, once (``--at``) or recurring
(cron), as utilities ask for in demand response.

Pure: given the schedules and a moment, which windows are in force. The controller
looks ahead by its reaction time (a control period and an agent sample), so a step
down is met when the window opens, not one period after; a window closes on time.
Overlapping windows: the lowest budget holds, and so does the standing budget when it
is lower still.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger


class ScheduleError(ValueError):
    """A schedule that cannot be used; the message names the part that is wrong."""


@dataclass(frozen=True)
class Schedule:
    id: int
    scope: str
    limit_w: float
    duration_s: float
    cron: str | None = None
    at_ts: float | None = None
    timezone: str = "UTC"


def cron_trigger(expr: str, timezone: str) -> CronTrigger:
    """A five-field crontab expression ('0 17 * * 1-5') in ``timezone``."""
    try:
        zone = ZoneInfo(timezone)
    except (KeyError, ValueError, OSError) as exc:
        raise ScheduleError(f"unknown time zone {timezone!r}") from exc
    fields = expr.split()
    if len(fields) != 5:
        raise ScheduleError(
            f"cron {expr!r}: {len(fields)} fields (five: minute hour day month weekday)"
        )
    if fields[2] != "*" and fields[4] != "*":
        # crontab fires when either matches; APScheduler when both do. Refuse rather
        # than mean something else than the line says.
        raise ScheduleError(f"cron {expr!r}: restrict the day of month or the weekday, not both")
    try:
        minute, hour, day, month, weekday = fields
        weekday = _crontab_weekdays(weekday)
        return CronTrigger(
            minute=minute, hour=hour, day=day, month=month, day_of_week=weekday, timezone=zone
        )
    except ValueError as exc:
        raise ScheduleError(
            f"cron {expr!r}: {exc} (five fields: minute hour day month weekday)"
        ) from None


_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _crontab_weekdays(field: str) -> str:
    """crontab counts weekdays from Sunday = 0 (7 is Sunday too); APScheduler from Monday
    = 0, and its ``from_crontab`` does not translate, so '1-5' would mean Tuesday to
    Saturday. Numeric items become explicit day names; named ones pass through."""
    out: list[str] = []
    for item in field.split(","):
        if item == "*" or item.isalpha() or all(c.isalpha() or c == "-" for c in item):
            out.append(item)  # names ('mon-fri') mean the same to both
            continue
        if any(c.isalpha() for c in item):
            raise ValueError(f"weekday {item!r}: use numbers or names, not both")
        span, _, step = item.partition("/")
        if span == "*":
            lo, hi = 0, 6
        elif "-" in span:
            a, b = span.split("-", 1)
            lo, hi = int(a), int(b)
        else:
            lo = hi = int(span)
        if not (0 <= lo <= 7 and 0 <= hi <= 7 and lo <= hi):
            raise ValueError(f"weekday {item!r} (0-7, Sunday is 0 or 7)")
        days = range(lo, hi + 1, int(step) if step else 1)
        out.extend(_DAY_NAMES[d] for d in days)
    return ",".join(dict.fromkeys(out))


def window_start(s: Schedule, at: float) -> float | None:
    """Start of ``s``'s window that contains ``at`` (Unix seconds), or None."""
    if s.at_ts is not None:
        return s.at_ts if s.at_ts <= at < s.at_ts + s.duration_s else None
    assert s.cron is not None
    trigger = cron_trigger(s.cron, s.timezone)
    # The first firing after at - duration (strictly: a window is [start, start + d)),
    # in force iff it has already happened.
    since = dt.datetime.fromtimestamp(at - s.duration_s + 1e-3, dt.UTC)
    fire = trigger.get_next_fire_time(None, since)
    if fire is None:
        return None
    start = fire.timestamp()
    return start if start <= at else None


def next_start(s: Schedule, after: float) -> float | None:
    """The next window start after ``after``, for people (``budget schedule list``)."""
    if s.at_ts is not None:
        return s.at_ts if s.at_ts > after else None
    assert s.cron is not None
    fire = cron_trigger(s.cron, s.timezone).get_next_fire_time(
        None, dt.datetime.fromtimestamp(after, dt.UTC)
    )
    return None if fire is None else fire.timestamp()


def effective_budget(
    standing_w: float | None, schedules: list[Schedule], now: float, lead_s: float
) -> tuple[float | None, Schedule | None]:
    """The budget in force at ``now``, looking ``lead_s`` ahead for windows about to
    open (but not holding one past its end), and the schedule that set it (None: the
    standing budget). A row that no longer parses (a time zone gone from this host)
    sets nothing: the controller says so once; a display must not fail on it."""
    best, source = standing_w, None
    for s in schedules:
        try:
            if window_start(s, now) is None and window_start(s, now + lead_s) is None:
                continue
        except ScheduleError:
            continue
        if best is None or s.limit_w < best:
            best, source = s.limit_w, s
    return best, source
