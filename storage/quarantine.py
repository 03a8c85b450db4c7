"""The quarantine for the billing office: list and detail, and re-decode requests as a queue.

Reads are scoped to a tenant: another tenant's row, or one with no tenant (a frame whose
sender was never identified), is indistinguishable from a missing one (None).

Re-decode is a durable queue (migration 0032): a job is what a caller asked for (one row,
or every open row matching a `Filter`), its items are the rows. `request_one` and
`request_matching` enqueue in one transaction and NOTIFY `CHANNEL`; asking again for a
row that has an open item joins that item's job, so nothing is queued twice. The
collector `claim`s queued items in bounded batches (FOR UPDATE SKIP LOCKED) inside a
transaction it keeps while their frames go through its live store path, then `record`s
every outcome in that same transaction: the item's state, the quarantine row's
resolution (with the new row when the frame was quarantined again), and the state of
each job left with no queued item. States change only through `transition`, along the
edges written in JOB_TRANSITIONS and ITEM_TRANSITIONS.

Errors (all StorageError):
├── AlreadyResolvedError    the row was re-decoded already; the message says with what result
├── NothingToDecodeError    the row kept no payload
├── TooManyRowsError        a bulk request matches more than MAX_JOB_ITEMS rows
└── InvalidTransitionError  a state change the tables do not allow (a bug, never input)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg

from storage.errors import StorageError
from storage.pool import translated

Conn = asyncpg.Connection | asyncpg.Pool
Pool = asyncpg.Pool
CHANNEL: Final = "nbmeter_redecode"
MAX_JOB_ITEMS: Final = 50_000
_END: Final = datetime.max.replace(tzinfo=UTC)  # the keyset start: after every row

# job: queued -> done | failed (failed: at least one of its items failed)
JOB_TRANSITIONS: Final[Mapping[str, frozenset[str]]] = {
    "queued": frozenset({"done", "failed"}),
    "done": frozenset(),
    "failed": frozenset(),
}
# item: queued -> what became of its frame (skipped: nothing was decoded, see its reason)
ITEM_OUTCOMES: Final = ("stored", "duplicate", "quarantined", "skipped", "failed")
ITEM_TRANSITIONS: Final[Mapping[str, frozenset[str]]] = {
    "queued": frozenset(ITEM_OUTCOMES),
    **{state: frozenset() for state in ITEM_OUTCOMES},
}
RESOLVING: Final = frozenset({"stored", "duplicate", "quarantined"})  # resolve the row

_ROW = (
    "q.quarantine_id, q.received_at, q.tenant_id, q.meter_id, q.transport, q.peer, q.reason,"
    " q.detail, octet_length(q.payload) AS size_bytes, q.resolved_at, q.resolution,"
    " q.resolved_by_job, q.superseded_by"
)
_JOB = (
    "SELECT j.job_id, j.state, j.selection, j.requested_by, j.requested_at, j.finished_at,"
    " j.n_items, count(i.state) FILTER (WHERE i.state = 'queued') AS queued,"
    + ", ".join(f" count(i.state) FILTER (WHERE i.state = '{s}') AS {s}" for s in ITEM_OUTCOMES)
    + ", coalesce(sum(i.n_new), 0)::bigint AS n_new"
    " FROM redecode_jobs j LEFT JOIN redecode_items i ON i.job_id = j.job_id"
    " WHERE j.job_id = $1 AND j.tenant_id = $2 GROUP BY j.job_id"
)


class AlreadyResolvedError(StorageError):
    """The quarantine row was re-decoded already; re-decoding it again would change nothing."""


class NothingToDecodeError(StorageError):
    """The quarantine row kept no payload, so there is nothing to decode again."""


class TooManyRowsError(StorageError):
    """A bulk re-decode request matches more rows than one job may hold."""


class InvalidTransitionError(StorageError):
    """A state change the transition table does not allow."""


@dataclass(frozen=True)
class Filter:
    """Which quarantine rows: every given condition must hold (None: any)."""

    reason: str | None = None
    error: str | None = None  # an undecodable row's decoder error code: no_key, crc, ...
    meter_id: int | None = None
    address: str | None = None  # rows of the tenant's meter(s) with this address
    received_from: datetime | None = None  # inclusive
    received_to: datetime | None = None  # exclusive
    resolved: bool | None = None

    def selection(self) -> dict[str, Any]:
        """The given conditions as JSON-able values, recorded with a job."""
        out = {k: v for k, v in vars(self).items() if v is not None}
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in out.items()}

    def where(self, first: int) -> tuple[str, list[Any]]:
        """SQL conditions on `q` (each with a leading ' AND') and their args from `$first`."""
        given = [(sql, getattr(self, name)) for name, sql in _CONDITIONS]
        given = [(sql, value) for sql, value in given if value is not None]
        conds = "".join(
            f" AND {sql.replace('$?', f'${first + n}')}" for n, (sql, _) in enumerate(given)
        )
        return conds, [value for _, value in given]


# Filter field -> its condition on quarantine q ($? is the value)
_CONDITIONS: Final = (
    ("reason", "q.reason = $?"),
    ("error", "starts_with(q.detail, $? || ':')"),  # the store writes '<code>: <message>'
    ("meter_id", "q.meter_id = $?"),
    (
        "address",
        "q.meter_id IN (SELECT m.meter_id FROM meters m"
        " WHERE m.tenant_id = q.tenant_id AND m.address = $?)",
    ),
    ("received_from", "q.received_at >= $?"),
    ("received_to", "q.received_at < $?"),
    ("resolved", "(q.resolved_at IS NOT NULL) = $?"),
)


async def list_rows(
    conn: Conn,
    tenant_id: int,
    flt: Filter,
    *,
    after: tuple[datetime, int] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Up to `limit` rows newest first, by (received_at, quarantine_id), after `after`."""
    where, args = flt.where(4)
    when, qid = after if after is not None else (_END, 2**63 - 1)
    return await conn.fetch(
        f"SELECT {_ROW} FROM quarantine q WHERE q.tenant_id = $1"
        f" AND (q.received_at, q.quarantine_id) < ($2, $3){where}"
        f" ORDER BY q.received_at DESC, q.quarantine_id DESC LIMIT {int(limit)}",
        tenant_id,
        when,
        qid,
        *args,
    )


async def get_row(conn: Conn, tenant_id: int, quarantine_id: int) -> asyncpg.Record | None:
    """The tenant's row `quarantine_id` with its payload, or None."""
    return await conn.fetchrow(
        f"SELECT {_ROW}, q.payload FROM quarantine q"
        " WHERE q.quarantine_id = $1 AND q.tenant_id = $2",
        quarantine_id,
        tenant_id,
    )


async def history(conn: Conn, tenant_id: int, quarantine_id: int) -> list[asyncpg.Record]:
    """Re-decode attempts of a row, oldest first; the first may be the one it came from.

    Each: job_id, requested_by, requested_at, quarantine_id (the row re-decoded), state,
    reason, detail, n_readings, n_new, new_quarantine_id, done_at.
    """
    return await conn.fetch(
        "SELECT i.job_id, j.requested_by, j.requested_at, i.quarantine_id, i.state, i.reason,"
        " i.detail, i.n_readings, i.n_new, i.new_quarantine_id, i.done_at"
        " FROM redecode_items i JOIN redecode_jobs j ON j.job_id = i.job_id"
        " WHERE j.tenant_id = $2 AND (i.quarantine_id = $1 OR i.new_quarantine_id = $1)"
        " ORDER BY i.job_id, i.quarantine_id",
        quarantine_id,
        tenant_id,
    )


async def get_job(conn: Conn, tenant_id: int, job_id: int) -> asyncpg.Record | None:
    """The tenant's job with its item counts per state and readings stored (n_new), or None."""
    return await conn.fetchrow(_JOB, job_id, tenant_id)


async def job_items(
    conn: Conn, tenant_id: int, job_id: int, *, after: int, limit: int
) -> list[asyncpg.Record]:
    """Up to `limit` items of the tenant's job with quarantine_id > `after`, in id order."""
    return await conn.fetch(
        "SELECT i.quarantine_id, i.state, i.reason, i.detail, i.n_readings, i.n_new,"
        " i.new_quarantine_id, i.done_at FROM redecode_items i"
        " JOIN redecode_jobs j ON j.job_id = i.job_id"
        " WHERE i.job_id = $1 AND j.tenant_id = $2 AND i.quarantine_id > $3"
        f" ORDER BY i.quarantine_id LIMIT {int(limit)}",
        job_id,
        tenant_id,
        after,
    )


def _resolution(row: asyncpg.Record) -> str:
    what = f"quarantine row {row['quarantine_id']} was re-decoded by job {row['resolved_by_job']}"
    if row["resolution"] == "quarantined":
        return (
            f"{what} and quarantined again as row {row['superseded_by']}: re-decode that row "
            "once its cause is fixed"
        )
    return f"{what} ({row['resolution']}); re-decoding it again would change nothing"


async def request_one(
    conn: asyncpg.Connection, tenant_id: int, quarantine_id: int, requested_by: str
) -> asyncpg.Record | None:
    """Queue a re-decode of one row; its job (the open one if it is queued already), or None.

    Raises AlreadyResolvedError or NothingToDecodeError.
    """
    async with conn.transaction():
        row = await conn.fetchrow(  # the lock serialises two requests for one row
            "SELECT quarantine_id, received_at, resolved_at, resolution, resolved_by_job,"
            " superseded_by, payload IS NOT NULL AS has_payload FROM quarantine"
            " WHERE quarantine_id = $1 AND tenant_id = $2 FOR UPDATE",
            quarantine_id,
            tenant_id,
        )
        if row is None:
            return None
        if row["resolved_at"] is not None:
            raise AlreadyResolvedError(_resolution(row))
        if not row["has_payload"]:
            msg = f"quarantine row {quarantine_id} kept no payload: there is nothing to decode"
            raise NothingToDecodeError(msg)
        open_item = (
            "SELECT job_id FROM redecode_items WHERE quarantine_id = $1 AND state = 'queued'"
        )
        open_job = await conn.fetchval(open_item, quarantine_id)
        if open_job is None:
            job_id = await _new_job(conn, tenant_id, {"quarantine_id": quarantine_id}, requested_by)
            open_job = await conn.fetchval(
                "INSERT INTO redecode_items (job_id, quarantine_id, received_at)"
                " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING job_id",
                job_id,
                quarantine_id,
                row["received_at"],
            )
            if open_job is None:  # a bulk request queued the row meanwhile: join its job
                await conn.execute("DELETE FROM redecode_jobs WHERE job_id = $1", job_id)
                open_job = await conn.fetchval(open_item, quarantine_id)
                if open_job is None:  # ... and a collector has taken it already
                    msg = f"quarantine row {quarantine_id} was re-decoded just now: see its detail"
                    raise AlreadyResolvedError(msg)
            else:
                await conn.execute("UPDATE redecode_jobs SET n_items = 1 WHERE job_id = $1", job_id)
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(job_id))
        return await get_job(conn, tenant_id, open_job)


async def request_matching(
    conn: asyncpg.Connection, tenant_id: int, flt: Filter, requested_by: str
) -> asyncpg.Record:
    """Queue a re-decode of every open row matching `flt` that has a payload; its job.

    Rows already queued in another job stay there (not counted here); a job of no rows
    is done at once. Raises TooManyRowsError beyond MAX_JOB_ITEMS rows (nothing queued).
    """
    open_only = replace(flt, resolved=False)
    where, args = open_only.where(3)
    async with conn.transaction():
        job_id = await _new_job(conn, tenant_id, flt.selection(), requested_by)
        status = await conn.execute(
            "INSERT INTO redecode_items (job_id, quarantine_id, received_at)"
            " SELECT $1, q.quarantine_id, q.received_at FROM quarantine q"
            f" WHERE q.tenant_id = $2 AND q.payload IS NOT NULL{where}"
            " AND NOT EXISTS (SELECT 1 FROM redecode_items o"
            "  WHERE o.quarantine_id = q.quarantine_id AND o.state = 'queued')"
            f" ORDER BY q.received_at, q.quarantine_id LIMIT {MAX_JOB_ITEMS + 1}"
            " ON CONFLICT DO NOTHING",
            job_id,
            tenant_id,
            *args,
        )
        n = int(status.split()[-1])
        if n > MAX_JOB_ITEMS:
            msg = (
                f"more than {MAX_JOB_ITEMS} quarantined rows match: narrow the filter "
                "(a received_at range, a meter) and ask in several jobs"
            )
            raise TooManyRowsError(msg)
        await conn.execute("UPDATE redecode_jobs SET n_items = $2 WHERE job_id = $1", job_id, n)
        if n:
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(job_id))
        else:
            await transition(conn, JOBS, [Move((job_id,), "done")])
        job = await get_job(conn, tenant_id, job_id)
    assert job is not None
    return job


async def _new_job(
    conn: asyncpg.Connection, tenant_id: int, selection: dict[str, Any], requested_by: str
) -> int:
    job_id: int = await conn.fetchval(
        "INSERT INTO redecode_jobs (tenant_id, selection, requested_by, n_items)"
        " VALUES ($1, $2::jsonb, $3, 0) RETURNING job_id",
        tenant_id,
        json.dumps(selection, sort_keys=True),
        requested_by,
    )
    return job_id


# --- the state machine, as data -----------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """A table whose `state` column moves only along `transitions` (old -> allowed new)."""

    table: str
    keys: tuple[str, ...]  # bigint columns
    stamp: str  # set when a row leaves 'queued'
    transitions: Mapping[str, frozenset[str]]
    columns: Mapping[str, str] = field(default_factory=dict)  # settable with a move: SQL type

    def sources(self, new: str) -> list[str]:
        """The states from which `new` may be entered; InvalidTransitionError if none."""
        found = sorted(old for old, nexts in self.transitions.items() if new in nexts)
        if not found:
            msg = f"{self.table}: no state may move to {new!r}"
            raise InvalidTransitionError(msg)
        return found


JOBS: Final = Machine("redecode_jobs", ("job_id",), "finished_at", JOB_TRANSITIONS)
ITEMS: Final = Machine(
    "redecode_items",
    ("job_id", "quarantine_id"),
    "done_at",
    ITEM_TRANSITIONS,
    {
        "reason": "text",
        "detail": "text",
        "n_readings": "integer",
        "n_new": "integer",
        "new_quarantine_id": "bigint",
    },
)


@dataclass(frozen=True)
class Move:
    """Row `key` of a machine to state `new`, setting `values` (columns of the machine)."""

    key: tuple[int, ...]
    new: str
    values: Mapping[str, object] = field(default_factory=dict)


async def transition(conn: asyncpg.Connection, machine: Machine, moves: Sequence[Move]) -> None:
    """Apply `moves` (distinct rows, all setting the same columns) in one statement.

    Each row must be in a state its new state may follow. Otherwise InvalidTransitionError
    names the rows that were not, and no row of the call changes.
    """
    if not moves:
        return
    names = sorted(moves[0].values)
    unknown = sorted(set(names) - set(machine.columns))
    if unknown or any(sorted(m.values) != names for m in moves):
        msg = f"{machine.table}: moves must set the same columns, among {sorted(machine.columns)}"
        raise InvalidTransitionError(msg)
    aliases = [*machine.keys, "new", "sources", *names]
    types = ["bigint"] * len(machine.keys) + ["text", "text"] + [machine.columns[c] for c in names]
    arrays: list[list[object]] = [[m.key[i] for m in moves] for i in range(len(machine.keys))]
    arrays += [[m.new for m in moves], [" ".join(machine.sources(m.new)) for m in moves]]
    arrays += [[m.values[c] for m in moves] for c in names]
    unnest = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, start=1))
    sets = "".join(f", {c} = v.{c}" for c in names)
    match = " AND ".join(f"t.{k} = v.{k}" for k in machine.keys)
    async with conn.transaction():  # a savepoint inside the caller's transaction
        moved = await conn.fetch(
            f"UPDATE {machine.table} t SET state = v.new, {machine.stamp} = now(){sets}"
            f" FROM unnest({unnest}) AS v({', '.join(aliases)})"
            f" WHERE {match} AND t.state = ANY(string_to_array(v.sources, ' '))"
            f" RETURNING {', '.join(f't.{k}' for k in machine.keys)}",
            *arrays,
        )
        if len(moved) != len(moves):
            done = {tuple(r) for r in moved}
            stuck = [(m.key, m.new) for m in moves if tuple(m.key) not in done]
            msg = f"{machine.table}: rows not in a state that may move so: {stuck[:5]}"
            raise InvalidTransitionError(msg)


# --- the collector's side: claim, then record ---------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """A queued item and what its frame needs to go through the store path again."""

    job_id: int
    quarantine_id: int
    received_at: datetime
    job_tenant_id: int
    found: bool  # False: the row is gone (retention)
    resolved: bool
    tenant_id: int | None
    meter_id: int | None
    address: str | None  # the meter's, when meter_id is set
    transport: int | None
    peer: str | None
    payload: bytes | None


@dataclass(frozen=True)
class Result:
    """What became of a claimed item's frame (`state` one of ITEM_OUTCOMES)."""

    item: Claimed
    state: str
    reason: str | None = None
    detail: str | None = None
    n_readings: int | None = None
    n_new: int | None = None


async def claim(conn: asyncpg.Connection, limit: int) -> list[Claimed]:
    """Lock up to `limit` queued items (others' locked ones skipped), oldest job first.

    Call inside a transaction and `record` the results before it commits; if it rolls
    back (a crash), the items are queued again.
    """
    rows = await conn.fetch(
        "SELECT i.job_id, i.quarantine_id, i.received_at, j.tenant_id AS job_tenant_id,"
        " q.quarantine_id IS NOT NULL AS found, q.resolved_at IS NOT NULL AS resolved,"
        " q.tenant_id, q.meter_id, m.address, q.transport, q.peer, q.payload"
        " FROM redecode_items i JOIN redecode_jobs j ON j.job_id = i.job_id"
        " LEFT JOIN quarantine q"
        "  ON q.quarantine_id = i.quarantine_id AND q.received_at = i.received_at"
        " LEFT JOIN meters m ON m.meter_id = q.meter_id"
        " WHERE i.state = 'queued' AND j.state = 'queued'"
        " ORDER BY i.job_id, i.quarantine_id LIMIT $1"
        " FOR UPDATE OF i SKIP LOCKED",
        limit,
    )
    return [
        Claimed(**{k: (bytes(v) if k == "payload" and v is not None else v) for k, v in r.items()})
        for r in rows
    ]


async def record(conn: asyncpg.Connection, results: Sequence[Result]) -> dict[int, str]:
    """Record `results` (inside `claim`'s transaction); return {job_id: state} of jobs closed.

    A stored, duplicate or quarantined frame resolves its quarantine row; quarantined
    again, the row names the new row the store wrote (same frame, same receive time).
    """
    if not results:
        return {}
    again = [r.item for r in results if r.state == "quarantined"]
    found = await conn.fetch(
        "SELECT v.qid, (SELECT n.quarantine_id FROM quarantine n JOIN quarantine o"
        "  ON o.quarantine_id = v.qid AND o.received_at = v.at"
        "  WHERE n.received_at = v.at AND n.quarantine_id > v.qid"
        "  AND n.tenant_id IS NOT DISTINCT FROM o.tenant_id AND n.payload = o.payload"
        "  ORDER BY n.quarantine_id LIMIT 1) AS new_row"
        " FROM unnest($1::bigint[], $2::timestamptz[]) AS v(qid, at)",
        [i.quarantine_id for i in again],
        [i.received_at for i in again],
    )
    new_row = {r["qid"]: r["new_row"] for r in found}
    moves = [
        Move(
            (r.item.job_id, r.item.quarantine_id),
            r.state,
            {
                "reason": r.reason,
                "detail": r.detail,
                "n_readings": r.n_readings,
                "n_new": r.n_new,
                "new_quarantine_id": new_row.get(r.item.quarantine_id),
            },
        )
        for r in results
    ]
    await transition(conn, ITEMS, moves)
    resolving = [r for r in results if r.state in RESOLVING]
    await conn.execute(
        "UPDATE quarantine q SET resolved_at = now(), resolution = v.resolution,"
        " resolved_by_job = v.job_id, superseded_by = v.new_row"
        " FROM unnest($1::bigint[], $2::timestamptz[], $3::text[], $4::bigint[], $5::bigint[])"
        "  AS v(qid, at, resolution, job_id, new_row)"
        " WHERE q.quarantine_id = v.qid AND q.received_at = v.at AND q.resolved_at IS NULL",
        [r.item.quarantine_id for r in resolving],
        [r.item.received_at for r in resolving],
        [r.state for r in resolving],
        [r.item.job_id for r in resolving],
        [new_row.get(r.item.quarantine_id) for r in resolving],
    )
    left = await conn.fetch(
        "SELECT i.job_id, count(*) FILTER (WHERE i.state = 'failed') AS failed"
        " FROM redecode_items i JOIN redecode_jobs j ON j.job_id = i.job_id"
        " WHERE i.job_id = ANY($1::bigint[]) AND j.state = 'queued' GROUP BY i.job_id"
        " HAVING count(*) FILTER (WHERE i.state = 'queued') = 0 ORDER BY i.job_id",
        sorted({r.item.job_id for r in results}),
    )
    closed = {r["job_id"]: "failed" if r["failed"] else "done" for r in left}
    await transition(conn, JOBS, [Move((job,), state) for job, state in closed.items()])
    return closed


@dataclass
class Batch:
    """Claimed items; put one Result per item in `results` before the block ends."""

    items: list[Claimed]
    results: list[Result] = field(default_factory=list)
    closed: dict[int, str] = field(default_factory=dict)  # jobs finished by this batch


@asynccontextmanager
async def claimed(pool: Pool, limit: int) -> AsyncIterator[Batch]:
    """Claim up to `limit` items for the block; record its results when it ends normally.

    The claim's transaction spans the block: if the block raises (or the process dies),
    nothing is recorded and the items are queued again. Database errors come out as
    storage errors (StorageUnavailableError: retry later).
    """
    with translated("re-decoding quarantined frames"):
        async with pool.acquire() as conn, conn.transaction():
            batch = Batch(await claim(conn, limit))
            yield batch
            if batch.results:
                batch.closed = await record(conn, batch.results)


class Listener:
    """A connection of its own that LISTENs on CHANNEL and calls `wake()` on each NOTIFY."""

    def __init__(self, dsn: str, wake: Callable[[], None]) -> None:
        """Listen on `dsn` once `open()` is awaited."""
        self._dsn = dsn
        self._wake = wake
        self._conn: asyncpg.Connection | None = None

    @property
    def alive(self) -> bool:
        """True while the connection is open."""
        return self._conn is not None and not self._conn.is_closed()

    async def open(self) -> None:
        """Connect and LISTEN; StorageUnavailableError when the database is away."""
        with translated("listening for re-decode requests"):
            conn = await asyncpg.connect(self._dsn, timeout=5.0)
            await conn.add_listener(CHANNEL, self._notified)
        self._conn = conn

    def _notified(self, *_args: object) -> None:
        self._wake()

    async def close(self) -> None:
        """Close the connection (never raises)."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn.terminate()
