"""Migration 0049 on a database that already holds readings: every row carried over into
the packed layout, the clock-ahead flag set from the dropped received_at, the key rebuilt.
(Checked on the schema 0049 leaves, before 0054 keys readings by int4 seconds.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from dbkit import migrated_database

from decoder.columns import Flag
from storage.migrate import available, migrate

PACKED = 49
SECONDS = 54  # test_readings_seconds.py
T0 = datetime(2026, 1, 1, tzinfo=UTC)
MIN = timedelta(minutes=1)


@pytest.fixture
async def before_0049(server_url: str) -> AsyncIterator[str]:
    """A scratch database migrated up to, not including, 0049 (dropped afterwards)."""
    async with migrated_database(server_url, "nbmeter_test_packed", before=PACKED) as url:
        yield url


async def test_existing_readings_move_to_the_packed_table(before_0049: str) -> None:
    """Rows keep their key, register, flags and quality; a reading dated more than 5 min
    after its received_at gets Flag.CLOCK_AHEAD (a device's own bit 4096 is cleared); the
    unique key, the chunk interval and the boundary-read function work on the new table."""
    conn = await asyncpg.connect(before_0049)
    try:
        tenant = await conn.fetchval(
            "INSERT INTO tenants (slug, name) VALUES ('p', 'p') RETURNING tenant_id"
        )
        meter = await conn.fetchval(
            "INSERT INTO meters (tenant_id, address, kind, format, installed_at)"
            " VALUES ($1, 'a', 'water', 'cjt188', $2) RETURNING meter_id",
            tenant,
            T0 - timedelta(days=30),
        )
        leak, ahead = int(Flag.LEAK), int(Flag.CLOCK_AHEAD)
        old = [  # read_at, register, flags, transport, received_at, quality
            (T0, 1_000, 0, 2, T0 + 2 * MIN, None),
            (T0 + timedelta(hours=1), 2_000, leak, 2, T0 + 50 * MIN, None),  # 10 min ahead
            (T0 + timedelta(hours=2), 3_000, leak | ahead, 2, T0 + 2 * timedelta(hours=1), None),
            (T0 + timedelta(hours=3), 4_000, 0, 4, T0 + timedelta(days=2), 7),  # entered
        ]
        await conn.executemany(
            "INSERT INTO readings (meter_id, read_at, register_ml, flags, transport,"
            " received_at, quality) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [(meter, *row) for row in old],
        )
        assert await migrate(before_0049, before=SECONDS) == [
            m.name for m in available() if PACKED <= m.number < SECONDS
        ]
        columns = await conn.fetch(
            "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute"
            " WHERE attrelid = 'readings'::regclass AND attnum > 0 AND NOT attisdropped"
            " ORDER BY attnum"
        )
        assert [(c["attname"], c["type"]) for c in columns] == [
            ("read_at", "timestamp with time zone"),
            ("register_ml", "bigint"),
            ("meter_id", "integer"),
            ("flags", "integer"),
            ("quality", "smallint"),
        ]
        rows = await conn.fetch(
            "SELECT read_at, register_ml, flags, quality FROM readings WHERE meter_id = $1"
            " ORDER BY read_at",
            meter,
        )
        assert [tuple(r) for r in rows] == [
            (T0, 1_000, 0, None),
            (T0 + timedelta(hours=1), 2_000, leak | ahead, None),
            (T0 + timedelta(hours=2), 3_000, leak, None),
            (T0 + timedelta(hours=3), 4_000, 0, 7),
        ]
        indexes = await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'readings' ORDER BY 1"
        )
        assert [i["indexname"] for i in indexes] == ["readings_meter_time"]
        options = await conn.fetch(
            "SELECT c.reloptions FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE i.indrelid IN (SELECT format('%I.%I', chunk_schema, chunk_name)::regclass"
            " FROM timescaledb_information.chunks WHERE hypertable_name = 'readings')"
        )
        assert [o["reloptions"] for o in options] == [["fillfactor=100"]]  # one chunk: T0's
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO readings (meter_id, read_at, register_ml) VALUES ($1, $2, 5)",
                meter,
                T0,
            )
        interval = await conn.fetchval(
            "SELECT time_interval FROM timescaledb_information.dimensions"
            " WHERE hypertable_name = 'readings'"
        )
        assert interval == timedelta(days=1)
        # the clock-ahead reading at +1 h is not used: the read at +1 h is interpolated
        read = await conn.fetchrow(
            "SELECT register_ml, method FROM nbm_boundary_read($1, $2, NULL, $2, $3, NULL,"
            " NULL, NULL, -3, 8, 10000000, interval '5 minutes')",
            meter,
            T0 + timedelta(hours=1),
            T0 - timedelta(days=30),
        )
        assert tuple(read) == (2_000, "interpolated")
        with pytest.raises(asyncpg.CheckViolationError, match="meters_meter_id_int4"):
            await conn.execute(
                "INSERT INTO meters (meter_id, tenant_id, address, kind, format)"
                " OVERRIDING SYSTEM VALUE VALUES (2147483648, $1, 'b', 'water', 'cjt188')",
                tenant,
            )
    finally:
        await conn.close()
