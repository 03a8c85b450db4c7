"""Alarm lifecycle, alarm rules and webhook endpoint routes.

Alarms are raised by the database in the transaction that stores the uplink (migration
0039); here they are listed, acknowledged and closed (the `meters:write` scope; the key id
is recorded), and a tenant's admin sets its rules and webhook endpoints.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request

from api.deps import CONFLICT, PROBLEM_RESPONSE, PROBLEMS, Admin, Pool, Reader, Writer
from api.errors import ConflictError, NotFoundError, UnavailableError, UnprocessableError
from api.schemas_alarms import (
    Alarm,
    AlarmNote,
    AlarmRule,
    Delivery,
    EffectiveRule,
    Endpoint,
    EndpointCreate,
    EndpointCreated,
    ReplayRequest,
    ReplayResult,
)
from storage import alarms
from storage import webhooks as hooks
from storage.credentials import parse_key

router = APIRouter(prefix="/v1", tags=["alarms"], responses=PROBLEMS)
AlarmId = Annotated[int, Path(ge=1, le=2**63 - 1, description="alarm id")]
EndpointId = Annotated[int, Path(ge=1, le=2**63 - 1, description="webhook endpoint id")]
Kind = Annotated[str, Path(pattern=r"^[a-z_]{1,32}$", description="alarm kind")]


@router.get("/alarms/{alarm_id}", summary="One alarm")
async def get_alarm(alarm_id: AlarmId, who: Reader, pool: Pool) -> Alarm:
    """An alarm with its acknowledge and close details."""
    try:
        return Alarm(**dict(await alarms.get_alarm(pool, who.tenant_id, alarm_id)))
    except alarms.AlarmNotFoundError as exc:
        raise NotFoundError(str(exc)) from exc


async def _move(
    pool: Pool, tenant: int, alarm_id: int, action: Literal["acknowledge", "close"],
    key_id: str, body: AlarmNote | None,
) -> Alarm:  # fmt: skip
    try:
        row = await alarms.transition(
            pool, tenant, alarm_id, action, key_id=key_id, note=body.note if body else None
        )
    except alarms.AlarmNotFoundError as exc:
        raise NotFoundError(str(exc)) from exc
    except alarms.AlarmStateError as exc:
        raise ConflictError(str(exc)) from exc
    return Alarm(**dict(row))


@router.post("/alarms/{alarm_id}/acknowledge", summary="Acknowledge an alarm", responses=CONFLICT)
async def acknowledge(
    alarm_id: AlarmId, who: Writer, pool: Pool, body: AlarmNote | None = None
) -> Alarm:
    """open -> acknowledged, recording this key and the note; 409 from any other state."""
    return await _move(pool, who.tenant_id, alarm_id, "acknowledge", who.key_id, body)


@router.post("/alarms/{alarm_id}/close", summary="Close an alarm", responses=CONFLICT)
async def close(alarm_id: AlarmId, who: Writer, pool: Pool, body: AlarmNote | None = None) -> Alarm:
    """open or acknowledged -> closed (manual), recording this key and the note."""
    return await _move(pool, who.tenant_id, alarm_id, "close", who.key_id, body)


@router.get("/alarm-rules", summary="Alarm rules in force")
async def get_rules(who: Reader, pool: Pool) -> list[EffectiveRule]:
    """Every alarm kind with the tenant's rule (its override, else the default)."""
    return [EffectiveRule(**dict(r)) for r in await alarms.rules(pool, who.tenant_id)]


@router.put("/alarm-rules/{kind}", summary="Set the rule of an alarm kind")
async def put_rule(kind: Kind, rule: AlarmRule, who: Admin, pool: Pool) -> EffectiveRule:
    """Enable/disable a kind, its severity, auto-close delay, threshold and periods."""
    known = {r["kind"]: r for r in await alarms.rules(pool, who.tenant_id)}
    if kind not in known:
        raise NotFoundError(f"no alarm kind {kind!r}; kinds: {', '.join(sorted(known))}")
    tunable = kind == "low_battery" or known[kind]["periods"] is not None
    if rule.threshold is not None and not tunable:
        raise UnprocessableError("a threshold applies to low_battery and the analytics kinds")
    if rule.periods is not None and known[kind]["periods"] is None:
        raise UnprocessableError("periods apply to the analytics kinds only")
    await alarms.set_rule(pool, who.tenant_id, kind, **rule.model_dump())
    [got] = [r for r in await alarms.rules(pool, who.tenant_id) if r["kind"] == kind]
    return EffectiveRule(**dict(got))


@router.post(
    "/webhooks", summary="Add a webhook endpoint", status_code=201,
    responses={503: {**PROBLEM_RESPONSE, "description": "no credentials key to seal secrets"}},
)  # fmt: skip
async def add_endpoint(
    body: EndpointCreate, who: Admin, pool: Pool, request: Request
) -> EndpointCreated:
    """A new endpoint; the answer carries its signing secret, shown this once (it is
    stored sealed under the credentials key)."""
    key = request.app.state.settings.credentials_key
    if key is None:
        raise UnavailableError(
            "webhook secrets are stored sealed: start the API with NBMETER_CREDENTIALS_KEY"
            " (the collector's credentials key)"
        )
    row, secret = await hooks.create_endpoint(
        pool, who.tenant_id, str(body.url), key=parse_key(key.get_secret_value()),
        secret=body.secret, kinds=body.kinds,
        event_types=body.event_types, min_severity=body.min_severity,
    )  # fmt: skip
    return EndpointCreated(**dict(row), secret=secret)


@router.get("/webhooks", summary="Webhook endpoints")
async def list_endpoints(who: Admin, pool: Pool) -> list[Endpoint]:
    """The tenant's endpoints with their state (disabled, and why)."""
    return [Endpoint(**dict(r)) for r in await hooks.endpoints(pool, who.tenant_id)]


@router.get("/webhooks/{endpoint_id}", summary="One webhook endpoint")
async def get_endpoint(endpoint_id: EndpointId, who: Admin, pool: Pool) -> Endpoint:
    """The endpoint and its failure state."""
    try:
        return Endpoint(**dict(await hooks.get_endpoint(pool, who.tenant_id, endpoint_id)))
    except hooks.EndpointNotFoundError as exc:
        raise NotFoundError(str(exc)) from exc


@router.delete("/webhooks/{endpoint_id}", summary="Remove a webhook endpoint", status_code=204)
async def delete_endpoint(endpoint_id: EndpointId, who: Admin, pool: Pool) -> None:
    """The endpoint, its queued deliveries and its log are removed."""
    try:
        await hooks.delete_endpoint(pool, who.tenant_id, endpoint_id)
    except hooks.EndpointNotFoundError as exc:
        raise NotFoundError(str(exc)) from exc


@router.post("/webhooks/{endpoint_id}/enable", summary="Re-enable a webhook endpoint")
async def enable_endpoint(endpoint_id: EndpointId, who: Admin, pool: Pool) -> Endpoint:
    """Switch a disabled endpoint back on; what waited for it is delivered now."""
    try:
        return Endpoint(**dict(await hooks.enable(pool, who.tenant_id, endpoint_id)))
    except hooks.EndpointNotFoundError as exc:
        raise NotFoundError(str(exc)) from exc


@router.get("/webhooks/{endpoint_id}/deliveries", summary="Delivery log")
async def delivery_log(
    endpoint_id: EndpointId, who: Admin, pool: Pool,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[Delivery]:  # fmt: skip
    """The endpoint's latest attempts, newest first."""
    try:
        rows = await hooks.deliveries(pool, who.tenant_id, endpoint_id, limit)
    except hooks.EndpointNotFoundError as exc:
        raise NotFoundError(str(exc)) from exc
    return [Delivery(**dict(r)) for r in rows]


@router.post("/webhooks/{endpoint_id}/replay", summary="Send events again")
async def replay(
    endpoint_id: EndpointId, body: ReplayRequest, who: Admin, pool: Pool
) -> ReplayResult:
    """Queue the tenant's events since `since` (or those of `event_ids`) for this endpoint
    again, delivered or not; they keep their event ids."""
    if body.since is None and body.event_ids is None:
        raise UnprocessableError("give since or event_ids")
    try:
        ids = [str(uuid.UUID(e)) for e in body.event_ids] if body.event_ids else None
    except ValueError as exc:
        raise UnprocessableError(f"not an event id: {exc}") from exc
    try:
        n = await hooks.replay(pool, who.tenant_id, endpoint_id, since=body.since, event_ids=ids)
    except hooks.EndpointNotFoundError as exc:
        raise NotFoundError(str(exc)) from exc
    return ReplayResult(queued=n)
