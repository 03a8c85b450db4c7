"""Streamed bulk export of a tenant's cycle reads: COPY TO STDOUT piped to the HTTP body.

`stream_cycle(pool, args, fmt)` yields bytes of NDJSON (one object per meter) or CSV (with
header), computed set-wise by one query (storage.billing's cycle SQL) and copied out by the
server. Memory stays flat whatever the fleet size: a bounded queue between the COPY and the
consumer holds at most `_QUEUE_CHUNKS` chunks, so a slow client pauses the COPY. The COPY's
~9 KB pieces are coalesced into `_CHUNK_BYTES` chunks: each chunk costs a queue hand-off,
an ASGI message and a socket write, ~0.25 ms for a 9 KB piece (a quarter of the export).

NDJSON rides COPY's CSV mode with a quote and delimiter that JSON text never contains raw
(0x01, 0x02: JSON escapes every control character), so each line is the JSON verbatim.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

import asyncpg

from storage.billing import CSV_HEADER, CYCLE_CSV_SQL, CYCLE_JSON_SQL

ExportFormat = Literal["ndjson", "csv"]
_QUEUE_CHUNKS = 8
_CHUNK_BYTES = 1 << 20
_DONE = b""


async def stream_cycle(
    pool: asyncpg.Pool, queries: list[tuple[Any, ...]], fmt: ExportFormat
) -> AsyncIterator[bytes]:
    """Yield the export body of each query's rows in turn (one COPY per timezone).

    The COPY is cancelled if the consumer stops early.
    """
    queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue(maxsize=_QUEUE_CHUNKS)

    pending = bytearray()

    async def sink(chunk: bytes) -> None:
        pending.extend(chunk)
        if len(pending) >= _CHUNK_BYTES:
            await queue.put(bytes(pending))
            pending.clear()

    async def produce() -> None:
        try:
            async with pool.acquire() as conn:
                for args in queries:
                    await _copy(conn, args)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await queue.put(exc)
            raise
        if pending:
            await queue.put(bytes(pending))
        await queue.put(_DONE)

    async def _copy(conn: asyncpg.Connection, args: tuple[Any, ...]) -> None:
        if fmt == "ndjson":
            await conn.copy_from_query(
                CYCLE_JSON_SQL, *args, output=sink, format="csv", delimiter="\x02", quote="\x01"
            )
        else:
            await conn.copy_from_query(CYCLE_CSV_SQL, *args, output=sink, format="csv", null="")

    task = asyncio.create_task(produce(), name="export.copy")
    try:
        if fmt == "csv":
            yield (CSV_HEADER + "\n").encode("ascii")
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is _DONE or item == _DONE:
                break
            yield item
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
