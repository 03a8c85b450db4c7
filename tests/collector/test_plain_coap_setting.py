"""Tenant settings changed the API's way reach the collector."""

from __future__ import annotations

import asyncpg
from collector_testkit import RawCoap, cjt188_frame, hour
from conftest import add_meter, new_address

from storage import tenant_settings


async def test_allow_plain_coap_set_by_settings_admits_plain_uplinks(
    raw: RawCoap, pool: asyncpg.Pool, tenant_slug: str
) -> None:
    """A tenant whose allow_plain_coap was turned on through the settings path (as PATCH
    /v1/tenant/settings does) gets its plain CoAP uplink stored (2.04), the change audited."""
    address = new_address()
    meter_id = await add_meter(pool, tenant_slug, address)
    tenant_id = await pool.fetchval("SELECT tenant_id FROM tenants WHERE slug = $1", tenant_slug)
    async with pool.acquire() as conn:
        await tenant_settings.update(conn, tenant_id, {"allow_plain_coap": True}, "test")
    reply = await raw.post(cjt188_frame(address, 20_000, hour(80)), query=f"t={tenant_slug}")
    assert reply.code_str == "2.04", reply.payload
    assert await pool.fetchval(
        "SELECT register_ml FROM readings WHERE meter_id = $1", meter_id
    ) == (20_000)
    [change] = await tenant_settings.changes(pool, tenant_id)
    assert (change["field"], change["old_value"], change["new_value"]) == (
        "allow_plain_coap",
        "false",
        "true",
    )
