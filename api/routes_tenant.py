"""Tenant settings routes: read them, change them (admin), and the audit trail of changes."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import PROBLEMS, Admin, Pool, Reader
from api.errors import NotFoundError, UnprocessableError
from api.schemas_tenant import SettingsChange, TenantSettings, TenantSettingsPatch
from storage import tenant_settings
from storage.pool import connection

router = APIRouter(prefix="/v1", tags=["tenant"], responses=PROBLEMS)


@router.get("/tenant/settings", summary="The tenant's settings")
async def get_settings(who: Reader, pool: Pool) -> TenantSettings:
    """Name, timezone and plain-CoAP permission of the caller's tenant."""
    row = await tenant_settings.get(pool, who.tenant_id)
    if row is None:  # the key outlived its tenant
        raise NotFoundError("this API key's tenant no longer exists")
    return TenantSettings(**dict(row))


@router.patch("/tenant/settings", summary="Change the tenant's settings")
async def patch_settings(body: TenantSettingsPatch, who: Admin, pool: Pool) -> TenantSettings:
    """Change the given settings; each change is audited with the key that made it."""
    values = body.model_dump(exclude_unset=True)
    nulls = sorted(k for k, v in values.items() if v is None)
    if nulls:
        msg = f"{', '.join(nulls)}: null is not a value; leave a setting out to keep it"
        raise UnprocessableError(msg)
    async with connection(pool, "updating tenant settings") as conn:
        row = await tenant_settings.update(conn, who.tenant_id, values, f"api-key:{who.key_id}")
    if row is None:
        raise NotFoundError("this API key's tenant no longer exists")
    return TenantSettings(**dict(row))


@router.get("/tenant/settings/changes", summary="Audit trail of setting changes")
async def list_changes(
    who: Admin, pool: Pool, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[SettingsChange]:
    """The latest changes, newest first: who (API key id), when, old and new value."""
    rows = await tenant_settings.changes(pool, who.tenant_id, limit=limit)
    return [
        SettingsChange(
            **{k: r[k] for k in ("change_id", "changed_at", "changed_by", "field")},
            old_value=json.loads(r["old_value"]) if r["old_value"] is not None else None,
            new_value=json.loads(r["new_value"]) if r["new_value"] is not None else None,
        )
        for r in rows
    ]
