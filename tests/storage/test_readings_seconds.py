"""Migration 0054 on a database that already holds readings: every row carried over to
int4 seconds since 2000 (a fraction of a second dropped, the earlier of two readings in
one second kept), the key rebuilt at 20 B an entry, the time helpers exact at their
edges, and the boundary-read function the same on the new table."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from dbkit import migrated_database, read_s

from storage.migrate import available, migrate

SECONDS = 54
T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
HALF_S = timedelta(milliseconds=500)


@pytest.fixture
async def before_0054(server_url: str) -> AsyncIterator[str]:
    """A scratch database migrated up to, not including, 0054 (dropped afterwards)."""
    async with migrated_database(server_url, "nbmeter_test_seconds", before=SECONDS) as url:
        yield url


async def _meter(conn: asyncpg.Connection) -> int:
    tenant = await conn.fetchval(
        "INSERT INTO tenants (slug, name) VALUES ('s', 's') RETURNING tenant_id"
    )
    return int(
        await conn.fetchval(
            "INSERT INTO meters (tenant_id, address, kind, format, installed_at)"
            " VALUES ($1, 'a', 'water', 'cjt188', $2) RETURNING meter_id",
            tenant,
            T0 - timedelta(days=30),
        )
    )


async def _read_at_one_hour(conn: asyncpg.Connection, meter: int) -> tuple[int, str]:
    """The meter's boundary read at T0 + 1 h: (register, method)."""
    row = await conn.fetchrow(
        "SELECT register_ml, method FROM nbm_boundary_read($1, $2, NULL, $2, $3, NULL,"
        " NULL, NULL, -3, 8, 10000000, interval '5 minutes')",
        meter,
        T0 + HOUR,
        T0 - timedelta(days=30),
    )
    assert row is not None
    return row["register_ml"], row["method"]


async def test_existing_readings_move_to_int4_seconds(before_0054: str) -> None:
    """Rows keep their register, flags and quality; whole seconds stay exact; an entered
    read at .5 s lands on its second; of two within one second the earlier stays; the
    boundary read interpolates as before; the chunk interval is a day in seconds."""
    conn = await asyncpg.connect(before_0054)
    try:
        meter = await _meter(conn)
        old = [  # read_at, register, flags, quality
            (T0, 1_000, 0, None),
            (T0 + 2 * HOUR, 3_000, 8, None),
            (T0 + 3 * HOUR + HALF_S, 4_000, 0, 7),  # entered with a fraction
            (T0 + 4 * HOUR + HALF_S, 5_000, 0, 7),  # two in one second: the earlier stays
            (T0 + 4 * HOUR + HALF_S + timedelta(milliseconds=100), 5_001, 0, 7),
        ]
        await conn.executemany(
            "INSERT INTO readings (meter_id, read_at, register_ml, flags, quality)"
            " VALUES ($1, $2, $3, $4, $5)",
            [(meter, *row) for row in old],
        )
        before = await _read_at_one_hour(conn, meter)
        assert await migrate(before_0054) == [m.name for m in available() if m.number >= SECONDS]
        columns = await conn.fetch(
            "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute"
            " WHERE attrelid = 'readings'::regclass AND attnum > 0 AND NOT attisdropped"
            " ORDER BY attnum"
        )
        assert [(c["attname"], c["type"]) for c in columns] == [
            ("read_s", "integer"),
            ("meter_id", "integer"),
            ("register_ml", "bigint"),
            ("flags", "integer"),
            ("quality", "smallint"),
        ]
        rows = await conn.fetch(
            "SELECT read_s, nbm_at(read_s) AS at, register_ml, flags, quality FROM readings"
            " WHERE meter_id = $1 ORDER BY read_s",
            meter,
        )
        assert [tuple(r) for r in rows] == [
            (read_s(T0), T0, 1_000, 0, None),
            (read_s(T0 + 2 * HOUR), T0 + 2 * HOUR, 3_000, 8, None),
            (read_s(T0 + 3 * HOUR), T0 + 3 * HOUR, 4_000, 0, 7),
            (read_s(T0 + 4 * HOUR), T0 + 4 * HOUR, 5_000, 0, 7),
        ]
        after = await _read_at_one_hour(conn, meter)
        assert after == before == (2_000, "interpolated")
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'readings'"
        )
        assert [i["indexname"] for i in indexes] == ["readings_meter_time"]
        assert "UNIQUE" in indexes[0]["indexdef"]
        assert "(meter_id, read_s DESC)" in indexes[0]["indexdef"]
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO readings (meter_id, read_s, register_ml) VALUES ($1, $2, 5)",
                meter,
                read_s(T0),
            )
        dimension = await conn.fetchrow(
            "SELECT column_name, integer_interval, integer_now_func"
            " FROM timescaledb_information.dimensions WHERE hypertable_name = 'readings'"
        )
        assert tuple(dimension) == ("read_s", 86_400, "nbm_now_s")
    finally:
        await conn.close()


async def test_time_helpers_are_exact_at_their_edges(before_0054: str) -> None:
    """nbm_floor_s / nbm_ceil_s round a fraction down / up, leave a whole second alone,
    clamp what int4 cannot hold (infinity included), keep NULL, and inline; nbm_at
    inverts them."""
    await migrate(before_0054)
    conn = await asyncpg.connect(before_0054)
    try:
        whole, half = T0, T0 + HALF_S
        got = await conn.fetchrow(
            "SELECT nbm_floor_s($1) AS f1, nbm_ceil_s($1) AS c1, nbm_floor_s($2) AS f2,"
            " nbm_ceil_s($2) AS c2, nbm_at(nbm_floor_s($2)) AS back,"
            " nbm_floor_s('infinity') AS inf, nbm_ceil_s('-infinity') AS neg,"
            " nbm_floor_s('2100-01-01Z') AS far, nbm_at(2147483647) AS last,"
            " nbm_at(-2147483648) AS first, nbm_at(0) AS zero",
            whole,
            half,
        )
        s = read_s(T0)
        assert (got["f1"], got["c1"], got["f2"], got["c2"]) == (s, s, s, s + 1)
        assert got["back"] == T0
        assert (got["inf"], got["neg"], got["far"]) == (2**31 - 1, -(2**31), 2**31 - 1)
        assert got["last"] == datetime(2068, 1, 19, 3, 14, 7, tzinfo=UTC)
        assert got["first"] == datetime(1931, 12, 13, 20, 45, 52, tzinfo=UTC)
        assert got["zero"] == datetime(2000, 1, 1, tzinfo=UTC)
        nulls = await conn.fetchrow("SELECT nbm_floor_s(NULL) AS f, nbm_ceil_s(NULL) AS c")
        assert tuple(nulls) == (None, None)
        # they inline: an index condition is an expression, not a function call per rescan
        # (a call made the billing close 2x slower)
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN (VERBOSE) SELECT read_s FROM readings, meters m"
                " WHERE readings.meter_id = m.meter_id AND read_s >= nbm_ceil_s(m.installed_at)"
                " AND read_s <= nbm_floor_s(m.installed_at + interval '1 day')"
            )
        )
        assert "nbm_" not in plan, plan
    finally:
        await conn.close()


async def test_an_index_entry_is_20_bytes(before_0054: str) -> None:
    """The point of 0054: a built readings_meter_time holds ~20.3 B per reading (8 B
    header + int4 + int4, 4 B line pointer, leaves full) where 0049's held ~28.3 B; the
    heap stays at 48 B a tuple (~52.2 B a reading on 8 kB pages)."""
    await migrate(before_0054)
    conn = await asyncpg.connect(before_0054)
    try:
        meter = await _meter(conn)
        await conn.execute(
            "INSERT INTO meters (tenant_id, address, kind, format, installed_at)"
            " SELECT tenant_id, 'm' || g, 'water', 'cjt188', installed_at"
            " FROM meters, generate_series(1, 1999) g WHERE meter_id = $1",
            meter,
        )
        await conn.execute(
            "INSERT INTO readings (meter_id, read_s, register_ml)"
            " SELECT meter_id, $1 + h * 3600, meter_id * 1000 + h FROM meters,"
            " generate_series(0, 23) h",
            read_s(T0),
        )
        chunk = await conn.fetchval(
            "SELECT format('%I.%I', chunk_schema, chunk_name)"
            " FROM timescaledb_information.chunks WHERE hypertable_name = 'readings'"
        )
        await conn.execute(f"REINDEX TABLE {chunk}")
        heap, index = await conn.fetchrow(
            "SELECT table_bytes, index_bytes FROM chunks_detailed_size('readings')"
        )
        n = 2000 * 24
        assert 51 < heap / n < 54, heap / n
        assert 19 < index / n < 22, index / n
    finally:
        await conn.close()
