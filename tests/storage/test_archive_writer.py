"""storage.archive.ArchiveWriter: raw uplinks and quarantine rows, atomically with readings."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import numpy as np
import pytest

from storage.archive import ArchiveWriter
from storage.errors import StorageError
from storage.ingest import ReadingWriter
from storage.rows import QuarantineRow, RawUplink, ReadingBatch

NOW = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)


async def test_archive_commits_with_the_readings(pool: asyncpg.Pool, tenant_id: int) -> None:
    """Readings, raw uplink and quarantine rows written in one transaction all commit."""
    meter_id = await pool.fetchval(
        "INSERT INTO meters (tenant_id, address, kind, format) VALUES ($1, 'a1', 'water', 'cjt188')"
        " RETURNING meter_id",
        tenant_id,
    )
    batch = ReadingBatch(
        meter_id=np.array([meter_id], np.int64),
        read_at_s=np.array([int(NOW.timestamp()) - 60], np.int64),
        register_ml=np.array([1_000], np.int64),
        flags=np.zeros(1, np.uint32),
        received_at_us=int(NOW.timestamp()) * 1_000_000,
    )
    payload = b"\x68\x10\x00\x16"
    async with pool.acquire() as conn, conn.transaction():
        result = await ReadingWriter(pool).write(batch, conn=conn)
        uplink = RawUplink(
            NOW,
            tenant_id,
            meter_id,
            3,
            "10.0.0.1:5683",
            payload,
            "cjt188",
            "stored",
            n_readings=1,
            n_new=result.new,
            decode_flags=4 | 2,  # FrameFlag TRAILING_JUNK | NO_DATA, archived as they are
        )
        bad = QuarantineRow(NOW, tenant_id, None, 3, "10.0.0.2", "undecodable", "bad CS", b"\x00")
        assert await ArchiveWriter(pool).write_uplinks([uplink], conn=conn) == 1
        assert await ArchiveWriter(pool).write_quarantine([bad], conn=conn) == 1
    row = await pool.fetchrow(
        "SELECT payload, outcome, n_new, decode_flags FROM raw_uplinks WHERE meter_id = $1",
        meter_id,
    )
    assert (row["payload"], row["outcome"], row["n_new"]) == (payload, "stored", 1)
    assert row["decode_flags"] == 6
    reason = await pool.fetchval(
        "SELECT reason FROM quarantine WHERE tenant_id = $1 AND peer = '10.0.0.2'", tenant_id
    )
    assert reason == "undecodable"


async def test_bad_archive_row_is_a_storage_error(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A row the schema refuses (unknown outcome) raises StorageError, not asyncpg's error."""
    row = RawUplink(NOW, tenant_id, None, 1, None, b"x", None, "lost")  # type: ignore[arg-type]
    with pytest.raises(StorageError, match="raw_uplinks"):
        await ArchiveWriter(pool).write_uplinks([row])


async def test_text_postgresql_cannot_hold_is_escaped(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A raw uplink whose peer, format or error message holds a NUL or an unpaired
    surrogate is archived with them escaped (`pg_text`); beside it, a plain row as is."""
    odd = RawUplink(NOW, tenant_id, None, 1, "p\x00eer", b"\x01", "fmt\udc80", "quarantined",
                    error_message="bad \ud800 text é")  # fmt: skip
    plain = RawUplink(NOW, tenant_id, None, 1, "10.0.0.9:1", b"\x02", None, "stored")
    assert await ArchiveWriter(pool).write_uplinks([odd, plain]) == 2
    rows = await pool.fetch(
        "SELECT peer, format, error_message FROM raw_uplinks WHERE tenant_id = $1"
        " AND payload IN ('\\x01'::bytea, '\\x02'::bytea) ORDER BY payload",
        tenant_id,
    )
    assert [tuple(r) for r in rows] == [
        ("p\\x00eer", "fmt\\udc80", "bad \\ud800 text é"),
        ("10.0.0.9:1", None, None),
    ]


async def test_one_batch_keeps_each_meters_newest_uplink(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """Migration 0057: a batch COPYed in one statement sets each meter's last uplink to
    its newest in the batch (a meter twice: the later time, whatever the row order), never
    moves one backwards, and passes over uplinks of no meter."""
    ids = [
        await pool.fetchval(
            "INSERT INTO meters (tenant_id, address, kind, format)"
            " VALUES ($1, $2, 'water', 'cjt188') RETURNING meter_id",
            tenant_id,
            f"seen-{n}-{tenant_id}",
        )
        for n in range(3)
    ]
    twice, ahead, fresh = ids
    later = NOW.replace(hour=13)
    await pool.execute(
        "INSERT INTO meter_last_seen (meter_id, last_uplink_at) VALUES ($1, $2)", ahead, later
    )
    rows = [
        RawUplink(later, tenant_id, twice, 1, None, b"\x01", None, "stored"),
        RawUplink(NOW, tenant_id, twice, 1, None, b"\x02", None, "duplicate"),
        RawUplink(NOW, tenant_id, ahead, 1, None, b"\x03", None, "stored"),
        RawUplink(NOW, tenant_id, fresh, 1, None, b"\x04", None, "quarantined"),
        RawUplink(NOW, tenant_id, None, 1, None, b"\x05", None, "quarantined"),
    ]
    assert await ArchiveWriter(pool).write_uplinks(rows) == len(rows)
    seen = dict(
        await pool.fetch(
            "SELECT meter_id, last_uplink_at FROM meter_last_seen WHERE meter_id = ANY($1)", ids
        )
    )
    assert seen == {twice: later, ahead: later, fresh: NOW}
