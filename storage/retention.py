"""Retention of the raw archive and the quarantine: drop whole chunks past their age.

`drop_expired(conn, retention)` drops the chunks of `raw_uplinks` and `quarantine` whose
every row is older than the retention (TimescaleDB `drop_chunks`, which the Apache-2
edition has too: the licensed edition's retention policies of migration 0002 do the same
there, and both may run). Defaults: 400 days for both, one annual billing cycle plus a
month for disputes and the regulator's re-read window, after which the decoded readings
are the record. Readings are billing records and are never dropped.

Retention is per table, not per tenant: a chunk holds every tenant's rows, and dropping
chunks (not deleting rows) is what keeps it cheap at city scale. One process at a time
does it (a transaction-scoped advisory lock); another one finding it taken does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.pool import Connection, connected, translating

DEFAULT_DAYS = 400
_LOCK = 0x6E626D5F72657431  # "nbm_ret1": pg_try_advisory_xact_lock key


@dataclass(frozen=True)
class Retention:
    """How many days each table keeps (at least 1)."""

    raw_uplinks_days: int = DEFAULT_DAYS
    quarantine_days: int = DEFAULT_DAYS

    def tables(self) -> tuple[tuple[str, int], ...]:
        """(table, days) pairs, validated."""
        pairs = (("raw_uplinks", self.raw_uplinks_days), ("quarantine", self.quarantine_days))
        for table, days in pairs:
            if days < 1:
                msg = f"retention of {table} must be at least 1 day (got {days})"
                raise ValueError(msg)
        return pairs


@translating("dropping expired chunks")
async def drop_expired(
    conn: Connection, retention: Retention, *, dry_run: bool = False
) -> dict[str, list[str]] | None:
    """Drop (or, with `dry_run`, list) the expired chunks: {table: [chunk names]}.

    None when another process holds the retention lock (it is doing the same)."""
    tables = retention.tables()
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK):
            return None
        fn = "show_chunks" if dry_run else "drop_chunks"
        return {
            table: [
                str(r[0])
                for r in await conn.fetch(
                    f"SELECT {fn}($1::regclass, older_than => now() - make_interval(days => $2))",
                    table,
                    days,
                )
            ]
            for table, days in tables
        }


async def drop_expired_at(
    database_url: str, retention: Retention, *, dry_run: bool = False
) -> dict[str, list[str]] | None:
    """`drop_expired` on a connection of its own to `database_url` (the command's way)."""
    async with connected(database_url, "dropping expired chunks") as conn:
        return await drop_expired(conn, retention, dry_run=dry_run)
