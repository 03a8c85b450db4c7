"""VEE checks of one cycle, without a database (billing.vee)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from billing.boundary import Reading
from billing.vee import Event, Report, Span, check_cycle
from decoder.columns import Flag

OPEN = datetime(2024, 2, 1, tzinfo=UTC)
CLOSE = datetime(2024, 3, 1, tzinfo=UTC)
D = timedelta(days=1)
SPAN = Span(1, "water", 5, -3, datetime(2023, 1, 1, tzinfo=UTC), None)


def daily(registers: list[int], start: datetime = OPEN, flags: int = 0) -> list[Reading]:
    """One reading a day from `start`."""
    return [Reading(1, start + k * D, ml, flags) for k, ml in enumerate(registers)]


def check(
    readings: list[Reading], spans: list[Span] | None = None, events: Sequence[Event] = ()
) -> Report:
    """The report over the February cycle, checked long after it ended."""
    return check_cycle(
        spans or [SPAN],
        readings,
        events,
        open_at=OPEN,
        close_at=CLOSE,
        now=CLOSE + 10 * D,
        max_gap=timedelta(hours=48),
        zero_streak=timedelta(days=7),
    )


def codes(report: Report) -> list[str]:
    """The report's issue codes, in order."""
    return [i.code for i in report.issues]


def test_a_plausible_drop_is_a_rollover_and_an_implausible_one_reverse_flow() -> None:
    """99.900 -> 0.100 m3 in a day on a 100 m3 register rolls over (info); a 0.9 m3 drop on
    a 100,000 m3 one is reverse flow (error)."""
    series = [98_000_000 + 100_000 * k for k in range(20)] + [
        100_000 + 100_000 * k for k in range(9)
    ]
    report = check(daily(series))
    assert codes(report) == ["rollover"]
    assert report.issues[0].detail == "register rolled over at 10^5 units: 0.200 m3 used"
    back = [10_000_000 + 100_000 * k for k in range(29)]
    back[10] -= 1_000_000
    big = Span(1, "water", 8, -3, SPAN.installed_at, None)  # a wrap would be 99,999 m3
    report = check(daily(back), [big])
    assert codes(report)[0] == "reverse_flow"
    assert report.issues[0].severity == "error"
    assert "negative consumption -0.900 m3" in report.issues[0].detail


def test_gaps_and_zero_streaks() -> None:
    """Three silent days are a gap; ten unchanged days a zero-consumption streak."""
    rising = [10_000_000 + 100_000 * k for k in range(29)]
    report = check([r for r in daily(rising) if not 5 <= (r.read_at - OPEN).days <= 7])
    assert codes(report) == ["gap"]
    assert report.issues[0].detail == "no reading for 96 h (limit 2 days, 0:00:00)"
    flat = rising[:10] + [rising[9]] * 10 + rising[20:]
    assert "zero_consumption" in codes(check(daily(flat)))


def test_exchange_excluded_readings_and_alarms() -> None:
    """A second meter is an exchange; a reading ingest flagged clock-ahead is excluded (and
    reported); events are alarms."""
    new = Span(2, "water", 5, -3, OPEN + 10 * D, None)
    future = Reading(1, OPEN + 3 * D, 1, int(Flag.CLOCK_AHEAD))
    events = [Event(1, "leak", OPEN + D, True, None)]
    report = check([*daily([10_000_000 + k for k in range(29)]), future], [SPAN, new], events)
    assert "meter_exchange" in codes(report)
    assert "clock_future" in codes(report)
    assert [(a.kind, a.source) for a in report.alarms] == [("leak", "event")]
    flagged = check(daily([10_000_000] * 29, flags=8 | 32))
    assert {(a.kind, a.count) for a in flagged.alarms} == {("leak", 29), ("reverse_flow", 29)}
