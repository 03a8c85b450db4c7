"""Numbered SQL migrations: `migrations/NNNN_name.sql`, each applied in one transaction.

`migrate(dsn)` applies the files not yet recorded in `schema_migrations`, in number
order, and returns the names it applied (an empty list when the schema is current).
It refuses, with `SchemaError`, a server without the timescaledb extension available,
and a database whose recorded migrations this code does not know (a newer nbmeter).
Concurrent migrators serialise on an advisory lock, so two collectors starting at once
apply each file exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from storage.errors import SchemaError
from storage.pool import translated

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_KEY = 0x6E626D6574657200  # "nbmeter\0": one advisory lock for all migrators


@dataclass(frozen=True)
class Migration:
    """One migration file: its number, file name and SQL text."""

    number: int
    name: str
    sql: str


def available() -> list[Migration]:
    """The migrations shipped with this code, in number order; duplicates are an error."""
    found: dict[int, Migration] = {}
    for entry in resources.files("storage.migrations").iterdir():
        match = _NAME.match(entry.name)
        if not match:
            continue
        number = int(match.group(1))
        if number in found:
            msg = f"two migrations share number {number:04d}: {found[number].name}, {entry.name}"
            raise SchemaError(msg)
        found[number] = Migration(number, entry.name, entry.read_text(encoding="utf-8"))
    return [found[n] for n in sorted(found)]


async def _require_timescaledb(conn: asyncpg.Connection) -> None:
    row = await conn.fetchrow(
        "SELECT default_version, installed_version FROM pg_available_extensions"
        " WHERE name = 'timescaledb'"
    )
    if row is None:
        version = await conn.fetchval("SHOW server_version")
        msg = (
            f"this PostgreSQL server ({version}) has no timescaledb extension: nbmeter stores "
            "readings in TimescaleDB hypertables. Point NBMETER_DATABASE_URL at a TimescaleDB "
            "server, or unset it and run `nbmeter stack up` to start the project's own."
        )
        raise SchemaError(msg)
    preloaded = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
    if "timescaledb" not in preloaded:
        msg = (
            "timescaledb is installed but not preloaded: add shared_preload_libraries = "
            "'timescaledb' to postgresql.conf and restart the server."
        )
        raise SchemaError(msg)


async def migrate(dsn: str, *, before: int | None = None) -> list[str]:
    """Apply pending migrations to the database at `dsn` (only those numbered below
    `before`, if given: a migration's test starts from the schema it meets); return the
    names applied."""
    with translated("connecting to the database to migrate it"):
        conn = await asyncpg.connect(dsn)
    try:
        with translated("migrating the database"):
            await _require_timescaledb(conn)
            await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
            try:
                return await _apply_pending(conn, before)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()


async def _apply_pending(conn: asyncpg.Connection, before: int | None) -> list[str]:
    await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " number integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    done = {r["number"]: r["name"] for r in await conn.fetch("SELECT * FROM schema_migrations")}
    shipped = available()
    unknown = sorted(set(done) - {m.number for m in shipped})
    if unknown:
        msg = (
            f"the database has migrations this nbmeter does not know ({unknown}): "
            "it was migrated by a newer version; upgrade nbmeter"
        )
        raise SchemaError(msg)
    applied: list[str] = []
    for migration in shipped:
        if before is not None and migration.number >= before:
            break
        if migration.number in done:
            continue
        try:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (number, name) VALUES ($1, $2)",
                    migration.number,
                    migration.name,
                )
        except asyncpg.PostgresError as exc:
            msg = f"migration {migration.name} failed and was rolled back: {exc}"
            raise SchemaError(msg) from exc
        applied.append(migration.name)
    return applied


async def current(dsn: str) -> list[str]:
    """Names of the migrations recorded in the database at `dsn` (empty if none)."""
    with translated("reading the applied migrations"):
        conn = await asyncpg.connect(dsn)
        try:
            exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
            if not exists:
                return []
            rows = await conn.fetch("SELECT name FROM schema_migrations ORDER BY number")
            return [r["name"] for r in rows]
        finally:
            await conn.close()
