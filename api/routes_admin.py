"""Admin routes: the tenant's API keys (list, create, revoke)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from api.auth import KeyCache
from api.deps import PROBLEMS, Admin, Pool
from api.errors import NotFoundError, UnprocessableError
from api.schemas import ApiKey, ApiKeyCreate, ApiKeyCreated
from storage import apikeys
from storage.pool import connection

router = APIRouter(prefix="/v1", tags=["admin"], responses=PROBLEMS)
KeyId = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$", examples=["0123456789ab"])]


@router.get("/api-keys", summary="List the tenant's API keys")
async def list_keys(who: Admin, pool: Pool) -> list[ApiKey]:
    """Key ids, scopes and dates; secrets are never stored or shown."""
    return [ApiKey(**dict(r)) for r in await apikeys.list_api_keys(pool, who.tenant_id)]


@router.post("/api-keys", status_code=201, summary="Create an API key")
async def create_key(body: ApiKeyCreate, who: Admin, pool: Pool) -> ApiKeyCreated:
    """A new key for this tenant, valid until `expires_at` if given (401 "expired" after);
    the plaintext `key` is returned only in this response."""
    if body.expires_at is not None and body.expires_at <= datetime.now(UTC):
        raise UnprocessableError(f"expires_at {body.expires_at.isoformat()} is not in the future")
    async with connection(pool, "creating an API key") as conn:
        key = await apikeys.create_api_key(conn, who.tenant_id, body.scopes, body.expires_at)
    return ApiKeyCreated(
        key_id=key.split("_")[1],
        key=key,
        scopes=sorted(set(body.scopes)),
        expires_at=body.expires_at,
    )


@router.delete("/api-keys/{key_id}", status_code=204, summary="Revoke an API key")
async def revoke_key(key_id: KeyId, who: Admin, pool: Pool, request: Request) -> Response:
    """Revoke a key of this tenant at once, in every API process (404 for an unknown,
    revoked or another tenant's key)."""
    if not await apikeys.revoke_api_key(pool, who.tenant_id, key_id):
        raise NotFoundError(f"no live API key {key_id}")
    cache: KeyCache = request.app.state.key_cache
    cache.forget(key_id)
    return Response(status_code=204)
