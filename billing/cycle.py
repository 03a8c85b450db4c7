"""One meter's billing-cycle row from its two boundary reads, and the publication rule.

A row is what the export's JSON_COLUMNS (storage.billing) builds set-wise in SQL: the
opening and closing reads, the consumption between them (billing.consumption), its
quality (billing.quality.mixed), and whether a published revision differs. Volumes are
int mL; the API renders them in m3 (billing.units.m3), once.

Publication (SQL twin: storage.billing.PUBLISH_SQL): once a boundary has passed, its read
is published as revision 1, and a later different register (a late reading) as the next
revision.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

from billing import quality, units
from billing.boundary import BoundaryRead, Meter, gap_across
from billing.consumption import Kind, consumption, span_us


@dataclass(frozen=True, slots=True)
class CycleMeter:
    """A meter as its cycle read shows it, with what its boundary reads need (`spec`)."""

    meter_id: int
    address: str
    service_point: str | None
    kind: Kind
    timezone: str | None
    spec: Meter


@dataclass(frozen=True, slots=True)
class Publication:
    """A revision of a boundary read to publish."""

    meter_id: int
    boundary_at: datetime
    revision: int
    register_ml: int | None
    method: str
    quality: int | None


@dataclass(frozen=True, slots=True)
class Published(Publication):
    """A published revision of a boundary read."""

    published_at: datetime


@dataclass(frozen=True, slots=True)
class Side:
    """A cycle boundary of one meter: its instant, its read, and the latest publication."""

    at: datetime
    read: BoundaryRead
    gap: bool
    published: Published | None

    @property
    def revised(self) -> bool:
        """A later revision was published, or the published register differs from now's."""
        pub = self.published
        if pub is None:
            return False
        return pub.revision > 1 or pub.register_ml != self.read.register_ml


@dataclass(frozen=True, slots=True)
class CycleRow:
    """One meter's cycle read (a meter exchanged mid-cycle gives two rows), in mL."""

    meter: CycleMeter
    cycle: date
    opening: Side
    closing: Side
    consumption_ml: int | None
    consumption_quality: int | None
    rolled_over: bool
    reverse: bool

    @property
    def revised(self) -> bool:
        """Either boundary read was revised after it was published."""
        return self.opening.revised or self.closing.revised


@dataclass(frozen=True, slots=True)
class BoundaryGap:
    """A boundary read interpolated across an outage: the readings before and after it."""

    meter_id: int
    side: str  # "opening" or "closing"
    at: datetime
    prev_at: datetime
    next_at: datetime


def cycle_row(
    meter: CycleMeter,
    cycle: date,
    ends: tuple[tuple[datetime, BoundaryRead], tuple[datetime, BoundaryRead]],
    latest: Mapping[tuple[int, datetime], Published],
    max_gap: timedelta,
) -> CycleRow:
    """The row of `meter` whose opening and closing (instant, read) are `ends`; `latest`
    maps (meter_id, boundary instant) to its newest publication."""
    (o_at, o_read), (c_at, c_read) = ends
    o_ml, c_ml = o_read.register_ml, c_read.register_ml
    spec = meter.spec
    used = consumption(o_ml, c_ml, span_us(o_at, c_at), spec.modulus, spec.max_flow_ml_h)
    key = meter.meter_id
    return CycleRow(
        meter=meter,
        cycle=cycle,
        opening=Side(o_at, o_read, gap_across(o_read, max_gap), latest.get((key, o_at))),
        closing=Side(c_at, c_read, gap_across(c_read, max_gap), latest.get((key, c_at))),
        consumption_ml=used,
        consumption_quality=quality.mixed((o_read.quality, c_read.quality)),
        # SQL: coalesce(u.ml > c.register_ml - o.register_ml, false), coalesce(u.ml < 0, false)
        rolled_over=used is not None
        and o_ml is not None
        and c_ml is not None
        and used > c_ml - o_ml,
        reverse=used is not None and used < 0,
    )


def total_m3(rows: Sequence[CycleRow]) -> Decimal | None:
    """A service point's cycle consumption in m3 when its meter was exchanged: the sum of
    each meter's consumption as its row shows it (rounded to its register), with the most
    decimals any has; None when one is unknown."""
    return units.total_m3([(r.consumption_ml, r.meter.spec.scale) for r in rows])


def total_quality(rows: Iterable[CycleRow]) -> int | None:
    """The quality of that sum: the rows' consumption quality when all agree, else 13."""
    return quality.mixed(r.consumption_quality for r in rows)


def boundary_gaps(rows: Iterable[CycleRow]) -> list[BoundaryGap]:
    """The rows' boundary reads interpolated across an outage longer than the gap limit."""
    gaps = []
    for row in rows:
        for name, side in (("opening", row.opening), ("closing", row.closing)):
            prev_at, next_at = side.read.prev_at, side.read.next_at
            if side.gap and prev_at is not None and next_at is not None:
                gaps.append(BoundaryGap(row.meter.meter_id, name, side.at, prev_at, next_at))
    return gaps


def to_publish(
    reads: Iterable[tuple[int, datetime, BoundaryRead]],
    published: Iterable[Published],
    now: datetime,
) -> list[Publication]:
    """The revisions to publish for these (meter_id, boundary instant, read): a boundary at
    or before `now` with no publication yet, or whose newest one has another register.
    `published` is every revision so far, oldest first."""
    latest: dict[tuple[int, datetime], Published] = {}
    for p in published:
        latest[(p.meter_id, p.boundary_at)] = p
    new = []
    for meter_id, at, read in reads:
        if at > now:
            continue
        last = latest.get((meter_id, at))
        revision = 0 if last is None else last.revision
        if last is None or last.register_ml != read.register_ml:
            new.append(
                Publication(meter_id, at, revision + 1, read.register_ml, read.method, read.quality)
            )
    return new
