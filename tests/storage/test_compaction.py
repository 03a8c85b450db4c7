"""storage.compaction on the real server: a closed readings chunk whose index ingest left
loose is rebuilt packed, once; the open day's chunk is left alone; nothing is lost; one
process at a time; and the collector's settings and `nbmeter db compact` reach it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest
from dbkit import migrated_database

from storage.compaction import compact_closed, compact_closed_at

METERS = 4000


@pytest.fixture
async def own_db(server_url: str) -> AsyncIterator[str]:
    """A database of its own: compaction looks at every readings chunk."""
    async with migrated_database(server_url, "nbmeter_compaction") as url:
        yield url


async def _fill(conn: asyncpg.Connection) -> None:
    """Ten days ago and today: 24 hourly readings per meter, inserted in shuffled meter
    order as ingest does (the index pages split half and half)."""
    for day in (timedelta(days=10), timedelta(0)):
        await conn.execute(
            "INSERT INTO readings (meter_id, read_s, register_ml)"
            " SELECT m, nbm_floor_s(date_trunc('day', now() - $2::interval)) + h * 3600,"
            " m * 1000 + h"
            " FROM (SELECT m FROM generate_series(1, $1) m ORDER BY md5(m::text)) meters,"
            " generate_series(0, 23) h",
            METERS,
            day,
        )


async def test_a_closed_chunk_is_compacted_once(own_db: str) -> None:
    """The 10-day-old chunk's indexes shrink; the current one is left; a second run and a
    dry run find nothing; every reading and the boundary lookup's index scan remain."""
    conn = await asyncpg.connect(own_db)
    try:
        await _fill(conn)
        total = await conn.fetchval("SELECT count(*) FROM readings")
        listed = await compact_closed(conn, dry_run=True)
        assert listed is not None
        assert len(listed) == 1
        assert listed[0].index_bytes_after == listed[0].index_bytes_before
        assert await conn.fetchval("SELECT count(*) FROM compacted_chunks") == 0

        done = await compact_closed(conn)
        assert done is not None
        assert [c.chunk for c in done] == [listed[0].chunk]
        before, after = done[0].index_bytes_before, done[0].index_bytes_after
        assert after < 0.85 * before, (before, after)
        per_reading = after / (METERS * 24)
        assert 18 < per_reading < 23, per_reading  # packed: ~20.3 B per reading (0054)

        assert await compact_closed(conn) == []
        assert await compact_closed(conn, dry_run=True) == []
        assert await conn.fetchval("SELECT count(*) FROM readings") == total
        recorded = await conn.fetchrow("SELECT * FROM compacted_chunks")
        assert (recorded["chunk"], recorded["index_bytes_after"]) == (done[0].chunk, after)
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT register_ml FROM readings WHERE meter_id = 17"
                " AND read_s <= nbm_floor_s(now() - interval '9 days') ORDER BY read_s DESC LIMIT 1"
            )
        )
        assert "readings_meter_time" in plan, plan
        # a day closes `after` after its end: with none, the open day's chunk is next
        done = await compact_closed_at(own_db, after=timedelta(0))
        assert done == []  # today's chunk ends tomorrow: not closed yet
    finally:
        await conn.close()


async def test_one_process_at_a_time(own_db: str) -> None:
    """While another session holds the compaction lock a run does nothing (None); a
    negative delay is refused."""
    holder, conn = await asyncpg.connect(own_db), await asyncpg.connect(own_db)
    try:
        await _fill(conn)
        await holder.execute("SELECT pg_advisory_lock(x'6E626D5F636D7031'::bigint)")
        assert await compact_closed(conn) is None
        await holder.execute("SELECT pg_advisory_unlock(x'6E626D5F636D7031'::bigint)")
        done = await compact_closed(conn)
        assert done is not None
        assert len(done) == 1
        with pytest.raises(ValueError, match="must not be negative"):
            await compact_closed(conn, after=timedelta(hours=-1))
    finally:
        await holder.close()
        await conn.close()


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NBMETER_DATABASE_URL=url)
    return subprocess.run(
        [sys.executable, "-m", "nbmeter.cli", "db", "compact", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_command(own_db: str) -> None:
    """`nbmeter db compact`: --dry-run lists the closed chunk, the run compacts it with
    its bytes before and after, the next run has nothing left; a bad delay exits 2."""
    conn = await asyncpg.connect(own_db)
    try:
        await _fill(conn)
    finally:
        await conn.close()
    listed = await asyncio.to_thread(_cli, own_db, "--dry-run")
    assert listed.returncode == 0, listed.stderr
    assert "readings: would compact _timescaledb_internal." in listed.stdout
    done = await asyncio.to_thread(_cli, own_db)
    assert done.returncode == 0, done.stderr
    assert "readings: compacted _timescaledb_internal." in done.stdout
    assert " B -> " in done.stdout
    again = await asyncio.to_thread(_cli, own_db)
    assert "no closed chunk left to compact" in again.stdout
    bad = await asyncio.to_thread(_cli, own_db, "--after-hours", "-1")
    assert bad.returncode == 2
    assert "must not be negative" in bad.stderr
