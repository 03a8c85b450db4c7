"""Bodies and answers of the analytics routes: districts, their balance, the read rate.

Volumes are exact integers of millilitres (`*_ml`), as stored; ratios are Decimals
rounded to 4 places, computed from the integer counts shown beside them.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

_ID = Field(ge=1, le=2**63 - 1)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DistrictCreate(_Body):
    """A district metered area: the bulk meter at its inlet and its customer meters."""

    name: str = Field(min_length=1, max_length=200)
    bulk_meter_id: int = _ID
    meter_ids: list[int] = Field(default_factory=list, max_length=100_000)


class DistrictMeters(_Body):
    """The district's customer meters (replacing the current ones)."""

    meter_ids: list[int] = Field(max_length=100_000)


class District(BaseModel):
    """A district with its meters."""

    district_id: int
    name: str
    bulk_meter_id: int
    meter_ids: list[int]
    created_at: datetime


class Balance(BaseModel):
    """A district's water balance of one local day, with the coverage it rests on."""

    district_id: int
    day: date
    bulk_meter_id: int
    bulk_ml: int | None = Field(description="the bulk meter's volume; null: not covered")
    customers_ml: int = Field(description="the sum over the covered customer meters")
    n_customers: int
    n_covered: int = Field(description="customer meters with both day boundaries read")
    complete: bool = Field(description="the bulk meter and every customer meter covered")
    nrw_ml: int | None = Field(description="non-revenue water: bulk_ml - customers_ml")
    nrw_ratio: Decimal | None = Field(description="nrw_ml / bulk_ml, when complete")
    computed_at: datetime | None = Field(description="when the day was rolled up")


class ReadRate(BaseModel):
    """Meters read at least once in the day over the meters installed during it."""

    district_id: int | None = Field(description="null: the whole tenant")
    meters_active: int
    meters_read: int
    readings: int
    read_rate: Decimal | None


class ReadRateDay(BaseModel):
    """The read success rate of one local day, tenant-wide and per district."""

    day: date
    computed_at: datetime | None = Field(description="null: the day is not rolled up yet")
    tenant: ReadRate
    districts: list[ReadRate]


class RunResult(BaseModel):
    """What an analytics run did for the tenant."""

    days: list[date]
    meter_days: int
    raised: dict[str, int] = Field(description="alarms raised (or renewed), by kind")
    cleared: dict[str, int] = Field(description="alarms marked cleared, by kind")
    silent: int = Field(description="the tenant's meters past their silent limit")
