"""storage.meters.MeterDirectory against the real database: addresses to meter ids."""

from __future__ import annotations

import asyncpg
import numpy as np

from storage.meters import UNKNOWN, MeterDirectory


async def add_meter(pool: asyncpg.Pool, tenant_id: int, address: str) -> int:
    """Create an active water meter and return its id."""
    meter_id: int = await pool.fetchval(
        "INSERT INTO meters (tenant_id, address, kind, format) VALUES ($1, $2, 'water', 'cjt188')"
        " RETURNING meter_id",
        tenant_id,
        address,
    )
    return meter_id


async def test_resolves_known_and_marks_unknown(pool: asyncpg.Pool, tenant_id: int) -> None:
    """Known addresses map to their ids (repeats included); unknown ones map to -1."""
    a = await add_meter(pool, tenant_id, "11223344556677")
    b = await add_meter(pool, tenant_id, "00000001")
    addresses = np.array(["00000001", "nope", "11223344556677", "00000001"], object)
    ids = await MeterDirectory(pool).resolve(tenant_id, addresses)
    assert ids.tolist() == [b, UNKNOWN, a, b]


async def test_other_tenants_and_removed_meters_do_not_resolve(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """An address of another tenant, or of a removed meter, is unknown to this tenant."""
    other = await pool.fetchval(
        "INSERT INTO tenants (slug, name) VALUES ($1, 'x') RETURNING tenant_id", f"o{tenant_id}"
    )
    await add_meter(pool, other, "42")
    gone = await add_meter(pool, tenant_id, "43")
    await pool.execute(
        "UPDATE meters SET removed_at = installed_at + interval '1 day' WHERE meter_id = $1", gone
    )
    ids = await MeterDirectory(pool).resolve(tenant_id, ["42", "43"])
    assert ids.tolist() == [UNKNOWN, UNKNOWN]


async def test_new_meter_resolves_at_once_and_forget_drops_cache(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """Misses are not cached (a new meter resolves next time); hits are, until forget()."""
    directory = MeterDirectory(pool)
    assert (await directory.resolve(tenant_id, ["7"])).tolist() == [UNKNOWN]
    first = await add_meter(pool, tenant_id, "7")
    assert (await directory.resolve(tenant_id, ["7"])).tolist() == [first]
    # a meter exchange: the cache keeps the old id until told
    await pool.execute(
        "UPDATE meters SET removed_at = installed_at + interval '1 day' WHERE meter_id = $1", first
    )
    second = await add_meter(pool, tenant_id, "7")
    assert (await directory.resolve(tenant_id, ["7"])).tolist() == [first]
    directory.forget(tenant_id)
    assert (await directory.resolve(tenant_id, ["7"])).tolist() == [second]
