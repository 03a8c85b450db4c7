"""The downlink mailbox (migration 0036): commands to meters, queued until the meter's window.

Callers (API, CLI) `create` one command or `bulk` one command to many meters (a job),
`cancel`, `get` and `list_commands`. The collector `claim`s a meter's pending commands when
the meter shows up (they become `sent`, attempts + 1) and `record_results` when the device
answers. `expire_due` moves what outlived its TTL to `expired`. Every state change follows
`storage.command_states.TRANSITIONS`: the SQL takes its source states from there.

Rules:
- idempotency: the caller's key is unique per tenant; the same key with the same meter,
  kind and args returns the existing command (created False), with anything else it raises
  IdempotencyConflictError;
- per-meter order: a meter's commands go out in command id order;
- supersede: a new command cancels the meter's queued commands for the same setting
  (reason `superseded_by=<new id>`); a command already sent is not touched (the device
  may have executed it) and goes on to its own answer;
- at least once: a sent command goes out again with every window until the device
  answers or it expires; the device executes each command id once and answers a
  repeated one from memory, so a repeated answer changes nothing;
- a device answers only its own meter's commands (others are reported `unknown`).

Errors (all StorageError): MailboxError ├ NoSuchMeterError, InvalidCommandError,
IdempotencyConflictError, NotCancellableError. Database errors as storage errors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg

from decoder.commands import DeviceResult, Pending, check_args, setting_of
from storage.command_states import PENDING, SUPERSEDED_PREFIX, sources
from storage.errors import StorageError
from storage.pool import connection, translating

MAX_BULK: Final = 100_000  # meters in one job
MAX_PER_WINDOW: Final = 8  # commands handed to a meter in one window (the rest next time)
_COLUMNS: Final = (
    "command_id, tenant_id, meter_id, job_id, idempotency_key, kind, setting, args, state,"
    " reason, result, attempts, created_by, created_at, expires_at, sent_at, last_sent_at,"
    " finished_at"
)


class MailboxError(StorageError):
    """A mailbox request that cannot be carried out as asked."""


class NoSuchMeterError(MailboxError):
    """The tenant has no such (active) meter."""


class InvalidCommandError(MailboxError):
    """The command's kind or args do not fit the meter (the message says why)."""


class IdempotencyConflictError(MailboxError):
    """The idempotency key was used already for another command."""


class NotCancellableError(MailboxError):
    """Only a queued command can be cancelled (a sent one may be executing)."""


@dataclass(frozen=True)
class Command:
    """One command row."""

    command_id: int
    tenant_id: int
    meter_id: int
    job_id: int | None
    idempotency_key: str | None
    kind: str
    setting: str
    args: dict[str, Any]
    state: str
    reason: str | None
    result: dict[str, Any] | None
    attempts: int
    created_by: str
    created_at: datetime
    expires_at: datetime
    sent_at: datetime | None
    last_sent_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class Job:
    """A bulk job with its commands counted per state."""

    job_id: int
    tenant_id: int
    idempotency_key: str | None
    kind: str
    args: dict[str, Any]
    selection: dict[str, Any]
    n_commands: int
    created_by: str
    created_at: datetime
    counts: dict[str, int]


@dataclass(frozen=True)
class Claimed:
    """A command handed to its meter now: what to encode, and where it goes (MQTT topic)."""

    pending: Pending
    meter_id: int
    tenant_slug: str


def _command(row: asyncpg.Record) -> Command:
    values = dict(row)
    values["args"] = json.loads(values["args"])
    values["result"] = json.loads(values["result"]) if values["result"] is not None else None
    return Command(**values)


def _canonical(args: Mapping[str, Any]) -> str:
    return json.dumps(args, sort_keys=True, separators=(",", ":"))


def _storable(value: Any) -> Any:
    """A device's result as jsonb holds it: a NUL character (no PostgreSQL text holds one)
    becomes U+FFFD, a non-finite number (no JSON number) its name as text ("NaN",
    "Infinity", "-Infinity"), in values and keys alike."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return {_storable(str(key)): _storable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(item) for item in value]
    return value


async def _meter(conn: asyncpg.Connection, tenant_id: int, meter_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT meter_id, format FROM meters"
        " WHERE tenant_id = $1 AND meter_id = $2 AND removed_at IS NULL",
        tenant_id,
        meter_id,
    )
    if row is None:
        msg = f"no active meter {meter_id}"
        raise NoSuchMeterError(msg)
    return row


async def _require_lwm2m(conn: asyncpg.Connection, kind: str, meter_ids: Sequence[int]) -> None:
    """A read is an LwM2M Device Management operation: every meter must be an LwM2M client
    (it registered at /rd at least once); else InvalidCommandError naming one that is not."""
    if kind != "read":
        return
    other = await conn.fetchval(
        "SELECT m FROM unnest($1::bigint[]) AS m WHERE NOT EXISTS"
        " (SELECT 1 FROM lwm2m_registrations r WHERE r.meter_id = m) ORDER BY m LIMIT 1",
        list(meter_ids),
    )
    if other is not None:
        msg = (
            f"read: meter {other} is no LwM2M client (it never registered at /rd); a read"
            " is an LwM2M Device Management operation, for LwM2M clients only"
        )
        raise InvalidCommandError(msg)


async def _supersede(conn: asyncpg.Connection, new_ids: Sequence[int]) -> int:
    """Cancel the queued commands that `new_ids` (just inserted) supersede; how many."""
    done = await conn.execute(
        "UPDATE commands o SET state = 'cancelled', finished_at = now(),"
        f" reason = '{SUPERSEDED_PREFIX}' || n.command_id"
        " FROM commands n"
        " WHERE n.command_id = ANY($1::bigint[]) AND o.meter_id = n.meter_id"
        " AND o.setting = n.setting AND o.command_id < n.command_id"
        " AND o.state = ANY($2::text[])",
        list(new_ids),
        sources("cancelled"),
    )
    return int(done.split()[-1])


@translating("queueing a command")
async def create(
    conn: asyncpg.Connection,
    *,
    tenant_id: int,
    meter_id: int,
    kind: str,
    args: Mapping[str, Any],
    ttl_s: int,
    created_by: str,
    idempotency_key: str | None = None,
) -> tuple[Command, bool]:
    """Queue a command to the tenant's meter; (command, created). See the module rules."""
    async with conn.transaction():
        meter = await _meter(conn, tenant_id, meter_id)
        try:
            clean = check_args(kind, meter["format"], args)
        except ValueError as exc:
            raise InvalidCommandError(str(exc)) from exc
        await _require_lwm2m(conn, kind, [meter_id])
        row = await conn.fetchrow(
            "INSERT INTO commands (tenant_id, meter_id, idempotency_key, kind, setting, args,"
            " created_by, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, now() + make_interval(secs => $8))"
            f" ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING {_COLUMNS}",
            tenant_id,
            meter_id,
            idempotency_key,
            kind,
            setting_of(kind, clean),
            _canonical(clean),
            created_by,
            float(ttl_s),
        )
        if row is None:  # the key was used before
            old = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM commands WHERE tenant_id = $1 AND idempotency_key = $2",
                tenant_id,
                idempotency_key,
            )
            assert old is not None  # the conflict was on this row; commands are never deleted
            same = (
                old["meter_id"] == meter_id
                and old["kind"] == kind
                and _canonical(json.loads(old["args"])) == _canonical(clean)
            )
            if not same:
                msg = (
                    f"idempotency key {idempotency_key!r} was used for command"
                    f" {old['command_id']} with another meter, kind or args"
                )
                raise IdempotencyConflictError(msg)
            return _command(old), False
        await _supersede(conn, [row["command_id"]])
        return _command(row), True


def _selection_sql(selection: Mapping[str, Any]) -> tuple[str, list[object]]:
    """WHERE clause (after tenant $1) and its arguments for a bulk selection."""
    if "meter_ids" in selection:
        return "m.meter_id = ANY($2::bigint[])", [list(selection["meter_ids"])]
    if "addresses" in selection:
        return "m.address = ANY($2::text[])", [list(selection["addresses"])]
    query = selection.get("query", {})
    return (
        "($2::text IS NULL OR m.kind = $2) AND ($3::text IS NULL OR m.format = $3)"
        " AND ($4::text IS NULL OR starts_with(m.address, $4))",
        [query.get("kind"), query.get("format"), query.get("address_prefix")],
    )


@translating("queueing a bulk command")
async def bulk(
    conn: asyncpg.Connection,
    *,
    tenant_id: int,
    kind: str,
    args: Mapping[str, Any],
    selection: Mapping[str, Any],
    ttl_s: int,
    created_by: str,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Queue one command to every selected active meter of the tenant, as one job.

    `selection`: {"meter_ids": [...]}, {"addresses": [...]} or {"query": {"kind",
    "format", "address_prefix"}} (each optional). Every selected meter must be able to
    take the command, and listed meters must exist (InvalidCommandError names them);
    at most MAX_BULK meters. (job, created); the same key again returns the job.
    """
    async with conn.transaction():
        if idempotency_key is not None:
            old = await conn.fetchrow(
                "SELECT job_id, kind, args, selection FROM command_jobs"
                " WHERE tenant_id = $1 AND idempotency_key = $2",
                tenant_id,
                idempotency_key,
            )
            if old is not None:
                same = (
                    old["kind"] == kind
                    and json.loads(old["args"]) == dict(args)
                    and json.loads(old["selection"]) == dict(selection)
                )
                if not same:
                    msg = f"idempotency key {idempotency_key!r} was used for job {old['job_id']}"
                    raise IdempotencyConflictError(msg)
                job = await get_job(conn, tenant_id, old["job_id"])
                assert job is not None
                return job, False
        where, params = _selection_sql(selection)
        meters = await conn.fetch(
            f"SELECT m.meter_id, m.address, m.format FROM meters m"
            f" WHERE m.tenant_id = $1 AND m.removed_at IS NULL AND {where}"
            f" ORDER BY m.meter_id LIMIT {MAX_BULK + 1}",
            tenant_id,
            *params,
        )
        _check_bulk(kind, args, selection, meters)
        clean = check_args(kind, meters[0]["format"], args)
        await _require_lwm2m(conn, kind, [r["meter_id"] for r in meters])
        job_id = await conn.fetchval(
            "INSERT INTO command_jobs (tenant_id, idempotency_key, kind, args, selection,"
            " n_commands, created_by) VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7)"
            " RETURNING job_id",
            tenant_id,
            idempotency_key,
            kind,
            _canonical(clean),
            _canonical(selection),
            len(meters),
            created_by,
        )
        new_ids = await conn.fetch(
            "INSERT INTO commands (tenant_id, meter_id, job_id, kind, setting, args, created_by,"
            " expires_at) SELECT $1, m, $2, $3, $4, $5::jsonb, $6,"
            " now() + make_interval(secs => $7) FROM unnest($8::bigint[]) AS m"
            " RETURNING command_id",
            tenant_id,
            job_id,
            kind,
            setting_of(kind, clean),
            _canonical(clean),
            created_by,
            float(ttl_s),
            [r["meter_id"] for r in meters],
        )
        await _supersede(conn, [r["command_id"] for r in new_ids])
        job = await get_job(conn, tenant_id, job_id)
        assert job is not None
        return job, True


def _check_bulk(
    kind: str, args: Mapping[str, Any], selection: Mapping[str, Any], meters: Sequence[Any]
) -> None:
    for key, column in (("meter_ids", "meter_id"), ("addresses", "address")):
        if key in selection:
            missing = sorted(set(selection[key]) - {r[column] for r in meters})
            if missing:
                msg = f"no active meter for {key} {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                raise InvalidCommandError(msg)
    if not meters:
        msg = "the selection names no active meter of this tenant"
        raise InvalidCommandError(msg)
    if len(meters) > MAX_BULK:
        msg = f"the selection holds more than {MAX_BULK} meters: narrow it"
        raise InvalidCommandError(msg)
    unfit: list[int] = []
    for fmt in sorted({r["format"] for r in meters}):
        try:
            check_args(kind, fmt, args)
        except ValueError as exc:
            if "cannot take" not in str(exc):
                raise InvalidCommandError(str(exc)) from exc
            unfit += [r["meter_id"] for r in meters if r["format"] == fmt]
    if unfit:
        msg = (
            f"{len(unfit)} selected meter(s) cannot take a {kind} command (e.g. meter"
            f" {unfit[0]}): narrow the selection, e.g. by format"
        )
        raise InvalidCommandError(msg)


@translating("reading a command job")
async def get_job(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int, job_id: int
) -> Job | None:
    """The tenant's job with its commands counted per state, or None."""
    row = await conn.fetchrow(
        "SELECT j.*, (SELECT coalesce(jsonb_object_agg(state, n), '{}') FROM"
        " (SELECT state, count(*) AS n FROM commands WHERE job_id = j.job_id GROUP BY state) s)"
        " AS counts FROM command_jobs j WHERE j.tenant_id = $1 AND j.job_id = $2",
        tenant_id,
        job_id,
    )
    if row is None:
        return None
    values = dict(row)
    for name in ("args", "selection", "counts"):
        values[name] = json.loads(values[name])
    return Job(**values)


@translating("expiring commands")
async def expire_due(conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int | None = None) -> int:
    """Move the pending commands past their TTL to `expired`; how many moved."""
    done = await conn.execute(
        "UPDATE commands SET state = 'expired', finished_at = now(),"
        " reason = CASE WHEN sent_at IS NULL THEN 'ttl_passed_undelivered'"
        " ELSE 'ttl_passed_unanswered' END"
        " WHERE state = ANY($1::text[]) AND expires_at <= now()"
        " AND ($2::bigint IS NULL OR tenant_id = $2)",
        sources("expired"),
        tenant_id,
    )
    return int(done.split()[-1])


@translating("reading a command")
async def get(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int, command_id: int
) -> Command | None:
    """The tenant's command, or None."""
    await expire_due(conn, tenant_id)
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM commands WHERE tenant_id = $1 AND command_id = $2",
        tenant_id,
        command_id,
    )
    return None if row is None else _command(row)


@translating("listing commands")
async def list_commands(
    conn: asyncpg.Connection | asyncpg.Pool,
    tenant_id: int,
    *,
    meter_id: int | None = None,
    state: str | None = None,
    job_id: int | None = None,
    after: int = 0,
    limit: int = 100,
) -> list[Command]:
    """The tenant's commands in id order (per meter: delivery order), filtered, a page."""
    await expire_due(conn, tenant_id)
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM commands WHERE tenant_id = $1"
        " AND ($2::bigint IS NULL OR meter_id = $2) AND ($3::text IS NULL OR state = $3)"
        " AND ($4::bigint IS NULL OR job_id = $4) AND command_id > $5"
        " ORDER BY command_id LIMIT $6",
        tenant_id,
        meter_id,
        state,
        job_id,
        after,
        limit,
    )
    return [_command(r) for r in rows]


@translating("cancelling a command")
async def cancel(
    conn: asyncpg.Connection, tenant_id: int, command_id: int, cancelled_by: str
) -> Command | None:
    """Cancel a queued command (reason `cancelled_by=<who>`); None if there is no such
    command; NotCancellableError when it is past queued."""
    await expire_due(conn, tenant_id)
    row = await conn.fetchrow(
        "UPDATE commands SET state = 'cancelled', finished_at = now(), reason = $3"
        " WHERE tenant_id = $1 AND command_id = $2 AND state = ANY($4::text[])"
        f" RETURNING {_COLUMNS}",
        tenant_id,
        command_id,
        f"cancelled_by={cancelled_by}",
        sources("cancelled"),
    )
    if row is not None:
        return _command(row)
    old = await get(conn, tenant_id, command_id)
    if old is None:
        return None
    msg = f"command {command_id} is {old.state}: only a queued command can be cancelled"
    raise NotCancellableError(msg)


# --- the collector's side -----------------------------------------------------------------

_CLAIM: Final = """
UPDATE commands c SET state = 'sent', attempts = c.attempts + 1,
    sent_at = coalesce(c.sent_at, now()), last_sent_at = now()
FROM (
    SELECT d.command_id, w.meter_id, w.format, w.kind, w.address, w.slug
    FROM ({source}) AS w
    CROSS JOIN LATERAL (
        SELECT command_id FROM commands
        WHERE meter_id = w.meter_id AND state = ANY($3::text[]) AND expires_at > now()
            AND (kind <> 'read' OR $4::bool)
        ORDER BY command_id LIMIT {limit}
        FOR UPDATE SKIP LOCKED
    ) AS d
) AS due
WHERE c.command_id = due.command_id
RETURNING c.command_id, c.meter_id, c.kind, c.args, due.format, due.kind AS meter_kind,
    due.address, due.slug
"""
_BY_ID: Final = (
    "SELECT m.meter_id, m.format, m.kind, m.address, t.slug FROM meters m"
    " JOIN tenants t USING (tenant_id) WHERE m.meter_id = ANY($1::bigint[]) AND $2::text[] IS NULL"
)
_BY_TOPIC: Final = (
    "SELECT m.meter_id, m.format, m.kind, m.address, t.slug"
    " FROM unnest($1::text[], $2::text[]) AS x(slug, address)"
    " JOIN tenants t ON t.slug = x.slug"
    " JOIN meters m ON m.tenant_id = t.tenant_id AND m.address = x.address"
    " AND m.removed_at IS NULL"
)


@translating("claiming commands")
async def claim(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    meter_ids: Sequence[int] = (),
    topics: Sequence[tuple[str, str]] = (),
    lwm2m: bool = False,
) -> list[Claimed]:
    """Hand out the pending commands of these meters (by id, or by MQTT topic's (tenant
    slug, address)): each becomes `sent`, attempts + 1; at most MAX_PER_WINDOW a meter,
    in order. Commands another collector is handing out right now are skipped. A `read`
    (an LwM2M GET, migration 0051) goes out only in an LwM2M window (`lwm2m=True`): a
    meter that also uplinks on /u or MQTT would not understand it in a JSON envelope.

    Committed without waiting for the WAL flush (synchronous_commit off): the answer it
    rides on waits for no second fsync after the uplink's own. A `sent` mark lost in a
    database crash only makes the command go out again in a later window, which delivery
    at least once (and the device's memory of command ids) already allows.
    """
    if isinstance(conn, asyncpg.Pool):
        async with connection(conn, "claiming commands") as held:
            return await claim(held, meter_ids=meter_ids, topics=topics, lwm2m=lwm2m)
    async with conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit TO off")
        return await _claim(conn, meter_ids, topics, lwm2m)


async def _claim(
    conn: asyncpg.Connection,
    meter_ids: Sequence[int],
    topics: Sequence[tuple[str, str]],
    lwm2m: bool,
) -> list[Claimed]:
    if topics:
        sql = _CLAIM.format(source=_BY_TOPIC, limit=MAX_PER_WINDOW)
        args: list[object] = [[t[0] for t in topics], [t[1] for t in topics]]
    else:
        sql = _CLAIM.format(source=_BY_ID, limit=MAX_PER_WINDOW)
        args = [list(meter_ids), None]
    rows = await conn.fetch(sql, *args, sources("sent"), lwm2m)
    rows = sorted(rows, key=lambda r: r["command_id"])
    return [
        Claimed(
            Pending(
                r["command_id"],
                r["kind"],
                json.loads(r["args"]),
                r["format"],
                r["meter_kind"],
                r["address"],
            ),
            r["meter_id"],
            r["slug"],
        )
        for r in rows
    ]


@translating("recording command results")
async def record_results(
    conn: asyncpg.Connection | asyncpg.Pool, meter_id: int, results: Sequence[DeviceResult]
) -> dict[int, str]:
    """Record a device's answers to its own meter's commands. Per command id: `recorded`
    (moved to acknowledged or failed), `repeated` (it was answered already: nothing
    changes), or `unknown` (no command of this meter that was sent)."""
    if not results:
        return {}
    answers = {r.command_id: r for r in results}  # one answer per id: the last
    ids = list(answers)
    news = ["acknowledged" if answers[i].ok else "failed" for i in ids]
    moved = await conn.fetch(
        "UPDATE commands c SET state = v.new, result = v.result::jsonb, finished_at = now(),"
        " reason = CASE WHEN c.state = 'expired' THEN 'device_answered_after_expiry'"
        " WHEN v.new = 'acknowledged' THEN 'device_confirmed' ELSE 'device_refused' END"
        " FROM unnest($2::bigint[], $3::text[], $4::text[]) AS v(command_id, new, result)"
        " WHERE c.command_id = v.command_id AND c.meter_id = $1 AND c.sent_at IS NOT NULL"
        " AND c.state = ANY($5::text[]) RETURNING c.command_id",
        meter_id,
        ids,
        news,
        [_canonical(_storable(answers[i].result)) for i in ids],
        sorted(set(sources("acknowledged")) | set(sources("failed"))),
    )
    out = dict.fromkeys(ids, "unknown")
    out |= {int(r["command_id"]): "recorded" for r in moved}
    rest = [i for i in ids if out[i] == "unknown"]
    if rest:
        seen = await conn.fetch(
            "SELECT command_id FROM commands WHERE meter_id = $1 AND command_id = ANY($2::bigint[])"
            " AND sent_at IS NOT NULL AND NOT (state = ANY($3::text[]))",
            meter_id,
            rest,
            list(PENDING),
        )
        out |= {int(r["command_id"]): "repeated" for r in seen}
    return out


@translating("looking up a meter")
async def meter_of(conn: asyncpg.Connection | asyncpg.Pool, slug: str, address: str) -> int | None:
    """The active meter `address` of tenant `slug` (an MQTT topic's device), or None."""
    value = await conn.fetchval(
        "SELECT m.meter_id FROM meters m JOIN tenants t USING (tenant_id)"
        " WHERE t.slug = $1 AND m.address = $2 AND m.removed_at IS NULL",
        slug,
        address,
    )
    return None if value is None else int(value)
