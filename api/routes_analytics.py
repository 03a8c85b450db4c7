"""Analytics routes: district metered areas, their daily balance, the daily read rate.

The figures come from the day rollup (`storage.analytics`, run by the collector or
`nbmeter analytics run`); an answer says when its day was rolled up (null: not yet, the
figures are then empty). Alarms the analytics raise are ordinary alarms (/v1/alarms).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from api.deps import CONFLICT, PROBLEMS, Admin, Pool, Reader
from api.errors import ConflictError, UnprocessableError
from api.schemas_analytics import (
    Balance,
    District,
    DistrictCreate,
    DistrictMeters,
    ReadRate,
    ReadRateDay,
    RunResult,
)
from storage import analytics, districts

router = APIRouter(prefix="/v1", tags=["analytics"], responses=PROBLEMS)
DistrictId = Annotated[int, Path(ge=1, le=2**63 - 1, description="district id")]
Day = Annotated[date, Query(description="the tenant's local day")]
_PLACES = Decimal("0.0001")
MAX_RUN_DAYS = 92
MAX_BALANCE_DAYS = 366


def _ratio(num: int, den: int) -> Decimal | None:
    if den <= 0:
        return None
    return (Decimal(num) / Decimal(den)).quantize(_PLACES, ROUND_HALF_EVEN)


@router.post("/districts", status_code=201, responses=CONFLICT, summary="Define a district")
async def create_district(body: DistrictCreate, who: Admin, pool: Pool) -> District:
    """A new district: its bulk meter and customer meters, all of the tenant's."""
    row = await districts.create(pool, who.tenant_id, body.name, body.bulk_meter_id, body.meter_ids)
    return District(**dict(row))


@router.get("/districts", summary="List districts")
async def list_districts(who: Reader, pool: Pool) -> list[District]:
    """The tenant's districts with their meters."""
    return [District(**dict(r)) for r in await districts.list_all(pool, who.tenant_id)]


@router.get("/districts/{district_id}", summary="One district")
async def get_district(district_id: DistrictId, who: Reader, pool: Pool) -> District:
    """A district with its meters."""
    return District(**dict(await districts.get(pool, who.tenant_id, district_id)))


@router.put("/districts/{district_id}/meters", summary="Set a district's customer meters")
async def put_meters(
    district_id: DistrictId, body: DistrictMeters, who: Admin, pool: Pool
) -> District:
    """Replace the customer meters (the bulk meter stays)."""
    row = await districts.set_meters(pool, who.tenant_id, district_id, body.meter_ids)
    return District(**dict(row))


@router.delete("/districts/{district_id}", status_code=204, summary="Remove a district")
async def delete_district(district_id: DistrictId, who: Admin, pool: Pool) -> None:
    """The district goes; its meters and their readings stay."""
    await districts.delete(pool, who.tenant_id, district_id)


def _balance(row: Mapping[str, Any]) -> Balance:
    complete = row["bulk_ml"] is not None and row["n_covered"] == row["n_customers"]
    nrw = row["nrw_ml"]
    return Balance(
        **{k: v for k, v in row.items() if k != "nrw_ml"},
        complete=complete,
        nrw_ml=nrw,
        nrw_ratio=_ratio(nrw, row["bulk_ml"]) if complete and nrw is not None else None,
    )


@router.get("/districts/{district_id}/balance", summary="A district's daily water balance")
async def get_balance(district_id: DistrictId, day: Day, who: Reader, pool: Pool) -> Balance:
    """Bulk volume, customers' volume, non-revenue water and the coverage of that day."""
    return _balance(dict(await districts.balance(pool, who.tenant_id, district_id, day)))


@router.get("/districts/{district_id}/balances", summary="A district's balance, day by day")
async def get_balances(
    district_id: DistrictId,
    who: Reader,
    pool: Pool,
    day_from: Annotated[date, Query(alias="from", description="first local day")],
    day_to: Annotated[date, Query(alias="to", description="last local day")],
) -> list[Balance]:
    """The balance of each day from..to (at most 366 days, in order), as `balance` has it:
    what the console's district chart draws."""
    if not 0 <= (day_to - day_from).days < MAX_BALANCE_DAYS:
        raise UnprocessableError(f"from..to must be 1 to {MAX_BALANCE_DAYS} days, in order")
    rows = await districts.balances(pool, who.tenant_id, district_id, day_from, day_to)
    return [_balance(dict(r)) for r in rows]


@router.get("/kpi/read-rate", summary="The daily read success rate")
async def get_read_rate(day: Day, who: Reader, pool: Pool) -> ReadRateDay:
    """Meters read at least once that day over the meters installed: tenant and districts."""
    rows = await analytics.read_rate(pool, who.tenant_id, day)
    rates = [
        ReadRate(**dict(r), read_rate=_ratio(r["meters_read"], r["meters_active"])) for r in rows
    ]
    return ReadRateDay(
        day=day,
        computed_at=await analytics.day_computed_at(pool, who.tenant_id, day),
        tenant=rates[0],
        districts=rates[1:],
    )


@router.post("/analytics/run", responses=CONFLICT, summary="Recompute the analytics of some days")
async def run_analytics(
    who: Admin,
    pool: Pool,
    day_from: Annotated[date, Query(alias="from", description="first local day")],
    day_to: Annotated[date, Query(alias="to", description="last local day")],
) -> RunResult:
    """Roll up and judge the tenant's days again (late data, an import); silent meters too."""
    span = (day_to - day_from).days
    if not 0 <= span < MAX_RUN_DAYS:
        raise UnprocessableError(f"from..to must be 1 to {MAX_RUN_DAYS} days, in order")
    days = [day_from + timedelta(days=k) for k in range(span + 1)]
    report = await analytics.run(pool, days=days, tenant_id=who.tenant_id)
    if report.skipped:
        raise ConflictError("another analytics run is under way: try again")
    return RunResult(
        days=[d for _, d in report.days], meter_days=report.meter_days,
        raised=report.raised, cleared=report.cleared, silent=report.silent,
    )  # fmt: skip
