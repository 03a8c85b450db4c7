"""Whole path: a CoAP uplink with status bits -> device_health rows and an alarm raised in
the uplink's transaction -> a signed webhook at a real HTTP receiver."""

from __future__ import annotations

import json
import time

import asyncpg
from collector_testkit import RawCoap, cjt188_frame, hour
from conftest import add_meter, new_address
from webhook_receiver import FAST, KEY, dispatching, start_receiver

from collector.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from decoder.columns import Flag
from decoder.interval import ModemHealth, encode_interval
from storage import webhooks as hooks


async def test_uplink_to_health_alarm_and_webhook(
    raw: RawCoap, pool: asyncpg.Pool, db_url: str, lab_tenant: str
) -> None:
    """A CJ/T 188 frame with ST battery-low and an nbm1 v2 frame with a leak: both meters
    get device_health rows, each condition one alarm, and the receiver both alarm.opened
    events, signed."""
    tenant = await pool.fetchval("SELECT tenant_id FROM tenants WHERE slug = $1", lab_tenant)
    receiver = start_receiver()
    try:
        _, secret = await hooks.create_endpoint(pool, tenant, receiver.url, key=KEY)
        cjt, nbm = new_address(), new_address()
        m_cjt, m_nbm = (
            await add_meter(pool, lab_tenant, cjt),
            await add_meter(pool, lab_tenant, nbm),
        )
        async with dispatching(pool, db_url, FAST):
            reply = await raw.post_until_stored(
                cjt188_frame(cjt, 1_230_000, hour(5), status=0x04), query=f"t={lab_tenant}"
            )
            assert reply.code_str == "2.04"
            frame = encode_interval(
                nbm, hour(5), 2_000_000, [1_000] * 3, Flag.LEAK,
                ModemHealth(3420, -11250, -150, 1, 0x2A00007),
            )  # fmt: skip
            reply = await raw.post_until_stored(frame, query=f"t={lab_tenant}")
            assert reply.code_str == "2.04"
            got = await receiver.wait_for(2)
        kinds = sorted(json.loads(r.body)["data"]["kind"] for r in receiver.seen)
        assert kinds == ["leak", "low_battery"]
        assert len(set(got)) == 2
        for r in receiver.seen:
            h = {k.lower(): v for k, v in r.headers.items()}
            assert verify(secret, h[TIMESTAMP_HEADER.lower()], r.body,
                          h[SIGNATURE_HEADER.lower()], now=time.time())  # fmt: skip
        health = {
            r["meter_id"]: r
            for r in await pool.fetch(
                "SELECT * FROM device_health WHERE meter_id = ANY($1::bigint[])", [m_cjt, m_nbm]
            )
        }
        assert health[m_cjt]["battery_low"] is True
        n = health[m_nbm]
        assert (n["battery_mv"], n["rsrp_cdbm"], n["sinr_cdb"], n["ecl"], n["cell_id"]) == (
            3420, -11250, -150, 1, 0x2A00007,
        )  # fmt: skip
    finally:
        receiver.close()
        await pool.execute("UPDATE webhook_endpoints SET enabled = false")
