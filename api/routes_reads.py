"""Read routes of one meter: interval reads, and its billing-cycle read with VEE."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from api.deps import PROBLEMS, CycleId, MeterId, Pool, Reader, get_or_404
from api.errors import NotFoundError, UnprocessableError
from api.schemas import (
    BoundaryRead,
    CycleAlarm,
    CycleRead,
    CycleRow,
    Interval,
    IntervalReads,
    IsoTime,
    Revision,
    VeeIssue,
    to_m3,
)
from api.settings import ApiSettings
from billing import cycle as cycles
from billing import quality, vee
from billing.localtime import (
    CalendarError,
    cycle_bounds,
    local_midnight,
    parse_instant,
    step_boundaries,
)
from storage import billing, meter_cycle
from storage.apikeys import tenant_timezone
from storage.pool import Executor, connection
from storage.registry import MeterRow

router = APIRouter(prefix="/v1", tags=["reads"], responses=PROBLEMS)
_BASELINE = timedelta(days=90)


async def meter_zone(conn: Executor, tenant_id: int, meter: MeterRow) -> str:
    """The meter's timezone, else its tenant's."""
    return meter.timezone or await tenant_timezone(conn, tenant_id)


@router.get("/meters/{meter_id}/readings", summary="Interval reads in local-time steps")
async def interval_reads(
    meter_id: MeterId,
    who: Reader,
    pool: Pool,
    request: Request,
    start: Annotated[IsoTime, Query(alias="from", description="ISO time; naive = local")],
    end: Annotated[IsoTime, Query(alias="to", description="ISO time; naive = local")],
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
    async with connection(pool, "reading interval reads") as conn:
        rows = await billing.interval_reads(conn, meter_id, bounds, settings.tuning())
    scale = meter.register_scale
    intervals = [
        Interval(
            start=a.at,
            end=b.at,
            start_register_m3=to_m3(a.register_ml, scale),
            end_register_m3=to_m3(b.register_ml, scale),
            consumption_m3=to_m3(b.used_ml, scale),
            start_method=a.method or "missing",
            end_method=b.method or "missing",
            quality=quality.mixed((a.quality, b.quality)),
        )
        for a, b in itertools.pairwise(rows)
    ]
    return IntervalReads(
        meter_id=meter_id, step=step, timezone=tz_name, unit="m3", intervals=intervals
    )


def _side(s: cycles.Side, scale: int) -> BoundaryRead:
    pub = s.published
    return BoundaryRead(
        at=s.at,
        register_m3=to_m3(s.read.register_ml, scale),
        method=s.read.method,
        basis=s.read.basis,
        quality=s.read.quality,
        read_at=s.read.basis_at,
        gap=s.gap,
        revision=None if pub is None else pub.revision,
        published_register_m3=None if pub is None else to_m3(pub.register_ml, scale),
    )


def cycle_row(row: cycles.CycleRow) -> CycleRow:
    """The response body of a billing core cycle row: its volumes in m3, rendered once."""
    m, scale = row.meter, row.meter.spec.scale
    return CycleRow(
        meter_id=m.meter_id,
        address=m.address,
        service_point=m.service_point,
        kind=m.kind,
        cycle=row.cycle,
        unit="m3",
        opening=_side(row.opening, scale),
        closing=_side(row.closing, scale),
        consumption_m3=to_m3(row.consumption_ml, scale),
        consumption_quality=row.consumption_quality,
        rolled_over=row.rolled_over,
        reverse=row.reverse,
        revised=row.revised,
    )


@router.get(
    "/meters/{meter_id}/cycles/{cycle}",
    summary="Billing-cycle read of a meter",
    response_model=CycleRead,
)
async def cycle_read(
    meter_id: MeterId, cycle: CycleId, who: Reader, pool: Pool, request: Request
) -> Response:
    """Opening/closing reads, consumption (summed over an exchange), VEE issues and alarms.

    Reads of a cycle that has ended are published on first service; a later change (a
    late reading) is published as a new revision and the cycle marked `revised`.
    """
    settings: ApiSettings = request.app.state.settings
    now = datetime.now(UTC)
    async with connection(pool, "reading a billing-cycle read") as conn:
        ctx = await meter_cycle.context(conn, who.tenant_id, meter_id)
        if ctx is None:
            raise NotFoundError(f"no meter {meter_id}")
        try:
            start, end = cycle_bounds(ctx.cycle_day, ctx.dates, cycle)
        except CalendarError as exc:
            raise NotFoundError(str(exc)) from exc
        windows = {}
        for zone in {ctx.zone_of(m) for m in ctx.meters}:
            tz = ZoneInfo(zone)
            windows[zone] = (local_midnight(start, tz), local_midnight(end, tz))
        tz_name = ctx.zone_of(ctx.asked)
        open_at, close_at = windows[tz_name]
        closed = close_at <= now
        found = await meter_cycle.meter_cycle(
            conn,
            ctx,
            cycle,
            windows,
            settings.tuning(),
            now=now,
            baseline=_BASELINE,
            publish=closed,
        )
    if not found.rows:
        raise NotFoundError(f"meter {meter_id} was not in service during cycle {cycle}")
    segments = sorted(found.rows, key=lambda r: r.opening.at)
    rows = [cycle_row(r) for r in segments]
    metas = found.meters
    spans = [
        vee.Span(
            r.meter.meter_id,
            r.meter.kind,
            r.meter.spec.digits,
            r.meter.spec.scale,
            r.meter.spec.installed_at,
            r.meter.spec.removed_at,
        )
        for r in segments
    ]
    report = vee.check_cycle(
        spans,
        found.readings,
        found.events,
        open_at=open_at,
        close_at=close_at,
        now=now,
        max_gap=timedelta(hours=settings.max_gap_h),
        zero_streak=timedelta(days=settings.zero_streak_days),
        boundary_gaps=found.gaps,
    )
    opening, closing = rows[0].opening, rows[-1].closing
    body = CycleRead(
        meter_id=meter_id,
        cycle=cycle,
        start=open_at,
        end=close_at,
        timezone=tz_name,
        unit="m3",
        closed=closed,
        opening=opening,
        closing=closing,
        consumption_m3=_m3_text(cycles.total_m3(segments)),
        consumption_quality=cycles.total_quality(segments),
        revised=any(r.revised for r in rows),
        segments=rows,
        issues=[VeeIssue(**i.__dict__) for i in report.issues],
        alarms=[CycleAlarm(**a.__dict__) for a in report.alarms],
        revisions=[
            Revision(
                meter_id=v.meter_id,
                at=v.boundary_at,
                revision=v.revision,
                register_m3=to_m3(v.register_ml, metas[v.meter_id].spec.scale),
                method=v.method,
                quality=v.quality,
                published_at=v.published_at,
            )
            for v in (found.revisions if closed else [])
        ],
    )
    # serialized here: returned as a model, FastAPI would validate it all over again
    return Response(body.model_dump_json(), media_type="application/json")


def _m3_text(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


__all__ = ["BoundaryRead", "cycle_row", "router"]
