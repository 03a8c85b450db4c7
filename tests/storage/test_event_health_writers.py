"""storage.events / storage.health: alarms and modem figures, idempotent binary COPY."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from storage.errors import RowRefusedError
from storage.events import write_events
from storage.health import write_health
from storage.rows import EventRow, HealthRow

NOW = datetime(2026, 1, 31, 12, 0, 0, 250_000, tzinfo=UTC)


async def _meter(pool: asyncpg.Pool, tenant_id: int, address: str) -> int:
    meter_id: int = await pool.fetchval(
        "INSERT INTO meters (tenant_id, address, kind, format) VALUES ($1, $2, 'water', 'cjt188')"
        " RETURNING meter_id",
        tenant_id,
        address,
    )
    return meter_id


async def test_events_replayed_store_nothing_twice(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A replayed batch of alarms inserts nothing; the first write's rows are kept as sent."""
    meter_id = await _meter(pool, tenant_id, "ev1")
    rows = [
        EventRow(meter_id, NOW - timedelta(hours=h), kind, NOW)
        for h in range(3)
        for kind in ("leak", "low_battery")
    ]
    async with pool.acquire() as conn:
        assert await write_events(conn, rows) == 6
        assert await write_events(conn, rows) == 0
        # a batch overlapping the stored one: only the new alarm goes in
        later = EventRow(meter_id, NOW + timedelta(hours=1), "burst", NOW)
        assert await write_events(conn, [rows[0], later]) == 1
    stored = await pool.fetch(
        "SELECT occurred_at, kind, received_at, active FROM meter_events WHERE meter_id = $1"
        " ORDER BY occurred_at, kind",
        meter_id,
    )
    assert len(stored) == 7
    assert all(r["active"] and r["received_at"] == NOW for r in stored)
    assert (stored[-1]["occurred_at"], stored[-1]["kind"]) == (later.occurred_at, "burst")


async def test_event_of_unknown_kind_is_refused(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A kind the table does not list is RowRefusedError, and no row of that call is stored."""
    meter_id = await _meter(pool, tenant_id, "ev2")
    good = EventRow(meter_id, NOW, "leak", NOW)
    bad = EventRow(meter_id, NOW, "flood", NOW)
    async with pool.acquire() as conn:
        with pytest.raises(RowRefusedError, match="meter events"):
            await write_events(conn, [good, bad])
    assert (
        await pool.fetchval("SELECT count(*) FROM meter_events WHERE meter_id = $1", meter_id) == 0
    )


async def test_health_replayed_stores_nothing_twice(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A replayed batch of modem figures inserts nothing; unreported figures stay NULL."""
    meter_id = await _meter(pool, tenant_id, "hl1")
    rows = [
        HealthRow(meter_id, NOW - timedelta(hours=1), 3_600, -10_550, 1_250, 1, NOW),
        HealthRow(meter_id, NOW, None, -9_900, None, None, NOW),
    ]
    async with pool.acquire() as conn:
        assert await write_health(conn, rows) == 2
        assert await write_health(conn, rows) == 0
    stored = await pool.fetch(
        "SELECT measured_at, battery_mv, rsrp_cdbm, sinr_cdb, ecl, received_at"
        " FROM device_health WHERE meter_id = $1 ORDER BY measured_at",
        meter_id,
    )
    assert [tuple(r) for r in stored] == [
        (rows[0].measured_at, 3_600, -10_550, 1_250, 1, NOW),
        (NOW, None, -9_900, None, None, NOW),
    ]


@pytest.mark.parametrize(
    ("battery_mv", "ecl"),
    [(3_600, 3), (2**31, 0)],
    ids=["ecl-outside-0..2", "battery-beyond-int4"],
)
async def test_health_row_the_table_cannot_hold_is_refused(
    pool: asyncpg.Pool, tenant_id: int, battery_mv: int, ecl: int
) -> None:
    """A figure the table refuses (its CHECK, or its integer width) is RowRefusedError."""
    meter_id = await _meter(pool, tenant_id, f"hl-{battery_mv}-{ecl}")
    rows = [
        HealthRow(meter_id, NOW - timedelta(hours=1), 3_600, None, None, 0, NOW),
        HealthRow(meter_id, NOW, battery_mv, None, None, ecl, NOW),
    ]
    async with pool.acquire() as conn:
        with pytest.raises(RowRefusedError, match="device health"):
            await write_health(conn, rows)
        # the connection is still usable after the refused COPY
        assert await write_health(conn, rows[:1]) == 1
    count = await pool.fetchval("SELECT count(*) FROM device_health WHERE meter_id = $1", meter_id)
    assert count == 1


async def test_refused_rows_leave_the_callers_transaction_usable(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """Inside a caller's transaction a refused write rolls back only itself (a savepoint)."""
    meter_id = await _meter(pool, tenant_id, "tx1")
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(RowRefusedError):
            await write_events(conn, [EventRow(meter_id, NOW, "flood", NOW)])
        assert await write_events(conn, [EventRow(meter_id, NOW, "tamper", NOW)]) == 1
        assert await write_health(conn, [HealthRow(meter_id, NOW, 3_000, None, None, 2, NOW)]) == 1
    kinds = await pool.fetch("SELECT kind FROM meter_events WHERE meter_id = $1", meter_id)
    assert [r["kind"] for r in kinds] == ["tamper"]
    ecl = await pool.fetchval("SELECT ecl FROM device_health WHERE meter_id = $1", meter_id)
    assert ecl == 2
