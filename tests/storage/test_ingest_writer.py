"""storage.ingest.ReadingWriter against the real TimescaleDB: idempotent, exact, race-free."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import numpy as np
import pytest

from decoder.columns import Decoded, Flag
from storage.ingest import MERGE_RUN_BATCHES, ReadingWriter
from storage.meters import MeterDirectory
from storage.rows import FUTURE_TOLERANCE_S, ReadingBatch, RejectReason

T0_S = 1_767_225_600  # 2026-01-01T00:00:00Z
RECEIVED_US = (T0_S + 30 * 86_400) * 1_000_000


async def make_meters(pool: asyncpg.Pool, tenant_id: int, n: int) -> np.ndarray:
    """Create `n` water meters for the tenant and return their ids."""
    rows = await pool.fetch(
        "INSERT INTO meters (tenant_id, address, kind, format)"
        " SELECT $1, 'm' || g, 'water', 'cjt188' FROM generate_series(1, $2) g"
        " RETURNING meter_id",
        tenant_id,
        n,
    )
    return np.array([r["meter_id"] for r in rows], np.int64)


def hourly(meter_ids: np.ndarray, hours: range) -> ReadingBatch:
    """One reading per meter per hour in `hours`, register = a distinct value per row."""
    mid = np.tile(meter_ids, len(hours))
    read_at = np.repeat(np.array([T0_S + h * 3600 for h in hours], np.int64), len(meter_ids))
    return ReadingBatch(
        meter_id=mid,
        read_at_s=read_at,
        register_ml=mid * 1_000_000 + (read_at - T0_S),
        flags=np.zeros(len(mid), np.uint32),
        received_at_us=RECEIVED_US,
    )


def subset(batch: ReadingBatch, rows: np.ndarray) -> ReadingBatch:
    """The rows `rows` of `batch` (scalars stay scalars)."""
    return ReadingBatch(
        meter_id=batch.meter_id[rows],
        read_at_s=batch.read_at_s[rows],
        register_ml=batch.register_ml[rows],
        flags=batch.flags[rows],
        received_at_us=batch.received_at_us,
    )


async def stored(pool: asyncpg.Pool, meter_ids: np.ndarray) -> int:
    """How many readings the database holds for these meters."""
    count: int = await pool.fetchval(
        "SELECT count(*) FROM readings WHERE meter_id = ANY($1::bigint[])", meter_ids.tolist()
    )
    return count


async def test_fresh_batch_is_copied_with_every_value(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A fresh batch takes the copy path; every row is new and stored with its exact values."""
    meters = await make_meters(pool, tenant_id, 3)
    batch = ReadingBatch(
        meter_id=meters[[2, 0, 1]],
        read_at_s=np.array([T0_S + 1, T0_S, T0_S + 2], np.int64),
        register_ml=np.array([123_456_789_012, 0, 7], np.int64),
        flags=np.array([0, 1 << 3, (1 << 31) | 1], np.uint32),
        received_at_us=np.array([RECEIVED_US, RECEIVED_US + 1, RECEIVED_US + 999_999], np.int64),
    )
    result = await ReadingWriter(pool).write(batch)
    assert (result.rows, result.new, result.duplicate, result.rejected) == (3, 3, 0, ())
    assert result.path == "copy"
    assert result.new_mask.tolist() == [True, True, True]
    rows = await pool.fetch(
        "SELECT meter_id, nbm_at(read_s) AS read_at, register_ml, flags, quality FROM readings"
        " WHERE meter_id = ANY($1::bigint[]) ORDER BY read_s",
        meters.tolist(),
    )
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    got = [
        (
            r["meter_id"],
            int((r["read_at"] - epoch).total_seconds()),
            r["register_ml"],
            r["flags"],
            r["quality"],
        )
        for r in rows
    ]
    assert got == [
        (meters[0], T0_S, 0, 8, None),
        (meters[2], T0_S + 1, 123_456_789_012, 0, None),
        # uint32 bit 31 is stored as the integer with the same bits
        (meters[1], T0_S + 2, 7, -(1 << 31) + 1, None),
    ]
    # the row is the packed one of 0054: no per-uplink columns, the time as int4 seconds
    columns = await pool.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'readings'::regclass"
        " AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    )
    assert [c["attname"] for c in columns] == [
        "read_s",
        "meter_id",
        "register_ml",
        "flags",
        "quality",
    ]


async def test_clock_ahead_is_flagged_by_the_receive_time(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """A reading dated more than FUTURE_TOLERANCE_S after its receipt is stored flagged
    CLOCK_AHEAD (billing leaves it out); within it, not; a device cannot set or clear it."""
    meters = await make_meters(pool, tenant_id, 4)
    received_s = RECEIVED_US // 1_000_000
    ahead, device_bits = int(Flag.CLOCK_AHEAD), int(Flag.LEAK | Flag.CLOCK_AHEAD)
    late = [FUTURE_TOLERANCE_S, FUTURE_TOLERANCE_S + 1, 3600, -60]  # s after the receipt
    batch = ReadingBatch(
        meter_id=meters,
        read_at_s=received_s + np.array(late, np.int64),
        register_ml=np.array([1, 2, 3, 4], np.int64),
        flags=np.array([0, 0, Flag.LEAK, device_bits], np.uint32),
        received_at_us=RECEIVED_US,
    )
    result = await ReadingWriter(pool).write(batch)
    assert (result.new, result.rejected) == (4, ())
    rows = await pool.fetch(
        "SELECT register_ml, flags FROM readings WHERE meter_id = ANY($1::bigint[])"
        " ORDER BY register_ml",
        meters.tolist(),
    )
    assert [(r["register_ml"], r["flags"]) for r in rows] == [
        (1, 0),
        (2, ahead),
        (3, int(Flag.LEAK) | ahead),
        (4, int(Flag.LEAK)),  # the device's own CLOCK_AHEAD bit is not ours: cleared
    ]


async def test_replayed_batch_inserts_nothing(pool: asyncpg.Pool, tenant_id: int) -> None:
    """Writing the same batch again inserts 0 rows and reports every row as a duplicate."""
    meters = await make_meters(pool, tenant_id, 50)
    batch = hourly(meters, range(4))
    writer = ReadingWriter(pool)
    first = await writer.write(batch)
    again = await writer.write(batch)
    assert (first.new, first.duplicate) == (200, 0)
    assert (again.new, again.duplicate, again.rejected) == (0, 200, ())
    assert not again.new_mask.any()
    assert await stored(pool, meters) == 200


async def test_partial_overlap_counts_exactly(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A batch half already stored reports exact new/duplicate counts and which rows were new."""
    meters = await make_meters(pool, tenant_id, 40)
    writer = ReadingWriter(pool)
    await writer.write(hourly(meters, range(3)))
    overlap = hourly(meters, range(2, 6))  # hour 2 stored, hours 3..5 new
    result = await writer.write(overlap)
    assert (result.new, result.duplicate) == (120, 40)
    assert result.path == "merge"
    np.testing.assert_array_equal(result.new_mask, overlap.read_at_s > T0_S + 2 * 3600)
    assert await stored(pool, meters) == 240


async def test_unknown_meter_does_not_sink_the_batch(pool: asyncpg.Pool, tenant_id: int) -> None:
    """Rows for unknown meter ids are rejected by index; the rest of the batch is written."""
    meters = await make_meters(pool, tenant_id, 5)
    batch = hourly(meters, range(2))
    ghost = int(await pool.fetchval("SELECT max(meter_id) FROM meters")) + 1_000_000
    mid = batch.meter_id.copy()
    mid[[1, 7]] = [ghost, -1]  # -1: an address MeterDirectory could not resolve
    bad = ReadingBatch(mid, batch.read_at_s, batch.register_ml, batch.flags, RECEIVED_US)
    result = await ReadingWriter(pool).write(bad)
    assert (result.new, result.duplicate) == (8, 0)
    assert [(r.index, r.reason) for r in result.rejected] == [
        (1, RejectReason.UNKNOWN_METER),
        (7, RejectReason.UNKNOWN_METER),
    ]
    assert result.rejected_by_reason() == {"unknown_meter": 2}
    assert await stored(pool, meters) == 8


async def test_absurd_values_are_rejected(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A negative register, a reset clock and a clock days ahead are rejected with reasons."""
    meters = await make_meters(pool, tenant_id, 4)
    received_s = RECEIVED_US // 1_000_000
    batch = ReadingBatch(
        meter_id=meters,
        read_at_s=np.array([T0_S, T0_S, 946_684_800, received_s + 3 * 86_400], np.int64),
        register_ml=np.array([5, -1, 5, 5], np.int64),
        flags=np.zeros(4, np.uint32),
        received_at_us=RECEIVED_US,
    )
    result = await ReadingWriter(pool).write(batch)
    assert result.new == 1
    assert [(r.index, r.reason.label) for r in result.rejected] == [
        (1, "negative_register"),
        (2, "clock_past"),
        (3, "clock_future"),
    ]
    assert result.new_mask.tolist() == [True, False, False, False]


async def test_readings_before_installation_are_rejected(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """Readings dated before the meter's installation are rejected, the rest written; a
    writer that cached the old date accepts them once the installation is moved earlier."""
    meters = await make_meters(pool, tenant_id, 2)
    installed = datetime.fromtimestamp(T0_S + 10 * 3600, UTC)
    await pool.execute(
        "UPDATE meters SET installed_at = $1 WHERE meter_id = $2", installed, meters[0]
    )
    writer = ReadingWriter(pool)
    result = await writer.write(hourly(meters, range(8, 12)))
    # rows alternate meters[0], meters[1] by hour: hours 8 and 9 of meters[0] are early
    assert [(r.index, r.reason.label) for r in result.rejected] == [
        (0, "before_installation"),
        (2, "before_installation"),
    ]
    assert result.new == 6
    await pool.execute(
        "UPDATE meters SET installed_at = $1 WHERE meter_id = $2",
        installed - timedelta(hours=2),
        meters[0],
    )
    again = await writer.write(hourly(meters[:1], range(7, 10)))
    assert [(r.index, r.reason.label) for r in again.rejected] == [(0, "before_installation")]
    assert again.new == 2


async def test_repeat_within_a_batch_keeps_the_first(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A key twice in one batch is stored once (first row wins) and counted as a duplicate."""
    meters = await make_meters(pool, tenant_id, 2)
    batch = ReadingBatch(
        meter_id=meters[[0, 1, 0]],
        read_at_s=np.full(3, T0_S, np.int64),
        register_ml=np.array([10, 20, 30], np.int64),
        flags=np.zeros(3, np.uint32),
        received_at_us=RECEIVED_US,
    )
    result = await ReadingWriter(pool).write(batch)
    assert (result.new, result.duplicate) == (2, 1)
    assert result.new_mask.tolist() == [True, True, False]
    value = await pool.fetchval("SELECT register_ml FROM readings WHERE meter_id = $1", meters[0])
    assert value == 10


async def test_concurrent_overlapping_writers(pool: asyncpg.Pool, tenant_id: int) -> None:
    """Four writers racing on overlapping batches: no error, no duplicate, exact new sum."""
    meters = await make_meters(pool, tenant_id, 2_000)
    rng = np.random.default_rng(7)
    # task k writes hours [k, k+6) in its own shuffled row order: heavy overlap, and each
    # task has its own writer (as separate collector processes would) so all try COPY
    batches = []
    for k in range(4):
        batch = hourly(meters, range(k, k + 6))
        batches.append(subset(batch, rng.permutation(len(batch))))
    results = await asyncio.gather(*(ReadingWriter(pool).write(b) for b in batches))
    distinct = 2_000 * 9  # hours 0..8
    assert sum(r.new for r in results) == distinct
    assert all(r.new + r.duplicate == r.rows and not r.rejected for r in results)
    assert await stored(pool, meters) == distinct
    dupes = await pool.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM readings WHERE meter_id = ANY($1::bigint[])"
        " GROUP BY meter_id, read_s HAVING count(*) > 1) d",
        meters.tolist(),
    )
    assert dupes == 0


async def test_write_joins_the_callers_transaction(pool: asyncpg.Pool, tenant_id: int) -> None:
    """On a caller's connection the rows commit or roll back with the caller's transaction."""
    meters = await make_meters(pool, tenant_id, 10)
    writer = ReadingWriter(pool)
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        assert (await writer.write(hourly(meters, range(2)), conn=conn)).new == 20
        await tx.rollback()  # the caller gives up: its readings go with it
        assert await stored(pool, meters) == 0
        async with conn.transaction():
            first = await writer.write(hourly(meters, range(2)), conn=conn)
            # a duplicate inside the caller's transaction falls back without aborting it
            second = await writer.write(hourly(meters, range(1, 3)), conn=conn)
            await conn.execute("SELECT 1")
    assert (first.new, second.new, second.duplicate) == (20, 10, 10)
    assert await stored(pool, meters) == 30


def test_mismatched_columns_are_a_programming_error() -> None:
    """ReadingBatch refuses array columns of different lengths with ValueError."""
    with pytest.raises(ValueError, match="read_at_s"):
        ReadingBatch(
            meter_id=np.zeros(3, np.int64),
            read_at_s=np.zeros(2, np.int64),
            register_ml=np.zeros(3, np.int64),
            flags=np.zeros(3, np.uint32),
            received_at_us=0,
        )


async def test_writer_returns_to_copy_after_a_run_of_merges(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """After a COPY meets a stored key, MERGE_RUN_BATCHES batches merge, then COPY is tried."""
    meters = await make_meters(pool, tenant_id, 10)
    writer = ReadingWriter(pool)
    assert (await writer.write(hourly(meters, range(1)))).path == "copy"
    assert (await writer.write(hourly(meters, range(1)))).path == "merge"
    paths = [(await writer.write(hourly(meters, range(h, h + 1)))).path for h in range(1, 11)]
    assert paths == ["merge"] * MERGE_RUN_BATCHES + ["copy"] * (10 - MERGE_RUN_BATCHES)
    assert await stored(pool, meters) == 110


async def test_copy_first_off_always_merges(pool: asyncpg.Pool, tenant_id: int) -> None:
    """With copy_first=False even fresh data takes the merge path, with the same counts."""
    meters = await make_meters(pool, tenant_id, 10)
    result = await ReadingWriter(pool, copy_first=False).write(hourly(meters, range(3)))
    assert (result.path, result.new, result.duplicate) == ("merge", 30, 0)
    assert result.new_mask.all()


async def test_empty_batch_writes_nothing(pool: asyncpg.Pool) -> None:
    """An empty batch returns zero counts and takes no write path."""
    empty = np.zeros(0, np.int64)
    batch = ReadingBatch(empty, empty, empty, np.zeros(0, np.uint32), RECEIVED_US)
    result = await ReadingWriter(pool).write(batch)
    assert (result.rows, result.new, result.duplicate, result.path) == (0, 0, 0, "none")


async def test_many_small_chunks_round_trip(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A COPY stream split into many chunks stores every row, on both paths."""
    meters = await make_meters(pool, tenant_id, 13)
    writer = ReadingWriter(pool, chunk_rows=7)
    first = await writer.write(hourly(meters, range(4)))
    second = await writer.write(hourly(meters, range(3, 8)))
    assert (first.path, first.new, second.path, second.new, second.duplicate) == (
        "copy",
        52,
        "merge",
        52,
        13,
    )
    total = await pool.fetchval(
        "SELECT sum(register_ml) FROM readings WHERE meter_id = ANY($1::bigint[])",
        meters.tolist(),
    )
    expected = sum(
        int(b.register_ml.sum()) for b in (hourly(meters, range(4)), hourly(meters, range(4, 8)))
    )
    assert total == expected


async def test_from_decoded_resolved_addresses(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A decoder result plus MeterDirectory ids becomes a batch; unresolved rows are rejected."""
    meters = await make_meters(pool, tenant_id, 2)
    decoded = Decoded(
        frame_index=np.array([0, 1, 2], np.int32),
        address=np.array(["m1", "m2", "zz"], object),
        read_at_s=np.full(3, T0_S, np.int64),
        register_ml=np.array([1, 2, 3], np.int64),
        flags=np.zeros(3, np.uint32),
        format=np.array(["cjt188"] * 3, object),
        address_of_frame=np.array(["m1", "m2", "zz"], object),
        error_code=np.zeros(3, np.uint16),
        error_message=np.array([""] * 3, object),
    )
    ids = await MeterDirectory(pool).resolve(tenant_id, decoded.address)
    batch = ReadingBatch.from_decoded(decoded, ids, received_at_us=RECEIVED_US)
    result = await ReadingWriter(pool).write(batch)
    assert ids[:2].tolist() == meters.tolist()
    assert (result.new, [(r.index, r.reason.label) for r in result.rejected]) == (
        2,
        [(2, "unknown_meter")],
    )


async def test_learned_meters_need_no_lookup(pool: asyncpg.Pool, tenant_id: int) -> None:
    """Meters the caller's own lookup read (`learn`, as the OSCORE context's does) are
    written without the writer's meters query; a reading before the learned installation
    still asks the database before it is refused (the learned time may be stale)."""
    meters = await make_meters(pool, tenant_id, 3)
    installed = datetime.fromtimestamp(T0_S + 2 * 3600, UTC)
    await pool.execute(
        "UPDATE meters SET installed_at = $1 WHERE meter_id = $2", installed, meters[0]
    )
    writer = ReadingWriter(pool)
    writer.learn(meters.tolist(), [int(installed.timestamp()), 0, 0])
    asked: list[str] = []
    async with pool.acquire() as conn:
        conn.add_query_logger(lambda record: asked.append(record.query))
        result = await writer.write(hourly(meters, range(2, 4)), conn=conn)
        assert (result.new, result.rejected) == (6, ())
        assert not [q for q in asked if "FROM meters" in q]
        early = await writer.write(hourly(meters[:1], range(1, 2)), conn=conn)
    assert [r.reason.label for r in early.rejected] == ["before_installation"]
    assert len([q for q in asked if "FROM meters" in q]) == 1
    assert await stored(pool, meters) == 6
