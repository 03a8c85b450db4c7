"""The demo tenant and its water meters, for `nbmeter demo --ingest-only`.

`ensure_demo_fleet` creates (or finds) the tenant and its meters, idempotently, so the
demo can run again on the same database; `count_tenant_readings` says what is stored.
Errors: storage errors via `storage.pool.translated`.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from storage.pool import translated


async def ensure_demo_fleet(
    pool: asyncpg.Pool, slug: str, name: str, addresses: Sequence[str]
) -> int:
    """Return the id of tenant `slug` (named `name`), with a CJ/T 188 water meter (0.01 m3
    register, 8 digits, service point `SP-<address>`) at each of `addresses`."""
    with translated("creating the demo fleet"):
        tenant_id: int = await pool.fetchval(
            "INSERT INTO tenants (slug, name) VALUES ($1, $2)"
            " ON CONFLICT (slug) DO UPDATE SET name = EXCLUDED.name RETURNING tenant_id",
            slug,
            name,
        )
        await pool.execute(
            "INSERT INTO meters (tenant_id, address, service_point, kind, format,"
            " register_scale, register_digits)"
            " SELECT $1, a, 'SP-' || a, 'water', 'cjt188', -2, 8 FROM unnest($2::text[]) a"
            " ON CONFLICT (tenant_id, address) WHERE removed_at IS NULL DO NOTHING",
            tenant_id,
            list(addresses),
        )
    return tenant_id


async def count_tenant_readings(pool: asyncpg.Pool, tenant_id: int) -> int:
    """How many readings the meters of `tenant_id` have stored."""
    with translated("counting the tenant's readings"):
        count: int = await pool.fetchval(
            "SELECT count(*) FROM readings r JOIN meters m USING (meter_id) WHERE m.tenant_id = $1",
            tenant_id,
        )
    return count
