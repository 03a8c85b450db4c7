"""storage.retention on the real server: expired raw-archive and quarantine chunks go,
recent ones and readings stay; one process at a time; and 0041's dropped time indexes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from dbkit import migrated_database

from storage.retention import Retention, drop_expired, drop_expired_at

OLD, NEW = "now() - interval '500 days'", "now() - interval '1 hour'"


@pytest.fixture
async def own_db(server_url: str) -> AsyncIterator[str]:
    """A database of its own: dropping chunks must not touch the session's rows."""
    async with migrated_database(server_url, "nbmeter_retention") as url:
        yield url


async def _fill(conn: asyncpg.Connection) -> None:
    for when in (OLD, NEW):
        await conn.execute(
            "INSERT INTO raw_uplinks (received_at, transport, payload, outcome)"
            f" VALUES ({when}, 1, '\\x01', 'stored')"
        )
        await conn.execute(
            "INSERT INTO quarantine (received_at, transport, reason, detail)"
            f" VALUES ({when}, 1, 'undecodable', 'test')"
        )
        await conn.execute(
            "INSERT INTO readings (meter_id, read_s, register_ml)"
            f" VALUES (1, nbm_floor_s({when}), 1)"
        )


async def _counts(conn: asyncpg.Connection) -> tuple[int, int, int]:
    return (
        await conn.fetchval("SELECT count(*) FROM raw_uplinks"),
        await conn.fetchval("SELECT count(*) FROM quarantine"),
        await conn.fetchval("SELECT count(*) FROM readings"),
    )


async def test_expired_chunks_go_and_recent_ones_stay(own_db: str) -> None:
    """A dry run lists the 500-day-old chunks and keeps them; the run drops only those
    (readings are never dropped); a second run finds nothing more."""
    conn = await asyncpg.connect(own_db)
    try:
        await _fill(conn)
        listed = await drop_expired(conn, Retention(), dry_run=True)
        assert listed is not None
        assert [len(listed["raw_uplinks"]), len(listed["quarantine"])] == [1, 1]
        assert await _counts(conn) == (2, 2, 2)
        dropped = await drop_expired(conn, Retention())
        assert dropped == listed
        assert await _counts(conn) == (1, 1, 2)
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM raw_uplinks WHERE received_at > now() - interval '1 day'"
            )
            == 1
        )
        assert await drop_expired_at(own_db, Retention()) == {"raw_uplinks": [], "quarantine": []}
    finally:
        await conn.close()


async def test_a_shorter_retention_per_table(own_db: str) -> None:
    """Each table has its own retention: 1 day for quarantine leaves the raw archive alone."""
    conn = await asyncpg.connect(own_db)
    try:
        await _fill(conn)
        dropped = await drop_expired(conn, Retention(raw_uplinks_days=1000, quarantine_days=1))
        assert dropped is not None
        assert (len(dropped["raw_uplinks"]), len(dropped["quarantine"])) == (0, 1)
        assert await _counts(conn) == (2, 1, 2)
        with pytest.raises(ValueError, match="at least 1 day"):
            await drop_expired(conn, Retention(quarantine_days=0))
    finally:
        await conn.close()


async def test_one_process_at_a_time(own_db: str) -> None:
    """While another connection holds the retention lock, a run does nothing (None)."""
    holder, conn = await asyncpg.connect(own_db), await asyncpg.connect(own_db)
    try:
        await _fill(conn)
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock(x'6E626D5F72657431'::bigint)")
            assert await drop_expired(conn, Retention()) is None
        assert await _counts(conn) == (2, 2, 2)
    finally:
        await holder.close()
        await conn.close()


async def test_time_only_indexes_are_gone(pool: asyncpg.Pool) -> None:
    """0041: readings, raw_uplinks and quarantine keep no (time DESC) index of their own,
    on the hypertable or its chunks; the meter index of readings stays (billing reads)."""
    names = {
        r[0]
        for r in await pool.fetch(
            "SELECT indexname FROM pg_indexes WHERE tablename IN"
            " ('readings', 'raw_uplinks', 'quarantine')"
        )
    }
    assert "readings_meter_time" in names
    assert not names & {
        "readings_read_at_idx",
        "raw_uplinks_received_at_idx",
        "quarantine_received_at_idx",
    }
    chunk_time_indexes = await pool.fetchval(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = '_timescaledb_internal'"
        " AND (indexname LIKE '%read_at_idx' OR indexname LIKE '%received_at_idx')"
    )
    assert chunk_time_indexes == 0
