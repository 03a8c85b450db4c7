"""Boundary reads of one meter: the register at an instant, and how it was obtained.

Python twin of SQL `nbm_boundary_read` (migrations 0020/0021/0033/0049). The whole-tenant
export computes boundary reads set-wise in SQL. A single-meter cycle read would pay ~8 ms
of planning for that statement (a dozen lookups on the `readings` hypertable, each
expanded into its chunks), so storage fetches the meter's readings around the cycle once
(a plain range scan, well under 1 ms) and the reads are computed here.
`tests/api/test_boundary_twin.py` holds both to the same result on random histories;
change one, change the other.

Exact integer arithmetic throughout: millilitres and microseconds. PostgreSQL's numeric
`div` and `mod` truncate toward zero, so `_div` and `_mod` do too.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from billing import quality
from billing.consumption import rolled_over, span_us
from billing.units import modulus_ml, unit_ml
from decoder.columns import Flag

# Reach of the lookups (the SQL function's default p_reach): neighbours within 35 days of
# the boundary, estimation history within 45 days.
NEIGHBOUR_REACH = timedelta(days=35)
HISTORY_REACH = timedelta(days=45)
# readings a cycle's boundary reads can use lie in [open - BEFORE, close + AFTER]
BEFORE = HISTORY_REACH
AFTER = NEIGHBOUR_REACH
_WEEK = timedelta(days=7)
_DAY = timedelta(days=1)
# an actual read is questionable (quality 10) when its meter flags any of these (832, as
# the SQL function has it)
_QUESTIONABLE_FLAGS = int(Flag.TAMPER | Flag.METER_ERROR | Flag.CLOCK_MISSING)
# a reading dated too far after it was received (a clock ahead, flagged at ingest) is never
# used (4096, as the SQL function has it)
CLOCK_AHEAD = int(Flag.CLOCK_AHEAD)


# how a read was obtained, and the basis of an estimated one
Method = Literal["actual", "interpolated", "estimated", "installation", "removal", "missing"]
Basis = Literal["reference_day", "average_daily_use", "last_read"]


@dataclass(frozen=True)
class Reading:
    """One stored reading as boundary reads and VEE checks see it."""

    meter_id: int
    read_at: datetime
    register_ml: int
    flags: int
    # ESPI quality it was entered with (manual read, import); None for a device reading
    quality: int | None = None


@dataclass(frozen=True)
class Tuning:
    """Boundary-read tuning: the actual-read window and the VEE gap limit (a boundary
    read interpolated across a longer outage is flagged `gap`). A clock running ahead is
    judged at ingest (Flag.CLOCK_AHEAD, storage.rows.FUTURE_TOLERANCE_S)."""

    actual_window: timedelta
    max_gap: timedelta = timedelta(hours=48)


@dataclass(frozen=True, slots=True)
class Meter:
    """What a boundary read needs to know of its meter."""

    installed_at: datetime
    removed_at: datetime | None
    initial_ml: int | None
    final_ml: int | None
    scale: int
    digits: int
    max_flow_ml_h: int

    @property
    def unit(self) -> int:
        """The register's smallest unit in mL."""
        return unit_ml(self.scale)

    @property
    def modulus(self) -> int:
        """The register's range in mL (it rolls over to 0 here)."""
        return modulus_ml(self.digits, self.scale)


@dataclass(frozen=True, slots=True)
class BoundaryRead:
    """The register at one instant and how it was obtained (`nbm_boundary_read`'s row)."""

    register_ml: int | None
    method: Method
    basis: Basis | None
    quality: int | None
    basis_at: datetime | None
    prev_at: datetime | None
    next_at: datetime | None
    rolled_over: bool
    used_flags: int | None


def _div(a: int, b: int) -> int:
    """Integer division truncating toward zero (PostgreSQL numeric `div`)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _mod(a: int, b: int) -> int:
    """Remainder with the dividend's sign (PostgreSQL numeric `mod`)."""
    return a - b * _div(a, b)


class History:
    """One meter's readings (meter_id is not looked at), oldest first, with the lookups
    `nbm_boundary_read` makes."""

    def __init__(self, readings: Sequence[Reading]) -> None:
        self.readings = sorted(readings, key=lambda r: r.read_at)
        self._times = [r.read_at for r in self.readings]

    def _between(self, lo: datetime, hi: datetime) -> Sequence[Reading]:
        """Readings with lo <= read_at <= hi."""
        i = bisect.bisect_left(self._times, lo)
        j = bisect.bisect_right(self._times, hi)
        return self.readings[i:j]

    def boundary_read(
        self,
        m: Meter,
        at: datetime,
        edge: str | None,
        bound: datetime,
        actual_window: timedelta,
    ) -> BoundaryRead:
        """The register at `at`: SQL `nbm_boundary_read(...)` with its default reach."""
        removed = m.removed_at or datetime.max.replace(tzinfo=at.tzinfo)

        def usable(r: Reading) -> bool:
            return r.read_at >= m.installed_at and not r.flags & CLOCK_AHEAD

        p = next(
            (
                r
                for r in reversed(self._between(bound - NEIGHBOUR_REACH, bound))
                if r.read_at > bound - NEIGHBOUR_REACH
                and r.read_at <= at
                and r.read_at <= removed
                and usable(r)
            ),
            None,
        )
        n = next(
            (
                r
                for r in self._between(bound, bound + NEIGHBOUR_REACH)
                if r.read_at > at and r.read_at <= removed and usable(r)
            ),
            None,
        )
        estimate = n is None and p is not None and edge != "remove"
        a_ml = b_ml = None
        base: Reading | None = None
        if estimate and p is not None:
            a_ml, b_ml = self._reference_day(p, at, bound, actual_window, usable)
            base = next(
                (
                    r
                    for r in self._between(
                        max(bound - HISTORY_REACH, p.read_at - timedelta(days=30)),
                        min(bound, p.read_at - _DAY),
                    )
                    if usable(r)
                ),
                None,
            )
        how = _how(m, at, edge, p, n, actual_window, a_ml, b_ml, base)
        return _read(m, at, how, p, n, a_ml, b_ml, base)

    def _reference_day(
        self,
        p: Reading,
        at: datetime,
        bound: datetime,
        window: timedelta,
        ok: Callable[[Reading], bool],
    ) -> tuple[int | None, int | None]:
        """Registers a week before the last reading and a week before `at` (ld.a, ld.b)."""
        a = b = None
        if p.read_at >= bound - _WEEK:
            target = p.read_at - _WEEK
            lo = max(bound - timedelta(days=15), target - window, bound - HISTORY_REACH)
            hi = min(bound, target + window)
            a = _nearest(self._between(lo, hi), target, ok)
        target = at - _WEEK
        lo = max(bound - timedelta(days=8), target - window, bound - HISTORY_REACH)
        hi = min(bound - timedelta(days=6), target + window)
        b = _nearest(self._between(lo, hi), target, ok)
        if a is None or b is None:
            return None, None
        return a.register_ml, b.register_ml


def _nearest(
    candidates: Sequence[Reading], target: datetime, ok: Callable[[Reading], bool]
) -> Reading | None:
    """The usable reading nearest `target` (ties: the earlier)."""
    best: Reading | None = None
    for r in candidates:
        if not ok(r):
            continue
        if best is None or abs(r.read_at - target) < abs(best.read_at - target):
            best = r
    return best


def _how(
    m: Meter,
    at: datetime,
    edge: str | None,
    p: Reading | None,
    n: Reading | None,
    window: timedelta,
    a_ml: int | None,
    b_ml: int | None,
    base: Reading | None,
) -> str:
    if edge == "install" and m.initial_ml is not None:
        return "installation"
    if edge == "remove" and m.final_ml is not None:
        return "removal"
    if (
        p is not None
        and at - p.read_at <= window
        and (n is None or at - p.read_at <= n.read_at - at)
    ):
        return "actual_prev"
    if n is not None and (n.read_at - at <= window or (p is None and edge == "install")):
        return "actual_next"
    if p is not None and n is not None:
        return "interpolated"
    if a_ml is not None and b_ml is not None:
        return "reference_day"
    if base is not None:
        return "average_daily_use"
    if p is not None:
        return "last_read"
    return "missing"


_METHOD: dict[str, Method] = {
    "installation": "installation",
    "removal": "removal",
    "actual_prev": "actual",
    "actual_next": "actual",
    "interpolated": "interpolated",
    "reference_day": "estimated",
    "average_daily_use": "estimated",
    "last_read": "estimated",
    "missing": "missing",
}
_BASIS: dict[str, Basis] = {
    "reference_day": "reference_day",
    "average_daily_use": "average_daily_use",
    "last_read": "last_read",
}
_QUALITY = {
    "installation": quality.VALID,
    "removal": quality.VALID,
    "interpolated": quality.INTERPOLATED,
    "reference_day": quality.REFERENCE_DAY,
    "average_daily_use": quality.PROJECTED,
    "last_read": quality.QUESTIONABLE,
}


def _read(
    m: Meter,
    at: datetime,
    how: str,
    p: Reading | None,
    n: Reading | None,
    a_ml: int | None,
    b_ml: int | None,
    base: Reading | None,
) -> BoundaryRead:
    unit, modulus = m.unit, m.modulus
    register: int | None = None
    wrapped = False
    code: int | None = _QUALITY.get(how)
    used_flags = None
    basis_at = p.read_at if p is not None else None
    if how == "installation":
        register, basis_at = m.initial_ml, m.installed_at
    elif how == "removal":
        register, basis_at = m.final_ml, m.removed_at
    elif how in ("actual_prev", "actual_next"):
        r = p if how == "actual_prev" else n
        assert r is not None
        register, basis_at, used_flags = r.register_ml, r.read_at, r.flags
        code = r.quality  # entered with one (manual read, import: 0033)
        if code is None:
            code = quality.QUESTIONABLE if r.flags & _QUESTIONABLE_FLAGS else quality.VALID
    elif how == "interpolated":
        assert p is not None
        assert n is not None
        raw = n.register_ml - p.register_ml
        dt, dt_at = span_us(p.read_at, n.read_at), span_us(p.read_at, at)
        wrapped = rolled_over(raw, modulus, dt, m.max_flow_ml_h)
        dr = raw + modulus if wrapped else raw
        num, den = 2 * dr * dt_at + dt * unit, 2 * dt * unit
        steps = _div(num, den) - (1 if _mod(num, den) < 0 else 0)
        register = _mod(p.register_ml + unit * steps, modulus)
    elif how == "reference_day":
        assert p is not None
        assert a_ml is not None
        assert b_ml is not None
        register = _mod(p.register_ml + _mod(b_ml - a_ml + modulus, modulus), modulus)
    elif how == "average_daily_use":
        assert p is not None
        assert base is not None
        used = _mod(p.register_ml - base.register_ml + modulus, modulus)
        dt, dt_at = span_us(base.read_at, p.read_at), span_us(p.read_at, at)
        steps = _div(2 * used * dt_at + dt * unit, 2 * dt * unit)
        register = _mod(p.register_ml + unit * steps, modulus)
    elif how == "last_read":
        assert p is not None
        register = p.register_ml
    elif how == "missing":
        basis_at = None
    return BoundaryRead(
        register_ml=register,
        method=_METHOD[how],
        basis=_BASIS.get(how),
        quality=code,
        basis_at=basis_at,
        prev_at=p.read_at if p is not None else None,
        next_at=n.read_at if n is not None else None,
        rolled_over=how == "interpolated" and wrapped,
        used_flags=used_flags,
    )


def gap_across(read: BoundaryRead, max_gap: timedelta) -> bool:
    """True when `read` was interpolated across an outage longer than `max_gap`.

    The outage is measured between the readings around the boundary, not cut at the cycle
    edge: 40 h + 44 h on either side is an 84 h gap. SQL twin: storage.billing._gap.
    """
    if read.method != "interpolated" or read.prev_at is None or read.next_at is None:
        return False
    return read.next_at - read.prev_at > max_gap
