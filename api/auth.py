"""Bearer API-key authentication and scope checks, as FastAPI dependencies.

`require(scope)` is the dependency behind `Reader`, `Writer` and `Admin` (api.deps), the
`Annotated` aliases routes take: each resolves to the key's Principal or answers 401
(no/unknown key; "expired" or "revoked" for a key whose secret is right) or 403 (key
lacks the scope).

Verified keys are cached per process (`KeyCache`). Expiry is checked against the clock
on every request, cached or not. Revocation reaches every process through PostgreSQL
NOTIFY (`listening` runs storage's listener): the cache forgets the key when the
notification arrives, milliseconds after the commit. While the listening connection is
down, notifications are lost: the cache is emptied and keys are re-checked after at most
`key_cache_fallback_ttl_s` until it is back (then emptied again).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated

import structlog
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import KeyRefusedError
from api.settings import ApiSettings
from storage.apikeys import ALL_KEYS, KeyRefusal, Principal, check_api_key, listen_key_changes
from storage.pool import Pool

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer nbm_<id>_<secret>`")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
_UNAUTHORIZED = "a valid API key is required: send `Authorization: Bearer <key>`"
log = structlog.get_logger("api")


class KeyCache:
    """Verified keys for `ttl_s` seconds (`fallback_ttl_s` while not `listening`), so a busy
    client costs no query per request; `forget` and `set_listening` keep it honest."""

    def __init__(self, ttl_s: float, fallback_ttl_s: float = 1.0, max_entries: int = 10_000):
        self.ttl_s = ttl_s
        self.fallback_ttl_s = min(fallback_ttl_s, ttl_s)
        self.max_entries = max_entries
        self.listening = False
        self._entries: dict[str, tuple[float, Principal]] = {}
        # bumped by every invalidation: a lookup whose query began before one must not
        # cache what it read (it may predate the revocation the notification announced)
        self._epoch = 0

    async def lookup(self, pool: Pool, key: str) -> Principal | KeyRefusal | None:
        """The key's Principal from cache or database, its refusal, or None (invalid)."""
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now and not hit[1].expired(datetime.now(UTC)):
            return hit[1]
        epoch = self._epoch
        found = await check_api_key(pool, key)
        ttl = self.ttl_s if self.listening else self.fallback_ttl_s
        if isinstance(found, Principal) and ttl > 0 and epoch == self._epoch:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key] = (now + ttl, found)
        return found

    def forget(self, key_id: str) -> None:
        """Drop cached entries of `key_id` (every entry for `ALL_KEYS`)."""
        self._epoch += 1
        if key_id == ALL_KEYS:
            self._entries.clear()
            return
        for key in [k for k, (_, p) in self._entries.items() if p.key_id == key_id]:
            del self._entries[key]

    def set_listening(self, up: bool, why: str | None = None) -> None:
        """Record the listener's state; either way the cache may have missed changes."""
        if up != self.listening:
            if up:
                log.info("key_listener.connected")
            elif why == "stopped":
                log.info("key_listener.stopped")
            else:
                log.warning("key_listener.lost", reason=why)
        self.listening = up
        self._epoch += 1
        self._entries.clear()


@contextlib.asynccontextmanager
async def listening(cache: KeyCache, settings: ApiSettings) -> AsyncIterator[None]:
    """Run storage's key-change listener for `cache` while the block runs."""
    task = asyncio.create_task(
        listen_key_changes(
            settings.database_url,
            cache.forget,
            cache.set_listening,
            check_every_s=settings.key_listen_check_s,
        ),
        name="api-keys.listener",
    )
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def get_pool(request: Request) -> Pool:
    """The app's connection pool (owned by its lifespan); async, so no threadpool hop."""
    pool: Pool = request.app.state.pool
    return pool


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency resolving the caller's Principal if its key holds `scope`."""

    async def dependency(
        request: Request,
        credentials: Credentials,
        pool: Annotated[Pool, Depends(get_pool)],
    ) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(401, _UNAUTHORIZED)
        cache: KeyCache = request.app.state.key_cache
        principal = await cache.lookup(pool, credentials.credentials)
        if principal is None:
            raise HTTPException(401, _UNAUTHORIZED)
        if isinstance(principal, KeyRefusal):
            detail = (
                f"this API key {principal.reason} at {principal.at.isoformat()}:"
                " ask an admin of the tenant for a new key"
            )
            raise KeyRefusedError(f"key-{principal.reason}", detail)
        if not principal.allows(scope):
            raise HTTPException(403, f"this API key lacks the {scope!r} scope")
        return principal

    return dependency
