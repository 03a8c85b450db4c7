"""The raw uplink archive and the quarantine: append-only rows, written with binary COPY.

The collector archives every uplink it accepted (`raw_uplinks`) and every one it could
not use (`quarantine`), normally on the connection and inside the transaction that
wrote the uplink's readings, so that the archive and the readings commit together:

    async with pool.acquire() as conn, conn.transaction():
        result = await readings.write(batch, conn=conn)
        await archive.write_uplinks(uplinks, conn=conn)

These tables have no unique key (an uplink received twice is two receptions), so the
rows are simply appended. Their text columns (peer, format, messages, reason, detail)
often quote what a device sent: they pass through `pg_text` first, because PostgreSQL
text refuses NUL and asyncpg cannot encode an unpaired surrogate, and one such address
must not fail a batch. Errors: StorageUnavailableError (retry), SchemaError,
StorageError, via `storage.pool.translated`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

import asyncpg

from storage.pool import translated, translating
from storage.rows import QuarantineRow, RawUplink, pg_text


def _storable(value: object) -> object:
    return pg_text(value) if isinstance(value, str) else value


def _uplink_record(row: RawUplink) -> tuple[object, ...]:
    """`row` as its COPY record: itself (a tuple in column order) unless a text column
    needs `pg_text` (one check of their concatenation: ASCII without NUL is the rule)."""
    text = "".join(filter(None, (row.peer, row.format, row.outcome, row.error_message)))
    if text.isascii() and "\x00" not in text:
        return row
    return tuple(_storable(value) for value in row)


_UPLINK_COLUMNS = RawUplink._fields
_QUARANTINE_COLUMNS = tuple(f.name for f in fields(QuarantineRow))


class ArchiveWriter:
    """Appends RawUplink and QuarantineRow rows; one per process, safe to share between tasks."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        """Write through `pool` when no connection is passed."""
        self._pool = pool

    async def write_uplinks(
        self, rows: Sequence[RawUplink], conn: asyncpg.Connection | None = None
    ) -> int:
        """Append `rows` to raw_uplinks (on `conn` if given); return how many were written."""
        records = [_uplink_record(row) for row in rows]
        return await self._copy("raw_uplinks", _UPLINK_COLUMNS, records, conn)

    async def write_quarantine(
        self, rows: Sequence[QuarantineRow], conn: asyncpg.Connection | None = None
    ) -> int:
        """Append `rows` to quarantine (on `conn` if given); return how many were written."""
        columns = _QUARANTINE_COLUMNS
        records = [tuple(_storable(getattr(row, c)) for c in columns) for row in rows]
        return await self._copy("quarantine", columns, records, conn)

    async def _copy(
        self,
        table: str,
        columns: tuple[str, ...],
        records: list[tuple[object, ...]],
        conn: asyncpg.Connection | None,
    ) -> int:
        if not records:
            return 0
        # variable-width bytea/text columns: asyncpg's record encoder is the right tool
        # here (archive rows are per uplink, a small fraction of the reading volume)
        with translated(f"archiving to {table}"):
            if conn is None:
                async with self._pool.acquire() as pooled:
                    await pooled.copy_records_to_table(table, records=records, columns=columns)
            else:
                await conn.copy_records_to_table(table, records=records, columns=columns)
        return len(records)


@translating("reading a meter's recent uplinks")
async def recent_uplinks(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int, meter_id: int, limit: int
) -> list[asyncpg.Record]:
    """The meter's last `limit` archived uplinks, newest first (raw_uplinks_meter index)."""
    return await conn.fetch(
        "SELECT uplink_id, received_at, transport, format, outcome, n_readings, n_new,"
        " error_code, error_message, decode_flags, payload FROM raw_uplinks"
        " WHERE meter_id = $1 AND tenant_id = $2 ORDER BY received_at DESC, uplink_id DESC"
        " LIMIT $3",
        meter_id,
        tenant_id,
        limit,
    )
