"""Boundary reads of one meter, computed without a database (billing.boundary).

Each way a read is obtained, on small hand-made histories; the SQL twin is held equal on
random fleets by tests/api/test_boundary_twin.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from billing.boundary import BoundaryRead, History, Meter, Reading, gap_across
from decoder.columns import Flag

AT = datetime(2024, 2, 1, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)
WINDOW = H
METER = Meter(
    installed_at=datetime(2023, 1, 1, tzinfo=UTC),
    removed_at=None,
    initial_ml=None,
    final_ml=None,
    scale=-3,
    digits=5,
    max_flow_ml_h=10_000_000,
)


def r(at: datetime, ml: int, flags: int = 0, quality: int | None = None) -> Reading:
    """One reading of meter 1."""
    return Reading(1, at, ml, flags, quality)


def read(readings: list[Reading], meter: Meter = METER, edge: str | None = None) -> BoundaryRead:
    """The boundary read at AT."""
    return History(readings).boundary_read(meter, AT, edge, AT, WINDOW)


def test_actual_read_within_the_window() -> None:
    """A reading 30 min before the boundary is the read, quality 0."""
    got = read([r(AT - 30 * H / 60, 1_500_000), r(AT + 10 * H, 1_900_000)])
    assert (got.method, got.register_ml, got.quality) == ("actual", 1_500_000, 0)


def test_questionable_flags_and_entered_quality() -> None:
    """A tamper-flagged actual read is quality 10; a manual read keeps its 7."""
    assert read([r(AT, 1_000_000, flags=64)]).quality == 10
    assert read([r(AT, 1_000_000, quality=7)]).quality == 7


def test_interpolated_rounds_to_the_register_unit() -> None:
    """Halfway between 1.000 and 1.001 m3 rounds half up to whole litres: 1.001."""
    got = read([r(AT - 6 * H, 1_000_000), r(AT + 6 * H, 1_001_000)])
    assert (got.method, got.register_ml, got.quality) == ("interpolated", 1_001_000, 9)
    assert (got.prev_at, got.next_at) == (AT - 6 * H, AT + 6 * H)


def test_interpolated_across_a_rollover() -> None:
    """99.000 -> 1.000 m3 on a 100 m3 register over 24 h: the midpoint is 0.000."""
    got = read([r(AT - 12 * H, 99_000_000), r(AT + 12 * H, 1_000_000)])
    assert (got.register_ml, got.rolled_over) == (0, True)


def test_estimates_when_nothing_follows() -> None:
    """No later reading: reference day with a week's history, else average use, else last."""
    week = [r(AT - 8 * D + k * D, 1_000_000 + 100_000 * k) for k in range(8)]
    got = read(week)
    assert (got.method, got.basis, got.quality) == ("estimated", "reference_day", 8)
    two = [r(AT - 10 * D, 1_000_000), r(AT - 2 * D, 1_800_000)]
    got = read(two)
    assert (got.basis, got.quality, got.register_ml) == ("average_daily_use", 12, 2_000_000)
    got = read([r(AT - 2 * D, 1_800_000)])
    assert (got.basis, got.quality, got.register_ml) == ("last_read", 10, 1_800_000)
    assert read([]).method == "missing"


def test_installation_and_removal_registers() -> None:
    """A meter installed (removed) at the boundary with its register: quality 0."""
    meter = Meter(AT, AT, 5_000, 7_000, -3, 5, 10_000_000)
    got = read([], meter, "install")
    assert (got.method, got.register_ml, got.basis_at) == ("installation", 5_000, AT)
    got = read([], meter, "remove")
    assert (got.method, got.register_ml, got.quality) == ("removal", 7_000, 0)


def test_future_clock_and_preinstallation_readings_are_unused() -> None:
    """A reading ingest flagged clock-ahead (dated after it was received + the tolerance) or
    one before installation is skipped."""
    future = Reading(1, AT, 9_000_000, int(Flag.CLOCK_AHEAD), None)
    assert read([future]).method == "missing"
    meter = Meter(AT - H, None, None, None, -3, 5, 10_000_000)
    assert read([r(AT - 2 * H, 1_000_000)], meter).method == "missing"


def test_gap_across_measures_between_the_readings() -> None:
    """40 h before + 44 h after the boundary is an 84 h outage: over a 48 h limit."""
    got = read([r(AT - 40 * H, 1_000_000), r(AT + 44 * H, 1_840_000)])
    assert got.method == "interpolated"
    assert gap_across(got, timedelta(hours=48))
    assert not gap_across(got, timedelta(hours=84))
    assert not gap_across(read([r(AT, 1_000_000)]), timedelta(0))
