"""Schemas of the alarm lifecycle, alarm rules and webhook endpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

Severity = Literal["info", "warning", "major", "critical"]
AlarmState = Literal["open", "acknowledged", "closed"]
EventType = Literal["alarm.opened", "alarm.acknowledged", "alarm.closed"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Alarm(BaseModel):
    """One alarm through its lifecycle: who acknowledged or closed it, when, why."""

    alarm_id: int
    meter_id: int
    kind: str
    severity: Severity
    state: AlarmState
    opened_at: datetime
    raised_at: datetime
    last_seen_at: datetime
    occurrences: int
    cleared_at: datetime | None
    acked_at: datetime | None
    acked_by: str | None = Field(description="the API key id that acknowledged it")
    ack_note: str | None
    closed_at: datetime | None
    closed_by: str | None = Field(description="the API key id; null when closed by itself")
    close_reason: Literal["manual", "cleared"] | None
    close_note: str | None


class AlarmNote(_Body):
    """An optional note kept with an acknowledge or close."""

    note: str | None = Field(None, max_length=2000)


class AlarmRule(_Body):
    """A tenant's rule for one kind (null: the kind's default)."""

    enabled: bool = True
    severity: Severity | None = None
    auto_close_after_s: int | None = Field(
        None, ge=-1, le=10 * 365 * 86400,
        description="seconds cleared before the alarm closes by itself; -1: never",
    )  # fmt: skip
    threshold: int | None = Field(
        None, ge=0, le=2**31 - 1,
        description="low_battery: battery_mv below this raises it; an analytics kind: its"
        " threshold (night_flow, gas_night_use, gas_overuse, valve_closed_flow: mL;"
        " silent: seconds between expected reports; district_loss: % of the bulk volume)",
    )  # fmt: skip
    periods: int | None = Field(
        None, ge=1, le=366,
        description="analytics kinds: days (silent: expected reports) the condition must hold",
    )  # fmt: skip


class EffectiveRule(BaseModel):
    """The rule in force for a kind: the tenant's override or the default."""

    kind: str
    enabled: bool
    severity: Severity
    auto_close_after_s: int | None
    threshold: int | None
    periods: int | None


class EndpointCreate(_Body):
    """A webhook endpoint and its filter (null: every kind / event type)."""

    url: AnyHttpUrl
    kinds: list[str] | None = Field(None, max_length=32)
    event_types: list[EventType] | None = None
    min_severity: Severity = "info"
    secret: str | None = Field(
        None, min_length=16, max_length=200, description="omit to have one generated"
    )


class Endpoint(BaseModel):
    """A webhook endpoint (its secret is shown only when it is created)."""

    endpoint_id: int
    url: str
    kinds: list[str] | None
    event_types: list[str] | None
    min_severity: Severity
    enabled: bool
    disabled_at: datetime | None
    disabled_reason: str | None = Field(description="why it was switched off")
    failing_since: datetime | None
    failures: int
    created_at: datetime


class EndpointCreated(Endpoint):
    """A new endpoint with its signing secret: keep it, it is not shown again."""

    secret: str


class Delivery(BaseModel):
    """One delivery attempt."""

    delivery_id: int
    event_id: str
    attempt: int
    attempted_at: datetime
    status_code: int | None
    error: str | None
    duration_ms: int
    ok: bool


class ReplayRequest(_Body):
    """Which events to send again: since a time, or by id."""

    since: datetime | None = None
    event_ids: list[str] | None = Field(None, max_length=1000)


class ReplayResult(BaseModel):
    """How many deliveries were queued."""

    queued: int
