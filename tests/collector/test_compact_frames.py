"""EN 13757-3 compact frames on the running collector: a tenant's stored full frames teach
their model's format (kept in the database, migration 0053), its compact frames decode
with it, frames refused before it was known are re-decoded once it is, and nothing one
tenant's meters taught ever reads another tenant's frames."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
from brokerkit import Broker
from collector_testkit import RawCoap, hour
from conftest import RunningCollector, collector_settings, count, wait_count
from dbkit import new_tenant

from collector.compact import CompactFormats
from collector.keys import MeterKeys
from collector.main import run
from collector.store import BatchStore
from collector.uplink import Transport, Uplink
from decoder.mbus_encode import encode_oms_plain
from decoder.mbus_link import crc16_en13757
from devices.provision import ProvisionedDevice, provision_device
from storage import compact_formats, quarantine

MAN = "ZZZ"  # no vendor table entry, no driver: only a learned format reads its compact frames
HEADER = bytes.fromhex("0413066D")  # what encode_oms_*(…, when) sends: litres, type I clock
# signature-colliding header (tests/decoder/test_mbus.py): the register's VIF says 10 L
COLLIDING_HEADER = bytes.fromhex("0414066D808080317F")
COUNT = "SELECT count(*) FROM readings WHERE meter_id = $1"
READINGS = "SELECT register_ml, read_s + 946684800 FROM readings WHERE meter_id = $1"


def oms_address() -> str:
    """A fresh 8-digit M-Bus identification number."""
    return f"{uuid.uuid4().int % 10**8:08d}"


def full(address: str, version: int, total_ml: int, at: int) -> bytes:
    """A plain (mode 0) OMS frame of model (MAN, version, water) with its DIF/VIF header."""
    return encode_oms_plain(
        address, MAN, version, 0x07, 1, total_ml, datetime.fromtimestamp(at, UTC)
    )


def compact(address: str, version: int, total_ml: int, at: int) -> bytes:
    """The same model's compact frame (CI 7B): signature, data CRC, values only."""
    when = datetime.fromtimestamp(at, UTC)
    return encode_oms_plain(address, MAN, version, 0x07, 1, total_ml, when, compact=True)


def a_version() -> int:
    """A model version of its own for one test (formats are keyed by it)."""
    return uuid.uuid4().int % 256


async def lab_tenant(pool: asyncpg.Pool) -> tuple[str, int]:
    """A new lab tenant (plain CoAP allowed): (slug, tenant_id)."""
    slug = await new_tenant(pool, "lab", plain_coap=True)
    return slug, int(await pool.fetchval("SELECT tenant_id FROM tenants WHERE slug = $1", slug))


def plain(frame: bytes, tenant: int) -> Uplink:
    """A plain-CoAP uplink of `tenant`."""
    return Uplink(frame, Transport.COAP, "127.0.0.1:5683", tenant_id=tenant)


async def meter(db_url: str, slug: str, key: str) -> ProvisionedDevice:
    """A new OMS meter of tenant `slug`, reached over plain CoAP."""
    return await provision_device(
        db_url, slug, oms_address(), credentials_key=key, meter_format="oms", oscore=False
    )


async def readings(pool: asyncpg.Pool, meter_id: int) -> list[tuple[int, int]]:
    """(register_ml, read_at epoch s) of a meter, by time."""
    rows = await pool.fetch(READINGS + " ORDER BY read_s", meter_id)
    return [(r[0], r[1]) for r in rows]


async def learned(pool: asyncpg.Pool, tenant_id: int) -> dict[tuple[str, int, int, int], bytes]:
    """The compact formats stored for a tenant."""
    return await compact_formats.load(pool, tenant_id)


def key_of(version: int, header: bytes = HEADER) -> tuple[str, int, int, int]:
    """The format key of model (MAN, version, water) whose header is `header`."""
    return (MAN, version, 0x07, crc16_en13757(header))


async def test_full_frame_teaches_a_compact_frame_of_another_meter(
    collector: RunningCollector, raw: RawCoap, pool: asyncpg.Pool, db_url: str,
    credentials_key: str,
) -> None:  # fmt: skip
    """A full frame of meter A, then a compact frame of meter B of the same model (same
    tenant): both are stored with their registers and clocks; the format is stored once."""
    slug, tenant = await lab_tenant(pool)
    a, b = await meter(db_url, slug, credentials_key), await meter(db_url, slug, credentials_key)
    version = a_version()
    assert (
        await raw.post(full(a.address, version, 1_234_000, hour(10)), query=f"t={slug}")
    ).code_str == "2.04"
    reply = await raw.post(compact(b.address, version, 5_678_000, hour(11)), query=f"t={slug}")
    assert reply.code_str == "2.04", reply.payload
    assert await readings(pool, a.meter_id) == [(1_234_000, hour(10))]
    assert await readings(pool, b.meter_id) == [(5_678_000, hour(11))]
    assert await learned(pool, tenant) == {key_of(version): HEADER}


async def test_compact_frame_quarantined_first_is_stored_once_a_full_frame_teaches(
    collector: RunningCollector, raw: RawCoap, pool: asyncpg.Pool, db_url: str,
    credentials_key: str,
) -> None:  # fmt: skip
    """A compact frame whose format no full frame taught yet is quarantined unknown_compact;
    once another meter's full frame of the model is stored, the collector re-decodes it by
    itself (a job requested by the collector) and its reading is stored, once."""
    slug, tenant = await lab_tenant(pool)
    a, b = await meter(db_url, slug, credentials_key), await meter(db_url, slug, credentials_key)
    version = a_version()
    early = compact(b.address, version, 7_000_000, hour(20))
    assert (await raw.post(early, query=f"t={slug}")).code_str == "4.00"
    [row] = await pool.fetch("SELECT * FROM quarantine WHERE payload = $1", early)
    assert row["detail"] == compact_formats.refused_detail(key_of(version))
    assert await readings(pool, b.meter_id) == []
    assert (
        await raw.post(full(a.address, version, 1_000, hour(21)), query=f"t={slug}")
    ).code_str == "2.04"
    await wait_count(pool, 1, COUNT, b.meter_id, within_s=20)  # re-decoded by the collector
    assert await readings(pool, b.meter_id) == [(7_000_000, hour(20))]
    resolved = await pool.fetchrow(
        "SELECT resolution, resolved_by_job FROM quarantine WHERE quarantine_id = $1",
        row["quarantine_id"],
    )
    assert resolved["resolution"] == "stored"
    job = await quarantine.get_job(pool, tenant, resolved["resolved_by_job"])
    assert job is not None
    assert (job.requested_by, job.n_items, job.n_new) == (compact_formats.REQUESTED_BY, 1, 1)


async def test_one_tenants_format_never_reads_another_tenants_compact_frame(
    collector: RunningCollector, raw: RawCoap, pool: asyncpg.Pool, db_url: str,
    credentials_key: str,
) -> None:  # fmt: skip
    """Tenant 1's meter teaches the model's format; tenant 2's compact frame of the same
    model is still quarantined unknown_compact, and no re-decode job of tenant 2 runs."""
    slug1, tenant1 = await lab_tenant(pool)
    slug2, tenant2 = await lab_tenant(pool)
    a = await meter(db_url, slug1, credentials_key)
    b = await meter(db_url, slug2, credentials_key)
    version = a_version()
    assert (
        await raw.post(full(a.address, version, 1_000, hour(30)), query=f"t={slug1}")
    ).code_str == "2.04"
    theirs = compact(b.address, version, 2_000_000, hour(31))
    assert (await raw.post(theirs, query=f"t={slug2}")).code_str == "4.00"
    [row] = await pool.fetch("SELECT reason, detail FROM quarantine WHERE payload = $1", theirs)
    assert row["detail"] == compact_formats.refused_detail(key_of(version))
    assert await learned(pool, tenant1) == {key_of(version): HEADER}
    assert await learned(pool, tenant2) == {}
    assert await readings(pool, b.meter_id) == []
    assert (
        await count(pool, "SELECT count(*) FROM redecode_jobs WHERE tenant_id = $1", tenant2) == 0
    )


async def test_learned_format_survives_a_restart(
    pool: asyncpg.Pool, db_url: str, broker: Broker, credentials_key: str
) -> None:
    """A format learned by one collector is read from the database by the next one (a
    restart, or another process): its first compact frame is stored."""
    slug, tenant = await lab_tenant(pool)
    a, b = await meter(db_url, slug, credentials_key), await meter(db_url, slug, credentials_key)
    version = a_version()
    async with own_collector(db_url, broker, credentials_key) as port:
        client = await RawCoap.open(port)
        try:
            reply = await client.post(full(a.address, version, 3_000, hour(40)), query=f"t={slug}")
        finally:
            client.close()
        assert reply.code_str == "2.04"
    assert await learned(pool, tenant) == {key_of(version): HEADER}
    async with own_collector(db_url, broker, credentials_key) as port:
        client = await RawCoap.open(port)
        try:
            reply = await client.post(
                compact(b.address, version, 9_000, hour(41)), query=f"t={slug}"
            )
        finally:
            client.close()
        assert reply.code_str == "2.04", reply.payload
    assert await readings(pool, b.meter_id) == [(9_000, hour(41))]


async def test_colliding_learned_format_is_refused_not_read(
    collector: RunningCollector, raw: RawCoap, pool: asyncpg.Pool, db_url: str,
    credentials_key: str,
) -> None:  # fmt: skip
    """A meter of the tenant teaches a header with the same signature but another register
    unit (10 L: a CRC-16 collision, as a poisoned format would be). Another meter's compact
    frame is not read through it (its register would be 10 times too large): its data CRC
    fails, it is quarantined bad_checksum, and no reading of it is stored."""
    slug, tenant = await lab_tenant(pool)
    a, b = await meter(db_url, slug, credentials_key), await meter(db_url, slug, credentials_key)
    version = a_version()
    real = full(a.address, version, 4_000, hour(50))
    records_at = 15  # L C M(2) ID(4) V T, CI 7A and its short TPL (ACC STS CW(2))
    assert real[records_at:][:2] == HEADER[:2]
    body = real[1:records_at] + COLLIDING_HEADER[:2] + real[records_at + 2 :] + COLLIDING_HEADER[4:]
    poison = bytes([len(body)]) + body
    assert (await raw.post(poison, query=f"t={slug}")).code_str == "2.04"
    assert await learned(pool, tenant) == {key_of(version): COLLIDING_HEADER}
    assert await readings(pool, a.meter_id) == [(40_000, hour(50))]  # its own frame: 4 x 10 L
    frame = compact(b.address, version, 5_000_000, hour(51))
    assert (await raw.post(frame, query=f"t={slug}")).code_str == "4.00"
    [row] = await pool.fetch("SELECT reason, detail FROM quarantine WHERE payload = $1", frame)
    assert (row["reason"], row["detail"]) == (
        "undecodable",
        "bad_checksum: compact frame data CRC mismatch",
    )
    assert await readings(pool, b.meter_id) == []


async def test_batch_store_learns_only_from_stored_frames_and_never_within_the_batch(
    collector: RunningCollector, pool: asyncpg.Pool, db_url: str, credentials_key: str
) -> None:
    """BatchStore.commit: a full frame of a meter the tenant does not have (unknown_meter)
    teaches nothing; a stored full frame's format reads no compact frame of its own batch
    (quarantined unknown_compact, then re-decoded by the running collector) but does the
    next batch's; the other tenant's compact frames in the same batches stay unknown."""
    slug1, tenant1 = await lab_tenant(pool)
    slug2, tenant2 = await lab_tenant(pool)
    a, b = await meter(db_url, slug1, credentials_key), await meter(db_url, slug1, credentials_key)
    c = await meter(db_url, slug2, credentials_key)
    version = a_version()

    async with asyncpg.create_pool(db_url, min_size=1, max_size=2) as own:
        store = BatchStore(own, MeterKeys(None))
        stranger = await store.commit(
            [plain(full(oms_address(), version, 1_000, hour(60)), tenant1)]
        )
        assert [o.reason for o in stranger] == ["unknown_meter"]
        assert await learned(pool, tenant1) == {}
        first = await store.commit(
            [
                plain(full(a.address, version, 1_000, hour(61)), tenant1),
                plain(compact(b.address, version, 2_000, hour(62)), tenant1),
                plain(compact(c.address, version, 3_000, hour(63)), tenant2),
            ]
        )
        assert [o.status for o in first] == ["stored", "quarantined", "quarantined"]
        assert "unknown_compact" in first[1].detail
        assert await learned(pool, tenant1) == {key_of(version): HEADER}
        second = await store.commit(
            [
                plain(compact(b.address, version, 4_000, hour(64)), tenant1),
                plain(compact(c.address, version, 5_000, hour(65)), tenant2),
            ]
        )
        assert [o.status for o in second] == ["stored", "quarantined"]
        assert "unknown_compact" in second[1].detail
    await wait_count(pool, 2, COUNT, b.meter_id, within_s=20)  # the first batch's, re-decoded
    assert await readings(pool, b.meter_id) == [(2_000, hour(62)), (4_000, hour(64))]
    assert await readings(pool, c.meter_id) == []
    assert await learned(pool, tenant2) == {}


@asynccontextmanager
async def own_collector(db_url: str, broker: Broker, key: str) -> AsyncIterator[int]:
    """A collector of its own on the session database for the block; its CoAP port."""
    settings = collector_settings(db_url, broker, key)
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(settings, stop=stop, started=started))
    await asyncio.wait_for(started.wait(), 20)
    try:
        yield settings.coap.port
    finally:
        stop.set()
        await asyncio.wait_for(task, 40)


async def test_a_format_another_process_learned_is_read_after_a_miss(
    pool: asyncpg.Pool, db_url: str, credentials_key: str
) -> None:
    """Two processes (two BatchStores): the second had read the tenant's formats before the
    first learned one; its next compact frame of the model finds none, so it reads the
    tenant's formats again (at most every refresh_s) and decodes the frame with it."""
    slug, tenant = await lab_tenant(pool)
    a, b = await meter(db_url, slug, credentials_key), await meter(db_url, slug, credentials_key)
    version = a_version()
    async with asyncpg.create_pool(db_url, min_size=1, max_size=2) as own:
        first = BatchStore(own, MeterKeys(None))
        second = BatchStore(own, MeterKeys(None), compact=CompactFormats(refresh_s=0))
        [early] = await second.commit([plain(compact(b.address, version, 1_000, hour(70)), tenant)])
        assert "unknown_compact" in early.detail
        [taught] = await first.commit([plain(full(a.address, version, 1_000, hour(71)), tenant)])
        assert taught.status == "stored"
        [later] = await second.commit([plain(compact(b.address, version, 3_000, hour(72)), tenant)])
    assert later.status == "stored", later.detail
    assert (3_000, hour(72)) in await readings(pool, b.meter_id)


async def test_a_damaged_stored_format_is_not_used(
    pool: asyncpg.Pool, db_url: str, credentials_key: str
) -> None:
    """A stored format whose signature is not the CRC-16 of its bytes (a damaged or edited
    row) reads no frame: the compact frame is quarantined unknown_compact, and a full
    frame of the model does not replace the row."""
    slug, tenant = await lab_tenant(pool)
    a, b = await meter(db_url, slug, credentials_key), await meter(db_url, slug, credentials_key)
    version = a_version()
    await pool.execute(
        "INSERT INTO compact_formats (tenant_id, manufacturer, version, device_type, signature,"
        " format) VALUES ($1, $2, $3, 7, $4, $5)",
        tenant, MAN, version, key_of(version)[3], COLLIDING_HEADER[:4],
    )  # fmt: skip
    async with asyncpg.create_pool(db_url, min_size=1, max_size=2) as own:
        store = BatchStore(own, MeterKeys(None))
        [refused] = await store.commit(
            [plain(compact(b.address, version, 1_000, hour(80)), tenant)]
        )
        assert refused.detail == compact_formats.refused_detail(key_of(version))
        [stored] = await store.commit([plain(full(a.address, version, 1_000, hour(81)), tenant)])
        assert stored.status == "stored"
    assert await learned(pool, tenant) == {key_of(version): COLLIDING_HEADER[:4]}


async def test_a_tenant_holds_at_most_max_formats(
    pool: asyncpg.Pool, db_url: str, credentials_key: str
) -> None:
    """Past its limit a tenant learns no more formats (one meter sending ever new headers
    would grow memory and the table without end): the second model's full frame is stored,
    teaches nothing, and that model's compact frames stay quarantined; the first model's
    still decode."""
    slug, tenant = await lab_tenant(pool)
    a, b = await meter(db_url, slug, credentials_key), await meter(db_url, slug, credentials_key)
    one, two = a_version(), a_version()
    async with asyncpg.create_pool(db_url, min_size=1, max_size=2) as own:
        store = BatchStore(own, MeterKeys(None), compact=CompactFormats(max_formats=1))
        taught = await store.commit([plain(full(a.address, one, 1_000, hour(90)), tenant)])
        refused = await store.commit([plain(full(b.address, two, 2_000, hour(90)), tenant)])
        assert [o.status for o in taught + refused] == ["stored", "stored"]
        assert set(await learned(pool, tenant)) == {key_of(one)}
        [ok] = await store.commit([plain(compact(a.address, one, 3_000, hour(91)), tenant)])
        [waits] = await store.commit([plain(compact(b.address, two, 4_000, hour(91)), tenant)])
    assert ok.status == "stored", ok.detail
    assert waits.detail == compact_formats.refused_detail(key_of(two))
    assert set(await learned(pool, tenant)) == {key_of(one)}
