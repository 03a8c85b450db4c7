"""Tenants and their API keys: create, verify, revoke. Only a key's sha256 is stored.

A key reads `nbm_<key_id>_<secret>`: `key_id` (12 hex) finds the row, `secret` (32 random
bytes, base64url) is checked against `secret_sha256` in constant time. A sha256 of a
256-bit random secret needs no salt or slow hash: there is nothing to brute-force.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg

from storage.errors import StorageError

SCOPES = ("readings:read", "meters:write", "admin")
_KEY = re.compile(r"^nbm_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


class DuplicateTenantError(StorageError):
    """A tenant with this slug exists already."""


class InvalidTimezoneError(StorageError):
    """The timezone is not an IANA zone name this host knows."""


@dataclass(frozen=True)
class Principal:
    """Who a verified key speaks for: its tenant, key id and scopes (`admin` implies all)."""

    tenant_id: int
    key_id: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """True when the key holds `scope` or `admin`."""
        return scope in self.scopes or "admin" in self.scopes


def check_timezone(name: str) -> str:
    """Return `name` if it is a known IANA zone, else raise InvalidTimezoneError."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        msg = f"unknown timezone {name!r}: use an IANA name such as 'Asia/Shanghai'"
        raise InvalidTimezoneError(msg) from exc
    return name


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


async def create_api_key(
    conn: asyncpg.Connection, tenant_id: int, scopes: list[str] | tuple[str, ...]
) -> str:
    """Create a key for `tenant_id` with `scopes`; return the plaintext key (shown once)."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        msg = f"scopes must be a non-empty subset of {SCOPES}, got {list(scopes)}"
        raise ValueError(msg)
    key_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    await conn.execute(
        "INSERT INTO api_keys (key_id, tenant_id, secret_sha256, scopes) VALUES ($1, $2, $3, $4)",
        key_id,
        tenant_id,
        _digest(secret),
        sorted(set(scopes)),
    )
    return f"nbm_{key_id}_{secret}"


async def verify_api_key(conn: asyncpg.Connection | asyncpg.Pool, key: str) -> Principal | None:
    """The Principal of an unrevoked, well-formed `key`, or None (never says which failed)."""
    match = _KEY.match(key)
    if match is None:
        return None
    key_id, secret = match.groups()
    row = await conn.fetchrow(
        "SELECT tenant_id, secret_sha256, scopes FROM api_keys"
        " WHERE key_id = $1 AND revoked_at IS NULL",
        key_id,
    )
    if row is None or not hmac.compare_digest(bytes(row["secret_sha256"]), _digest(secret)):
        return None
    return Principal(row["tenant_id"], key_id, frozenset(row["scopes"]))


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


async def list_api_keys(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int
) -> list[asyncpg.Record]:
    """The tenant's keys (id, scopes, created_at, revoked_at), never their secrets."""
    return await conn.fetch(
        "SELECT key_id, scopes, created_at, revoked_at FROM api_keys WHERE tenant_id = $1"
        " ORDER BY created_at, key_id",
        tenant_id,
    )


async def tenant_timezone(conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int) -> str:
    """The tenant's IANA timezone name."""
    tz: str = await conn.fetchval("SELECT timezone FROM tenants WHERE tenant_id = $1", tenant_id)
    return tz
