"""Learned compact-frame formats (migration 0053) on the real database: per tenant, the
first format under a key stays, a new one wakes the re-decode loops, and the sweep queues
exactly the quarantined frames a format decodes (once at once, once more later), in jobs
of at most MAX_JOB_ITEMS rows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from dbkit import migrated_database

from decoder.mbus_compact import Key
from storage import compact_formats, quarantine
from storage.archive import ArchiveWriter
from storage.redecode_queue import CHANNEL
from storage.rows import QuarantineRow

KEY: Key = ("ZZZ", 1, 7, 0x7E1C)
FORMAT = bytes.fromhex("0413066D")
OTHER_KEY: Key = ("ZZZ", 1, 7, 0x1234)
T0 = datetime(2025, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
async def formats_url(server_url: str) -> AsyncIterator[str]:
    """A database of this module's own: the session's collector (tests/collector) drains
    the session database's re-decode queue and sweeps its formats."""
    async with migrated_database(server_url, "nbmeter_test_compact") as url:
        yield url


@pytest.fixture(scope="module")
async def pool(formats_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the module's own database."""
    async with asyncpg.create_pool(formats_url, min_size=1, max_size=4) as p:
        yield p


async def refused(pool: asyncpg.Pool, tenant_id: int, key: Key, n: int, tag: str) -> list[int]:
    """`n` quarantine rows of frames refused for want of `key`, a second apart; their ids."""
    detail = compact_formats.refused_detail(key)
    payloads = [f"{tag}-{i}".encode() for i in range(n)]
    await ArchiveWriter(pool).write_quarantine(
        [
            QuarantineRow(
                T0 + timedelta(seconds=i), tenant_id, None, 1, None, "undecodable", detail, p
            )
            for i, p in enumerate(payloads)
        ]
    )
    rows = await pool.fetch(
        "SELECT quarantine_id FROM quarantine WHERE payload = ANY($1::bytea[])"
        " ORDER BY quarantine_id",
        payloads,
    )
    return [r[0] for r in rows]


async def sweep(pool: asyncpg.Pool, tenant_id: int) -> list[compact_formats.Swept]:
    """One sweep (formats are due again 60 s after they were learned); those of the tenant."""
    async with pool.acquire() as conn:
        swept = await compact_formats.sweep(conn, again_after_s=60)
    return [s for s in swept if s.tenant_id == tenant_id]


async def queued(pool: asyncpg.Pool, tenant_id: int) -> set[int]:
    """The tenant's quarantine rows with a queued re-decode item."""
    rows = await pool.fetch(
        "SELECT i.quarantine_id FROM redecode_items i JOIN redecode_jobs j USING (job_id)"
        " WHERE j.tenant_id = $1 AND i.state = 'queued'",
        tenant_id,
    )
    return {r[0] for r in rows}


async def test_first_format_under_a_key_stays_and_is_the_tenants_alone(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """learn stores new keys (and says which), keeps the first format under a key (a
    second one is answered with the first), and another tenant holds none of them."""
    other = await pool.fetchval(
        "INSERT INTO tenants (slug, name) VALUES ('cf-other', 'x') RETURNING tenant_id"
    )
    async with pool.acquire() as conn, conn.transaction():
        stored, added = await compact_formats.learn(conn, tenant_id, {KEY: FORMAT})
    assert (stored, added) == ({KEY: FORMAT}, [KEY])
    colliding = bytes.fromhex("0414066D808080317F")
    async with pool.acquire() as conn, conn.transaction():
        stored, added = await compact_formats.learn(
            conn, tenant_id, {KEY: colliding, OTHER_KEY: b"\x04\x13"}
        )
    assert (stored, added) == ({KEY: FORMAT, OTHER_KEY: b"\x04\x13"}, [OTHER_KEY])
    assert await compact_formats.load(pool, tenant_id) == {KEY: FORMAT, OTHER_KEY: b"\x04\x13"}
    assert await compact_formats.load(pool, other) == {}


async def test_a_new_format_wakes_the_redecode_loops_at_commit(
    pool: asyncpg.Pool, formats_url: str, tenant_id: int
) -> None:
    """Storing a new format NOTIFYs the re-decode channel (delivered at commit); a format
    stored before does not."""
    got: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(formats_url)
    try:
        await listener.add_listener(CHANNEL, lambda *args: got.put_nowait(args[3]))
        async with pool.acquire() as conn, conn.transaction():
            await compact_formats.learn(conn, tenant_id, {KEY: FORMAT})
        assert await asyncio.wait_for(got.get(), 5) == "compact_format"
        async with pool.acquire() as conn, conn.transaction():
            await compact_formats.learn(conn, tenant_id, {KEY: FORMAT})
        await asyncio.sleep(0.3)
        assert got.empty()
    finally:
        await listener.close()


async def test_sweep_queues_what_a_format_decodes_at_once_and_once_more_later(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """The first sweep queues the tenant's open rows refused for the key only (not another
    key's, another tenant's or a resolved one); a sweep before `again_after_s` queues
    nothing; once it has passed, one more sweep queues the rows refused meanwhile; then
    none again. The jobs are requested by the collector and record the match."""
    mine = await refused(pool, tenant_id, KEY, 2, f"mine-{tenant_id}")
    other_key = await refused(pool, tenant_id, OTHER_KEY, 1, f"otherkey-{tenant_id}")
    other = await pool.fetchval(
        "INSERT INTO tenants (slug, name) VALUES ($1, 'x') RETURNING tenant_id",
        f"cf-{tenant_id}",
    )
    theirs = await refused(pool, other, KEY, 1, f"theirs-{tenant_id}")
    [done] = await refused(pool, tenant_id, KEY, 1, f"done-{tenant_id}")
    await pool.execute(
        "UPDATE quarantine SET resolved_at = now(), resolution = 'stored' WHERE quarantine_id = $1",
        done,
    )
    async with pool.acquire() as conn, conn.transaction():
        await compact_formats.learn(conn, tenant_id, {KEY: FORMAT})
    [first] = await sweep(pool, tenant_id)
    assert (first.key, first.n_items, len(first.job_ids)) == (KEY, 2, 1)
    assert await queued(pool, tenant_id) == set(mine)
    assert not await queued(pool, other)
    assert other_key
    assert theirs
    job = await quarantine.get_job(pool, tenant_id, first.job_ids[0])
    assert job is not None
    assert job.requested_by == compact_formats.REQUESTED_BY
    assert job.selection["detail_prefix"] == compact_formats.refused_detail(KEY)
    # refused meanwhile by a collector that had not read the format yet
    late = await refused(pool, tenant_id, KEY, 1, f"late-{tenant_id}")
    assert await sweep(pool, tenant_id) == []
    await pool.execute(  # a minute and more goes by
        "UPDATE compact_formats SET learned_at = learned_at - interval '2 minutes',"
        " swept_at = swept_at - interval '2 minutes' WHERE tenant_id = $1",
        tenant_id,
    )
    [second] = await sweep(pool, tenant_id)
    assert second.n_items == 1
    assert await queued(pool, tenant_id) == {*mine, *late}
    assert await sweep(pool, tenant_id) == []


async def test_a_sweep_of_a_format_no_row_waits_for_makes_no_job(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """A format no quarantined frame was refused for is swept without a job."""
    async with pool.acquire() as conn, conn.transaction():
        await compact_formats.learn(conn, tenant_id, {OTHER_KEY: b"\x04\x13"})
    [swept] = await sweep(pool, tenant_id)
    assert (swept.job_ids, swept.n_items) == ((), 0)
    jobs = await pool.fetchval("SELECT count(*) FROM redecode_jobs WHERE tenant_id = $1", tenant_id)
    assert jobs == 0


async def test_request_all_matching_splits_into_jobs_of_max_items(
    pool: asyncpg.Pool, tenant_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More matching rows than one job may hold are queued oldest first in several jobs
    of at most MAX_JOB_ITEMS each, every row once; a second request finds none left."""
    monkeypatch.setattr(quarantine, "MAX_JOB_ITEMS", 2)
    ids = await refused(pool, tenant_id, KEY, 5, f"split-{tenant_id}")
    flt = quarantine.Filter(detail_prefix=compact_formats.refused_detail(KEY))
    async with pool.acquire() as conn:
        jobs = await quarantine.request_all_matching(conn, tenant_id, flt, "test")
        assert [j.n_items for j in jobs] == [2, 2, 1]
        assert await queued(pool, tenant_id) == set(ids)
        firsts = [
            (await quarantine.job_items(conn, tenant_id, j.job_id, after=0, limit=5))[0]
            for j in jobs
        ]
        assert [i.quarantine_id for i in firsts] == [ids[0], ids[2], ids[4]]
        assert await quarantine.request_all_matching(conn, tenant_id, flt, "test") == []
