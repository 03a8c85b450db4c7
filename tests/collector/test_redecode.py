"""Re-decoding quarantined frames: the running collector carries out queued requests through
its live store path (identity, dedup, quarantine), and resolves the quarantine rows."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from datetime import UTC, datetime

import aiocoap
import asyncpg
import pytest
from collector_testkit import RawCoap, cjt188_frame, hour, oscore_client
from conftest import RunningCollector, count, new_address

from decoder.mbus_encode import encode_oms_mode5
from devices.provision import provision_device
from storage import quarantine

ROW = "SELECT * FROM quarantine WHERE payload = $1 ORDER BY quarantine_id"


def oms_frame(address: str, key: bytes, total_ml: int, read_at_s: int) -> bytes:
    """A water meter's OMS mode 5 frame with its register and a type F clock."""
    when = datetime.fromtimestamp(read_at_s, UTC)
    return encode_oms_mode5(address, "NBM", 1, 0x07, 0x21, total_ml, key, when)


def oms_address() -> str:
    """A fresh 8-digit M-Bus identification number."""
    return f"{uuid.uuid4().int % 10**8:08d}"


async def tenant_of(pool: asyncpg.Pool, slug: str) -> int:
    """The id of tenant `slug`."""
    return int(await pool.fetchval("SELECT tenant_id FROM tenants WHERE slug = $1", slug))


async def finished(pool: asyncpg.Pool, tenant_id: int, job_id: int) -> quarantine.Job:
    """The job once it is no longer queued (within 20 s), else fail."""
    deadline = time.monotonic() + 20
    while True:
        job = await quarantine.get_job(pool, tenant_id, job_id)
        assert job is not None
        if job.state != "queued":
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"re-decode job {job_id} still queued after 20 s: {job}")
        await asyncio.sleep(0.05)


async def oscore_post(
    collector: RunningCollector, oscore: dict[str, str], frames: list[bytes]
) -> list[str]:
    """POST each frame as the OSCORE device (one context: sequence numbers go on); codes."""
    client = await oscore_client(collector.coap_port, oscore)
    codes = []
    try:
        for frame in frames:
            request = aiocoap.Message(
                code=aiocoap.POST, uri=f"coap://127.0.0.1:{collector.coap_port}/u", payload=frame
            )
            codes.append(str((await client.request(request).response).code.dotted))
    finally:
        await client.shutdown()
    return codes


async def test_no_key_frame_is_stored_once_after_its_key_arrives(
    collector: RunningCollector,
    raw: RawCoap,
    pool: asyncpg.Pool,
    db_url: str,
    lab_tenant: str,
    credentials_key: str,
) -> None:
    """A plain-CoAP OMS frame quarantined as no_key is stored, dated by its own clock, once
    its key is provisioned and it is re-decoded; asking again stores nothing twice."""
    address, aes = oms_address(), secrets.token_bytes(16)
    device = await provision_device(
        db_url, lab_tenant, address, credentials_key=credentials_key, meter_format="oms",
        oscore=False,
    )  # fmt: skip
    frame = oms_frame(address, aes, 4_321_000, hour(50))
    assert (await raw.post(frame, query=f"t={lab_tenant}")).code_str == "4.00"
    [row] = await pool.fetch(ROW, frame)
    assert row["reason"] == "undecodable"
    assert row["detail"].startswith("no_key:")
    await provision_device(
        db_url, lab_tenant, address, credentials_key=credentials_key, meter_format="oms",
        oscore=False, aes_key=aes,
    )  # fmt: skip
    tenant_id = await tenant_of(pool, lab_tenant)
    async with pool.acquire() as conn:
        job = await quarantine.request_one(conn, tenant_id, row["quarantine_id"], "test")
    assert job is not None
    done = await finished(pool, tenant_id, job.job_id)
    assert (done.state, done.counts["stored"], done.n_new) == ("done", 1, 1)
    readings = await pool.fetch(
        "SELECT register_ml, extract(epoch FROM nbm_at(read_s))::bigint AS at"
        " FROM readings WHERE meter_id = $1",
        device.meter_id,
    )
    assert [(r["register_ml"], r["at"]) for r in readings] == [(4_321_000, hour(50))]
    archived = await pool.fetch(
        "SELECT received_at, transport FROM raw_uplinks WHERE meter_id = $1 AND outcome = 'stored'",
        device.meter_id,
    )
    # the uplink is archived with its original reception (readings keep no receive time)
    assert [tuple(a) for a in archived] == [(row["received_at"], 1)]
    [resolved] = await pool.fetch(ROW, frame)
    assert (resolved["resolution"], resolved["resolved_by_job"]) == ("stored", job.job_id)
    # asking again: the single row is refused with what became of it, a bulk request
    # finds nothing open, and no reading is stored twice
    async with pool.acquire() as conn:
        with pytest.raises(quarantine.AlreadyResolvedError, match="stored"):
            await quarantine.request_one(conn, tenant_id, row["quarantine_id"], "test")
        again = await quarantine.request_matching(
            conn, tenant_id, quarantine.Filter(reason="undecodable", error="no_key"), "test"
        )
    assert (again.state, again.n_items) == ("done", 0)
    assert (
        await count(pool, "SELECT count(*) FROM readings WHERE meter_id = $1", device.meter_id) == 1
    )


async def test_a_meters_no_key_rows_are_redecoded_in_bulk_as_its_device(
    collector: RunningCollector,
    pool: asyncpg.Pool,
    db_url: str,
    tenant_slug: str,
    credentials_key: str,
) -> None:
    """Every no_key row of an OSCORE meter, re-decoded by one bulk job once its key is
    stored, is stored as that device's uplink (transport coap+oscore), each reading once."""
    address, aes = oms_address(), secrets.token_bytes(16)
    device = await provision_device(
        db_url, tenant_slug, address, credentials_key=credentials_key, meter_format="oms"
    )
    frames = [oms_frame(address, aes, 1_000_000 * (n + 1), hour(60 + n)) for n in range(3)]
    assert await oscore_post(collector, device.oscore, frames) == ["4.00"] * 3
    await provision_device(
        db_url, tenant_slug, address, credentials_key=credentials_key, meter_format="oms",
        oscore=False, aes_key=aes,
    )  # fmt: skip
    tenant_id = await tenant_of(pool, tenant_slug)
    flt = quarantine.Filter(reason="undecodable", error="no_key", meter_id=device.meter_id)
    async with pool.acquire() as conn:
        job = await quarantine.request_matching(conn, tenant_id, flt, "test")
    assert job.n_items == 3
    done = await finished(pool, tenant_id, job.job_id)
    assert (done.state, done.counts["stored"], done.n_new) == ("done", 3, 3)
    rows = await pool.fetch(
        "SELECT register_ml, extract(epoch FROM nbm_at(read_s))::bigint AS at"
        " FROM readings WHERE meter_id = $1 ORDER BY read_s",
        device.meter_id,
    )
    assert [tuple(r) for r in rows] == [(1_000_000 * (n + 1), hour(60 + n)) for n in range(3)]
    open_rows = await quarantine.list_rows(
        pool, tenant_id, quarantine.Filter(meter_id=device.meter_id, resolved=False),
        after=None, limit=10,
    )  # fmt: skip
    assert open_rows == []


async def test_frame_naming_another_meter_is_quarantined_again_as_identity_mismatch(
    collector: RunningCollector,
    pool: asyncpg.Pool,
    db_url: str,
    tenant_slug: str,
    credentials_key: str,
) -> None:
    """Re-decoding a device's frame that names another meter meets the identity check: it is
    quarantined again (a new row, same frame and receive time), the old row points at it."""
    device = await provision_device(
        db_url, tenant_slug, new_address(), credentials_key=credentials_key
    )
    other = await provision_device(
        db_url, tenant_slug, new_address(), credentials_key=credentials_key, oscore=False
    )
    frame = cjt188_frame(other.address, 50_000, hour(70))
    assert await oscore_post(collector, device.oscore, [frame]) == ["4.03"]
    [first] = await pool.fetch(ROW, frame)
    tenant_id = await tenant_of(pool, tenant_slug)
    async with pool.acquire() as conn:
        job = await quarantine.request_one(conn, tenant_id, first["quarantine_id"], "test")
    assert job is not None
    done = await finished(pool, tenant_id, job.job_id)
    assert (done.state, done.counts["quarantined"], done.n_new) == ("done", 1, 0)
    old, new = await pool.fetch(ROW, frame)
    assert (old["resolution"], old["superseded_by"]) == ("quarantined", new["quarantine_id"])
    assert (new["reason"], new["resolved_at"]) == ("identity_mismatch", None)
    assert (new["received_at"], new["meter_id"]) == (first["received_at"], device.meter_id)
    [item] = await quarantine.job_items(pool, tenant_id, job.job_id, after=0, limit=10)
    assert (item.state, item.reason) == ("quarantined", "identity_mismatch")
    assert item.new_quarantine_id == new["quarantine_id"]
    # the new row's history names the row it came from
    [attempt] = await quarantine.history(pool, tenant_id, new["quarantine_id"])
    assert attempt.quarantine_id == first["quarantine_id"]
    assert (
        await count(
            pool,
            "SELECT count(*) FROM readings WHERE meter_id = ANY($1::bigint[])",
            [device.meter_id, other.meter_id],
        )
        == 0
    )
