"""Readings entered by people: manual reads of one meter, and historical read imports.

Both store through `storage.manual_reads`: a row of `readings` with its own ESPI quality
(7 for a manual read, the file's for an import) and who entered it (`key:<api key id>`),
used by boundary reads, exports and VEE as any reading. An entered read never replaces a
stored reading of the same instant: a manual read there is refused with 409 (the same
manual read again is answered 200 with the stored one); an import row there is a
duplicate when its register is equal (nothing is stored twice), else a bad row.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from api.deps import (
    CONFLICT,
    PROBLEM_RESPONSE,
    PROBLEMS,
    MeterId,
    Pool,
    Reader,
    Writer,
    get_or_404,
)
from api.errors import ConflictError, UnprocessableError, problem
from api.read_import import MAX_ROWS, BodyError, Kind, TooManyRowsError, parse
from api.schemas import to_m3
from api.schemas_manual import ImportAccepted, ManualRead, ManualReadCreate
from api.settings import ApiSettings
from storage import manual_reads
from storage.apikeys import Principal
from storage.manual_reads import EnteredRead, EnteredReadError, ReadConflictError
from storage.pool import connection

router = APIRouter(prefix="/v1", tags=["manual reads"], responses=PROBLEMS)
MAX_IMPORT_BYTES = 16 << 20  # ~150k CSV rows; larger migrations go in several files
_TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: {**PROBLEM_RESPONSE, "description": "body over 16 MiB or over 100,000 rows"},
    415: {**PROBLEM_RESPONSE, "description": "neither text/csv nor application/json"},
}
_IMPORT_BODY = {
    "requestBody": {
        "required": True,
        "description": "CSV with a header row, or a JSON array of objects: meter_id or address,"
        " read_at (ISO 8601 with offset), register_m3 (decimal string) or register_ml, quality"
        " (ESPI, default 7), note",
        "content": {
            "text/csv": {
                "schema": {"type": "string"},
                "example": "address,read_at,register_m3,quality\n"
                "12345678901234,2023-12-01T00:00:00+08:00,101.250,0\n",
            },
            "application/json": {
                "schema": {
                    "type": "array",
                    "maxItems": MAX_ROWS,
                    "items": {"type": "object"},
                },
                "example": [
                    {"meter_id": 1, "read_at": "2023-12-01T00:00:00Z", "register_ml": 101250000}
                ],
            },
        },
    }
}


def entered_by(who: Principal) -> str:
    """The bookkeeping name of an API caller: its key id (never the secret)."""
    return f"key:{who.key_id}"


def _out(s: manual_reads.Stored) -> ManualRead:
    return ManualRead(
        meter_id=s.meter_id,
        read_at=s.read_at,
        register_m3=to_m3(s.register_ml, s.register_scale),
        quality=s.quality,
        source=s.source,  # type: ignore[arg-type]  # text; the column's CHECK holds it to these
        note=s.note,
        entered_by=s.entered_by,
        entered_at=s.entered_at,
        import_id=s.import_id,
    )


@router.post(
    "/meters/{meter_id}/manual-reads",
    status_code=201,
    response_model=ManualRead,
    responses={**CONFLICT, 200: {"model": ManualRead, "description": "the same read again"}},
    summary="Enter a manual read (visit, customer photo)",
)
async def create_manual_read(
    meter_id: MeterId, body: ManualReadCreate, who: Writer, pool: Pool, request: Request
) -> Response:
    """Store a register read by a person, with quality 7 and the caller's key as entered_by.

    422 for a time in the future, before installation or after removal, or a register
    finer than or beyond the meter's register; 409 when a different reading (a meter's,
    or another manual read) is stored at that instant. The same read again answers 200.
    """
    settings: ApiSettings = request.app.state.settings
    read = EnteredRead(
        line=1,
        meter_id=meter_id,
        address=None,
        read_at=body.read_at,
        register_ml=body.millilitres(),
        quality=manual_reads.MANUAL_QUALITY,
        note=body.note,
    )
    async with connection(pool, "storing a manual read") as conn:
        await get_or_404(conn, who.tenant_id, meter_id)
        try:
            done = await manual_reads.store(
                conn,
                who.tenant_id,
                [read],
                source=body.source,
                entered_by=entered_by(who),
                now=datetime.now(UTC),
                tolerance=timedelta(seconds=settings.future_tolerance_s),
            )
        except ReadConflictError as exc:
            raise ConflictError(str(exc)) from exc
        except EnteredReadError as exc:
            raise UnprocessableError(str(exc)) from exc
        stored = await manual_reads.manual_reads(
            conn, who.tenant_id, meter_id, read_at=body.read_at, limit=1
        )
    out = _out(stored[0])
    return Response(
        out.model_dump_json(),
        status_code=201 if done.stored else 200,
        media_type="application/json",
    )


@router.get("/meters/{meter_id}/manual-reads", summary="Entered reads of a meter")
async def list_manual_reads(
    meter_id: MeterId,
    who: Reader,
    pool: Pool,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[ManualRead]:
    """Manual and imported reads of the meter, newest first, with who entered them."""
    async with connection(pool, "listing manual reads") as conn:
        await get_or_404(conn, who.tenant_id, meter_id)
        rows = await manual_reads.manual_reads(conn, who.tenant_id, meter_id, limit=limit)
    return [_out(r) for r in rows]


async def read_body(request: Request, cap: int) -> bytes:
    """The request body, read as it streams in; 413 as soon as it passes `cap` bytes."""
    declared = request.headers.get("content-length", "")
    too_large = f"the body is over {cap:,} bytes: split the import into several files"
    if declared.isdigit() and int(declared) > cap:
        raise HTTPException(413, too_large)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise HTTPException(413, too_large)
    return bytes(body)


def _kind(request: Request) -> Kind:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "text/csv":
        return "csv"
    if media == "application/json" or media.endswith("+json"):
        return "json"
    raise HTTPException(415, "send the reads as text/csv or application/json")


@router.post(
    "/reads/import",
    summary="Import historical reads (CSV or JSON), all or nothing",
    openapi_extra=_IMPORT_BODY,
    response_model=ImportAccepted,
    responses={**_TOO_LARGE},
)
async def import_reads(request: Request, who: Writer, pool: Pool) -> Response:
    """Check every row, then store them all in one transaction, or refuse the whole import.

    422 lists each bad row (`errors`: line and detail): unknown meter, time in the future
    or outside the meter's service, register beyond or finer than the meter's register,
    quality not an ESPI code, a different reading stored at that instant. Re-posting the
    same body stores nothing (`replayed`); a row whose reading is stored already with the
    same register counts as a duplicate.
    """
    settings: ApiSettings = request.app.state.settings
    kind = _kind(request)
    body = await read_body(request, MAX_IMPORT_BYTES)
    try:
        rows, problems = parse(body, kind)
    except TooManyRowsError as exc:
        raise HTTPException(413, f"line {exc.line}: {exc.reason}") from exc
    except BodyError as exc:
        return _refused(request, [(exc.line, exc.reason)])
    try:
        async with connection(pool, "importing reads") as conn:
            done = await manual_reads.store(
                conn,
                who.tenant_id,
                rows,
                source="import",
                entered_by=entered_by(who),
                now=datetime.now(UTC),
                tolerance=timedelta(seconds=settings.future_tolerance_s),
                problems=problems,
                body_sha256=manual_reads.body_digest(body),
            )
    except EnteredReadError as exc:
        return _refused(request, exc.problems)
    result = ImportAccepted(
        import_id=done.import_id,
        rows=done.rows,
        stored=done.stored,
        duplicates=done.duplicates,
        replayed=done.replayed,
    )
    return Response(result.model_dump_json(), media_type="application/json")


def _refused(request: Request, problems: list[tuple[int, str]]) -> JSONResponse:
    errors = [{"line": line, "detail": detail} for line, detail in problems]
    first = f"line {problems[0][0]}: {problems[0][1]}"
    more = f" ({len(problems)} bad rows in all)" if len(problems) > 1 else ""
    detail = f"import refused, nothing stored: {first}{more}; fix the rows and post it again"
    return problem(request, 422, "import-refused", detail, errors=errors)
