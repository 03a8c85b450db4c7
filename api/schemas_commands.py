"""Bodies of the command routes: a command to a meter, its lifecycle, bulk jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api.schemas import Address, Format, Integer, Kind

CommandKind = Literal["valve", "clock", "reporting", "rotate_key", "read"]
CommandState = Literal["queued", "sent", "acknowledged", "failed", "expired", "cancelled"]
IdempotencyKey = Annotated[str, StringConstraints(pattern=r"^[!-~]{1,200}$")]
ArgValue = Annotated[str, StringConstraints(max_length=64)] | Integer
TtlS = Annotated[Integer, Field(ge=60, le=30 * 86400, description="seconds until it expires")]
_ARGS_DOC = (
    "valve: {action: open|close}; clock: {} (the collector's clock when it is sent);"
    " reporting: {interval_s: 60..604800, report_time: 'HH:MM'} (senml/interval meters);"
    " rotate_key: {key?: aes|oscore} (default: aes for OMS meters, else oscore; a new AES"
    " key or OSCORE context, staged beside the current one by the collector; the old one"
    " is accepted until the device confirms the new one);"
    " read: {path: '/3/0/9'} (LwM2M clients only: an LwM2M Read of an object, instance,"
    " resource or resource instance; the client's answer, decoded, becomes the result)"
)


class NewCommand(BaseModel):
    """A command for one meter; it waits until the meter is next heard from."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"kind": "valve", "args": {"action": "close"}, "idempotency_key": "a1"}]
        },
    )
    kind: CommandKind
    args: dict[Annotated[str, StringConstraints(max_length=32)], ArgValue] = Field(
        default_factory=dict, max_length=8, description=_ARGS_DOC
    )
    ttl_s: TtlS = 86_400
    idempotency_key: IdempotencyKey | None = Field(
        None, description="the same key again returns the command already made"
    )


class Command(BaseModel):
    """A command and where it is in its lifecycle."""

    command_id: int
    meter_id: int
    job_id: int | None
    idempotency_key: str | None
    kind: CommandKind
    args: dict[str, Any]
    state: CommandState
    reason: str | None = Field(
        description="why it ended: device_confirmed, device_refused, superseded_by=<id>,"
        " cancelled_by=<who>, ttl_passed_undelivered, ttl_passed_unanswered,"
        " device_answered_after_expiry"
    )
    result: dict[str, Any] | None = Field(description="what the device answered")
    attempts: int = Field(description="windows it was sent in")
    created_by: str
    created_at: datetime
    expires_at: datetime
    sent_at: datetime | None
    last_sent_at: datetime | None
    finished_at: datetime | None


class CommandPage(BaseModel):
    """A page of commands in id order; pass `next_cursor` for the next."""

    items: list[Command]
    next_cursor: str | None


class MeterQuery(BaseModel):
    """Meters of the tenant matching every given condition."""

    model_config = ConfigDict(extra="forbid")
    kind: Kind | None = None
    format: Format | None = None
    address_prefix: Annotated[str, StringConstraints(pattern=r"^[!-~]{1,64}$")] | None = None


class BulkCommand(BaseModel):
    """One command to many meters: exactly one of meter_ids, addresses, query."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"kind": "valve", "args": {"action": "close"}, "query": {"kind": "gas"}},
            ]
        },
    )
    kind: CommandKind
    args: dict[Annotated[str, StringConstraints(max_length=32)], ArgValue] = Field(
        default_factory=dict, max_length=8, description=_ARGS_DOC
    )
    ttl_s: TtlS = 86_400
    idempotency_key: IdempotencyKey | None = None
    meter_ids: list[Annotated[Integer, Field(ge=1, le=2**63 - 1)]] | None = Field(
        None, min_length=1, max_length=100_000
    )
    addresses: list[Address] | None = Field(None, min_length=1, max_length=100_000)
    query: MeterQuery | None = None


class CommandJob(BaseModel):
    """A bulk job: its commands counted per state (follow it until none is queued or sent)."""

    job_id: int
    kind: CommandKind
    args: dict[str, Any]
    selection: dict[str, Any]
    n_commands: int
    created_by: str
    created_at: datetime
    counts: dict[CommandState, int]
