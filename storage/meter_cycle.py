"""One meter's billing-cycle read: its service point's meters, boundary reads, publication.

Four plain statements on one connection (context, readings, published revisions, events)
and at most one insert; the boundary reads are computed by `storage.boundary` (the twin
of SQL `nbm_boundary_read`) from the meters' readings around the cycle. The whole-tenant
export (storage.billing) computes the same reads set-wise in SQL.

Publication is as `storage.billing.publish`: once the cycle has ended, each boundary read
at or before now is published as revision 1, and a later different value (a late
reading) as the next revision; concurrent first services publish once (primary key).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg

from storage import boundary
from storage.billing import (
    MAX_FLOW_ML_H,
    Reading,
    Tuning,
    events_between,
    readings_between,
    revisions,
)
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

    asked: asyncpg.Record
    meters: list[asyncpg.Record]
    tenant_zone: str
    cycle_day: int
    dates: list[date]

    def zone_of(self, meter: asyncpg.Record) -> str:
        """The meter's timezone, else its tenant's."""
        zone: str = meter["timezone"] or self.tenant_zone
        return zone


async def context(conn: asyncpg.Connection, tenant_id: int, meter_id: int) -> Context | None:
    """The meter's context in one statement; None if the tenant has no such meter."""
    rows = await conn.fetch(_CONTEXT_SQL, tenant_id, meter_id)
    if not rows:
        return None
    first = rows[0]
    return Context(
        asked=next(r for r in rows if r["asked"]),
        meters=rows,
        tenant_zone=first["tenant_zone"],
        cycle_day=first["cycle_day"],
        dates=list(first["dates"]),
    )


@dataclass
class MeterCycle:
    """What the cycle-read route renders: rows shaped as CycleRow, and the VEE inputs."""

    rows: list[dict[str, Any]]
    meters: dict[int, asyncpg.Record]
    readings: list[Reading]
    events: list[asyncpg.Record]
    revisions: list[asyncpg.Record] = field(default_factory=list)
    # boundary reads interpolated across an outage longer than the gap limit (VEE)
    gaps: list[BoundaryGap] = field(default_factory=list)


@dataclass(frozen=True)
class BoundaryGap:
    """A boundary read interpolated across an outage: the readings before and after it."""

    meter_id: int
    side: str  # "opening" or "closing"
    at: datetime
    prev_at: datetime
    next_at: datetime


@dataclass(frozen=True)
class _Side:
    meter: asyncpg.Record
    at: datetime
    read: boundary.BoundaryRead


def _meter(m: asyncpg.Record) -> boundary.Meter:
    return boundary.Meter(
        installed_at=m["installed_at"],
        removed_at=m["removed_at"],
        initial_ml=m["initial_register_ml"],
        final_ml=m["final_register_ml"],
        scale=m["register_scale"],
        digits=m["register_digits"],
        max_flow_ml_h=MAX_FLOW_ML_H[m["kind"]],
    )


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
        if m["installed_at"] < close_at and (m["removed_at"] is None or m["removed_at"] > open_at):
            chain.append(m)
    if not chain:
        return MeterCycle([], {}, [], [])
    ids = [m["meter_id"] for m in chain]
    open_min = min(windows[ctx.zone_of(m)][0] for m in chain)
    close_max = max(windows[ctx.zone_of(m)][1] for m in chain)
    # the boundary lookups reach AFTER past the closing, inclusive: end the scan just beyond
    stored = await readings_between(
        conn,
        ids,
        open_min - max(baseline, boundary.BEFORE),
        close_max + boundary.AFTER + timedelta(microseconds=1),
    )
    sides: list[_Side] = []  # opening and closing of each meter, in turn
    for m in chain:
        open_at, close_at = windows[ctx.zone_of(m)]
        history = boundary.History([r for r in stored if r.meter_id == m["meter_id"]])
        spec = _meter(m)
        removed = m["removed_at"]
        o_at = max(open_at, m["installed_at"])
        o_edge = "install" if m["installed_at"] >= open_at else None
        c_at, c_edge = close_at, None
        if removed is not None and removed <= close_at:
            c_at, c_edge = removed, "remove"
        for at, edge, bound in ((o_at, o_edge, open_at), (c_at, c_edge, close_at)):
            read = history.boundary_read(
                spec, at, edge, bound, tuning.actual_window, tuning.future_tolerance
            )
            sides.append(_Side(m, at, read))
    ats = sorted({s.at for s in sides})
    published = await revisions(conn, ids, ats)
    if publish:
        published = await _publish(conn, sides, published, now, ids, ats) or published
    latest: dict[tuple[int, datetime], asyncpg.Record] = {}
    for p in published:  # oldest first: the last one wins
        latest[(p["meter_id"], p["boundary_at"])] = p
    rows = [
        _row(cycle, o, c, latest, tuning.max_gap)
        for o, c in zip(sides[::2], sides[1::2], strict=True)
    ]
    gaps = []
    for i, s in enumerate(sides):  # opening, closing, opening, ...
        prev_at, next_at = s.read.prev_at, s.read.next_at
        if boundary.gap_across(s.read, tuning.max_gap) and prev_at and next_at:
            side = "closing" if i % 2 else "opening"
            gaps.append(BoundaryGap(s.meter["meter_id"], side, s.at, prev_at, next_at))
    return MeterCycle(
        rows=rows,
        meters={m["meter_id"]: m for m in chain},
        readings=[r for r in stored if r.read_at < close_max],
        events=await events_between(conn, ids, open_min, close_max),
        revisions=published,
        gaps=gaps,
    )


async def _publish(
    conn: asyncpg.Connection,
    sides: list[_Side],
    published: list[asyncpg.Record],
    now: datetime,
    ids: list[int],
    ats: list[datetime],
) -> list[asyncpg.Record] | None:
    """Insert the revisions `storage.billing.publish` would.

    Returns every revision at the sides' boundaries afterwards (None if nothing was new):
    `published` with the inserted ones, or read again when a concurrent publisher won.
    """
    latest: dict[tuple[int, datetime], tuple[int, int | None]] = {}
    for p in published:
        latest[(p["meter_id"], p["boundary_at"])] = (p["revision"], p["register_ml"])
    new = []
    for s in sides:
        if s.at > now:
            continue
        meter_id, read = s.meter["meter_id"], s.read
        revision, register = latest.get((meter_id, s.at), (0, None))
        if revision == 0 or register != read.register_ml:
            new.append((meter_id, s.at, revision + 1, read.register_ml, read.method, read.quality))
    if not new:
        return None
    inserted = await conn.fetch(_INSERT_SQL, *(list(col) for col in zip(*new, strict=True)))
    if len(inserted) < len(new):  # another request published some of them first
        return await revisions(conn, ids, ats)
    key = operator.itemgetter("meter_id", "boundary_at", "revision")
    return sorted([*published, *inserted], key=key)


def _side(s: _Side, pub: asyncpg.Record | None, max_gap: timedelta) -> dict[str, Any]:
    scale = s.meter["register_scale"]
    return {
        "at": s.at,
        "register_m3": boundary.m3_text(s.read.register_ml, scale),
        "method": s.read.method,
        "basis": s.read.basis,
        "quality": s.read.quality,
        "read_at": s.read.basis_at,
        "gap": boundary.gap_across(s.read, max_gap),
        "revision": pub["revision"] if pub is not None else None,
        "published_register_m3": None
        if pub is None
        else boundary.m3_text(pub["register_ml"], scale),
    }


def _revised(pub: asyncpg.Record | None, read: boundary.BoundaryRead) -> bool:
    if pub is None:
        return False
    return bool(pub["revision"] > 1 or pub["register_ml"] != read.register_ml)


def _row(
    cycle: date,
    o: _Side,
    c: _Side,
    latest: Mapping[tuple[int, datetime], asyncpg.Record],
    max_gap: timedelta,
) -> dict[str, Any]:
    """One meter's cycle row, as the export's JSON_COLUMNS builds it."""
    m = o.meter
    spec = _meter(m)
    po, pc = latest.get((m["meter_id"], o.at)), latest.get((m["meter_id"], c.at))
    o_ml, c_ml = o.read.register_ml, c.read.register_ml
    used = boundary.consumption(o_ml, c_ml, boundary.span_us(o.at, c.at), spec)
    if o.read.quality is None or c.read.quality is None:
        quality = None
    else:
        quality = o.read.quality if o.read.quality == c.read.quality else 13
    both = used is not None and o_ml is not None and c_ml is not None
    return {
        "meter_id": m["meter_id"],
        "address": m["address"],
        "service_point": m["service_point"],
        "kind": m["kind"],
        "cycle": cycle,
        "unit": "m3",
        "opening": _side(o, po, max_gap),
        "closing": _side(c, pc, max_gap),
        "consumption_m3": boundary.m3_text(used, m["register_scale"]),
        "consumption_quality": quality,
        "rolled_over": both and used > c_ml - o_ml,  # type: ignore[operator]
        "reverse": used is not None and used < 0,
        "revised": _revised(po, o.read) or _revised(pc, c.read),
    }
