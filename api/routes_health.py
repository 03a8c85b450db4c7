"""Device health routes: one meter's history and the fleet's distributions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from api.deps import PROBLEMS, MeterId, Pool, Reader, get_or_404
from storage import health_views

router = APIRouter(prefix="/v1", tags=["health"], responses=PROBLEMS)


class HealthPoint(BaseModel):
    """One device_health row: battery, radio, status bits (null: not reported)."""

    measured_at: datetime
    battery_mv: int | None
    battery_pct: int | None
    battery_low: bool | None
    meter_error: bool | None
    rsrp_cdbm: int | None
    sinr_cdb: int | None
    ecl: int | None
    cell_id: int | None
    received_at: datetime


class Band(BaseModel):
    """A histogram bar: meters whose figure is in [from, from + width)."""

    start: int
    meters: int


class Cell(BaseModel):
    """A serving cell and the radio its meters see."""

    cell_id: int
    meters: int
    median_rsrp_cdbm: int
    median_sinr_cdb: int | None
    meters_ecl2: int


class FleetHealth(BaseModel):
    """The tenant's meters reporting in the window, by their latest figures."""

    since: datetime
    meters: int
    battery_low: int
    meter_error: int
    with_battery: int
    with_radio: int
    battery_mv_bands: list[Band]  # 100 mV wide
    ecl: dict[int, int]  # coverage class -> meters
    rsrp_cdbm_bands: list[Band]  # 5 dB (500 cdBm) wide
    worst_cells: list[Cell]


@router.get("/meters/{meter_id}/health/history", summary="Device health history")
async def health_history(
    meter_id: MeterId,
    who: Reader,
    pool: Pool,
    since: Annotated[datetime | None, Query()] = None,
    until: Annotated[datetime | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> list[HealthPoint]:
    """The meter's health rows in [since, until), newest first."""
    await get_or_404(pool, who.tenant_id, meter_id)
    rows = await health_views.history(pool, meter_id, since, until, limit)
    return [HealthPoint(**dict(r)) for r in rows]


@router.get("/health/fleet", summary="Fleet battery and coverage")
async def fleet_health(
    who: Reader,
    pool: Pool,
    days: Annotated[int, Query(ge=1, le=90)] = 7,
    worst: Annotated[int, Query(ge=1, le=100)] = 10,
) -> FleetHealth:
    """Battery and coverage distributions, and the worst cells by median RSRP."""
    since = datetime.now(UTC) - timedelta(days=days)
    got = await health_views.fleet(pool, who.tenant_id, since, worst)
    s = got.summary
    return FleetHealth(
        since=since,
        meters=s["meters"],
        battery_low=s["battery_low"],
        meter_error=s["meter_error"],
        with_battery=s["with_battery"],
        with_radio=s["with_radio"],
        battery_mv_bands=[Band(start=r["from_mv"], meters=r["meters"]) for r in got.battery],
        ecl={r["ecl"]: r["meters"] for r in got.ecl},
        rsrp_cdbm_bands=[Band(start=r["from_cdbm"], meters=r["meters"]) for r in got.rsrp],
        worst_cells=[Cell(**dict(r)) for r in got.worst_cells],
    )
