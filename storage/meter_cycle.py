"""One meter's billing-cycle read: its service point's meters, boundary reads, publication.

Four plain statements on one connection (context, readings, published revisions, events)
and at most one insert; the boundary reads, rows and publications are computed by the
billing core (billing.boundary, the twin of SQL `nbm_boundary_read`; billing.cycle) from
the meters' readings around the cycle, and returned as its dataclasses (int mL: the API
renders them). The whole-tenant export (storage.billing) computes the same reads
set-wise in SQL.

Publication is as `storage.billing.publish` (billing.cycle.to_publish): once the cycle has
ended, each boundary read at or before now is published as revision 1, and a later
different value (a late reading) as the next revision; concurrent first services publish
once (primary key).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

import asyncpg

from billing import boundary
from billing.boundary import BoundaryRead, Reading, Tuning
from billing.consumption import MAX_FLOW_ML_H
from billing.cycle import (
    BoundaryGap,
    CycleMeter,
    CycleRow,
    Publication,
    Published,
    boundary_gaps,
    cycle_row,
    to_publish,
)
from billing.vee import Event
from storage.billing import events_between, readings_between, revisions
from storage.pool import translating
from storage.registry import METER_COLUMNS

_M_COLUMNS = ", ".join(f"m.{c.strip()}" for c in METER_COLUMNS.split(","))
_CONTEXT_SQL = f"""
SELECT t.timezone AS tenant_zone, coalesce(bc.cycle_day, 1) AS cycle_day,
       ARRAY(SELECT d.starts_on FROM billing_cycle_dates d WHERE d.tenant_id = t.tenant_id
             ORDER BY d.starts_on) AS dates,
       m.meter_id = me.meter_id AS asked, {_M_COLUMNS}
FROM tenants t
JOIN meters me ON me.tenant_id = t.tenant_id AND me.meter_id = $2
LEFT JOIN billing_calendars bc ON bc.tenant_id = t.tenant_id
JOIN meters m ON m.tenant_id = t.tenant_id AND (m.meter_id = me.meter_id
    OR (me.service_point IS NOT NULL AND m.service_point = me.service_point))
WHERE t.tenant_id = $1
ORDER BY m.installed_at, m.meter_id
"""

_INSERT_SQL = """
INSERT INTO published_boundary_reads (meter_id, boundary_at, revision, register_ml, method, quality)
SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::int[], $4::bigint[], $5::text[],
                     $6::smallint[])
ON CONFLICT DO NOTHING
RETURNING meter_id, boundary_at, revision, register_ml, method, quality, published_at"""


@dataclass(frozen=True)
class Context:
    """The asked meter, the meters at its service point (oldest first), the tenant's calendar."""

    asked: CycleMeter
    meters: list[CycleMeter]
    tenant_zone: str
    cycle_day: int
    dates: list[date]

    def zone_of(self, meter: CycleMeter) -> str:
        """The meter's timezone, else its tenant's."""
        return meter.timezone or self.tenant_zone


def _meter(m: asyncpg.Record) -> CycleMeter:
    return CycleMeter(
        meter_id=m["meter_id"],
        address=m["address"],
        service_point=m["service_point"],
        kind=m["kind"],
        timezone=m["timezone"],
        spec=boundary.Meter(
            installed_at=m["installed_at"],
            removed_at=m["removed_at"],
            initial_ml=m["initial_register_ml"],
            final_ml=m["final_register_ml"],
            scale=m["register_scale"],
            digits=m["register_digits"],
            max_flow_ml_h=MAX_FLOW_ML_H[m["kind"]],
        ),
    )


@translating("loading the meter's cycle context")
async def context(conn: asyncpg.Connection, tenant_id: int, meter_id: int) -> Context | None:
    """The meter's context in one statement; None if the tenant has no such meter."""
    rows = await conn.fetch(_CONTEXT_SQL, tenant_id, meter_id)
    if not rows:
        return None
    first = rows[0]
    meters = [_meter(r) for r in rows]
    return Context(
        asked=next(m for m, r in zip(meters, rows, strict=True) if r["asked"]),
        meters=meters,
        tenant_zone=first["tenant_zone"],
        cycle_day=first["cycle_day"],
        dates=list(first["dates"]),
    )


@dataclass
class MeterCycle:
    """What the cycle-read route renders: the rows (int mL), and the VEE inputs."""

    rows: list[CycleRow]
    meters: dict[int, CycleMeter]
    readings: list[Reading]
    events: list[Event]
    revisions: list[Published] = field(default_factory=list)
    # boundary reads interpolated across an outage longer than the gap limit (VEE)
    gaps: list[BoundaryGap] = field(default_factory=list)


@translating("reading the meter's billing cycle")
async def meter_cycle(
    conn: asyncpg.Connection,
    ctx: Context,
    cycle: date,
    windows: Mapping[str, tuple[datetime, datetime]],
    tuning: Tuning,
    *,
    now: datetime,
    baseline: timedelta,
    publish: bool,
) -> MeterCycle:
    """The cycle reads of the meters at ctx's service point in service during the cycle.

    `windows` maps each timezone of ctx.meters to the cycle's [open, close) instants
    there. Readings are returned from `baseline` before the opening to the closing (VEE).
    With `publish`, unpublished or changed boundary reads at or before `now` are published.
    """
    chain = []
    for m in ctx.meters:
        open_at, close_at = windows[ctx.zone_of(m)]
        removed = m.spec.removed_at
        if m.spec.installed_at < close_at and (removed is None or removed > open_at):
            chain.append(m)
    if not chain:
        return MeterCycle([], {}, [], [])
    ids = [m.meter_id for m in chain]
    open_min = min(windows[ctx.zone_of(m)][0] for m in chain)
    close_max = max(windows[ctx.zone_of(m)][1] for m in chain)
    # the boundary lookups reach AFTER past the closing, inclusive: end the scan just beyond
    stored = await readings_between(
        conn,
        ids,
        open_min - max(baseline, boundary.BEFORE),
        close_max + boundary.AFTER + timedelta(microseconds=1),
    )
    ends: list[tuple[tuple[datetime, BoundaryRead], tuple[datetime, BoundaryRead]]] = []
    for m in chain:
        open_at, close_at = windows[ctx.zone_of(m)]
        history = boundary.History([r for r in stored if r.meter_id == m.meter_id])
        spec = m.spec
        o_at = max(open_at, spec.installed_at)
        o_edge = "install" if spec.installed_at >= open_at else None
        c_at, c_edge = close_at, None
        if spec.removed_at is not None and spec.removed_at <= close_at:
            c_at, c_edge = spec.removed_at, "remove"
        o_read, c_read = (
            history.boundary_read(spec, at, edge, bound, tuning.actual_window)
            for at, edge, bound in ((o_at, o_edge, open_at), (c_at, c_edge, close_at))
        )
        ends.append(((o_at, o_read), (c_at, c_read)))
    ats = sorted({at for pair in ends for at, _ in pair})
    published = await revisions(conn, ids, ats)
    if publish:
        reads = [
            (m.meter_id, at, read) for m, pair in zip(chain, ends, strict=True) for at, read in pair
        ]
        published = await _publish(conn, to_publish(reads, published, now), published, ids, ats)
    latest: dict[tuple[int, datetime], Published] = {}
    for p in published:  # oldest first: the last one wins
        latest[(p.meter_id, p.boundary_at)] = p
    rows = [
        cycle_row(m, cycle, pair, latest, tuning.max_gap)
        for m, pair in zip(chain, ends, strict=True)
    ]
    return MeterCycle(
        rows=rows,
        meters={m.meter_id: m for m in chain},
        readings=[r for r in stored if r.read_at < close_max],
        events=await events_between(conn, ids, open_min, close_max),
        revisions=published,
        gaps=boundary_gaps(rows),
    )


async def _publish(
    conn: asyncpg.Connection,
    new: list[Publication],
    published: list[Published],
    ids: list[int],
    ats: list[datetime],
) -> list[Published]:
    """Insert the `new` revisions (billing.cycle.to_publish) after `published`.

    Returns every revision at the boundaries afterwards: `published` with the inserted
    ones, or read again when a concurrent publisher won.
    """
    if not new:
        return published
    cols = (
        [p.meter_id for p in new],
        [p.boundary_at for p in new],
        [p.revision for p in new],
        [p.register_ml for p in new],
        [p.method for p in new],
        [p.quality for p in new],
    )
    inserted = await conn.fetch(_INSERT_SQL, *cols)
    if len(inserted) < len(new):  # another request published some of them first
        return await revisions(conn, ids, ats)
    key = operator.attrgetter("meter_id", "boundary_at", "revision")
    return sorted([*published, *(Published(*r) for r in inserted)], key=key)
