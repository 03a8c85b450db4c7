"""A first cycle close on sessions set up as the API's (generic plans): the lookup of each
boundary's latest published revision walks the primary key, never a scan of the whole
published table per boundary (which, planned while the table was empty, made a 200k-meter
close take 89 s instead of 7 s)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta

import asyncpg
import pytest
from dbkit import migrated_database, read_s

from billing.boundary import Tuning
from storage import billing

METERS = 300
START, END = date(2026, 1, 1), date(2026, 2, 1)


@pytest.fixture
async def own_db(server_url: str) -> AsyncIterator[str]:
    """A database of its own: published_boundary_reads empty."""
    async with migrated_database(server_url, "nbmeter_publish") as url:
        yield url


async def _scans(conn: asyncpg.Connection) -> tuple[int, int]:
    row = await conn.fetchrow(
        "SELECT seq_scan, coalesce(idx_scan, 0) AS idx_scan FROM pg_stat_user_tables"
        " WHERE relname = 'published_boundary_reads'"
    )
    assert row is not None
    return int(row["seq_scan"]), int(row["idx_scan"])


async def test_first_close_looks_revisions_up_by_key(own_db: str) -> None:
    """Every boundary is published once, by index lookups only, and the table analyzed
    after it; closing again publishes nothing (the lookups find the revisions)."""
    conn = await asyncpg.connect(own_db, server_settings=billing.SESSION_SETTINGS)
    watcher = await asyncpg.connect(own_db)
    try:
        tenant = await conn.fetchval(
            "INSERT INTO tenants (slug, name, timezone) VALUES ('p', 'p', 'UTC')"
            " RETURNING tenant_id"
        )
        await conn.execute(
            "INSERT INTO meters (tenant_id, address, kind, format, installed_at)"
            " SELECT $1, 'm' || g, 'water', 'cjt188', '2025-06-01Z' FROM generate_series(1, $2) g",
            tenant,
            METERS,
        )
        ids = [r[0] for r in await conn.fetch("SELECT meter_id FROM meters ORDER BY 1")]
        days = [START - timedelta(days=1) + timedelta(days=k) for k in range(34)]
        rows = [
            (m, read_s(datetime.combine(d, time(), tzinfo=UTC)), 1_000_000 + 10_000 * k, 0)
            for m in ids
            for k, d in enumerate(days)
        ]
        await conn.copy_records_to_table(
            "readings", records=rows, columns=["meter_id", "read_s", "register_ml", "flags"]
        )
        # statistics of the empty table, as after an operator's ANALYZE or an upgrade
        await conn.execute("ANALYZE published_boundary_reads")
        before = await _scans(watcher)
        q = billing.CycleQuery(tenant, START, END, "UTC", Tuning(timedelta(hours=1)))
        first = await billing.publish_cycle(conn, q, analyze_after=2 * METERS)
        analyzed = await watcher.fetchval(
            "SELECT reltuples FROM pg_class WHERE relname = 'published_boundary_reads'"
        )
        assert analyzed == 2 * METERS  # statistics of what was just published
        again = await billing.publish_cycle(conn, q, analyze_after=2 * METERS)
        assert first == {"boundaries": 2 * METERS, "published": 2 * METERS, "revised": 0}
        assert again == {"boundaries": 2 * METERS, "published": 0, "revised": 0}
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await conn.execute("SELECT 1")  # the flush comes at the end of a transaction
        for _ in range(50):
            seq, idx = await _scans(watcher)
            if idx - before[1] >= 4 * METERS:
                break
            await asyncio.sleep(0.1)
        assert (seq - before[0], idx - before[1] >= 4 * METERS) == (0, True), (before, seq, idx)
    finally:
        await watcher.close()
        await conn.close()
