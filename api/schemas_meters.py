"""Request and response bodies of the meter registry (quantities: m3 decimal strings)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints

from api.schemas import M3, Address, Format, Instant, Integer, Text, Zone
from billing.consumption import Kind


class Credentials(BaseModel):
    """Device credentials for the collector; only a sha256 reference is kept here."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["psk", "oscore", "mqtt"]
    identity: Text | None = None
    secret: Annotated[str, StringConstraints(min_length=8, max_length=512)]


_METER_EXAMPLE: dict[str, JsonValue] = {
    "address": "12345678901234",
    "service_point": "SP-0001",
    "kind": "water",
    "format": "cjt188",
    "register_scale": -3,
    "register_digits": 8,
    "timezone": None,
    "installed_at": "2024-01-01T00:00:00Z",
    "initial_register_m3": "0.000",
}


class MeterCreate(BaseModel):
    """A meter to register."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_METER_EXAMPLE]})
    address: Address
    service_point: Text | None = None
    kind: Kind
    format: Format
    register_scale: Integer = Field(-3, ge=-6, le=0)
    register_digits: Integer = Field(8, ge=4, le=14)
    timezone: Zone | None = None
    installed_at: Instant | None = None
    initial_register_m3: M3 | None = None
    credentials: Credentials | None = None


_KEEP = "absent: unchanged (null is refused: the meter must have one)"


def _absent_only(schema: dict[str, Any]) -> None:
    """Document no default: the field is either sent with a value or absent."""
    schema.pop("default", None)


class MeterPatch(BaseModel):
    """Fields to change on a meter: absent ones are kept; null clears a nullable one.

    address, format, register_scale and register_digits cannot be cleared: their schema
    has no null, and an explicit null is a 422 naming the field (their `None` default only
    stands for "absent", never validated; read them after checking `model_fields_set`).
    """

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"service_point": "SP-0002"}]}
    )
    # the `None` defaults of address, format, register_scale and register_digits stand for
    # "absent" only and are never validated (see above): not values of their types
    address: Address = Field(None, description=_KEEP, json_schema_extra=_absent_only)  # type: ignore[assignment]  # None: absent
    service_point: Text | None = None
    format: Format = Field(None, description=_KEEP, json_schema_extra=_absent_only)  # type: ignore[arg-type]  # None: absent
    register_scale: Integer = Field(
        None, ge=-6, le=0, description=_KEEP, json_schema_extra=_absent_only
    )  # type: ignore[assignment]  # None: absent
    register_digits: Integer = Field(
        None, ge=4, le=14, description=_KEEP, json_schema_extra=_absent_only
    )  # type: ignore[assignment]  # None: absent
    timezone: Zone | None = None
    credentials: Credentials | None = None


class Meter(BaseModel):
    """A registered meter."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_METER_EXAMPLE,
                    "meter_id": 1,
                    "unit": "m3",
                    "removed_at": None,
                    "final_register_m3": None,
                    "has_credentials": False,
                    "created_at": "2024-01-01T00:00:00Z",
                }
            ]
        }
    )
    meter_id: int
    address: str
    service_point: str | None
    kind: Kind
    format: Format
    unit: Literal["m3"]
    register_scale: int
    register_digits: int
    timezone: str | None
    installed_at: datetime
    removed_at: datetime | None
    initial_register_m3: str | None
    final_register_m3: str | None
    has_credentials: bool
    created_at: datetime


class MeterPage(BaseModel):
    """A page of meters; pass `next_cursor` as `cursor` for the next one."""

    items: list[Meter]
    next_cursor: str | None


class ImportRowError(BaseModel):
    """Why one imported row was rejected (row numbers start at 1, after a CSV header)."""

    row: int
    detail: str


class ImportResult(BaseModel):
    """Outcome of a bulk import: valid rows are kept, invalid ones reported."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"created": 2, "meter_ids": [7, 8], "errors": [{"row": 3, "detail": "kind: ..."}]}
            ]
        }
    )
    created: int
    meter_ids: list[int]
    errors: list[ImportRowError]


class NewMeter(BaseModel):
    """The meter installed by an exchange (service point, kind, timezone are inherited)."""

    model_config = ConfigDict(extra="forbid")
    address: Address
    format: Format
    register_scale: Integer = Field(-3, ge=-6, le=0)
    register_digits: Integer = Field(8, ge=4, le=14)
    initial_register_m3: M3 = "0"
    credentials: Credentials | None = None


class ExchangeRequest(BaseModel):
    """Remove a meter with its final read; install the next one at the same service point."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "exchanged_at": "2024-03-15T08:30:00+08:00",
                    "final_register_m3": "123.456",
                    "new_meter": {
                        "address": "12345678909999",
                        "format": "cjt188",
                        "initial_register_m3": "0.000",
                    },
                }
            ]
        },
    )
    exchanged_at: Instant
    final_register_m3: M3
    new_meter: NewMeter


class ExchangeResult(BaseModel):
    """The removed and the installed meter."""

    removed: Meter
    installed: Meter


class DeviceHealth(BaseModel):
    """Last-seen times and the latest radio/battery measurements of a meter."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "meter_id": 1,
                    "last_read_at": "2024-03-01T00:00:00Z",
                    "last_received_at": "2024-03-01T00:02:00Z",
                    "last_uplink_at": None,
                    "last_register_m3": "12.345",
                    "last_flags": ["low_battery"],
                    "measured_at": None,
                    "battery_mv": None,
                    "rsrp_cdbm": None,
                    "sinr_cdb": None,
                    "ecl": None,
                    "battery_pct": None,
                    "battery_low": False,
                    "meter_error": None,
                    "cell_id": None,
                }
            ]
        }
    )
    meter_id: int
    last_read_at: datetime | None
    # when readings last arrived: the newest uplink that stored new ones, or an entered read
    last_received_at: datetime | None
    last_uplink_at: datetime | None
    last_register_m3: str | None
    last_flags: list[str]
    measured_at: datetime | None
    battery_mv: int | None
    rsrp_cdbm: int | None
    sinr_cdb: int | None
    ecl: int | None
    battery_pct: int | None = None
    battery_low: bool | None = None
    meter_error: bool | None = None
    cell_id: int | None = None


class OpenAlarm(BaseModel):
    """An alarm whose latest event is still active, with its lifecycle alarm (null when it
    has none, or with `state` given: one of the lifecycle alarms, occurred_at its last event)."""

    meter_id: int
    kind: str
    occurred_at: datetime
    detail: str | None
    alarm_id: int | None = None
    severity: str | None = None
    state: str | None = None
    acked_at: datetime | None = None
    acked_by: str | None = None
    ack_note: str | None = None
    opened_at: datetime | None = Field(None, description="with `state`: the first event's time")


class Uplink(BaseModel):
    """One archived uplink of a meter, as received, with what the collector made of it."""

    uplink_id: int
    received_at: datetime
    transport: str = Field(description="coap, coap+oscore, mqtt, ...")
    size_bytes: int
    format: str | None = Field(description="the decoder format that read it; null: none")
    outcome: str = Field(description="stored, duplicate, quarantined")
    n_readings: int
    n_new: int
    error_code: int | None = Field(description="the decoder's error code; null: decoded")
    error_message: str | None
    decode_flags: list[str] | None = Field(
        description="what the decoder tolerated or left out of the frame (no_data,"
        " trailing_junk, ...); null: archived before these were kept, or not decoded"
    )
    payload_hex: str
