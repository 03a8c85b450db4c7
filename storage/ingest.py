"""Idempotent batched ingest of decoded readings into the `readings` hypertable.

`ReadingWriter(pool).write(batch, conn=None)` validates a `ReadingBatch` (numpy columns),
writes its good rows with binary COPY and returns an `IngestResult`: how many rows were
new, how many the database (or the batch itself) already had, and which rows were
rejected and why. Writing the same batch twice inserts nothing the second time.

Two paths, the same result:
- copy: fresh data is the common case, so the rows are COPYed straight into `readings`
  inside a transaction (a savepoint when the caller's connection is in one). Every
  row is then new.
- merge: if that COPY hits the unique key (meter_id, read_s), it is rolled back and
  the batch is COPYed into a per-connection temp table, then moved with
  `INSERT ... ON CONFLICT DO NOTHING RETURNING`, whose returned keys say exactly which
  rows were new. After a merge the next few batches go straight to merge (a replaying
  device makes overlap likely to continue), then the copy path is tried again.

Rows are written in (meter_id, read_s) order, so concurrent writers of overlapping
batches wait for each other in one global order and cannot deadlock; the loser of a
race sees its rows as duplicates, never an error. Key order is also the unique index's
order, which makes the COPY itself faster than one of rows in arrival order
(bench/ingest.py measures both). The binary COPY stream is built from the numpy
columns (`storage.copybin`) one chunk at a time while earlier chunks are in flight.

A reading dated more than `future_tolerance_s` (5 min) after its uplink was received is
written with Flag.CLOCK_AHEAD set (billing leaves it out); more than a day after is a
clock_future rejection. The receive time itself is not stored with the reading (the raw
archive keeps it per uplink): the flag is what billing needs of it (migration 0049). The
reading's own time is stored as int4 seconds since 2000 (`read_s`, migration 0054): the
decoders' epoch seconds less READ_S_EPOCH.

A duplicate is a key already stored, whatever its values: the first write of a
(meter_id, read_s) wins, and a later different register for it is counted as a
duplicate, not an update (corrections are a billing concern, not an ingest one).

A bad row is a rejection, never an exception: see `RejectReason`. Errors (all from
`storage.errors`, mapped in `storage.pool.translated`):

StorageError                 another database error
├── StorageUnavailableError  connection lost, pool closing, deadlock: retry the batch
└── SchemaError              `readings` or `meters` missing: run `nbmeter db migrate`

A batch whose columns disagree in length is a programming error: ValueError.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import asyncpg
import numpy as np
import numpy.typing as npt

from billing import units
from decoder.columns import Flag
from storage import copybin
from storage.pool import connection, translated
from storage.rows import (
    EARLIEST_READ_AT_S,
    FUTURE_TOLERANCE_S,
    INSTALLED_S_SQL,
    MAX_CLOCK_AHEAD_S,
    READ_S_EPOCH,
    READ_S_MAX_EPOCH,
    READ_S_MIN_EPOCH,
    Bools,
    IngestResult,
    Int64s,
    Path,
    ReadingBatch,
    Rejection,
    RejectReason,
)

# the table's own column order (0054: packed, no padding); read_s and meter_id are int4
_COLUMNS = ("read_s", "meter_id", "register_ml", "flags")
_STAGE = "nbmeter_readings_stage"
_CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (LIKE readings INCLUDING DEFAULTS)"
    " ON COMMIT DELETE ROWS"
)
_COLS_SQL = ", ".join(_COLUMNS)
# ORDER BY: insert in key order, so that racing merges wait in one order (no deadlock)
_MERGE = (
    f"INSERT INTO readings ({_COLS_SQL}) SELECT {_COLS_SQL} FROM pg_temp.{_STAGE}"
    " ORDER BY meter_id, read_s ON CONFLICT DO NOTHING RETURNING meter_id::bigint, read_s::bigint"
)
_CLOCK_AHEAD = int(Flag.CLOCK_AHEAD)
# after a merge, skip the copy attempt for this many batches (a failed copy costs a
# whole batch of work; replays come in runs)
MERGE_RUN_BATCHES = 8
# known meter ids kept in memory; past this the cache is simply dropped and refilled
_MAX_KNOWN_METERS = 4_000_000


@dataclass(frozen=True)
class _Plan:
    """The rows to write (indices into the batch, in key order) and the rejected ones."""

    write: npt.NDArray[np.intp]
    reject_code: npt.NDArray[np.uint8]  # per batch row: 0 or a RejectReason
    flags: Int64s  # per batch row: the flags to store (Flag.CLOCK_AHEAD set here only)


class ReadingWriter:
    """Writes `ReadingBatch`es into `readings` idempotently; one per process, task-safe."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        earliest_read_at_s: int = EARLIEST_READ_AT_S,
        max_clock_ahead_s: int = MAX_CLOCK_AHEAD_S,
        future_tolerance_s: int = FUTURE_TOLERANCE_S,
        chunk_rows: int = 65_536,
        copy_first: bool = True,
    ) -> None:
        """Write through `pool`; rows outside [earliest, received + ahead] are rejected,
        rows dated after received + future_tolerance_s are flagged Flag.CLOCK_AHEAD.

        `copy_first=False` always takes the merge path (for a feed known to be mostly
        replays, such as a re-import, where a failed COPY attempt would be wasted work).
        """
        self._pool = pool
        self._copy_first = copy_first
        self._earliest_read_at_s = max(earliest_read_at_s, READ_S_MIN_EPOCH)
        self._max_clock_ahead_s = max_clock_ahead_s
        self._future_tolerance_s = future_tolerance_s
        self._chunk_rows = chunk_rows
        self._known_meters: Int64s = np.zeros(0, np.int64)  # sorted, unique
        self._installed_s: Int64s = np.zeros(0, np.int64)  # installed_at of each known meter
        self._merge_run = 0

    async def write(
        self, batch: ReadingBatch, conn: asyncpg.Connection | None = None
    ) -> IngestResult:
        """Insert the batch's new, valid rows; return the counts. Raises storage.errors.

        With `conn`, the rows are written on that connection, inside a savepoint if it
        is in a transaction (so the caller can archive the uplink atomically with its
        readings); otherwise a pooled connection and a transaction of its own are used.
        """
        started = time.perf_counter()
        if conn is None:
            async with connection(self._pool, "writing readings") as pooled:
                return await self._write(batch, pooled, started)
        with translated("writing readings"):
            return await self._write(batch, conn, started)

    async def _write(
        self, batch: ReadingBatch, conn: asyncpg.Connection, started: float
    ) -> IngestResult:
        plan = await self._plan(batch, conn)
        new_mask = np.zeros(len(batch), np.bool_)
        path: Path = "none"
        if len(plan.write):
            try_copy = self._copy_first and self._merge_run == 0
            self._merge_run = max(0, self._merge_run - 1)
            if try_copy and await self._copy(batch, plan, conn):
                new_mask[plan.write] = True
                path = "copy"
            else:
                if try_copy:  # the copy met a stored key: expect more overlap for a while
                    self._merge_run = MERGE_RUN_BATCHES
                new_mask[plan.write[await self._merge(batch, plan, conn)]] = True
                path = "merge"
        rejected_rows = np.flatnonzero(plan.reject_code)
        rejected = tuple(
            Rejection(int(i), RejectReason(int(plan.reject_code[i]))) for i in rejected_rows
        )
        new = int(np.count_nonzero(new_mask))
        return IngestResult(
            rows=len(batch),
            new=new,
            duplicate=len(batch) - new - len(rejected),
            rejected=rejected,
            new_mask=new_mask,
            path=path,
            elapsed_s=time.perf_counter() - started,
        )

    async def _plan(self, batch: ReadingBatch, conn: asyncpg.Connection) -> _Plan:
        """Validate, sort by key and drop in-batch repeats; unknown meters need one query."""
        n = len(batch)
        code = np.zeros(n, np.uint8)
        received_s = np.asarray(batch.received_at_us, np.int64) // copybin.US_PER_S
        ahead = np.minimum(received_s + self._max_clock_ahead_s, READ_S_MAX_EPOCH)
        code[batch.read_at_s > ahead] = RejectReason.CLOCK_FUTURE
        # the flag is ours alone: a device's status bits must not set (or clear) it
        flags = np.asarray(batch.flags).astype(np.int64) & ~_CLOCK_AHEAD
        flags[batch.read_at_s > received_s + self._future_tolerance_s] |= _CLOCK_AHEAD
        code[batch.read_at_s < self._earliest_read_at_s] = RejectReason.CLOCK_PAST
        code[units.negative(batch.register_ml)] = RejectReason.NEGATIVE_REGISTER
        candidates = np.flatnonzero(code == 0)
        # np.lexsort: last key is primary; stable, so a repeated key keeps its first row
        order = candidates[np.lexsort((batch.read_at_s[candidates], batch.meter_id[candidates]))]
        meters = batch.meter_id[order]
        known, installed = await self._known(meters, conn)
        code[order[~known]] = RejectReason.UNKNOWN_METER
        order, meters, installed = order[known], meters[known], installed[known]
        early = batch.read_at_s[order] < installed
        if early.any():
            # the cached installation time may be stale (moved earlier since): ask again
            # for these meters before rejecting anything
            await self._ask(np.unique(meters[early]), conn)
            _, installed = await self._known(meters, conn)
            early = batch.read_at_s[order] < installed
            code[order[early]] = RejectReason.BEFORE_INSTALLATION
            order, meters = order[~early], meters[~early]
        read_at = batch.read_at_s[order]
        repeat = np.zeros(len(order), np.bool_)
        repeat[1:] = (meters[1:] == meters[:-1]) & (read_at[1:] == read_at[:-1])
        order = order[~repeat]
        return _Plan(write=order, reject_code=code, flags=flags)

    async def _known(self, sorted_meters: Int64s, conn: asyncpg.Connection) -> tuple[Bools, Int64s]:
        """Per row of `sorted_meters` (ascending): does the meter exist, and its installed_at
        (epoch seconds, rounded down; 0 for an unknown meter)."""
        if not len(sorted_meters):
            return np.zeros(0, np.bool_), np.zeros(0, np.int64)
        starts = np.empty(len(sorted_meters), np.bool_)
        starts[0] = True
        starts[1:] = sorted_meters[1:] != sorted_meters[:-1]
        unique = sorted_meters[starts]
        cached, at = self._lookup(unique)
        ask = unique[~cached & (unique > 0)]
        if len(ask):
            # meters are never deleted while they have readings, so a found id stays
            # valid; an unknown id is asked again next time (it may be registered since)
            await self._ask(ask, conn)
            cached, at = self._lookup(unique)
        # expand the per-unique answer back to every row of its run
        run = np.cumsum(starts) - 1
        return cached[run], at[run]

    def _lookup(self, unique: Int64s) -> tuple[Bools, Int64s]:
        known = self._known_meters
        if not len(known):
            return np.zeros(len(unique), np.bool_), np.zeros(len(unique), np.int64)
        pos = np.minimum(np.searchsorted(known, unique), len(known) - 1)
        hit = known[pos] == unique
        return hit, np.where(hit, self._installed_s[pos], 0)

    def learn(self, meter_ids: Sequence[int], installed_s: Sequence[int]) -> None:
        """Meters that exist, with their installed_at in epoch seconds (rounded down), as
        a lookup of the caller's read them (the OSCORE context's): their rows need no
        query of the writer's own."""
        found = np.asarray(meter_ids, np.int64)
        at = np.asarray(installed_s, np.int64)
        cached, _ = self._lookup(found)
        if not cached.all():
            self._remember(found[~cached], at[~cached])

    async def _ask(self, ids: Int64s, conn: asyncpg.Connection) -> None:
        """Cache the existence and installation time of `ids` from the database."""
        rows = await conn.fetch(
            f"SELECT meter_id, {INSTALLED_S_SQL} AS installed_s"
            " FROM meters WHERE meter_id = ANY($1::bigint[])",
            ids.tolist(),
        )
        found = np.fromiter((r["meter_id"] for r in rows), np.int64, len(rows))
        at = np.fromiter((r["installed_s"] for r in rows), np.int64, len(rows))
        self._remember(found, at)

    def _remember(self, found: Int64s, at: Int64s) -> None:
        """Merge meters `found` (unique) and their installation times into the cache."""
        if len(self._known_meters) + len(found) > _MAX_KNOWN_METERS:
            self._known_meters = np.zeros(0, np.int64)
            self._installed_s = np.zeros(0, np.int64)
        # merged into the sorted cache (a batch's few ids into a city's: an insert, not a
        # sort of the whole cache per batch); a fresh answer replaces a cached one
        order = np.argsort(found, kind="stable")
        found, at = found[order], at[order]
        known = self._known_meters
        pos = np.searchsorted(known, found)
        cached = pos < len(known)
        cached[cached] = known[pos[cached]] == found[cached]
        self._installed_s[pos[cached]] = at[cached]
        self._known_meters = np.insert(known, pos[~cached], found[~cached])
        self._installed_s = np.insert(self._installed_s, pos[~cached], at[~cached])

    def _payload(self, batch: ReadingBatch, plan: _Plan) -> AsyncIterator[memoryview | bytes]:
        """The binary COPY stream of the planned rows, encoded chunk by chunk as it is sent."""
        # read_s and meter_id narrow to int4 here: _plan rejects times outside
        # READ_S_MIN/MAX_EPOCH, only known meters are written, and meters' CHECK keeps
        # every id below 2^31 (0049)
        columns: list[copybin.Column] = [
            ("read_s", "integer", batch.read_at_s - READ_S_EPOCH),
            ("meter_id", "integer", batch.meter_id),
            ("register_ml", "bigint", batch.register_ml),
            ("flags", "integer", plan.flags),
        ]
        return _aiter(
            copybin.encode_chunks(
                columns, len(plan.write), take=plan.write, chunk_rows=self._chunk_rows
            )
        )

    async def _copy(self, batch: ReadingBatch, plan: _Plan, conn: asyncpg.Connection) -> bool:
        """COPY the planned rows straight into readings; False if one already exists."""
        try:
            async with conn.transaction():
                await conn.copy_to_table(
                    "readings",
                    source=self._payload(batch, plan),  # type: ignore[arg-type]  # bytes-like ok
                    columns=_COLUMNS,
                    format="binary",
                )
        except asyncpg.UniqueViolationError:
            return False
        return True

    async def _merge(
        self, batch: ReadingBatch, plan: _Plan, conn: asyncpg.Connection
    ) -> npt.NDArray[np.intp]:
        """Insert the planned rows not yet stored; return their positions in `plan.write`."""
        chunks: list[bytes] = []

        async def collect(data: bytes) -> None:
            chunks.append(data)

        async with conn.transaction():
            await conn.execute(_CREATE_STAGE)
            # the caller's transaction may already have used the stage table
            await conn.execute(f"TRUNCATE pg_temp.{_STAGE}")
            await conn.copy_to_table(
                _STAGE,
                source=self._payload(batch, plan),  # type: ignore[arg-type]  # as in _copy
                columns=_COLUMNS,
                format="binary",
            )
            await conn.copy_from_query(_MERGE, output=collect, format="binary")
        inserted = copybin.decode_int8(b"".join(chunks), 2)
        return np.searchsorted(
            _key(batch.meter_id[plan.write], batch.read_at_s[plan.write] - READ_S_EPOCH),
            _key(inserted[:, 0], inserted[:, 1]),
        )


def _key(meter_id: Int64s, read_s: Int64s) -> npt.NDArray[np.void]:
    """One comparable 16-byte value per (meter_id, read_s): memcmp order = key order."""
    out = np.empty((len(meter_id), 2), ">u8")
    # flipping the sign bit maps signed order onto unsigned (big-endian bytewise) order
    sign = np.uint64(1 << 63)
    out[:, 0] = meter_id.view(np.uint64) ^ sign
    out[:, 1] = np.ascontiguousarray(read_s, np.int64).view(np.uint64) ^ sign
    return out.view("V16").ravel()


async def _aiter(chunks: Iterator[memoryview | bytes]) -> AsyncIterator[memoryview | bytes]:
    """Hand a sync chunk generator to asyncpg, which wants an async iterable.

    Each chunk is encoded only when asyncpg asks for it, i.e. after the previous one is
    on its way to the server, so encoding overlaps the server's work on earlier chunks.
    """
    for chunk in chunks:
        yield chunk
