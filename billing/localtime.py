"""Local-time calendar math (pure, zoneinfo): cycle bounds and DST-correct step boundaries.

Boundaries are local wall-clock instants (midnight, the hour, the 1st of the month) turned
into aware UTC datetimes, so a local day lasts 23, 24 or 25 hours. A wall time that does
not exist (a spring-forward gap) resolves with fold=0, i.e. the offset in force before the
transition, which is also what PostgreSQL's `timestamp AT TIME ZONE` does.
"""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

Step = Literal["1h", "1d", "1mo"]
MAX_STEPS = 2000
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)


class CalendarError(ValueError):
    """A cycle or range that the calendar cannot produce; the message says why."""


def local_midnight(day: date, tz: ZoneInfo) -> datetime:
    """The UTC instant at which `day` starts in `tz`."""
    return datetime.combine(day, time(), tzinfo=tz).astimezone(UTC)


def add_months(day: date, months: int) -> date:
    """`day` moved by `months` calendar months (day of month must exist: <= 28 is safe)."""
    index = day.year * 12 + day.month - 1 + months
    return day.replace(year=index // 12, month=index % 12 + 1)


def cycle_bounds(cycle_day: int, dates: list[date], cycle: date) -> tuple[date, date]:
    """Local start and end dates of the cycle starting on `cycle`, or CalendarError."""
    if dates:
        if cycle not in dates:
            msg = f"no billing cycle starts on {cycle.isoformat()} in this tenant's calendar"
            raise CalendarError(msg)
        later = [d for d in dates if d > cycle]
        if not later:
            msg = f"the cycle starting {cycle.isoformat()} has no end date in the calendar yet"
            raise CalendarError(msg)
        return cycle, later[0]
    if cycle.day != cycle_day:
        msg = f"cycles start on day {cycle_day} of the month; {cycle.isoformat()} is not one"
        raise CalendarError(msg)
    if not date(1970, 1, 1) <= cycle < date(2199, 1, 1):
        msg = "cycle dates must lie between 1970 and 2199"
        raise CalendarError(msg)
    return cycle, add_months(cycle, 1)


def cycles_in(
    cycle_day: int, dates: list[date], first: date, last: date
) -> list[tuple[date, date]]:
    """The (start, end) of every cycle starting within [first, last], at most 120."""
    if dates:
        starts = [d for d in dates if first <= d <= last]
        return [(d, e) for d, e in itertools.pairwise(dates) if d in starts][:120]
    out: list[tuple[date, date]] = []
    start = date(first.year, first.month, cycle_day)
    if start < first:
        start = add_months(start, 1)
    while start <= last and len(out) < 120:
        out.append((start, add_months(start, 1)))
        start = add_months(start, 1)
    return out


def step_boundaries(start: datetime, end: datetime, step: Step, tz: ZoneInfo) -> list[datetime]:
    """UTC instants of the local step boundaries covering [start, end): first <= start."""
    if not EARLIEST <= start < end <= LATEST:
        msg = "need from < to, both between 1970-01-01 and 2200-01-01"
        raise CalendarError(msg)
    local = start.astimezone(tz)
    out: list[datetime] = []
    if step == "1h":
        at = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
        if at > start:  # a half-hour zone may floor past the start
            at -= timedelta(hours=1)
        while len(out) <= MAX_STEPS:
            out.append(at)
            if at >= end:
                break
            at += timedelta(hours=1)
    else:
        day = local.date() if step == "1d" else local.date().replace(day=1)
        while len(out) <= MAX_STEPS:
            at = local_midnight(day, tz)
            out.append(at)
            if at >= end:
                break
            day = day + timedelta(days=1) if step == "1d" else add_months(day, 1)
    if len(out) > MAX_STEPS:
        msg = f"too many steps: at most {MAX_STEPS} per request, use a larger step"
        raise CalendarError(msg)
    return out


def parse_instant(value: datetime, tz: ZoneInfo) -> datetime:
    """An aware UTC datetime: naive values are wall-clock time in `tz`."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=tz)
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:
        msg = "date out of range"
        raise CalendarError(msg) from exc
