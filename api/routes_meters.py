"""Meter registry routes: create, list, get, update, bulk import, exchange, health, alarms,
recent uplinks."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError

from api.bodies import load_json, read_csv
from api.cursors import decode_cursor, encode_cursor
from api.deps import (
    CONFLICT,
    PROBLEMS,
    MeterId,
    Pool,
    Reader,
    Writer,
    get_or_404,
)
from api.errors import NotFoundError, UnprocessableError, public_detail
from api.schemas import to_m3, to_ml
from api.schemas_meters import (
    DeviceHealth,
    ExchangeRequest,
    ExchangeResult,
    ImportResult,
    ImportRowError,
    Meter,
    MeterCreate,
    MeterPage,
    MeterPatch,
    OpenAlarm,
    Uplink,
)
from api.schemas_quarantine import TRANSPORTS
from decoder.columns import Flag, frame_flag_names
from storage import alarms, registry
from storage.apikeys import check_timezone
from storage.archive import recent_uplinks
from storage.errors import StorageError, StorageUnavailableError
from storage.pool import connection
from storage.registry import MeterRow

router = APIRouter(prefix="/v1", tags=["meters"], responses=PROBLEMS)
MAX_IMPORT_ROWS = 10_000


def credentials_ref(creds: dict[str, Any]) -> str:
    """A reference to device credentials: sha256 of their canonical JSON, never the secret.

    The hook for the collector's credential store: it provisions the secret itself
    (storage.credentials / `nbmeter device provision`); the API keeps only this reference.
    """
    canonical = json.dumps(creds, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def meter_out(row: MeterRow) -> Meter:
    """The API view of a meter: its registers in m3 text, its credentials only as a flag."""
    scale = row.register_scale
    return Meter(
        meter_id=row.meter_id,
        address=row.address,
        service_point=row.service_point,
        kind=row.kind,
        format=row.format,
        unit=row.unit,
        register_scale=scale,
        register_digits=row.register_digits,
        timezone=row.timezone,
        installed_at=row.installed_at,
        removed_at=row.removed_at,
        created_at=row.created_at,
        initial_register_m3=to_m3(row.initial_register_ml, scale),
        final_register_m3=to_m3(row.final_register_ml, scale),
        has_credentials=row.credentials_ref is not None,
    )


def _fields(body: MeterCreate | MeterPatch, scale: int) -> dict[str, Any]:
    data = body.model_dump(exclude_unset=True, exclude={"credentials", "initial_register_m3"})
    if data.get("timezone") is not None:
        check_timezone(data["timezone"])
    if body.credentials is not None:
        data["credentials_ref"] = credentials_ref(body.credentials.model_dump())
    initial = getattr(body, "initial_register_m3", None)
    if initial is not None:
        data["initial_register_ml"] = to_ml(initial, scale, "initial_register_m3")
    if data.get("installed_at") is None:
        data.pop("installed_at", None)
    return data


@router.post("/meters", status_code=201, responses=CONFLICT, summary="Register a meter")
async def create_meter(body: MeterCreate, who: Writer, pool: Pool) -> Meter:
    """Register a meter; 409 if an active meter of the tenant has the same address."""
    async with connection(pool, "creating a meter") as conn:
        row = await registry.insert_meter(conn, who.tenant_id, _fields(body, body.register_scale))
    return meter_out(row)


@router.get("/meters", summary="List meters")
async def list_meters(
    who: Reader,
    pool: Pool,
    cursor: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    address: Annotated[str | None, Query(max_length=64, pattern=r"^[!-~]+$")] = None,
    service_point: Annotated[
        str | None, Query(max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
    ] = None,
    active: bool | None = None,
) -> MeterPage:
    """Meters in id order, `limit` per page; filter by address, service point, active."""
    after = decode_cursor(cursor)
    rows = await registry.list_meters(
        pool,
        who.tenant_id,
        after=after,
        limit=limit,
        address=address,
        service_point=service_point,
        active=active,
    )
    more = len(rows) == limit
    return MeterPage(
        items=[meter_out(r) for r in rows],
        next_cursor=encode_cursor(rows[-1].meter_id) if more else None,
    )


@router.get("/meters/{meter_id}", summary="Get a meter")
async def get_meter(meter_id: MeterId, who: Reader, pool: Pool) -> Meter:
    """One meter of the tenant."""
    return meter_out(await get_or_404(pool, who.tenant_id, meter_id))


@router.patch("/meters/{meter_id}", responses=CONFLICT, summary="Update a meter")
async def update_meter(meter_id: MeterId, body: MeterPatch, who: Writer, pool: Pool) -> Meter:
    """Change the given fields of a meter; registers keep their millilitre values."""
    async with connection(pool, "updating a meter") as conn:
        old = await get_or_404(conn, who.tenant_id, meter_id)
        scale = (
            body.register_scale if "register_scale" in body.model_fields_set else old.register_scale
        )
        row = await registry.update_meter(conn, who.tenant_id, meter_id, _fields(body, scale))
    if row is None:
        raise NotFoundError(f"no meter {meter_id}")
    return meter_out(row)


_IMPORT_BODY = {
    "requestBody": {
        "required": True,
        "description": "a JSON array of meters, or CSV with a header row of MeterCreate"
        " fields; each row is validated on its own and a bad one reported in `errors`",
        "content": {
            "application/json": {
                "schema": {
                    "type": "array",
                    "maxItems": MAX_IMPORT_ROWS,
                    # each row is validated on its own: a row that is no MeterCreate is
                    # reported in `errors` (200), not a reason to refuse the others
                    "items": {"anyOf": [{"$ref": "#/components/schemas/MeterCreate"}, {}]},
                },
                "example": [{"address": "10000001", "kind": "water", "format": "mbus"}],
            },
            "text/csv": {
                "schema": {"type": "string"},
                "example": "address,kind,format,service_point\n10000001,water,mbus,SP-1\n",
            },
        },
    }
}


async def _import_rows(request: Request) -> list[Any]:
    raw = await request.body()
    if request.headers.get("content-type", "").startswith("text/csv"):
        return list(read_csv(raw, MeterCreate.model_fields))
    rows = load_json(raw)
    if not isinstance(rows, list):
        raise UnprocessableError("the JSON body must be an array of meters")
    return rows


@router.post(
    "/meters/import", summary="Bulk-import meters (JSON array or CSV)", openapi_extra=_IMPORT_BODY
)
async def import_meters(request: Request, who: Writer, pool: Pool) -> ImportResult:
    """Import up to 10,000 meters; each row is validated and inserted on its own."""
    rows = await _import_rows(request)
    if len(rows) > MAX_IMPORT_ROWS:
        raise UnprocessableError(f"at most {MAX_IMPORT_ROWS} rows per import")
    created: list[int] = []
    errors: list[ImportRowError] = []
    async with connection(pool, "importing meters") as conn:
        for number, raw in enumerate(rows, start=1):
            try:
                meter = MeterCreate.model_validate(raw)
                row = await registry.insert_meter(
                    conn, who.tenant_id, _fields(meter, meter.register_scale)
                )
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                errors.append(ImportRowError(row=number, detail=f"{where}: {first['msg']}"))
            except UnprocessableError as exc:
                errors.append(ImportRowError(row=number, detail=str(exc)))
            except StorageUnavailableError:
                raise
            except StorageError as exc:
                errors.append(ImportRowError(row=number, detail=public_detail(exc)))
            else:
                created.append(row.meter_id)
    return ImportResult(created=len(created), meter_ids=created, errors=errors)


@router.post(
    "/meters/{meter_id}/exchange",
    status_code=201,
    responses=CONFLICT,
    summary="Exchange a meter at its service point",
)
async def exchange_meter(
    meter_id: MeterId, body: ExchangeRequest, who: Writer, pool: Pool
) -> ExchangeResult:
    """Remove the meter with its final read, install the new one with its initial read."""
    async with connection(pool, "exchanging a meter") as conn:
        old = await get_or_404(conn, who.tenant_id, meter_id)
        new = body.new_meter
        fields = {
            "address": new.address,
            "format": new.format,
            "register_scale": new.register_scale,
            "register_digits": new.register_digits,
            "initial_register_ml": to_ml(
                new.initial_register_m3, new.register_scale, "initial_register_m3"
            ),
        }
        if new.credentials is not None:
            fields["credentials_ref"] = credentials_ref(new.credentials.model_dump())
        final_ml = to_ml(body.final_register_m3, old.register_scale, "final_register_m3")
        done = await registry.exchange_meter(
            conn,
            who.tenant_id,
            meter_id,
            exchanged_at=body.exchanged_at,
            final_register_ml=final_ml,
            new_meter=fields,
        )
    if done is None:
        raise NotFoundError(f"no meter {meter_id}")
    return ExchangeResult(removed=meter_out(done[0]), installed=meter_out(done[1]))


@router.get("/meters/{meter_id}/health", summary="Device health and last seen")
async def meter_health(meter_id: MeterId, who: Reader, pool: Pool) -> DeviceHealth:
    """Last reading and uplink times, register, flags, battery and radio of a meter."""
    meter = await get_or_404(pool, who.tenant_id, meter_id)
    health, seen = await registry.device_health(pool, meter_id)
    flags = seen["flags"] or 0
    return DeviceHealth(
        meter_id=meter_id,
        last_read_at=seen["last_read_at"],
        last_received_at=seen["last_received_at"],
        last_uplink_at=seen["last_uplink_at"],
        last_register_m3=to_m3(seen["register_ml"], meter.register_scale),
        last_flags=[f.name.lower() for f in Flag if f and flags & f and f.name],
        **{
            k: (health[k] if health else None)
            for k in (
                "measured_at",
                "battery_mv",
                "rsrp_cdbm",
                "sinr_cdb",
                "ecl",
                "battery_pct",
                "battery_low",
                "meter_error",
                "cell_id",
            )
        },
    )


@router.get("/meters/{meter_id}/alarms", summary="Open alarms of a meter")
async def meter_alarms(meter_id: MeterId, who: Reader, pool: Pool) -> list[OpenAlarm]:
    """Alarms (leak, tamper, ...) whose latest event is still active."""
    await get_or_404(pool, who.tenant_id, meter_id)
    rows = await registry.open_alarms(pool, who.tenant_id, meter_id)
    return [OpenAlarm(**dict(r)) for r in rows]


@router.get("/alarms", summary="Open alarms of every meter")
async def tenant_alarms(
    who: Reader,
    pool: Pool,
    state: Annotated[list[Literal["open", "acknowledged", "closed"]] | None, Query()] = None,
) -> list[OpenAlarm]:
    """The tenant's open alarms, newest first (at most 1,000). With `state` (repeatable):
    the lifecycle alarms in those states (acknowledge and close: /v1/alarms/{id}/...)."""
    if state:
        rows = await alarms.list_alarms(pool, who.tenant_id, states=state)
        return [OpenAlarm(**dict(r), occurred_at=r["last_seen_at"], detail=None) for r in rows]
    rows = await registry.open_alarms(pool, who.tenant_id, None)
    return [OpenAlarm(**dict(r)) for r in rows]


_UPLINK_COLUMNS = ("uplink_id", "received_at", "format", "outcome", "n_readings", "n_new",
                   "error_code", "error_message")  # fmt: skip


@router.get("/meters/{meter_id}/uplinks", summary="Recent raw uplinks of a meter")
async def meter_uplinks(
    meter_id: MeterId,
    who: Reader,
    pool: Pool,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[Uplink]:
    """The meter's last `limit` archived uplinks, newest first: bytes, outcome, decoder
    error and the decoder's frame flags by name."""
    await get_or_404(pool, who.tenant_id, meter_id)
    rows = await recent_uplinks(pool, who.tenant_id, meter_id, limit)
    return [
        Uplink(
            **{k: r[k] for k in _UPLINK_COLUMNS},
            transport=TRANSPORTS.get(r["transport"], str(r["transport"])),
            size_bytes=len(r["payload"]),
            decode_flags=None if r["decode_flags"] is None else frame_flag_names(r["decode_flags"]),
            payload_hex=bytes(r["payload"]).hex(),
        )
        for r in rows
    ]
