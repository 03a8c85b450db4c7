"""Request and response bodies. Billing quantities are decimal strings of m3, never floats.

`M3` is such a string ("123.456"); `to_ml` / `to_m3` convert exactly between it and the
int millilitres storage speaks (billing.units, the one conversion), checking the value
fits the register's resolution.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
)

from api.errors import UnprocessableError
from billing import consumption, units
from storage.registry import MeterFormat

# at most 12 integer digits: 10^12 m3 in mL stays inside bigint (9.2e18)
M3 = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,12}(\.[0-9]{1,6})?$")]
Text = Annotated[
    str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]+$", min_length=1, max_length=64)
]
Address = Annotated[str, StringConstraints(pattern=r"^[!-~]{1,64}$")]
Zone = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+){0,2}$", max_length=64)
]
# the calendar the API computes in (billing.localtime): PostgreSQL and datetime both go further,
# but local-time arithmetic near year 1 or 9999 overflows, and no meter reads that far
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)


def _instant_in_range(value: datetime) -> datetime:
    if not EARLIEST <= value < LATEST:
        msg = "must lie between 1970-01-01 and 2200-01-01 UTC"
        raise ValueError(msg)
    return value


def _day_in_range(value: date) -> date:
    if not EARLIEST.date() <= value < LATEST.date():
        msg = "must lie between 1970-01-01 and 2199-12-31"
        raise ValueError(msg)
    return value


_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_ISO_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}.*")
_ISO_DAY_OR_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}([Tt ][0-9]{2}:[0-9]{2}.*)?")


def _written_as(pattern: re.Pattern[str], example: str) -> Callable[[object], object]:
    """A before-validator: the value must be text in ISO 8601 form (pydantic alone would
    also take a number of seconds since 1970, or a date-time for a date)."""

    def check(value: object) -> object:
        if isinstance(value, str) and pattern.fullmatch(value):
            return value
        if isinstance(value, date):
            return value  # built in Python, not parsed
        msg = f"write it in ISO 8601 form, e.g. {example}"
        raise ValueError(msg)

    return check


IsoDay = Annotated[date, BeforeValidator(_written_as(_ISO_DAY, "2024-03-01"))]
# a query's time: ISO 8601 with or without a time of day and an offset (naive = local)
IsoTime = Annotated[
    datetime,
    BeforeValidator(_written_as(_ISO_DAY_OR_TIME, "2024-03-01T00:00:00+08:00")),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": f"^{_ISO_DAY_OR_TIME.pattern}$",
            "examples": ["2024-03-01", "2024-03-01T08:00:00", "2024-03-01T00:00:00+08:00"],
        }
    ),
]
Instant = Annotated[
    AwareDatetime,
    BeforeValidator(_written_as(_ISO_TIME, "2024-03-01T00:00:00+08:00")),
    AfterValidator(_instant_in_range),
]
Day = Annotated[IsoDay, AfterValidator(_day_in_range)]


def _not_bool(value: object) -> object:
    if isinstance(value, bool):
        msg = "a number is expected, not true/false"
        raise ValueError(msg)  # pydantic's lax mode would read them as 1 and 0
    return value


Integer = Annotated[int, BeforeValidator(_not_bool)]
Format: TypeAlias = MeterFormat  # the meters table's CHECKs, as storage reads them
Kind: TypeAlias = consumption.Kind
Scope = Literal["readings:read", "meters:write", "admin"]
Method = Literal["actual", "interpolated", "estimated", "installation", "removal", "missing"]
Basis = Literal["reference_day", "average_daily_use", "last_read"]


def to_ml(value: str, scale: int, what: str) -> int:
    """Exact mL of an m3 decimal string; UnprocessableError if finer than 10^scale m3."""
    try:
        return units.register_ml(value, scale)
    except units.ResolutionError as exc:
        raise UnprocessableError(f"{what} {exc}") from exc


def to_m3(ml: int | None, scale: int) -> str | None:
    """The m3 decimal string of `ml` with the register's number of decimals (as the SQL)."""
    return None if ml is None else str(units.m3(ml, scale))


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    errors: list[dict[str, Any]] | None = None
    error_id: str | None = Field(None, description="500 only: quote it to the operator")
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "/problems/not-found",
                    "title": "Not Found",
                    "status": 404,
                    "detail": "no meter 42",
                    "instance": "/v1/meters/42",
                }
            ]
        }
    )


class Interval(BaseModel):
    """One step: registers at its local-time boundaries and the consumption between."""

    start: datetime
    end: datetime
    start_register_m3: str | None
    end_register_m3: str | None
    consumption_m3: str | None
    start_method: Method
    end_method: Method
    quality: int | None


class IntervalReads(BaseModel):
    """Interval reads of a meter, steps aligned to its local time."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "meter_id": 1,
                    "step": "1d",
                    "timezone": "Asia/Shanghai",
                    "unit": "m3",
                    "intervals": [
                        {
                            "start": "2024-02-29T16:00:00Z",
                            "end": "2024-03-01T16:00:00Z",
                            "start_register_m3": "10.000",
                            "end_register_m3": "10.350",
                            "consumption_m3": "0.350",
                            "start_method": "actual",
                            "end_method": "interpolated",
                            "quality": 13,
                        }
                    ],
                }
            ]
        }
    )
    meter_id: int
    step: Literal["1h", "1d", "1mo"]
    timezone: str
    unit: Literal["m3"]
    intervals: list[Interval]


class BoundaryRead(BaseModel):
    """A register at a cycle boundary, how it was obtained, and its publication state."""

    at: datetime
    register_m3: str | None
    method: Method
    basis: Basis | None
    quality: int | None = Field(
        description="ESPI QualityOfReading: 0 valid, 7 manually entered, 8 reference "
        "day, 9 interpolated, 10 questionable, 12 projected, 13 mixed (an imported read "
        "keeps the code it was imported with)"
    )
    read_at: datetime | None
    gap: bool = Field(
        False,
        description="interpolated across an outage longer than the VEE gap limit, measured "
        "between the readings around the boundary (not cut at the cycle edge)",
    )
    revision: int | None
    published_register_m3: str | None


class CycleRow(BaseModel):
    """One meter's cycle read as exported (a meter exchanged mid-cycle has two rows)."""

    meter_id: int
    address: str
    service_point: str | None
    kind: Kind
    cycle: date
    unit: Literal["m3"]
    opening: BoundaryRead
    closing: BoundaryRead
    consumption_m3: str | None
    consumption_quality: int | None
    rolled_over: bool
    reverse: bool
    revised: bool


class CyclePage(BaseModel):
    """A page of cycle reads; pass `next_cursor` as `cursor` for the next one."""

    items: list[CycleRow]
    next_cursor: str | None


class VeeIssue(BaseModel):
    """A VEE finding during the cycle."""

    code: str
    severity: Literal["error", "warning", "info"]
    meter_id: int
    start: datetime
    end: datetime
    detail: str


class CycleAlarm(BaseModel):
    """An alarm during the cycle, from meter events or reading flags."""

    kind: str
    source: Literal["event", "flag"]
    meter_id: int
    first_at: datetime
    last_at: datetime
    count: int
    active: bool


class Revision(BaseModel):
    """A published boundary read; revisions after the first follow late readings."""

    meter_id: int
    at: datetime
    revision: int
    register_m3: str | None
    method: str
    quality: int | None
    published_at: datetime


class CycleRead(BaseModel):
    """A meter's billing-cycle read: opening, closing, consumption, VEE, alarms."""

    meter_id: int
    cycle: date
    start: datetime
    end: datetime
    timezone: str
    unit: Literal["m3"]
    closed: bool
    opening: BoundaryRead
    closing: BoundaryRead
    consumption_m3: str | None
    consumption_quality: int | None
    revised: bool
    segments: list[CycleRow]
    issues: list[VeeIssue]
    alarms: list[CycleAlarm]
    revisions: list[Revision]


class Cycle(BaseModel):
    """A billing cycle: [start_date 00:00, end_date 00:00) local time."""

    cycle: date
    start_date: date
    end_date: date


class CycleList(BaseModel):
    """Billing cycles in a range."""

    timezone: str
    cycles: list[Cycle]


class Calendar(BaseModel):
    """The tenant's billing calendar: a cycle day, or explicit start dates (which win)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"cycle_day": 1, "dates": []},
                {"cycle_day": 1, "dates": ["2024-01-05", "2024-02-06"]},
            ]
        },
    )
    cycle_day: Integer = Field(1, ge=1, le=28)
    dates: list[Day] = Field(default_factory=list, max_length=1200)


class CloseResult(BaseModel):
    """Boundary reads published by closing a cycle."""

    cycle: date
    boundaries: int
    published: int
    revised: int


class ApiKeyCreate(BaseModel):
    """Scopes of a new API key, and when it expires (absent or null: never)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"scopes": ["readings:read"]},
                {"scopes": ["meters:write"], "expires_at": "2030-01-01T00:00:00Z"},
            ]
        },
    )
    scopes: list[Scope] = Field(min_length=1, max_length=3)
    expires_at: Instant | None = Field(None, description="must lie in the future")


class ApiKeyCreated(BaseModel):
    """A new key: `key` is shown only now."""

    key_id: str
    key: str
    scopes: list[Scope]
    expires_at: datetime | None


class ApiKey(BaseModel):
    """A key's metadata (never its secret)."""

    key_id: str
    scopes: list[Scope]
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None


class Health(BaseModel):
    """Liveness: the database answered."""

    status: Literal["ok"]
