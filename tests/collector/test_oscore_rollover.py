"""OSCORE context rollover on the real collector and database (migration 0048): a rotate_key
stages a new context (new master secret, salt and key id) beside the current one and
sends it inside the OSCORE-protected 2.04; both contexts are accepted until the device
confirms the new one (its answer, or its first request under it); then the old key id is
gone and a replay under it is refused. The meter never goes unheard."""

from __future__ import annotations

import json
import secrets

import aiocoap
import asyncpg
import pytest
from aiocoap.message import Direction
from collector_testkit import OscoreMeter, RawCoap, cjt188_frame, hour
from test_downlink import queue_command

from devices.provision import ProvisionedDevice
from simulator.commands import CommandExecutor
from storage import credentials

READINGS = "SELECT register_ml FROM readings WHERE meter_id = $1 ORDER BY read_s"
KIDS = (
    "SELECT oscore_kid, oscore_pending_kid, oscore_replay_index, oscore_server_seq"
    " FROM device_credentials WHERE meter_id = $1"
)


async def _kids(pool: asyncpg.Pool, meter_id: int) -> tuple[bytes | None, bytes | None]:
    row = await pool.fetchrow(KIDS, meter_id)
    return (
        None if row[0] is None else bytes(row[0]),
        None if row[1] is None else bytes(row[1]),
    )


async def _state(pool: asyncpg.Pool, cid: int) -> tuple[str, int]:
    row = await pool.fetchrow("SELECT state, attempts FROM commands WHERE command_id = $1", cid)
    return str(row["state"]), int(row["attempts"])


def _code(datagram: bytes) -> str:
    """The dotted code of an answer that is not OSCORE-protected (an error before it)."""
    code = int(aiocoap.Message.decode(datagram).code)
    return f"{code >> 5}.{code & 0x1F:02d}"


def _resent(datagram: bytes) -> tuple[bytes, bytes]:
    """The same OSCORE-protected request in a new CoAP message (new message id and token,
    both outside OSCORE's protection): a replay the message layer does not deduplicate."""
    msg = aiocoap.Message.decode(datagram)
    msg.direction = Direction.OUTGOING
    msg.mid = (msg.mid + 32768) % 65536  # far from the ids the test kit counts up
    msg.token = secrets.token_bytes(4)
    return msg.encode(), msg.token


def _rotation(envelope: bytes, cid: int) -> dict[str, str]:
    (cmd,) = json.loads(envelope)["cmds"]
    assert (cmd["id"], cmd["kind"]) == (cid, "rotate_key")
    assert "frame" not in cmd  # the modem's key, not a CJ/T 188 write
    return dict(cmd["args"]["oscore"])


@pytest.mark.parametrize("answered_under", ["old", "new", "lost"])
async def test_rotate_key_moves_the_device_to_a_new_context_without_a_gap(
    pool: asyncpg.Pool, device: ProvisionedDevice, raw: RawCoap, answered_under: str
) -> None:
    """Queued while asleep → a new context in the next (protected) 2.04, staged with a new
    kid; the device switches. Its answer arriving (under the old context or already under
    the new one): it confirms the context. Its answer lost: its next uplink, under the new
    context, is stored and confirms it, and the command sent again (same context) is
    answered from memory. Then the old kid is gone: a replayed old request and a new one
    under it get 4.01; every reading stored once."""
    cid = await queue_command(pool, device, "rotate_key")
    assert await pool.fetchval("SELECT args FROM commands WHERE command_id = $1", cid) == "{}"
    old_kid = bytes.fromhex(device.oscore["sender_id"])
    old = OscoreMeter(device.oscore)
    dev = CommandExecutor(device.address, "cjt188")

    first = old.request(cjt188_frame(device.address, 100_000, hour(1)))
    reply = old.answer(await raw.exchange(first[0], first[1]), first[2])
    assert reply.code == "2.04"
    sent = _rotation(reply.payload, cid)
    new_kid = bytes.fromhex(sent["sender_id"])
    assert new_kid != old_kid
    assert sent["master_secret"] != device.oscore["master_secret"]
    assert await _kids(pool, device.meter_id) == (old_kid, new_kid)  # staged, not confirmed
    stored = await pool.fetchval("SELECT args::text FROM commands WHERE command_id = $1", cid)
    assert sent["master_secret"] not in stored  # the mailbox never holds the key
    answer = dev.handle(reply.payload, 0)
    assert answer is not None
    assert dev.state.oscore == sent
    new = OscoreMeter(sent)  # on the same socket: the device's one modem
    answer_lost = answered_under == "lost"
    if not answer_lost:
        answering = old if answered_under == "old" else new
        assert (await answering.post(raw, answer, path="c")).code == "2.04"
        assert await _kids(pool, device.meter_id) == (new_kid, None)

    again = await new.post(raw, cjt188_frame(device.address, 110_000, hour(2)))
    assert again.code == "2.04"
    assert await _kids(pool, device.meter_id) == (new_kid, None)  # confirmed either way
    if answer_lost:  # sent again, carrying the same context: answered from memory
        assert _rotation(again.payload, cid) == sent
        assert dev.handle(again.payload, 0) == answer
        assert (await new.post(raw, answer, path="c")).code == "2.04"
    else:
        assert again.payload == b""
    assert await _state(pool, cid) == ("acknowledged", 2 if answer_lost else 1)
    assert dev.executed[cid] == 1

    # the old context is gone: its replayed request and a new one are refused
    assert _code(await raw.exchange(*_resent(first[0]))) == "4.01"
    stale = old.request(cjt188_frame(device.address, 1200_000, hour(3)))
    assert _code(await raw.exchange(stale[0], stale[1])) == "4.01"
    assert (await new.post(raw, cjt188_frame(device.address, 1300_000, hour(4)))).code == "2.04"
    row = await pool.fetchrow(KIDS, device.meter_id)
    assert row["oscore_replay_index"] is not None  # the new context's own window, persisted
    readings = [r[0] for r in await pool.fetch(READINGS, device.meter_id)]
    assert readings == [100_000, 110_000, 1300_000]


async def test_device_that_missed_rotate_key_keeps_reporting_and_gets_it_again(
    pool: asyncpg.Pool, device: ProvisionedDevice, raw: RawCoap
) -> None:
    """The device never got (or never applied) the command: its uplinks under the old
    context are still stored, and each window carries the command again with the same
    staged context, until the device takes it; its first request under the new context
    confirms it."""
    cid = await queue_command(pool, device, "rotate_key")
    old = OscoreMeter(device.oscore)
    dev = CommandExecutor(device.address, "cjt188")
    lost = await old.post(raw, cjt188_frame(device.address, 200_000, hour(5)))
    sent = _rotation(lost.payload, cid)  # ... but the 2.04 never reached the device
    retry = await old.post(raw, cjt188_frame(device.address, 210_000, hour(6)))
    assert retry.code == "2.04"
    assert _rotation(retry.payload, cid) == sent
    assert await _state(pool, cid) == ("sent", 2)
    old_kid = bytes.fromhex(device.oscore["sender_id"])
    assert await _kids(pool, device.meter_id) == (old_kid, bytes.fromhex(sent["sender_id"]))

    answer = dev.handle(retry.payload, 0)  # this time it switches; its answer is lost
    assert answer is not None
    new = OscoreMeter(sent)
    confirmed = await new.post(raw, cjt188_frame(device.address, 220_000, hour(7)))
    assert confirmed.code == "2.04"
    assert await _kids(pool, device.meter_id) == (bytes.fromhex(sent["sender_id"]), None)
    assert (await new.post(raw, dev.handle(confirmed.payload, 0) or b"", path="c")).code == "2.04"
    assert await _state(pool, cid) == ("acknowledged", 3)
    readings = [r[0] for r in await pool.fetch(READINGS, device.meter_id)]
    assert readings == [200_000, 210_000, 220_000]


async def test_pending_context_is_found_by_its_kid_and_dropped_by_provisioning(
    pool: asyncpg.Pool, device: ProvisionedDevice, raw: RawCoap, credentials_key: str
) -> None:
    """The batched loader finds a context by its current or its pending kid (flagged
    pending, its window empty); provisioning the device again drops the staged one."""
    cid = await queue_command(pool, device, "rotate_key")
    reply = await OscoreMeter(device.oscore).post(
        raw, cjt188_frame(device.address, 300_000, hour(8))
    )
    sent = _rotation(reply.payload, cid)
    old_kid, new_kid = bytes.fromhex(device.oscore["sender_id"]), bytes.fromhex(sent["sender_id"])
    key = credentials.parse_key(credentials_key)
    async with pool.acquire() as conn:
        found, bad = await credentials.load_oscore_many(conn, key, [old_kid, new_kid, b"\x7f"])
        assert bad == []
        assert set(found) == {old_kid, new_kid}
        assert (found[old_kid].pending, found[new_kid].pending) == (False, True)
        assert found[new_kid].master_secret.hex() == sent["master_secret"]
        assert found[new_kid].replay_index is None
        assert found[old_kid].replay_index is not None
        assert await credentials.oscore_kid_taken(conn, new_kid, device.meter_id + 1)
        meter = credentials.MeterRef(device.meter_id, found[old_kid].tenant_id, device.address)
        await credentials.store_oscore(
            conn, key, meter, kid=b"\x01" + old_kid[1:], sender_id=b"\x00",
            master_secret=b"\x02" * 16, master_salt=b"",
        )  # fmt: skip
        found, _ = await credentials.load_oscore_many(conn, key, [new_kid])
    assert found == {}
