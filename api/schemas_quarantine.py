"""Bodies of the quarantine routes: rows, their detail and re-decode history, re-decode jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api.schemas import Address, Instant, Integer
from storage import reasons
from storage.quarantine import ItemState, JobState, Resolution
from storage.reasons import Reason

# transports as stored (migration 0001); the collector owns the numbers
TRANSPORTS: dict[int, str] = {1: "coap", 2: "coap+oscore", 3: "mqtt", 4: "import", 5: "test"}
Code = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]  # a filter's code


class QuarantineRow(BaseModel):
    """An uplink (or reading set) the collector set aside, and what became of it since."""

    quarantine_id: int
    received_at: datetime
    meter_id: int | None = Field(description="the authenticated device's meter, when known")
    transport: str
    peer: str | None
    reason: str = Field(description=f"machine-readable, one of: {reasons.listed()}")
    decoder_error: str | None = Field(
        description="for undecodable rows, the decoder's error code: no_key, decrypt_failed, ..."
    )
    detail: str
    size_bytes: int | None = Field(description="payload length; null when none was kept")
    resolved_at: datetime | None
    resolution: Resolution | None = Field(
        description="what re-decoding did with the frame; quarantined: see superseded_by"
    )
    resolved_by_job: int | None
    superseded_by: int | None = Field(description="the row the frame was quarantined as again")


class QuarantinePage(BaseModel):
    """A page of quarantine rows, newest first; pass `next_cursor` for the next."""

    items: list[QuarantineRow]
    next_cursor: str | None


class RedecodeAttempt(BaseModel):
    """One re-decode of a row: its job, and what became of the frame."""

    job_id: int
    requested_by: str
    requested_at: datetime
    quarantine_id: int = Field(description="the row re-decoded (this one, or its predecessor)")
    state: ItemState
    reason: str | None
    detail: str | None
    n_readings: int | None
    n_new: int | None
    new_quarantine_id: int | None
    done_at: datetime | None


class QuarantineDetail(QuarantineRow):
    """One row with its raw payload and re-decode history."""

    payload_hex: str | None
    payload_base64: str | None
    history: list[RedecodeAttempt]


class RedecodeFilter(BaseModel):
    """Which open rows to re-decode: every given condition must hold."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"reason": Reason.UNDECODABLE.value, "error": "no_key", "meter_id": 7}]
        },
    )
    reason: Code | None = Field(None, description="a quarantine reason: undecodable, ...")
    error: Code | None = Field(None, description="decoder error code of undecodable rows")
    meter_id: Integer | None = Field(None, ge=1, le=2**63 - 1)
    address: Address | None = None
    received_from: Instant | None = None
    received_to: Instant | None = None


class RedecodeJob(BaseModel):
    """A re-decode request and its progress: items per state, readings stored."""

    job_id: int
    state: JobState = Field(description="queued until every item is done; failed if one failed")
    selection: dict[str, Any]
    requested_by: str
    requested_at: datetime
    finished_at: datetime | None
    n_items: int
    counts: dict[ItemState, int]
    readings_new: int = Field(description="readings stored by this job (never counted twice)")


class RedecodeItem(BaseModel):
    """What became of one row of a job."""

    quarantine_id: int
    state: ItemState
    reason: str | None
    detail: str | None
    n_readings: int | None
    n_new: int | None
    new_quarantine_id: int | None
    done_at: datetime | None


class RedecodeItemPage(BaseModel):
    """A page of a job's items in row order; pass `next_cursor` for the next."""

    items: list[RedecodeItem]
    next_cursor: str | None
