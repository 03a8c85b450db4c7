"""Compaction of closed readings chunks: their indexes rebuilt packed, once.

Ingest inserts the readings of meters in random order into the open day's chunk, so the
pages of its unique index (meter_id, read_at) split half and half and end about 70 %
full: ~40 B per reading where an index built whole (fillfactor 100, migration 0049) is
28.6 B, and the heap row is 52.3 B. Once a chunk is closed (its day ended more than
`after` ago, so only late readings still arrive), `compact_closed` rebuilds its indexes
with `REINDEX TABLE CONCURRENTLY` (no lock that blocks ingest or billing reads of the
chunk: both go on meanwhile) and records it in `compacted_chunks` (migration 0052), so
each chunk is done once. Late readings into a compacted chunk split pages again only
where they land. bench/cityday.py measures it: 92.6 B per reading as ingested, ~81 B
once compacted.

This is the Apache-2 edition's stand-in for compression; on the licensed edition the
compression policy of migration 0002 does far more, and compressed chunks are skipped.
One process at a time does it (a session-level advisory lock: REINDEX CONCURRENTLY runs
outside any transaction); another one finding it taken does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from storage.pool import Connection, connected, translating

DEFAULT_AFTER = timedelta(days=2)  # a day's chunk fills until the next day's last uplinks
_LOCK = 0x6E626D5F636D7031  # "nbm_cmp1": pg_try_advisory_lock key


@dataclass(frozen=True)
class Compacted:
    """One chunk rebuilt: its name and its index bytes before and after."""

    chunk: str
    index_bytes_before: int
    index_bytes_after: int


_CLOSED = """
SELECT format('%I.%I', c.chunk_schema, c.chunk_name) AS chunk
FROM timescaledb_information.chunks c
WHERE c.hypertable_name = 'readings'  -- chunks of int4 seconds since 2000 (0054)
  AND c.range_end_integer <= nbm_floor_s(now() - $1::interval)
  AND NOT c.is_compressed
  AND NOT EXISTS (
      SELECT 1 FROM compacted_chunks k
      WHERE k.chunk = format('%I.%I', c.chunk_schema, c.chunk_name))
ORDER BY c.range_end_integer
LIMIT $2
"""


@translating("compacting closed readings chunks")
async def compact_closed(
    conn: Connection, *, after: timedelta = DEFAULT_AFTER, limit: int = 7, dry_run: bool = False
) -> list[Compacted] | None:
    """Rebuild the indexes of up to `limit` closed, not yet compacted readings chunks
    (oldest first); with `dry_run` only list them (bytes after = before). None when
    another process holds the compaction lock (it is doing the same).

    `conn` must not be in a transaction (REINDEX CONCURRENTLY cannot run in one)."""
    if after < timedelta(0):
        msg = f"compaction delay must not be negative (got {after})"
        raise ValueError(msg)
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK):
        return None
    try:
        done: list[Compacted] = []
        for row in await conn.fetch(_CLOSED, after, limit):
            chunk = str(row["chunk"])
            before = await _index_bytes(conn, chunk)
            if dry_run:
                done.append(Compacted(chunk, before, before))
                continue
            # the name comes from the catalog, quoted by format(%I.%I)
            await conn.execute(f"REINDEX TABLE CONCURRENTLY {chunk}")
            now = await _index_bytes(conn, chunk)
            await conn.execute(
                "INSERT INTO compacted_chunks (chunk, index_bytes_before, index_bytes_after)"
                " VALUES ($1, $2, $3) ON CONFLICT (chunk) DO NOTHING",
                chunk,
                before,
                now,
            )
            done.append(Compacted(chunk, before, now))
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK)


async def _index_bytes(conn: Connection, chunk: str) -> int:
    return int(await conn.fetchval("SELECT pg_indexes_size($1::regclass)", chunk))


async def compact_closed_at(
    database_url: str, *, after: timedelta = DEFAULT_AFTER, limit: int = 7, dry_run: bool = False
) -> list[Compacted] | None:
    """`compact_closed` on a connection of its own to `database_url` (the command's way)."""
    async with connected(database_url, "compacting closed chunks") as conn:
        return await compact_closed(conn, after=after, limit=limit, dry_run=dry_run)
