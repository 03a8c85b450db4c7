"""Tenant-wide billing routes: calendar, cycle list, bulk cycle-read export, cycle close."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from api import cursors
from api.deps import CONFLICT, PROBLEMS, Admin, CycleId, Pool, Reader
from api.errors import ConflictError, NotFoundError
from api.schemas import Calendar, CloseResult, Cycle, CycleList, CyclePage, Day
from api.settings import ApiSettings
from billing.localtime import CalendarError, cycle_bounds, cycles_in, local_midnight
from storage import billing
from storage.apikeys import tenant_timezone
from storage.export import stream_cycle
from storage.pool import connection

router = APIRouter(prefix="/v1", tags=["cycles"], responses=PROBLEMS)
NDJSON = "application/x-ndjson"
_EXPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON page (default), NDJSON stream or CSV stream of cycle reads",
        "content": {
            NDJSON: {
                "schema": {"type": "string"},
                "example": '{"meter_id": 1, "cycle": "2024-03-01", ...}\n',
            },
            "text/csv": {
                "schema": {"type": "string"},
                "example": "meter_id,address,...\n1,12345678901234,...\n",
            },
        },
    }
}


@router.get("/billing-calendar", summary="The tenant's billing calendar")
async def get_calendar(who: Reader, pool: Pool) -> Calendar:
    """Cycle day of month (default 1), or explicit cycle start dates."""
    day, dates = await billing.calendar(pool, who.tenant_id)
    return Calendar(cycle_day=day, dates=dates)


@router.put("/billing-calendar", summary="Replace the tenant's billing calendar")
async def put_calendar(body: Calendar, who: Admin, pool: Pool) -> Calendar:
    """Set the cycle day, or explicit start dates (then the cycle day is not used)."""
    async with connection(pool, "setting the billing calendar") as conn:
        await billing.set_calendar(conn, who.tenant_id, body.cycle_day, body.dates)
    return body


@router.get("/cycles", summary="List billing cycles")
async def list_cycles(
    who: Reader,
    pool: Pool,
    start: Annotated[
        Day | None, Query(alias="from", description="1970-01-01 to 2199-12-31")
    ] = None,
    end: Annotated[Day | None, Query(alias="to", description="1970-01-01 to 2199-12-31")] = None,
) -> CycleList:
    """Cycles starting within [from, to] (default: the last 365 days), at most 120."""
    today = datetime.now(UTC).date()
    last = min(end or today, date(2199, 1, 1))
    first = max(start or (last - timedelta(days=365)), date(1970, 1, 1))
    day, dates = await billing.calendar(pool, who.tenant_id)
    tz = await tenant_timezone(pool, who.tenant_id)
    cycles = [
        Cycle(cycle=s, start_date=s, end_date=e) for s, e in cycles_in(day, dates, first, last)
    ]
    return CycleList(timezone=tz, cycles=cycles)


async def _bounds(pool: Pool, tenant_id: int, cycle: date) -> tuple[date, date]:
    day, dates = await billing.calendar(pool, tenant_id)
    try:
        return cycle_bounds(day, dates, cycle)
    except CalendarError as exc:
        raise NotFoundError(str(exc)) from exc


def _negotiate(fmt: str | None, accept: str) -> str:
    if fmt is not None:
        return fmt
    if NDJSON in accept or "application/jsonl" in accept:
        return "ndjson"
    if "text/csv" in accept:
        return "csv"
    return "json"


@router.get(
    "/cycles/{cycle}/reads",
    summary="Cycle reads of every meter (export)",
    response_model=CyclePage,
    responses=_EXPORT_RESPONSES,
)
async def cycle_reads(
    cycle: CycleId,
    who: Reader,
    pool: Pool,
    request: Request,
    fmt: Annotated[Literal["json", "ndjson", "csv"] | None, Query(alias="format")] = None,
    cursor: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    """All meters' cycle reads: a JSON page (opaque `cursor`), or the whole tenant streamed.

    `format=` (or Accept: application/x-ndjson, text/csv) picks the form. Streams run one
    set-wise query with the server copying rows out, so memory is flat at any fleet size.
    A meter exchanged during the cycle has one row per meter (sum by service point).
    """
    settings: ApiSettings = request.app.state.settings
    start, end = await _bounds(pool, who.tenant_id, cycle)
    kind = _negotiate(fmt, request.headers.get("accept", ""))
    zones = await billing.zones(pool, who.tenant_id)
    queries = [billing.CycleQuery(who.tenant_id, start, end, z, settings.tuning()) for z in zones]
    if kind in ("ndjson", "csv"):
        media = NDJSON if kind == "ndjson" else "text/csv; charset=utf-8"
        stream = stream_cycle(
            pool,
            [q.args() for q in queries],
            "csv" if kind == "csv" else "ndjson",
            connections=min(settings.export_connections, settings.api_pool_max),
        )
        return StreamingResponse(stream, media_type=media)
    zone, after = _decode_cursor(cursor, zones)
    lines: list[str] = []
    next_cursor = None
    for q in queries[zones.index(zone) :]:
        lines += await billing.cycle_lines(pool, q.args(after=after, limit=limit - len(lines)))
        if len(lines) == limit:
            next_cursor = _encode_cursor(q.zone, json.loads(lines[-1])["meter_id"])
            break
        after = 0
    text = '{"items":[' + ",".join(lines) + '],"next_cursor":' + json.dumps(next_cursor) + "}"
    return Response(text, media_type="application/json")


def _encode_cursor(zone: str, after: int) -> str:
    return cursors.encode("z", zone, after)


def _decode_cursor(cursor: str | None, zones: list[str]) -> tuple[str, int]:
    """(zone, after meter id) of a cursor; the first zone and 0 without one."""
    if not cursor:
        return zones[0], 0
    zone, after = cursors.decode(cursor, "z", 2)
    if zone not in zones:
        raise cursors.invalid()
    return zone, cursors.bigint(after)


@router.post("/cycles/{cycle}/close", responses=CONFLICT, summary="Close a cycle (publish reads)")
async def close_cycle(cycle: CycleId, who: Admin, pool: Pool, request: Request) -> CloseResult:
    """Publish every meter's boundary reads of an ended cycle; changed ones become revisions."""
    settings: ApiSettings = request.app.state.settings
    start, end = await _bounds(pool, who.tenant_id, cycle)
    tz = ZoneInfo(await tenant_timezone(pool, who.tenant_id))
    if local_midnight(end, tz) > datetime.now(UTC):
        raise ConflictError(f"cycle {cycle} ends {end} and cannot be closed before then")
    totals = [0, 0, 0]
    async with connection(pool, "closing a billing cycle") as conn:
        for zone in await billing.zones(conn, who.tenant_id):
            q = billing.CycleQuery(who.tenant_id, start, end, zone, settings.tuning())
            row = await billing.publish_cycle(conn, q)
            totals = [
                totals[0] + row["boundaries"],
                totals[1] + row["published"],
                totals[2] + row["revised"],
            ]
    return CloseResult(cycle=cycle, boundaries=totals[0], published=totals[1], revised=totals[2])
