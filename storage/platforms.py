"""Operator-platform identities of meters and the tenants' push endpoint secrets (0038).

A meter reached through an operator's IoT platform (OneNET, OceanConnect, CTWing) is named
in each push by the platform's own device identity (device id or IMEI): `store_device`
maps it to the meter, `devices_by_identity` resolves a push's identities in one query.
Each tenant has one endpoint secret per platform (the token its pushes are signed with),
sealed under the credentials key with (tenant id, platform) as associated data:
`store_secret` seals, `load_secret` opens.

Errors: asyncpg's (callers translate them at their boundary, as for `storage.credentials`);
`CredentialsError` when a sealed secret does not open with the key given.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import asyncpg

from storage.credentials import MeterRef, seal, unseal

PLATFORMS = ("onenet", "oceanconnect", "ctwing")  # the CHECK of migration 0038
# tenants.slug's CHECK (migration 0001): a slug outside it names no tenant (and one with a
# NUL, from a push URL's %00, is no text PostgreSQL takes: refused, it read as an outage)
TENANT_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def _purpose(platform: str) -> str:
    # the tenant id stands where a meter id binds other sealed secrets; no meter secret
    # uses this purpose, so a blob cannot be moved between the two kinds
    return f"platform-secret/{platform}"


async def store_device(
    conn: asyncpg.Connection, meter: MeterRef, platform: str, device_id: str
) -> None:
    """Map `platform`'s identity `device_id` to `meter` (replacing the meter's old one)."""
    await conn.execute(
        "DELETE FROM platform_devices WHERE meter_id = $1 AND platform = $2",
        meter.meter_id,
        platform,
    )
    await conn.execute(
        "INSERT INTO platform_devices (tenant_id, platform, platform_device_id, meter_id)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, platform, platform_device_id)"
        " DO UPDATE SET meter_id = EXCLUDED.meter_id, created_at = now()",
        meter.tenant_id,
        platform,
        device_id,
        meter.meter_id,
    )


async def devices_by_identity(
    conn: asyncpg.Connection, tenant_id: int, platform: str, device_ids: Iterable[str]
) -> dict[str, MeterRef]:
    """The active meters of `tenant_id` that `platform` names `device_ids` (absent: none)."""
    wanted = sorted(set(device_ids))
    if not wanted:
        return {}
    rows = await conn.fetch(
        "SELECT p.platform_device_id, m.meter_id, m.address, m.format FROM platform_devices p"
        " JOIN meters m USING (meter_id) WHERE p.tenant_id = $1 AND p.platform = $2"
        " AND p.platform_device_id = ANY($3::text[]) AND m.removed_at IS NULL",
        tenant_id,
        platform,
        wanted,
    )
    return {str(r[0]): MeterRef(int(r[1]), tenant_id, str(r[2]), str(r[3])) for r in rows}


async def store_secret(
    conn: asyncpg.Connection, key: bytes, tenant_id: int, platform: str, secret: bytes
) -> None:
    """Store (or rotate) the tenant's endpoint secret for `platform`, sealed under `key`."""
    await conn.execute(
        "INSERT INTO platform_secrets (tenant_id, platform, secret_sealed) VALUES ($1, $2, $3)"
        " ON CONFLICT (tenant_id, platform) DO UPDATE SET"
        " secret_sealed = EXCLUDED.secret_sealed, rotated_at = now()",
        tenant_id,
        platform,
        seal(key, secret, tenant_id, _purpose(platform)),
    )


async def load_secret(
    conn: asyncpg.Connection, key: bytes, tenant_slug: str, platform: str
) -> tuple[int, bytes] | None:
    """(tenant id, opened secret) of tenant `tenant_slug` for `platform`; None if it has none.

    Raises CredentialsError when the row does not open with `key`."""
    if not TENANT_SLUG.fullmatch(tenant_slug):
        return None
    row = await conn.fetchrow(
        "SELECT s.tenant_id, s.secret_sealed FROM platform_secrets s JOIN tenants t"
        " USING (tenant_id) WHERE t.slug = $1 AND s.platform = $2",
        tenant_slug,
        platform,
    )
    if row is None:
        return None
    tenant_id = int(row[0])
    return tenant_id, unseal(key, bytes(row[1]), tenant_id, _purpose(platform))
