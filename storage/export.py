"""Streamed bulk export of a tenant's cycle reads: COPY TO STDOUT piped to the HTTP body.

`stream_cycle(pool, queries, fmt)` yields bytes of NDJSON (one object per meter) or CSV
(with header), computed set-wise by storage.billing's cycle SQL and copied out by the
server, in meter order.

The tenant is cut into segments of `segment` meters (by meter_id, found as the export
goes: an index-only probe each), and `connections` server connections COPY successive
segments at once. The boundary reads cost PostgreSQL CPU, and one backend uses one core;
the consumer drains the segments in order. Memory stays flat whatever the fleet size:
each segment in flight has a bounded queue of at most `_QUEUE_CHUNKS` chunks, so a slow
client pauses the COPYs. The COPY's ~9 KB pieces are coalesced into `_CHUNK_BYTES`
chunks: each chunk costs a queue hand-off, an ASGI message and a socket write.

NDJSON rides COPY's CSV mode with a quote and delimiter that JSON text never contains raw
(0x01, 0x02: JSON escapes every control character), so each line is the JSON verbatim.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg

from storage.billing import CSV_HEADER, CYCLE_CSV_SQL, CYCLE_JSON_SQL, LAST_ID
from storage.pool import connection

ExportFormat = Literal["ndjson", "csv"]
_QUEUE_CHUNKS = 4
_CHUNK_BYTES = 1 << 20
SEGMENT_METERS = 20_000
_DONE = b""
# the last meter id of the segment starting after $2: $3 meters on, or none (the last one)
_SPLIT_SQL = (
    "SELECT meter_id FROM meters WHERE tenant_id = $1 AND meter_id > $2"
    " ORDER BY meter_id OFFSET $3 - 1 LIMIT 1"
)
# query args: $1 tenant, $4 after, $5 limit, $10 last meter id (storage.billing._CORE)
_AFTER, _LIMIT, _UPTO = 3, 4, 9


@dataclass
class _Segment:
    args: tuple[Any, ...]
    queue: asyncio.Queue[bytes | BaseException] = field(
        default_factory=lambda: asyncio.Queue(maxsize=_QUEUE_CHUNKS)
    )


class _Plan:
    """Segments of every query in order, made as workers ask for the next one."""

    def __init__(self, queries: list[tuple[Any, ...]], segment: int) -> None:
        self.queries = queries
        self.segment = segment
        self.made: list[_Segment] = []
        self.ready = asyncio.Condition()
        self.finished = False
        self._query = 0
        self._after = 0
        self._lock = asyncio.Lock()

    async def take(self, conn: asyncpg.Connection) -> _Segment | None:
        """The next segment to copy (None when all are handed out)."""
        async with self._lock:
            if self._query >= len(self.queries):
                return None
            args = list(self.queries[self._query])
            upto = await conn.fetchval(_SPLIT_SQL, args[0], self._after, self.segment)
            args[_AFTER], args[_LIMIT] = self._after, None
            args[_UPTO] = upto if upto is not None else LAST_ID
            if upto is None:
                self._query, self._after = self._query + 1, 0
            else:
                self._after = upto
            seg = _Segment(tuple(args))
            async with self.ready:
                self.made.append(seg)
                self.ready.notify_all()
            return seg

    async def close(self) -> None:
        """No more segments: wake the consumer."""
        async with self.ready:
            self.finished = True
            self.ready.notify_all()

    async def get(self, i: int) -> _Segment | None:
        """Segment i, once made; None if there is none."""
        async with self.ready:
            await self.ready.wait_for(lambda: len(self.made) > i or self.finished)
            return self.made[i] if len(self.made) > i else None


async def stream_cycle(
    pool: asyncpg.Pool,
    queries: list[tuple[Any, ...]],
    fmt: ExportFormat,
    *,
    connections: int = 2,
    segment: int = SEGMENT_METERS,
) -> AsyncIterator[bytes]:
    """Yield the export body of each query's rows in turn (one query per timezone).

    The COPYs are cancelled if the consumer stops early; an error in one is raised here.
    """
    plan = _Plan(queries, segment)

    async def copy(conn: asyncpg.Connection, seg: _Segment) -> None:
        pending = bytearray()

        async def sink(chunk: bytes) -> None:
            pending.extend(chunk)
            if len(pending) >= _CHUNK_BYTES:
                await seg.queue.put(bytes(pending))
                pending.clear()

        if fmt == "ndjson":
            await conn.copy_from_query(
                CYCLE_JSON_SQL, *seg.args, output=sink, format="csv", delimiter="\x02", quote="\x01"
            )
        else:
            await conn.copy_from_query(CYCLE_CSV_SQL, *seg.args, output=sink, format="csv", null="")
        if pending:
            await seg.queue.put(bytes(pending))
        await seg.queue.put(_DONE)

    async def work() -> None:
        seg = None
        try:
            async with connection(pool, "exporting cycle reads") as conn:
                while (seg := await plan.take(conn)) is not None:
                    await copy(conn, seg)
        except (
            Exception
        ) as exc:  # a storage error (or a bug)  # handed to the consumer, which re-raises it
            if seg is None:  # failed between segments: the error takes the next place
                seg = _Segment(())
                async with plan.ready:
                    plan.made.append(seg)
                    plan.ready.notify_all()
            await seg.queue.put(exc)  # waits until the consumer reaches this segment
            raise

    workers = [
        asyncio.create_task(work(), name=f"export.copy{i}") for i in range(max(1, connections))
    ]

    async def finish() -> None:
        await asyncio.gather(*workers, return_exceptions=True)
        await plan.close()

    closer = asyncio.create_task(finish(), name="export.close")
    try:
        if fmt == "csv":
            yield (CSV_HEADER + "\n").encode("ascii")
        i = 0
        while (seg := await plan.get(i)) is not None:
            while True:
                item = await seg.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item == _DONE:
                    break
                yield item
            i += 1
    finally:
        for task in (*workers, closer):
            if not task.done():
                task.cancel()
        for task in (*workers, closer):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
