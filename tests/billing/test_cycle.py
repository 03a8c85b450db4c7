"""A meter's cycle row and the publication rule, without a database (billing.cycle)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from billing.boundary import BoundaryRead, Meter, Method
from billing.cycle import (
    CycleMeter,
    CycleRow,
    Published,
    boundary_gaps,
    cycle_row,
    to_publish,
    total_m3,
    total_quality,
)

OPEN = datetime(2024, 2, 1, tzinfo=UTC)
CLOSE = datetime(2024, 3, 1, tzinfo=UTC)
SPEC = Meter(datetime(2023, 1, 1, tzinfo=UTC), None, None, None, -3, 5, 10_000_000)
METER = CycleMeter(1, "A-1", None, "water", None, SPEC)
MAX_GAP = timedelta(hours=48)


def b(ml: int | None, quality: int | None = 0, method: Method = "actual") -> BoundaryRead:
    """A boundary read with just a register, method and quality."""
    return BoundaryRead(ml, method, None, quality, None, None, None, False, None)


def row(
    o: BoundaryRead, c: BoundaryRead, latest: dict[tuple[int, datetime], Published] | None = None
) -> CycleRow:
    """The row of METER from `o` at OPEN to `c` at CLOSE."""
    return cycle_row(METER, date(2024, 2, 1), ((OPEN, o), (CLOSE, c)), latest or {}, MAX_GAP)


def test_consumption_quality_and_flags() -> None:
    """Consumption is the difference; quality mixes; a rollover and reverse flow are flagged."""
    got = row(b(1_000_000), b(3_000_000))
    assert (got.consumption_ml, got.consumption_quality) == (2_000_000, 0)
    assert not got.rolled_over
    assert not got.reverse
    assert row(b(1_000_000, 7), b(3_000_000, 0)).consumption_quality == 13
    assert row(b(1_000_000, None), b(3_000_000)).consumption_quality is None
    wrapped = row(b(99_000_000), b(1_900_000))
    assert (wrapped.consumption_ml, wrapped.rolled_over) == (2_900_000, True)
    assert row(b(99_000_000), b(None)).consumption_ml is None


def test_revised_when_the_published_register_differs() -> None:
    """A side is revised after a second revision or a published register unlike today's."""
    pub = Published(1, CLOSE, 1, 3_000_000, "actual", 0, CLOSE)
    assert not row(b(1_000_000), b(3_000_000), {(1, CLOSE): pub}).revised
    assert row(b(1_000_000), b(3_100_000), {(1, CLOSE): pub}).revised
    pub2 = Published(1, OPEN, 2, 1_000_000, "actual", 0, CLOSE)
    assert row(b(1_000_000), b(3_000_000), {(1, OPEN): pub2}).revised


def test_boundary_gaps_name_the_side() -> None:
    """An opening read interpolated across more than the gap limit is reported once."""
    long = BoundaryRead(
        1,
        "interpolated",
        None,
        9,
        None,
        OPEN - timedelta(hours=40),
        OPEN + timedelta(hours=44),
        False,
        None,
    )
    gaps = boundary_gaps([row(long, b(3_000_000))])
    assert [(g.side, g.prev_at, g.next_at) for g in gaps] == [
        ("opening", OPEN - timedelta(hours=40), OPEN + timedelta(hours=44))
    ]


def test_to_publish_first_and_changed_reads_of_passed_boundaries() -> None:
    """Unpublished reads at or before now are revision 1, changed ones the next revision."""
    now = CLOSE
    reads = [(1, OPEN, b(1_000_000)), (1, CLOSE, b(3_000_000)), (2, OPEN, b(5))]
    later = [(1, CLOSE + timedelta(days=1), b(4_000_000))]
    published = [
        Published(1, OPEN, 1, 999_000, "actual", 0, OPEN),
        Published(2, OPEN, 1, 5, "actual", 0, OPEN),
    ]
    got = to_publish(reads + later, published, now)
    assert [(p.meter_id, p.boundary_at, p.revision, p.register_ml) for p in got] == [
        (1, OPEN, 2, 1_000_000),
        (1, CLOSE, 1, 3_000_000),
    ]


def test_exchange_totals_sum_the_rows_as_shown() -> None:
    """An exchange's consumption sums each meter's rounded m3; qualities mix to 13."""
    new_meter = CycleMeter(2, "A-2", None, "water", None, Meter(OPEN, None, 0, None, -2, 5, 1))
    old = row(b(1_000_000), b(2_504_000))  # 1.504 m3 on a litre register
    new = cycle_row(
        new_meter, date(2024, 2, 1), ((OPEN, b(0, 7)), (CLOSE, b(10_000, 7))), {}, MAX_GAP
    )
    assert str(total_m3([old, new])) == "1.514"
    assert total_quality([old, new]) == 13
    assert total_quality([old]) == 0
    assert total_m3([old, row(b(1), b(None))]) is None
