"""Read routes of one meter: interval reads, and its billing-cycle read with VEE."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal
from zoneinfo import ZoneInfo

import asyncpg
from fastapi import APIRouter, Path, Query, Request

from api import vee
from api.auth import Pool, Reader
from api.errors import NotFoundError, UnprocessableError
from api.localtime import (
    CalendarError,
    cycle_bounds,
    local_midnight,
    parse_instant,
    step_boundaries,
)
from api.routes_meters import PROBLEMS, MeterId, get_or_404
from api.schemas import (
    BoundaryRead,
    CycleAlarm,
    CycleRead,
    CycleRow,
    Interval,
    IntervalReads,
    Revision,
    VeeIssue,
    to_m3,
)
from api.settings import ApiSettings
from storage import billing, registry
from storage.apikeys import tenant_timezone

router = APIRouter(prefix="/v1", tags=["reads"], responses=PROBLEMS)
CycleId = Annotated[
    date, Path(description="local date the cycle starts on", examples=["2024-03-01"])
]
_BASELINE = timedelta(days=90)


def _mixed(a: int | None, b: int | None) -> int | None:
    """ESPI quality of a quantity derived from two reads: equal codes stay, else 13 mixed."""
    if a is None or b is None:
        return None
    return a if a == b else 13


async def meter_zone(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int, meter: asyncpg.Record
) -> str:
    """The meter's timezone, else its tenant's."""
    tz: str = meter["timezone"] or await tenant_timezone(conn, tenant_id)
    return tz


@router.get("/meters/{meter_id}/readings", summary="Interval reads in local-time steps")
async def interval_reads(
    meter_id: MeterId,
    who: Reader,
    pool: Pool,
    request: Request,
    start: Annotated[datetime, Query(alias="from", description="ISO time; naive = local")],
    end: Annotated[datetime, Query(alias="to", description="ISO time; naive = local")],
    step: Literal["1h", "1d", "1mo"] = "1d",
) -> IntervalReads:
    """Registers at each local step boundary covering [from, to) and consumption per step."""
    settings: ApiSettings = request.app.state.settings
    meter = await get_or_404(pool, who.tenant_id, meter_id)
    tz_name = await meter_zone(pool, who.tenant_id, meter)
    tz = ZoneInfo(tz_name)
    try:
        bounds = step_boundaries(parse_instant(start, tz), parse_instant(end, tz), step, tz)
    except CalendarError as exc:
        raise UnprocessableError(str(exc)) from exc
    async with pool.acquire() as conn:
        rows = await billing.interval_reads(conn, meter_id, bounds, settings.tuning())
    scale = meter["register_scale"]
    intervals = [
        Interval(
            start=a["at"],
            end=b["at"],
            start_register_m3=to_m3(a["register_ml"], scale),
            end_register_m3=to_m3(b["register_ml"], scale),
            consumption_m3=to_m3(b["used_ml"], scale),
            start_method=a["method"] or "missing",
            end_method=b["method"] or "missing",
            quality=_mixed(a["quality"], b["quality"]),
        )
        for a, b in itertools.pairwise(rows)
    ]
    return IntervalReads(
        meter_id=meter_id, step=step, timezone=tz_name, unit="m3", intervals=intervals
    )


def _sum(values: list[str | None]) -> str | None:
    if not values or any(v is None for v in values):
        return None
    total = sum((Decimal(v) for v in values if v is not None), Decimal(0))
    places = max(-Decimal(v).as_tuple().exponent for v in values if v is not None)  # type: ignore[operator]
    return str(total.quantize(Decimal(1).scaleb(-places)))


@router.get("/meters/{meter_id}/cycles/{cycle}", summary="Billing-cycle read of a meter")
async def cycle_read(
    meter_id: MeterId, cycle: CycleId, who: Reader, pool: Pool, request: Request
) -> CycleRead:
    """Opening/closing reads, consumption (summed over an exchange), VEE issues and alarms.

    Reads of a cycle that has ended are published on first service; a later change (a
    late reading) is published as a new revision and the cycle marked `revised`.
    """
    settings: ApiSettings = request.app.state.settings
    now = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        meter = await get_or_404(conn, who.tenant_id, meter_id)
        tz_name = await meter_zone(conn, who.tenant_id, meter)
        cycle_day, dates = await billing.calendar(conn, who.tenant_id)
        try:
            start, end = cycle_bounds(cycle_day, dates, cycle)
        except CalendarError as exc:
            raise NotFoundError(str(exc)) from exc
        tz = ZoneInfo(tz_name)
        open_at, close_at = local_midnight(start, tz), local_midnight(end, tz)
        ids = await registry.service_point_chain(conn, who.tenant_id, meter, open_at, close_at)
        lines: list[str] = []
        tenant_zone = await tenant_timezone(conn, who.tenant_id)
        metas = {r["meter_id"]: r for r in await _meters(conn, who.tenant_id, ids)}
        for zone in sorted({m["timezone"] or tenant_zone for m in metas.values()}):
            args = billing.CycleQuery(who.tenant_id, start, end, zone, settings.tuning()).args(
                meter_ids=ids
            )
            lines += await billing.meter_cycle_lines(conn, args, publish_ended=close_at <= now)
        closed = close_at <= now
        rows = sorted(
            (CycleRow.model_validate_json(line) for line in lines), key=lambda r: r.opening.at
        )
        if not rows:
            raise NotFoundError(f"meter {meter_id} was not in service during cycle {cycle}")
        ats = [t for r in rows for t in (r.opening.at, r.closing.at)]
        revs = await billing.revisions(conn, ids, ats) if closed else []
        readings = await billing.readings_between(conn, ids, open_at - _BASELINE, close_at)
        events = await billing.events_between(conn, ids, open_at, close_at)
    spans = [
        vee.Span(
            m["meter_id"],
            m["kind"],
            m["register_digits"],
            m["register_scale"],
            m["installed_at"],
            m["removed_at"],
        )
        for m in (metas[r.meter_id] for r in rows)
    ]
    report = vee.check_cycle(
        spans,
        readings,
        [tuple(e) for e in events],  # type: ignore[misc]
        open_at=open_at,
        close_at=close_at,
        now=now,
        tolerance=timedelta(seconds=settings.future_tolerance_s),
        max_gap=timedelta(hours=settings.max_gap_h),
        zero_streak=timedelta(days=settings.zero_streak_days),
    )
    opening, closing = rows[0].opening, rows[-1].closing
    return CycleRead(
        meter_id=meter_id,
        cycle=cycle,
        start=open_at,
        end=close_at,
        timezone=tz_name,
        unit="m3",
        closed=closed,
        opening=opening,
        closing=closing,
        consumption_m3=_sum([r.consumption_m3 for r in rows]),
        consumption_quality=_segments_quality(rows),
        revised=any(r.revised for r in rows),
        segments=rows,
        issues=[VeeIssue(**i.__dict__) for i in report.issues],
        alarms=[CycleAlarm(**a.__dict__) for a in report.alarms],
        revisions=[
            Revision(
                meter_id=v["meter_id"],
                at=v["boundary_at"],
                revision=v["revision"],
                register_m3=to_m3(v["register_ml"], metas[v["meter_id"]]["register_scale"]),
                method=v["method"],
                quality=v["quality"],
                published_at=v["published_at"],
            )
            for v in revs
        ],
    )


def _segments_quality(rows: list[CycleRow]) -> int | None:
    codes = {r.consumption_quality for r in rows}
    if None in codes:
        return None
    return codes.pop() if len(codes) == 1 else 13


async def _meters(conn: asyncpg.Connection, tenant_id: int, ids: list[int]) -> list[asyncpg.Record]:
    return [m for m in [await registry.get_meter(conn, tenant_id, i) for i in ids] if m is not None]


__all__ = ["BoundaryRead", "router"]
