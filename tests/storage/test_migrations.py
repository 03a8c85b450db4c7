"""Migrations on the real server: idempotent, TimescaleDB really there, 0002 license-aware."""

from __future__ import annotations

import asyncpg
import pytest

from storage.errors import SchemaError
from storage.migrate import available, migrate

# a plain PostgreSQL without timescaledb, present on some development machines only
PLAIN_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
HYPERTABLES = {"readings", "raw_uplinks", "quarantine", "meter_events", "device_health"}


async def test_second_migrate_applies_nothing(db_url: str, pool: asyncpg.Pool) -> None:
    """Migrating a current database applies nothing; every shipped migration is recorded once."""
    assert await migrate(db_url) == []
    recorded = await pool.fetch("SELECT number, name FROM schema_migrations ORDER BY number")
    assert [(r["number"], r["name"]) for r in recorded] == [(m.number, m.name) for m in available()]


async def test_tables_are_hypertables_on_a_loaded_extension(pool: asyncpg.Pool) -> None:
    """timescaledb is preloaded and installed, and every time-series table is a hypertable."""
    assert "timescaledb" in await pool.fetchval(
        "SELECT current_setting('shared_preload_libraries')"
    )
    assert await pool.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
    names = {
        r["hypertable_name"]
        for r in await pool.fetch("SELECT hypertable_name FROM timescaledb_information.hypertables")
    }
    assert names >= HYPERTABLES


async def test_compression_follows_the_license(pool: asyncpg.Pool) -> None:
    """0002 compresses readings by meter only under the Timescale license; Apache: nothing."""
    license_ = await pool.fetchval("SELECT current_setting('timescaledb.license')")
    rows = await pool.fetch(
        "SELECT hypertable_name, attname, segmentby_column_index, orderby_column_index"
        " FROM timescaledb_information.compression_settings"
        " WHERE hypertable_name IN ('readings', 'raw_uplinks')"
    )
    jobs = await pool.fetch(
        "SELECT hypertable_name, proc_name FROM timescaledb_information.jobs"
        " WHERE hypertable_name IS NOT NULL ORDER BY 1, 2"
    )
    if license_ == "timescale":
        readings = {(r["attname"], r["segmentby_column_index"]) for r in rows}
        assert ("meter_id", 1) in readings
        assert {(j["hypertable_name"], j["proc_name"]) for j in jobs} >= {
            ("readings", "policy_compression"),
            ("raw_uplinks", "policy_compression"),
            ("raw_uplinks", "policy_retention"),
            ("quarantine", "policy_retention"),
        }
    else:
        assert rows == []
        assert jobs == []


async def test_notice_says_what_apache_skipped(db_url: str, pool: asyncpg.Pool) -> None:
    """Run on the Apache edition, 0002's DO block raises a NOTICE naming what it skipped."""
    license_ = await pool.fetchval("SELECT current_setting('timescaledb.license')")
    if license_ == "timescale":
        pytest.skip("this server has the Timescale license: 0002 applies its policies")
    sql = next(m.sql for m in available() if m.number == 2)
    notices: list[str] = []
    # a connection of its own: a pool refuses back a connection with a log listener
    conn = await asyncpg.connect(db_url)
    try:
        conn.add_log_listener(lambda _conn, message: notices.append(str(message)))
        await conn.execute(sql)  # on Apache it changes nothing, so re-running it is harmless
        await conn.execute("SELECT 1")  # listeners are called from the loop: let them run
    finally:
        await conn.close()
    assert any("skipped compression" in n and "retention" in n for n in notices), notices


async def test_refuses_a_server_without_timescaledb() -> None:
    """migrate() against a plain PostgreSQL without timescaledb raises SchemaError."""
    try:
        conn = await asyncpg.connect(PLAIN_POSTGRES, timeout=3)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"no plain PostgreSQL at {PLAIN_POSTGRES} ({exc}): a dev-machine-only check")
    try:
        has_ts = await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
    finally:
        await conn.close()
    if has_ts:
        pytest.skip(f"{PLAIN_POSTGRES} has timescaledb available")
    with pytest.raises(SchemaError, match="no timescaledb extension"):
        await migrate(PLAIN_POSTGRES)
