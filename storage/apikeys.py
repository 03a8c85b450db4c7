"""Tenants and their API keys: create, verify, revoke, expire. Only a key's sha256 is stored.

A key reads `nbm_<key_id>_<secret>`: `key_id` (12 hex) finds the row, `secret` (32 random
bytes, base64url) is checked against `secret_sha256` in constant time. A sha256 of a
256-bit random secret needs no salt or slow hash: there is nothing to brute-force.

Every change to a key row notifies `KEY_CHANNEL` (migration 0031's trigger);
`listen_key_changes` keeps a connection listening to it, so API processes can cache
verified keys and still drop a revoked one at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg

from storage import notify
from storage.errors import StorageError
from storage.pool import translating

SCOPES = ("readings:read", "meters:write", "admin")
_KEY = re.compile(r"^nbm_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
KEY_CHANNEL = "nbmeter_api_keys"  # payload: a key_id, or '*' for every key
ALL_KEYS = "*"


class DuplicateTenantError(StorageError):
    """A tenant with this slug exists already."""


class InvalidTimezoneError(StorageError):
    """The timezone is not an IANA zone name this host knows."""


class UnknownTenantError(StorageError):
    """No tenant has this slug."""


@dataclass(frozen=True)
class Principal:
    """Who a verified key speaks for: its tenant, key id and scopes (`admin` implies all)."""

    tenant_id: int
    key_id: str
    scopes: frozenset[str]
    expires_at: datetime | None = None

    def allows(self, scope: str) -> bool:
        """True when the key holds `scope` or `admin`."""
        return scope in self.scopes or "admin" in self.scopes

    def expired(self, now: datetime) -> bool:
        """True from the key's expiry instant on."""
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True)
class KeyRefusal:
    """A key whose secret is right but that may no longer be used: revoked or expired, when."""

    key_id: str
    reason: Literal["revoked", "expired"]
    at: datetime


def check_timezone(name: str) -> str:
    """Return `name` if it is a known IANA zone, else raise InvalidTimezoneError."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        msg = f"unknown timezone {name!r}: use an IANA name such as 'Asia/Shanghai'"
        raise InvalidTimezoneError(msg) from exc
    return name


@translating("creating a tenant")
async def create_tenant(
    conn: asyncpg.Connection, slug: str, name: str, timezone: str = "Asia/Shanghai"
) -> int:
    """Insert a tenant and return its id; DuplicateTenantError if the slug is taken."""
    check_timezone(timezone)
    try:
        tenant_id: int = await conn.fetchval(
            "INSERT INTO tenants (slug, name, timezone) VALUES ($1, $2, $3) RETURNING tenant_id",
            slug,
            name,
            timezone,
        )
    except asyncpg.UniqueViolationError as exc:
        msg = f"a tenant with slug {slug!r} exists already"
        raise DuplicateTenantError(msg) from exc
    except asyncpg.CheckViolationError as exc:
        msg = f"invalid tenant slug {slug!r}: lower-case letters, digits, '-' and '_'"
        raise StorageError(msg) from exc
    return tenant_id


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


@translating("creating an API key")
async def create_api_key(
    conn: asyncpg.Connection,
    tenant_id: int,
    scopes: Sequence[str],
    expires_at: datetime | None = None,
) -> str:
    """Create a key for `tenant_id` with `scopes`, valid until `expires_at` (None: no end);
    return the plaintext key (shown once). ValueError for bad scopes or a past expiry."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        msg = f"scopes must be a non-empty subset of {SCOPES}, got {list(scopes)}"
        raise ValueError(msg)
    if expires_at is not None and (expires_at.tzinfo is None or expires_at <= datetime.now(UTC)):
        msg = f"a key must expire in the future (an aware time), got {expires_at}"
        raise ValueError(msg)
    key_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    await conn.execute(
        "INSERT INTO api_keys (key_id, tenant_id, secret_sha256, scopes, expires_at)"
        " VALUES ($1, $2, $3, $4, $5)",
        key_id,
        tenant_id,
        _digest(secret),
        sorted(set(scopes)),
        expires_at,
    )
    return f"nbm_{key_id}_{secret}"


@translating("checking an API key")
async def check_api_key(
    conn: asyncpg.Connection | asyncpg.Pool, key: str
) -> Principal | KeyRefusal | None:
    """The Principal of a live `key`; a KeyRefusal when its secret is right but the key is
    revoked or expired; None for anything else (malformed, unknown id, wrong secret)."""
    match = _KEY.match(key)
    if match is None:
        return None
    key_id, secret = match.groups()
    row = await conn.fetchrow(
        "SELECT tenant_id, secret_sha256, scopes, revoked_at, expires_at,"
        " expires_at <= now() AS expired FROM api_keys WHERE key_id = $1",
        key_id,
    )
    if row is None or not hmac.compare_digest(bytes(row["secret_sha256"]), _digest(secret)):
        return None
    if row["revoked_at"] is not None:
        return KeyRefusal(key_id, "revoked", row["revoked_at"])
    if row["expired"]:
        return KeyRefusal(key_id, "expired", row["expires_at"])
    return Principal(row["tenant_id"], key_id, frozenset(row["scopes"]), row["expires_at"])


@translating("revoking an API key")
async def revoke_api_key(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int, key_id: str
) -> bool:
    """Revoke the tenant's key `key_id`; False when the tenant has no such live key."""
    done = await conn.fetchval(
        "UPDATE api_keys SET revoked_at = now() WHERE tenant_id = $1 AND key_id = $2"
        " AND revoked_at IS NULL RETURNING true",
        tenant_id,
        key_id,
    )
    return bool(done)


@translating("listing API keys")
async def list_api_keys(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int
) -> list[asyncpg.Record]:
    """The tenant's keys (id, scopes, created_at, revoked_at, expires_at), never secrets."""
    return await conn.fetch(
        "SELECT key_id, scopes, created_at, revoked_at, expires_at FROM api_keys"
        " WHERE tenant_id = $1 ORDER BY created_at, key_id",
        tenant_id,
    )


@translating("looking up the tenant")
async def tenant_id_of(conn: asyncpg.Connection | asyncpg.Pool, slug: str) -> int:
    """The id of the tenant `slug`; UnknownTenantError if there is none."""
    tenant_id: int | None = await conn.fetchval(
        "SELECT tenant_id FROM tenants WHERE slug = $1", slug
    )
    if tenant_id is None:
        msg = f"no tenant {slug!r}: `nbmeter tenant create {slug}` makes one"
        raise UnknownTenantError(msg)
    return tenant_id


async def listen_key_changes(
    dsn: str,
    on_change: Callable[[str], None],
    on_state: Callable[[bool, str | None], None],
    *,
    check_every_s: float = 2.0,
    retry_s: float = 1.0,
    retry_max_s: float = 5.0,
) -> None:
    """Forever: LISTEN on KEY_CHANNEL over a connection of its own; cancel to stop.

    `on_change(key_id)` runs for each changed key (`ALL_KEYS` after a TRUNCATE).
    `on_state(True, None)` runs once listening, `on_state(False, why)` when the connection
    is lost or cannot be opened (then it retries after `retry_s`, doubling up to
    `retry_max_s`), `on_state(False, "stopped")` when cancelled: notifications sent
    meanwhile are lost, so a cache must distrust itself until the next `on_state(True)`.
    A connection that dies silently (no FIN, a hung server) is found by a `SELECT 1` every
    `check_every_s` that must answer within `check_every_s`: lost within twice that.
    The loop is `storage.notify.listen`'s.
    """
    await notify.listen(
        dsn,
        KEY_CHANNEL,
        on_change,
        on_state,
        app_name="nbmeter-api-keys",
        check_every_s=check_every_s,
        check_timeout_s=check_every_s,
        retry_min_s=retry_s,
        retry_max_s=max(retry_s, retry_max_s),
    )


@translating("reading the tenant's timezone")
async def tenant_timezone(conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int) -> str:
    """The tenant's IANA timezone name."""
    tz: str = await conn.fetchval("SELECT timezone FROM tenants WHERE tenant_id = $1", tenant_id)
    return tz
