"""The quarantine for the billing office: list and detail, and re-decode requests.

Reads are scoped to a tenant: another tenant's row, or one with no tenant (a frame whose
sender was never identified), is indistinguishable from a missing one (None).

A re-decode request is a job of the durable queue in storage.redecode_queue (migration
0032): what a caller asked for (one row, or every open row matching a `Filter`), with one
item per row. `request_one` and `request_matching` enqueue in one transaction and NOTIFY
the collectors; asking again for a row that has an open item joins that item's job, so
nothing is queued twice; a row already re-decoded (resolved) is refused.
`request_all_matching` queues every match in as many jobs as it takes (for requests no
one sizes by hand: the collector's, when a learned compact format decodes what it had
to refuse, storage.compact_formats). Rows cross this boundary as frozen dataclasses
(`Quarantined`, `Attempt`, `Job`, `JobItem`); the API and the CLI render them.

Errors (all StorageError):
├── AlreadyResolvedError    the row was re-decoded already; the message says with what result
├── NothingToDecodeError    the row kept no payload
└── TooManyRowsError        a bulk request matches more than MAX_JOB_ITEMS rows
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal

import asyncpg

from storage.errors import StorageError
from storage.pool import translating
from storage.redecode_queue import CHANNEL, ITEM_OUTCOMES, JOBS, Move, transition

Conn = asyncpg.Connection | asyncpg.Pool
# the CHECKs of migration 0032 (item states: queued and ITEM_OUTCOMES)
Resolution = Literal["stored", "duplicate", "quarantined"]
JobState = Literal["queued", "done", "failed"]
ItemState = Literal["queued", "stored", "duplicate", "quarantined", "skipped", "failed"]
MAX_JOB_ITEMS: Final = 50_000
_END: Final = datetime.max.replace(tzinfo=UTC)  # the keyset start: after every row


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A quarantine row of a tenant; `payload` only from `get_row` (None: none was kept).

    `transport` is the smallint code of migration 0001; `reason` a `storage.reasons.Reason`
    value (`detail` of an undecodable row is '<decoder error code>: <message>').
    """

    quarantine_id: int
    received_at: datetime
    tenant_id: int | None
    meter_id: int | None
    transport: int
    peer: str | None
    reason: str
    detail: str
    size_bytes: int | None
    resolved_at: datetime | None
    resolution: Resolution | None  # quarantined: see superseded_by
    resolved_by_job: int | None
    superseded_by: int | None
    payload: bytes | None = None


@dataclass(frozen=True, slots=True)
class JobItem:
    """What became of one row of a re-decode job."""

    quarantine_id: int
    state: ItemState
    reason: str | None
    detail: str | None
    n_readings: int | None
    n_new: int | None
    new_quarantine_id: int | None
    done_at: datetime | None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One re-decode of a row: its job's requester and time, and the item's result."""

    job_id: int
    requested_by: str
    requested_at: datetime
    quarantine_id: int  # the row re-decoded (this one, or its predecessor)
    state: ItemState
    reason: str | None
    detail: str | None
    n_readings: int | None
    n_new: int | None
    new_quarantine_id: int | None
    done_at: datetime | None


@dataclass(frozen=True, slots=True)
class Job:
    """A re-decode job: what was asked, its items per state, and readings stored (n_new)."""

    job_id: int
    state: JobState
    selection: dict[str, Any]
    requested_by: str
    requested_at: datetime
    finished_at: datetime | None
    n_items: int
    counts: dict[ItemState, int]  # items per state
    n_new: int


def _cols(cls: type, prefix: str) -> str:
    return ", ".join(f"{prefix}{f.name}" for f in fields(cls))


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
    detail_prefix: str | None = None  # e.g. one decoder message, '<code>: <message>'

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
    ("detail_prefix", "starts_with(q.detail, $?)"),
)
# a row some job is about to re-decode already (asking again joins that job)
_QUEUED: Final = (
    "EXISTS (SELECT 1 FROM redecode_items o"
    " WHERE o.quarantine_id = q.quarantine_id AND o.state = 'queued')"
)


@translating("listing quarantined uplinks")
async def list_rows(
    conn: Conn,
    tenant_id: int,
    flt: Filter,
    *,
    after: tuple[datetime, int] | None,
    limit: int,
) -> list[Quarantined]:
    """Up to `limit` rows newest first, by (received_at, quarantine_id), after `after`."""
    where, args = flt.where(4)
    when, qid = after if after is not None else (_END, 2**63 - 1)
    rows = await conn.fetch(
        f"SELECT {_ROW} FROM quarantine q WHERE q.tenant_id = $1"
        f" AND (q.received_at, q.quarantine_id) < ($2, $3){where}"
        f" ORDER BY q.received_at DESC, q.quarantine_id DESC LIMIT {int(limit)}",
        tenant_id,
        when,
        qid,
        *args,
    )
    return [Quarantined(**r) for r in rows]


@translating("reading a quarantined uplink")
async def get_row(conn: Conn, tenant_id: int, quarantine_id: int) -> Quarantined | None:
    """The tenant's row `quarantine_id` with its payload, or None."""
    row = await conn.fetchrow(
        f"SELECT {_ROW}, q.payload FROM quarantine q"
        " WHERE q.quarantine_id = $1 AND q.tenant_id = $2",
        quarantine_id,
        tenant_id,
    )
    return None if row is None else Quarantined(**row)


@translating("reading a quarantined uplink's history")
async def history(conn: Conn, tenant_id: int, quarantine_id: int) -> list[Attempt]:
    """Re-decode attempts of a row, oldest first; the first may be the one it came from."""
    rows = await conn.fetch(
        f"SELECT j.requested_by, j.requested_at, {_cols(JobItem, 'i.')}, i.job_id"
        " FROM redecode_items i JOIN redecode_jobs j ON j.job_id = i.job_id"
        " WHERE j.tenant_id = $2 AND (i.quarantine_id = $1 OR i.new_quarantine_id = $1)"
        " ORDER BY i.job_id, i.quarantine_id",
        quarantine_id,
        tenant_id,
    )
    return [Attempt(**r) for r in rows]


@translating("reading a re-decode job")
async def get_job(conn: Conn, tenant_id: int, job_id: int) -> Job | None:
    """The tenant's job with its item counts per state and readings stored (n_new), or None."""
    row = await conn.fetchrow(_JOB, job_id, tenant_id)
    if row is None:
        return None
    return Job(
        job_id=row["job_id"],
        state=row["state"],
        selection=json.loads(row["selection"]),
        requested_by=row["requested_by"],
        requested_at=row["requested_at"],
        finished_at=row["finished_at"],
        n_items=row["n_items"],
        counts={s: row[s] for s in ("queued", *ITEM_OUTCOMES)},
        n_new=row["n_new"],
    )


@translating("listing a re-decode job's items")
async def job_items(
    conn: Conn, tenant_id: int, job_id: int, *, after: int, limit: int
) -> list[JobItem]:
    """Up to `limit` items of the tenant's job with quarantine_id > `after`, in id order."""
    rows = await conn.fetch(
        f"SELECT {_cols(JobItem, 'i.')} FROM redecode_items i"
        " JOIN redecode_jobs j ON j.job_id = i.job_id"
        " WHERE i.job_id = $1 AND j.tenant_id = $2 AND i.quarantine_id > $3"
        f" ORDER BY i.quarantine_id LIMIT {int(limit)}",
        job_id,
        tenant_id,
        after,
    )
    return [JobItem(**r) for r in rows]


def _resolution(row: asyncpg.Record) -> str:
    what = f"quarantine row {row['quarantine_id']} was re-decoded by job {row['resolved_by_job']}"
    if row["resolution"] == "quarantined":
        return (
            f"{what} and quarantined again as row {row['superseded_by']}: re-decode that row "
            "once its cause is fixed"
        )
    return f"{what} ({row['resolution']}); re-decoding it again would change nothing"


@translating("requesting a re-decode")
async def request_one(
    conn: asyncpg.Connection, tenant_id: int, quarantine_id: int, requested_by: str
) -> Job | None:
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


@translating("requesting re-decodes")
async def request_matching(
    conn: asyncpg.Connection, tenant_id: int, flt: Filter, requested_by: str
) -> Job:
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
            f" WHERE q.tenant_id = $2 AND q.payload IS NOT NULL{where} AND NOT {_QUEUED}"
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


@translating("requesting re-decodes")
async def request_all_matching(
    conn: asyncpg.Connection, tenant_id: int, flt: Filter, requested_by: str
) -> list[Job]:
    """`request_matching` in as many jobs as it takes, oldest rows first, each of at most
    MAX_JOB_ITEMS rows (cut at a receive time); no job at all when no open row matches."""
    where, args = replace(flt, resolved=False).where(3)
    after = (
        "SELECT q.received_at FROM quarantine q WHERE q.tenant_id = $1"
        f" AND q.payload IS NOT NULL{where} AND NOT {_QUEUED}"
        " ORDER BY q.received_at, q.quarantine_id OFFSET $2 LIMIT 1"
    )
    jobs: list[Job] = []
    while await conn.fetchval(after, tenant_id, 0, *args) is not None:
        cut = await conn.fetchval(after, tenant_id, MAX_JOB_ITEMS, *args)
        part = flt
        if cut is not None and (flt.received_to is None or cut < flt.received_to):
            part = replace(flt, received_to=cut)  # the rows before the first one left over
        job = await request_matching(conn, tenant_id, part, requested_by)
        jobs.append(job)
        if not job.n_items:  # a cut no row lies before (a tie at one instant): give up
            break
    return jobs


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
