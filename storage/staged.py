"""Idempotent appends to a keyed table: binary COPY into a stage, then ON CONFLICT DO NOTHING.

`merge_records(conn, table, columns, records, key, doing)` COPYs `records` (asyncpg's
binary record encoder) into a per-connection temporary table shaped like `table`, then
moves them with one `INSERT ... SELECT ... ORDER BY key ON CONFLICT DO NOTHING`, so a row
whose key is already stored (a replayed uplink) is skipped, never an error, and racing
writers take the key's locks in one order (no deadlock). It runs in a transaction of its
own, or in a savepoint of the caller's. The stage is emptied by the same statement that
reads it, and created only when a COPY finds it missing (once per connection: one round
trip less per call). Errors: storage errors via `storage.pool.translated` (`doing` names
the task); a value asyncpg cannot encode for its column is RowRefusedError too.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from storage.errors import RowRefusedError
from storage.pool import translated


async def merge_records(
    conn: asyncpg.Connection,
    table: str,
    columns: Sequence[str],
    records: Sequence[tuple[object, ...]],
    key: Sequence[str],
    doing: str,
) -> int:
    """Insert `records` (tuples in `columns` order) not yet in `table`; return how many.

    `table`, `columns` and `key` are identifiers from the caller's code, never input.
    """
    if not records:
        return 0
    with translated(doing):
        try:
            return await _merge(conn, table, columns, records, key, doing, create=False)
        except asyncpg.UndefinedTableError:  # this connection has no stage yet
            return await _merge(conn, table, columns, records, key, doing, create=True)


async def _merge(
    conn: asyncpg.Connection,
    table: str,
    columns: Sequence[str],
    records: Sequence[tuple[object, ...]],
    key: Sequence[str],
    doing: str,
    *,
    create: bool,
) -> int:
    stage = f"nbmeter_{table}_stage"
    cols = ", ".join(columns)
    async with conn.transaction():
        if create:
            await conn.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table} INCLUDING DEFAULTS)"
            )
        try:
            await conn.copy_records_to_table(stage, records=records, columns=list(columns))
        except (OverflowError, TypeError, ValueError) as exc:
            # asyncpg's COPY encoder raises these as they are (a value out of the column
            # type's range, of the wrong type, text it cannot encode)
            msg = f"{doing}: a value cannot be sent as its column's type ({exc})"
            raise RowRefusedError(msg) from exc
        status = await conn.execute(
            f"WITH staged AS (DELETE FROM pg_temp.{stage} RETURNING {cols})"
            f" INSERT INTO {table} ({cols}) SELECT {cols} FROM staged"
            f" ORDER BY {', '.join(key)} ON CONFLICT DO NOTHING"
        )
    return int(status.rsplit(" ", 1)[-1])  # "INSERT 0 <rows>"
