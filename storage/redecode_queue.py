"""The re-decode queue: jobs and their items (migration 0032), and the collector's side.

A job is what a caller asked for (storage.quarantine.request_*), its items are the
quarantine rows, one each. States change only through `transition`, along the edges
written in JOB_TRANSITIONS and ITEM_TRANSITIONS (tests walk every one). A collector
claims queued items in bounded batches (`claimed`: FOR UPDATE SKIP LOCKED, so several
collectors share the work) inside a transaction it keeps while their frames go through
its live store path, then records every outcome in that same transaction (`record`):
the item's state, the quarantine row's resolution (with the new row when the frame was
quarantined again), and the state of each job left with no queued item. If the
transaction rolls back (a crash), the items are queued again. `listen` wakes a
collector on NOTIFY CHANNEL (storage.notify's loop).

Errors: InvalidTransitionError (a StorageError) for a state change the tables do not
allow (a bug, never input); database errors as storage errors (storage.pool.translated).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg

from storage import notify
from storage.errors import StorageError
from storage.pool import connection

Pool = asyncpg.Pool


def _claimed(row: asyncpg.Record) -> Claimed:
    """A claimed row as its dataclass (the payload as bytes, not the driver's buffer)."""
    fields: dict[str, Any] = dict(row.items())
    if fields["payload"] is not None:
        fields["payload"] = bytes(fields["payload"])
    return Claimed(**fields)


CHANNEL: Final = "nbmeter_redecode"

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


class InvalidTransitionError(StorageError):
    """A state change the transition table does not allow."""


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
    return [_claimed(r) for r in rows]


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
    async with connection(pool, "re-decoding quarantined frames") as conn, conn.transaction():
        batch = Batch(await claim(conn, limit))
        yield batch
        if batch.results:
            batch.closed = await record(conn, batch.results)


async def listen(
    dsn: str,
    wake: Callable[[], None],
    on_state: Callable[[bool, str | None], None],
    *,
    check_every_s: float = 2.0,
    retry_max_s: float = 30.0,
) -> None:
    """Forever: call `wake()` on each NOTIFY CHANNEL and each time listening (re)starts.

    A request notified while the connection was down was missed, so (re)connecting wakes
    the caller to look. `on_state` is `storage.notify.listen`'s, whose loop this is
    (heartbeat every `check_every_s`, reconnect with backoff up to `retry_max_s`).
    """

    def state(up: bool, why: str | None) -> None:
        on_state(up, why)
        if up:
            wake()

    await notify.listen(
        dsn,
        CHANNEL,
        lambda _payload: wake(),
        state,
        app_name="nbmeter-redecode",
        check_every_s=check_every_s,
        check_timeout_s=check_every_s,
        retry_max_s=retry_max_s,
    )
