"""OMS AES key rollover on the real collector and database (migration 0047): a new key is
staged beside the current one; the old key is accepted until the first frame under the
new one confirms it; then the new key replaces the old. The meter never goes unheard."""

from __future__ import annotations

import secrets

import aiocoap
import asyncpg
import pytest
from collector_testkit import RawCoap, hour, oscore_client
from conftest import RunningCollector
from test_oms_keys import oms_address, oms_frame

from devices.provision import provision_device
from storage import credentials

READINGS = "SELECT register_ml FROM readings WHERE meter_id = $1 ORDER BY read_s"
SEALED = "SELECT aes_key_sealed, aes_key_pending_sealed FROM device_credentials WHERE meter_id = $1"


async def _keys(pool: asyncpg.Pool, meter_id: int, credentials_key: str) -> list[bytes | None]:
    row = await pool.fetchrow(SEALED, meter_id)
    key = credentials.parse_key(credentials_key)
    return [credentials.open_aes_key(key, meter_id, bytes(b)) if b else None for b in row]


async def _stage(pool: asyncpg.Pool, meter_id: int, credentials_key: str, new: bytes) -> None:
    async with pool.acquire() as conn:
        key = credentials.parse_key(credentials_key)
        assert await credentials.stage_aes_key(conn, key, meter_id, new)


async def test_plain_coap_meter_keeps_reporting_across_an_aes_key_change(
    raw: RawCoap, pool: asyncpg.Pool, db_url: str, lab_tenant: str, credentials_key: str
) -> None:
    """Old key after staging: stored. First frame under the new key: stored and the key
    promoted; its answer lost, the same frame again: 2.04, stored once. After that the old
    key's frames are refused (wrong key) and the new key's are stored."""
    address, old, new = oms_address(), secrets.token_bytes(16), secrets.token_bytes(16)
    device = await provision_device(
        db_url, lab_tenant, address, credentials_key=credentials_key, meter_format="oms",
        oscore=False, aes_key=old,
    )  # fmt: skip
    await _stage(pool, device.meter_id, credentials_key, new)
    assert await _keys(pool, device.meter_id, credentials_key) == [old, new]
    q = f"t={lab_tenant}"
    assert (
        await raw.post(oms_frame(address, old, 1_000_000, hour(40)), query=q)
    ).code_str == "2.04"
    assert await _keys(pool, device.meter_id, credentials_key) == [old, new]  # not confirmed
    first_new = oms_frame(address, new, 1_500_000, hour(41))
    assert (await raw.post(first_new, query=q)).code_str == "2.04"
    assert await _keys(pool, device.meter_id, credentials_key) == [new, None]
    assert (await raw.post(first_new, query=q)).code_str == "2.04"  # the lost answer, again
    assert (await raw.post(oms_frame(address, old, 1_600_000, hour(42)), query=q)).code_str == (
        "4.00"
    )
    assert (await raw.post(oms_frame(address, new, 1_700_000, hour(43)), query=q)).code_str == (
        "2.04"
    )
    assert [r[0] for r in await pool.fetch(READINGS, device.meter_id)] == [
        1_000_000, 1_500_000, 1_700_000,
    ]  # fmt: skip


@pytest.mark.parametrize("lost_first", [True, False])
async def test_oscore_oms_meter_confirms_the_new_key_by_its_first_frame(
    collector: RunningCollector, pool: asyncpg.Pool, db_url: str, tenant_slug: str,
    credentials_key: str, lost_first: bool,
) -> None:  # fmt: skip
    """An OSCORE device's OMS frames: the staged key is tried when the current one fails;
    when the first frame under the new key is lost on the way, the next one confirms it."""
    address, old, new = oms_address(), secrets.token_bytes(16), secrets.token_bytes(16)
    device = await provision_device(
        db_url, tenant_slug, address, credentials_key=credentials_key, meter_format="oms",
        aes_key=old,
    )  # fmt: skip
    await _stage(pool, device.meter_id, credentials_key, new)
    client = await oscore_client(collector.coap_port, device.oscore)
    uri = f"coap://127.0.0.1:{collector.coap_port}/u"
    sent = [(old, 2_000_000, 50), (new, 2_100_000, 51), (new, 2_200_000, 52)]
    if lost_first:
        sent.pop(1)  # the first uplink under the new key never arrived
    try:
        for aes, ml, h in sent:
            msg = aiocoap.Message(
                code=aiocoap.POST, uri=uri, payload=oms_frame(address, aes, ml, hour(h))
            )
            response = await client.request(msg).response
            assert response.code == aiocoap.CHANGED, response.payload
    finally:
        await client.shutdown()
    assert await _keys(pool, device.meter_id, credentials_key) == [new, None]
    assert [r[0] for r in await pool.fetch(READINGS, device.meter_id)] == [s[1] for s in sent]


@pytest.mark.parametrize("answer_lost", [True, False])
async def test_rotate_key_command_never_strands_the_meter(
    collector: RunningCollector, pool: asyncpg.Pool, db_url: str, tenant_slug: str,
    credentials_key: str, answer_lost: bool,
) -> None:  # fmt: skip
    """A rotate_key queued while the meter sleeps rides on its next 2.04 with a key the
    collector staged (never in the API's args); the meter switches. Its answer lost once:
    the next frame, under the new key, is stored and confirms the key, and the command
    sent again is answered from memory and acknowledged. Its answer arriving: the answer
    confirms the key. Either way every frame is stored and the old key is gone."""
    from test_downlink import queue_command

    from simulator.commands import CommandExecutor

    address, old = oms_address(), secrets.token_bytes(16)
    device = await provision_device(
        db_url, tenant_slug, address, credentials_key=credentials_key, meter_format="oms",
        aes_key=old,
    )  # fmt: skip
    cid = await queue_command(pool, device, "rotate_key")
    assert await pool.fetchval("SELECT args FROM commands WHERE command_id = $1", cid) == "{}"
    meter = CommandExecutor(address, "oms")
    client = await oscore_client(collector.coap_port, device.oscore)
    base = f"coap://127.0.0.1:{collector.coap_port}"

    async def post(path: str, payload: bytes) -> aiocoap.Message:
        msg = aiocoap.Message(code=aiocoap.POST, uri=f"{base}/{path}", payload=payload)
        response = await client.request(msg).response
        assert response.code == aiocoap.CHANGED, response.payload
        return response

    try:
        envelope = (await post("u", oms_frame(address, old, 3_000_000, hour(60)))).payload
        answer = meter.handle(envelope, 0)
        new = meter.state.aes_key
        assert answer is not None
        assert new is not None
        assert new != old
        assert await _keys(pool, device.meter_id, credentials_key) == [old, new]
        if not answer_lost:
            await post("c", answer)
            assert await _keys(pool, device.meter_id, credentials_key) == [new, None]
        again = (await post("u", oms_frame(address, new, 3_100_000, hour(61)))).payload
        assert await _keys(pool, device.meter_id, credentials_key) == [new, None]
        if answer_lost:  # sent again in this window, with the same key: answered from memory
            assert meter.handle(again, 0) == answer
            await post("c", answer)
        else:
            assert not again
        await post("u", oms_frame(address, new, 3_200_000, hour(62)))
    finally:
        await client.shutdown()
    state = await pool.fetchrow("SELECT state, attempts FROM commands WHERE command_id = $1", cid)
    assert (state["state"], state["attempts"]) == ("acknowledged", 2 if answer_lost else 1)
    assert meter.executed[cid] == 1
    assert [r[0] for r in await pool.fetch(READINGS, device.meter_id)] == [
        3_000_000, 3_100_000, 3_200_000,
    ]  # fmt: skip
