"""VEE checks of one billing cycle (pure): rollover, reverse flow, spikes, zero streaks,
gaps, clock sanity, alarms from flags and events, meter exchange.

Input: the cycle's meters (oldest first), their readings from 90 days before the cycle to
its end, and their events. Output: `Issue`s and `Alarm`s, each dated, most severe first.
Thresholds (stated, and reported with each issue):
- spike_high: a >= 1-day window uses > 3x the baseline daily use and > 100 L/day more;
  spike_low: a >= 1-day window uses > 0 and < baseline / 3, baseline > 100 L/day;
  baseline = average daily use over the (up to) 90 days before the cycle, at least 7 days.
- gap: readings (or cycle edges) further apart than `max_gap`; and an outage across a
  cycle boundary whose boundary read was interpolated across it, measured between the
  readings around the boundary (40 h before + 44 h after is an 84 h gap, reported once with
  its whole span in each cycle that boundary read serves, instead of the cut pieces). The
  boundary reads say which were (billing.boundary.gap_across; SQL twin in storage.billing).
- zero_consumption: an unchanged register over at least `zero_streak` days.
- rollover: a drop whose wrap at 10^digits units is plausible at MAX_FLOW_ML_H (info;
  billing.consumption.rolled_over, the rule every consumption uses);
  reverse_flow: any other drop (negative consumption), or the REVERSE_FLOW flag.
- clock_future / before_installation / after_removal: readings excluded from billing
  (reported when dated in the cycle or the 7 days before it; clock_future also when dated
  in the day after it, as a reading received in the cycle can be). clock_future is a
  reading ingest flagged Flag.CLOCK_AHEAD: dated more than 5 minutes after it was received.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from billing import units
from billing.boundary import Reading
from billing.consumption import MAX_FLOW_ML_H, Kind, rolled_over
from billing.cycle import BoundaryGap
from decoder.columns import Flag

# plain ints: IntFlag arithmetic costs ~1 us an operation, and a cycle has hundreds
_ALARM_FLAGS = {
    int(Flag.LEAK): "leak",
    int(Flag.BURST): "burst",
    int(Flag.TAMPER): "tamper",
    int(Flag.REVERSE_FLOW): "reverse_flow",
    int(Flag.DRY): "dry",
    int(Flag.METER_ERROR): "meter_error",
    int(Flag.LOW_BATTERY): "low_battery",
    int(Flag.VALVE_ABNORMAL): "valve_abnormal",
}
_ANY_ALARM = sum(_ALARM_FLAGS)
_REVERSE_FLOW = int(Flag.REVERSE_FLOW)
_CLOCK_AHEAD = int(Flag.CLOCK_AHEAD)
_SEVERITY = {"error": 0, "warning": 1, "info": 2}
DAY = timedelta(days=1)
_SECOND = timedelta(seconds=1)
_NEAR = timedelta(days=7)  # excluded readings this close to the cycle could have been used
# storage.rows.MAX_CLOCK_AHEAD_S: a reading dated later than this after its receipt is
# never stored, so one received in the cycle is dated before its end plus this
_NONE = timedelta(0)
_LATE = {"clock_future": timedelta(days=1)}


@dataclass(frozen=True)
class Span:
    """One meter's part in the cycle."""

    meter_id: int
    kind: Kind
    digits: int
    scale: int
    installed_at: datetime
    removed_at: datetime | None


@dataclass(frozen=True, slots=True)
class Event:
    """A meter event (an alarm the meter reported) as stored."""

    meter_id: int
    kind: str
    occurred_at: datetime
    active: bool
    detail: str | None


@dataclass(frozen=True)
class Issue:
    """A VEE finding: code, severity, meter, time span, and a human detail."""

    code: str
    severity: str
    meter_id: int
    start: datetime
    end: datetime
    detail: str


@dataclass
class Alarm:
    """An alarm seen during the cycle, from meter events or reading flags."""

    kind: str
    source: str
    meter_id: int
    first_at: datetime
    last_at: datetime
    count: int = 1
    active: bool = True


@dataclass
class Report:
    """The cycle's issues and alarms."""

    issues: list[Issue] = field(default_factory=list)
    alarms: list[Alarm] = field(default_factory=list)


def _m3(ml: int) -> str:
    return str(units.m3(ml, -3))  # detail text: litres, exact


_WHY = {
    "clock_future": " (more than 5 minutes after it was received: a clock ahead)",
    "before_installation": " (before the meter's installation)",
    "after_removal": " (after the meter's removal)",
}


def _valid(r: Reading, s: Span) -> str | None:
    if r.flags & _CLOCK_AHEAD:
        return "clock_future"
    if r.read_at < s.installed_at:
        return "before_installation"
    if s.removed_at is not None and r.read_at > s.removed_at:
        return "after_removal"
    return None


def check_cycle(
    spans: list[Span],
    readings: list[Reading],
    events: Sequence[Event],
    *,
    open_at: datetime,
    close_at: datetime,
    now: datetime,
    max_gap: timedelta,
    zero_streak: timedelta,
    boundary_gaps: Sequence[BoundaryGap] = (),
) -> Report:
    """Run every check over the cycle [open_at, close_at) and return the report.

    `boundary_gaps`: the cycle's boundary reads interpolated across an outage longer than
    `max_gap` (billing.cycle.boundary_gaps).
    """
    report = Report()
    if len(spans) > 1:
        for old, new in itertools.pairwise(spans):
            at = new.installed_at
            report.issues.append(
                Issue(
                    "meter_exchange",
                    "info",
                    new.meter_id,
                    at,
                    at,
                    f"meter {old.meter_id} exchanged for {new.meter_id}: cycle consumption is "
                    "the sum of both meters'",
                )
            )
    for s in spans:
        mine = [r for r in readings if r.meter_id == s.meter_id]
        good: list[Reading] = []
        for r in mine:
            why = _valid(r, s)
            if why is None:
                good.append(r)
            elif open_at - _NEAR <= r.read_at < close_at + _LATE.get(why, _NONE):
                report.issues.append(
                    Issue(
                        why,
                        "warning",
                        s.meter_id,
                        r.read_at,
                        r.read_at,
                        f"reading dated {r.read_at.isoformat()}{_WHY[why]} excluded from billing",
                    )
                )
        mine_gaps = [g for g in boundary_gaps if g.meter_id == s.meter_id]
        _check_gaps(report, s, good, open_at, close_at, now, max_gap, mine_gaps)
        _check_series(report, s, good, open_at, close_at, now, zero_streak)
        _flag_alarms(report, s, [r for r in good if open_at <= r.read_at < close_at])
    for e in events:
        report.alarms.append(
            Alarm(e.kind, "event", e.meter_id, e.occurred_at, e.occurred_at, 1, e.active)
        )
    report.issues.sort(key=lambda i: (_SEVERITY[i.severity], i.start, i.code))
    report.alarms.sort(key=lambda a: (a.first_at, a.kind))
    return report


def _baseline_ml_day(good: list[Reading], open_at: datetime, modulus: int) -> int | None:
    before = [r for r in good if r.read_at <= open_at]
    if len(before) < 2 or before[-1].read_at - before[0].read_at < timedelta(days=7):
        return None
    used = (before[-1].register_ml - before[0].register_ml) % modulus
    return used * 86400 // ((before[-1].read_at - before[0].read_at) // _SECOND)


def _hours(span: timedelta) -> str:
    return f"{span / timedelta(hours=1):.0f}"


def _check_gaps(
    report: Report,
    s: Span,
    good: list[Reading],
    open_at: datetime,
    close_at: datetime,
    now: datetime,
    max_gap: timedelta,
    across: list[BoundaryGap],
) -> None:
    """Gaps inside the cycle, cut at its edges; a boundary read interpolated across a longer
    outage replaces the cut piece at its edge by the whole outage."""
    start = max(open_at, s.installed_at)
    stop = min(close_at, now, s.removed_at or close_at)
    edges = [start, *(r.read_at for r in good if start <= r.read_at < stop), stop]
    pairs = list(itertools.pairwise(edges))
    sides = {g.side for g in across}
    for i, (a, b) in enumerate(pairs):
        at_edge = (i == 0 and "opening" in sides) or (i == len(pairs) - 1 and "closing" in sides)
        if b - a > max_gap and not at_edge:
            report.issues.append(
                Issue(
                    "gap",
                    "warning",
                    s.meter_id,
                    a,
                    b,
                    f"no reading for {_hours(b - a)} h (limit {max_gap})",
                )
            )
    seen: dict[tuple[datetime, datetime], list[str]] = {}
    for g in across:
        seen.setdefault((g.prev_at, g.next_at), []).append(g.side)
    for (a, b), names in seen.items():
        reads = " and ".join(f"{n} read" for n in names)
        report.issues.append(
            Issue(
                "gap",
                "warning",
                s.meter_id,
                a,
                b,
                f"no reading for {_hours(b - a)} h across the cycle boundary (limit {max_gap}):"
                f" the {reads} {'was' if len(names) == 1 else 'were'} interpolated across it",
            )
        )


def _check_series(
    report: Report,
    s: Span,
    good: list[Reading],
    open_at: datetime,
    close_at: datetime,
    now: datetime,
    zero_streak: timedelta,
) -> None:
    modulus = units.modulus_ml(s.digits, s.scale)
    max_ml_h = MAX_FLOW_ML_H[s.kind]
    baseline = _baseline_ml_day(good, open_at, modulus)
    start = max(open_at, s.installed_at)
    stop = min(close_at, now, s.removed_at or close_at)
    inside = [r for r in good if start <= r.read_at < stop]
    prior = [r for r in good if r.read_at < start]
    series = prior[-1:] + inside
    add = report.issues.append
    zero_from: datetime | None = None
    win_start, win_used = None, 0
    for a, b in itertools.pairwise(series):
        used = b.register_ml - a.register_ml
        if used < 0:
            wrapped = used + modulus
            # whole seconds between the readings, as this check has always counted them
            over_us = (b.read_at - a.read_at) // _SECOND * 1_000_000
            if rolled_over(used, modulus, over_us, max_ml_h):
                used = wrapped
                add(
                    Issue(
                        "rollover",
                        "info",
                        s.meter_id,
                        a.read_at,
                        b.read_at,
                        f"register rolled over at 10^{s.digits} units: {_m3(wrapped)} m3 used",
                    )
                )
            else:
                add(
                    Issue(
                        "reverse_flow",
                        "error",
                        s.meter_id,
                        a.read_at,
                        b.read_at,
                        f"negative consumption {_m3(used)} m3 (not a plausible rollover)",
                    )
                )
        if used == 0:
            zero_from = zero_from or a.read_at
        else:
            if zero_from is not None and a.read_at - zero_from >= zero_streak:
                add(_zero(s, zero_from, a.read_at))
            zero_from = None
        win_start = win_start or a.read_at
        win_used += used
        if baseline is not None and b.read_at - win_start >= DAY:
            days = (b.read_at - win_start) / DAY
            rate = win_used / days
            if rate > 3 * baseline and rate - baseline > 100_000:
                add(
                    Issue(
                        "spike_high",
                        "warning",
                        s.meter_id,
                        win_start,
                        b.read_at,
                        f"{_m3(int(rate))} m3/day vs baseline {_m3(baseline)} m3/day (> 3x)",
                    )
                )
            elif 0 < rate < baseline / 3 and baseline > 100_000:
                add(
                    Issue(
                        "spike_low",
                        "warning",
                        s.meter_id,
                        win_start,
                        b.read_at,
                        f"{_m3(int(rate))} m3/day vs baseline {_m3(baseline)} m3/day (< 1/3)",
                    )
                )
            win_start, win_used = None, 0
    if zero_from is not None and series and series[-1].read_at - zero_from >= zero_streak:
        add(_zero(s, zero_from, series[-1].read_at))


def _zero(s: Span, start: datetime, end: datetime) -> Issue:
    return Issue(
        "zero_consumption",
        "warning",
        s.meter_id,
        start,
        end,
        f"register unchanged for {(end - start) / DAY:.1f} days",
    )


def _flag_alarms(report: Report, s: Span, inside: list[Reading]) -> None:
    seen: dict[str, Alarm] = {}
    for r in inside:
        if not r.flags & _ANY_ALARM:
            continue
        for bit, kind in _ALARM_FLAGS.items():
            if r.flags & bit:
                alarm = seen.get(kind)
                if alarm is None:
                    seen[kind] = Alarm(kind, "flag", s.meter_id, r.read_at, r.read_at)
                else:
                    alarm.last_at, alarm.count = r.read_at, alarm.count + 1
        if r.flags & _REVERSE_FLOW:
            report.issues.append(
                Issue(
                    "reverse_flow",
                    "warning",
                    s.meter_id,
                    r.read_at,
                    r.read_at,
                    "the meter flags reverse flow",
                )
            )
    if inside:
        last = inside[-1]
        for kind, alarm in seen.items():
            bit = next(b for b, k in _ALARM_FLAGS.items() if k == kind)
            alarm.active = bool(last.flags & bit)
    report.alarms.extend(seen.values())
