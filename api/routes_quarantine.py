"""Quarantine routes: list and detail of a tenant's quarantined uplinks, and re-decode requests.

A re-decode request is queued (storage.quarantine) and answered 202 with its job; a
collector carries it out through its live store path, so a re-decoded frame meets the
same identity, dedup and quarantine checks as a live uplink. Follow the job at
/v1/redecode-jobs/{job_id}.
"""

from __future__ import annotations

import base64
import re
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Query

from api import cursors
from api.cursors import decode_cursor, encode_cursor
from api.deps import CONFLICT, PROBLEMS, Pool, Reader, Writer
from api.errors import NotFoundError
from api.schemas import Address, Instant
from api.schemas_quarantine import (
    TRANSPORTS,
    Code,
    QuarantineDetail,
    QuarantinePage,
    QuarantineRow,
    RedecodeAttempt,
    RedecodeFilter,
    RedecodeItem,
    RedecodeItemPage,
    RedecodeJob,
)
from storage import quarantine
from storage.pool import connection
from storage.quarantine import Filter
from storage.reasons import Reason

router = APIRouter(prefix="/v1", tags=["quarantine"], responses=PROBLEMS)
Id = Annotated[int, Path(ge=1, le=2**63 - 1, description="quarantine row id", examples=[1])]
JobId = Annotated[int, Path(ge=1, le=2**63 - 1, description="re-decode job id", examples=[1])]
Cursor = Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
_ERROR_CODE = re.compile(r"^([a-z][a-z0-9_]*):")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = datetime.resolution


def requested_by(key_id: str) -> str:
    """How a job records the API key that asked for it."""
    return f"api-key:{key_id}"


_Row = TypeVar("_Row", bound=QuarantineRow)


def row_out(row: quarantine.Quarantined, model: type[_Row], **more: Any) -> _Row:
    """The API view of a quarantine row (`model` with `more` fields for the detail)."""
    match = _ERROR_CODE.match(row.detail) if row.reason == Reason.UNDECODABLE else None
    return model(
        quarantine_id=row.quarantine_id,
        received_at=row.received_at,
        meter_id=row.meter_id,
        peer=row.peer,
        reason=row.reason,
        detail=row.detail,
        size_bytes=row.size_bytes,
        resolved_at=row.resolved_at,
        resolution=row.resolution,
        resolved_by_job=row.resolved_by_job,
        superseded_by=row.superseded_by,
        transport=TRANSPORTS.get(row.transport, str(row.transport)),
        decoder_error=match.group(1) if match else None,
        **more,
    )


def job_out(job: quarantine.Job) -> RedecodeJob:
    """The API view of a job with its counts."""
    return RedecodeJob(
        job_id=job.job_id,
        state=job.state,
        requested_by=job.requested_by,
        requested_at=job.requested_at,
        finished_at=job.finished_at,
        selection=job.selection,
        n_items=job.n_items,
        counts=job.counts,
        readings_new=job.n_new,
    )


def encode_row_cursor(received_at: datetime, quarantine_id: int) -> str:
    """An opaque cursor for 'after this row' in the list's order (received_at in µs)."""
    return cursors.encode("q", (received_at - _EPOCH) // _MICROSECOND, quarantine_id)


def decode_row_cursor(cursor: str | None) -> tuple[datetime, int] | None:
    """The (received_at, quarantine_id) a cursor points after; UnprocessableError if not ours."""
    if not cursor:
        return None
    micros, qid = cursors.decode(cursor, "q", 2)
    try:
        at = _EPOCH + int(micros) * _MICROSECOND
    except (ValueError, OverflowError) as exc:
        raise cursors.invalid() from exc
    return at, cursors.bigint(qid)


@router.get("/quarantine", summary="List quarantined uplinks")
async def list_quarantine(
    who: Reader,
    pool: Pool,
    reason: Annotated[Code | None, Query(description="reason: undecodable, ...")] = None,
    error: Annotated[Code | None, Query(description="decoder error: no_key, ...")] = None,
    meter_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    address: Annotated[Address | None, Query(description="the tenant's meter address")] = None,
    received_from: Annotated[Instant | None, Query(description="inclusive")] = None,
    received_to: Annotated[Instant | None, Query(description="exclusive")] = None,
    resolved: bool | None = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> QuarantinePage:
    """The tenant's quarantine rows, newest first (received_at, then id), `limit` a page."""
    flt = Filter(reason, error, meter_id, address, received_from, received_to, resolved)
    rows = await quarantine.list_rows(
        pool, who.tenant_id, flt, after=decode_row_cursor(cursor), limit=limit
    )
    more = len(rows) == limit
    last = rows[-1] if rows else None
    return QuarantinePage(
        items=[row_out(r, QuarantineRow) for r in rows],
        next_cursor=(
            encode_row_cursor(last.received_at, last.quarantine_id) if more and last else None
        ),
    )


@router.get("/quarantine/{quarantine_id}", summary="One quarantined uplink")
async def get_quarantine(quarantine_id: Id, who: Reader, pool: Pool) -> QuarantineDetail:
    """The row with its raw payload (hex and base64) and its re-decode history."""
    row = await quarantine.get_row(pool, who.tenant_id, quarantine_id)
    if row is None:
        raise NotFoundError(f"no quarantine row {quarantine_id}")
    payload = row.payload
    attempts = await quarantine.history(pool, who.tenant_id, quarantine_id)
    return row_out(
        row,
        QuarantineDetail,
        payload_hex=payload.hex() if payload is not None else None,
        payload_base64=base64.b64encode(payload).decode() if payload is not None else None,
        history=[RedecodeAttempt(**asdict(a)) for a in attempts],
    )


@router.post(
    "/quarantine/{quarantine_id}/redecode",
    status_code=202,
    responses=CONFLICT,
    summary="Re-decode one quarantined uplink",
)
async def redecode_one(quarantine_id: Id, who: Writer, pool: Pool) -> RedecodeJob:
    """Queue the row's frame for decoding again; its job (the open one if already queued).

    409 when the row was re-decoded already (the detail says with what result).
    """
    async with connection(pool, "requesting a re-decode") as conn:
        job = await quarantine.request_one(
            conn, who.tenant_id, quarantine_id, requested_by(who.key_id)
        )
    if job is None:
        raise NotFoundError(f"no quarantine row {quarantine_id}")
    return job_out(job)


@router.post("/quarantine/redecode", status_code=202, summary="Re-decode every matching row")
async def redecode_matching(body: RedecodeFilter, who: Writer, pool: Pool) -> RedecodeJob:
    """Queue every open row matching the filter (e.g. a meter's no_key rows) in one job.

    Rows already queued by another job stay there. At most 50,000 rows per job (422
    beyond: narrow the filter).
    """
    flt = Filter(**body.model_dump())
    async with connection(pool, "requesting re-decodes") as conn:
        job = await quarantine.request_matching(conn, who.tenant_id, flt, requested_by(who.key_id))
    return job_out(job)


@router.get("/redecode-jobs/{job_id}", summary="A re-decode job's progress")
async def get_job(job_id: JobId, who: Reader, pool: Pool) -> RedecodeJob:
    """State, items per state and readings stored so far."""
    job = await quarantine.get_job(pool, who.tenant_id, job_id)
    if job is None:
        raise NotFoundError(f"no re-decode job {job_id}")
    return job_out(job)


@router.get("/redecode-jobs/{job_id}/items", summary="What became of each row of a job")
async def job_items(
    job_id: JobId,
    who: Reader,
    pool: Pool,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> RedecodeItemPage:
    """The job's items in row order, `limit` a page."""
    if await quarantine.get_job(pool, who.tenant_id, job_id) is None:
        raise NotFoundError(f"no re-decode job {job_id}")
    rows = await quarantine.job_items(
        pool, who.tenant_id, job_id, after=decode_cursor(cursor), limit=limit
    )
    more = len(rows) == limit
    return RedecodeItemPage(
        items=[RedecodeItem(**asdict(r)) for r in rows],
        next_cursor=encode_cursor(rows[-1].quarantine_id) if more else None,
    )
