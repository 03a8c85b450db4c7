"""Local-time calendar math: cycle bounds and DST-correct step boundaries (pure)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from billing.localtime import (
    CalendarError,
    add_months,
    cycle_bounds,
    cycles_in,
    local_midnight,
    parse_instant,
    step_boundaries,
)

BERLIN = ZoneInfo("Europe/Berlin")


def test_local_days_last_23_or_25_hours_across_dst() -> None:
    """Berlin's spring-forward day is 23 h, its fall-back day 25 h."""
    spring = step_boundaries(
        local_midnight(date(2024, 3, 31), BERLIN),
        local_midnight(date(2024, 4, 1), BERLIN),
        "1d",
        BERLIN,
    )
    assert spring[1] - spring[0] == timedelta(hours=23)
    autumn = step_boundaries(
        local_midnight(date(2024, 10, 27), BERLIN),
        local_midnight(date(2024, 10, 28), BERLIN),
        "1d",
        BERLIN,
    )
    assert autumn[1] - autumn[0] == timedelta(hours=25)


def test_cycle_bounds_by_day_or_dates() -> None:
    """A cycle day gives month-long cycles; explicit dates win and must name the cycle."""
    assert cycle_bounds(5, [], date(2024, 1, 5)) == (date(2024, 1, 5), date(2024, 2, 5))
    with pytest.raises(CalendarError, match="cycles start on day 5"):
        cycle_bounds(5, [], date(2024, 1, 6))
    dates = [date(2024, 1, 3), date(2024, 2, 7)]
    assert cycle_bounds(1, dates, date(2024, 1, 3)) == (date(2024, 1, 3), date(2024, 2, 7))
    with pytest.raises(CalendarError, match="no end date"):
        cycle_bounds(1, dates, date(2024, 2, 7))


def test_cycles_in_and_add_months() -> None:
    """Cycles starting within a range, at most 120; months move across years."""
    assert add_months(date(2024, 12, 28), 2) == date(2025, 2, 28)
    got = cycles_in(1, [], date(2024, 1, 15), date(2024, 4, 1))
    assert got == [
        (date(2024, 2, 1), date(2024, 3, 1)),
        (date(2024, 3, 1), date(2024, 4, 1)),
        (date(2024, 4, 1), date(2024, 5, 1)),
    ]
    assert len(cycles_in(1, [], date(1990, 1, 1), date(2100, 1, 1))) == 120


def test_naive_times_are_local_and_ranges_are_bounded() -> None:
    """A naive time is wall-clock time in the zone; an empty or huge range is refused."""
    at = parse_instant(datetime(2024, 1, 1, 1, 0), BERLIN)
    assert at == datetime(2024, 1, 1, 0, 0, tzinfo=UTC)
    with pytest.raises(CalendarError, match="need from < to"):
        step_boundaries(at, at, "1h", BERLIN)
    with pytest.raises(CalendarError, match="too many steps"):
        step_boundaries(at, at + timedelta(days=200), "1h", BERLIN)
