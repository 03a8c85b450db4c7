"""Bearer API-key authentication and scope checks, as FastAPI dependencies.

`Reader`, `Writer` and `Admin` are the `Annotated` aliases routes take: each resolves to
the key's Principal or answers 401 (no/unknown key) or 403 (key lacks the scope).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Annotated

import asyncpg
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from storage.apikeys import Principal, verify_api_key

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer nbm_<id>_<secret>`")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
_UNAUTHORIZED = "a valid API key is required: send `Authorization: Bearer <key>`"


class KeyCache:
    """Verified keys for `ttl_s` seconds, so a busy client costs no query per request."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}

    async def lookup(self, pool: asyncpg.Pool, key: str) -> Principal | None:
        """The key's Principal from cache or database, or None for an invalid key."""
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        principal = await verify_api_key(pool, key)
        if principal is not None and self.ttl_s > 0:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key] = (now + self.ttl_s, principal)
        return principal

    def forget(self, key_id: str) -> None:
        """Drop cached entries of `key_id` (after a revocation through this process)."""
        for key in [k for k, (_, p) in self._entries.items() if p.key_id == key_id]:
            del self._entries[key]


async def get_pool(request: Request) -> asyncpg.Pool:
    """The app's connection pool (owned by its lifespan); async, so no threadpool hop."""
    pool: asyncpg.Pool = request.app.state.pool
    return pool


Pool = Annotated[asyncpg.Pool, Depends(get_pool)]


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency resolving the caller's Principal if its key holds `scope`."""

    async def dependency(request: Request, credentials: Credentials, pool: Pool) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(401, _UNAUTHORIZED)
        cache: KeyCache = request.app.state.key_cache
        principal = await cache.lookup(pool, credentials.credentials)
        if principal is None:
            raise HTTPException(401, _UNAUTHORIZED)
        if not principal.allows(scope):
            raise HTTPException(403, f"this API key lacks the {scope!r} scope")
        return principal

    return dependency


Reader = Annotated[Principal, Depends(require("readings:read"))]
Writer = Annotated[Principal, Depends(require("meters:write"))]
Admin = Annotated[Principal, Depends(require("admin"))]
