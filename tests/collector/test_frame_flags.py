"""A frame with a readable total and a bad billing record: the total is stored, the
decoder's per-frame flags are archived with the raw uplink, nothing is quarantined."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
from collector_testkit import RawCoap, hour
from conftest import count

from decoder.columns import FrameFlag
from decoder.mbus_encode import encode_oms_plain
from devices.provision import provision_device

# EN 13757-3 records after the total: the billing register (storage 1) holds the "no
# data" marker 0x80000000 at a valid date, storage 2 has a hex digit in its BCD value
BAD_BILLING = bytes.fromhex("441300000080426C1F0C8C0113AA000000")


async def test_valid_total_is_stored_and_bad_billing_record_flagged(
    raw: RawCoap, pool: asyncpg.Pool, db_url: str, lab_tenant: str, credentials_key: str
) -> None:
    """The current total becomes a reading (2.04), the raw uplink carries NO_DATA and
    RECORD_DROPPED, and no quarantine row is written (formerly the no-data billing value
    was a -2147483.648 m3 reading the writer refused)."""
    address = f"{uuid.uuid4().int % 10**8:08d}"
    device = await provision_device(
        db_url, lab_tenant, address, credentials_key=credentials_key, meter_format="oms",
        oscore=False,
    )  # fmt: skip
    when = datetime.fromtimestamp(hour(40), UTC)
    plain = encode_oms_plain(address, "NBM", 1, 0x07, 0x21, 4_321_000, when)
    body = plain[1:] + BAD_BILLING
    frame = bytes([len(body)]) + body
    reply = await raw.post(frame, query=f"t={lab_tenant}")
    assert reply.code_str == "2.04", reply.payload
    rows = await pool.fetch(
        "SELECT register_ml, extract(epoch FROM nbm_at(read_s))::bigint AS at FROM readings"
        " WHERE meter_id = $1",
        device.meter_id,
    )
    assert [(r["register_ml"], r["at"]) for r in rows] == [(4_321_000, hour(40))]
    archived = await pool.fetchrow(
        "SELECT outcome, decode_flags, n_readings FROM raw_uplinks WHERE payload = $1", frame
    )
    assert archived is not None
    assert archived["outcome"] == "stored"
    assert archived["n_readings"] == 1
    assert archived["decode_flags"] == FrameFlag.NO_DATA | FrameFlag.RECORD_DROPPED
    assert await count(pool, "SELECT count(*) FROM quarantine WHERE payload = $1", frame) == 0
