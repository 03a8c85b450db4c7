"""Webhook endpoints, the durable outbox and its delivery log (migration 0040).

The outbox is written by the database itself (`nbm_alarm_event`), in the transaction that
changes the alarm. This module is the other side: `claim` leases due rows to a
dispatcher (FOR UPDATE SKIP LOCKED, so several dispatchers never send one row at once),
`record` writes what each attempt did, `replay` queues events again. A dispatcher that
dies holding a lease loses nothing: the lease runs out and the row is due again.

Outbox states move along `OUTBOX_TRANSITIONS` only:

    pending ──ok──> delivered        pending ──fail──> pending (next_attempt_at later)
    pending ──give_up──> dead        delivered / dead ──replay──> pending

An endpoint whose attempts keep failing (`failures` consecutive, for at least
`disable_after_s`) is disabled with a reason; `enable` turns it back on.

Signing secrets are sealed (migration 0045) under the credentials key, the same key and
AES-256-GCM as the OSCORE secrets (storage.credentials), bound to the endpoint id:
`create_endpoint` seals, `claim` opens, `seal_clear_secrets` seals rows from before 0045.
Errors: `EndpointNotFoundError`, other `storage.errors`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import structlog

from storage import notify
from storage.credentials import CredentialsError, seal, unseal
from storage.errors import RowRefusedError, StorageError
from storage.pool import translating

log = structlog.get_logger("storage.webhooks")

CHANNEL = "nbmeter_alarms"  # NOTIFY payload: the tenant id (nbm_alarm_event)
APP_NAME = "nbmeter-alarms"

# (state, outcome) -> next state
OUTBOX_TRANSITIONS: Mapping[tuple[str, str], str] = {
    ("pending", "ok"): "delivered",
    ("pending", "fail"): "pending",
    ("pending", "give_up"): "dead",
    ("delivered", "replay"): "pending",
    ("dead", "replay"): "pending",
    ("pending", "replay"): "pending",
}

_ENDPOINT = (
    "endpoint_id, tenant_id, url, kinds, event_types, min_severity, enabled, disabled_at,"
    " disabled_reason, failing_since, failures, created_at"
)


class EndpointNotFoundError(StorageError):
    """No webhook endpoint with this id for this tenant."""


@dataclass(frozen=True)
class Claimed:
    """One leased outbox row: what to send where, and which attempt this is."""

    event_id: str
    endpoint_id: int
    attempt: int
    url: str
    secret: str | None  # None: the sealed secret does not open with the dispatcher's key
    body: bytes
    created_at: datetime  # the event row's time, in the transaction that raised it


@dataclass(frozen=True)
class Attempt:
    """What one delivery attempt did; `retry_at` is when to try again if it failed."""

    event_id: str
    endpoint_id: int
    attempt: int
    attempted_at: datetime
    ok: bool
    status_code: int | None
    error: str | None
    duration_ms: int
    retry_at: datetime | None


def new_secret() -> str:
    """A signing secret for a new endpoint (32 random bytes, URL-safe text)."""
    return secrets.token_urlsafe(32)


MIN_SECRET_CHARS = 16
_PURPOSE = "webhook"  # the AAD is "<endpoint_id>/webhook": a secret opens for its row only


def seal_secret(key: bytes, endpoint_id: int, secret: str) -> bytes:
    """The endpoint's signing secret sealed under the credentials `key`."""
    return seal(key, secret.encode(), endpoint_id, _PURPOSE)


def open_secret(key: bytes | None, endpoint_id: int, sealed: bytes) -> str | None:
    """The signing secret `seal_secret` sealed, or None when it does not open with `key`
    (no key, another key, or a row moved to another endpoint id)."""
    if key is None:
        return None
    try:
        return unseal(key, sealed, endpoint_id, _PURPOSE).decode()
    except CredentialsError:
        return None


@translating("creating a webhook endpoint")
async def create_endpoint(
    conn: asyncpg.Connection | asyncpg.Pool,
    tenant_id: int,
    url: str,
    *,
    key: bytes,
    secret: str | None = None,
    kinds: Sequence[str] | None = None,
    event_types: Sequence[str] | None = None,
    min_severity: str = "info",
) -> tuple[asyncpg.Record, str]:
    """A new enabled endpoint and its signing secret (shown once, stored sealed under the
    credentials `key`); RowRefusedError for a URL that is not http(s), a short secret or
    an unknown severity."""
    secret = secret or new_secret()
    if len(secret) < MIN_SECRET_CHARS:
        msg = f"a webhook secret needs at least {MIN_SECRET_CHARS} characters"
        raise RowRefusedError(msg)
    # the id first, so the sealed secret can be bound to it in the row's own INSERT
    endpoint_id: int = await conn.fetchval(
        "SELECT nextval(pg_get_serial_sequence('webhook_endpoints', 'endpoint_id'))"
    )
    row = await conn.fetchrow(
        "INSERT INTO webhook_endpoints (endpoint_id, tenant_id, url, secret_sealed, kinds,"
        " event_types, min_severity) OVERRIDING SYSTEM VALUE"
        f" VALUES ($7, $1, $2, $3, $4, $5, $6) RETURNING {_ENDPOINT}",
        tenant_id,
        url,
        seal_secret(key, endpoint_id, secret),
        list(kinds) if kinds is not None else None,
        list(event_types) if event_types is not None else None,
        min_severity,
        endpoint_id,
    )
    assert row is not None
    return row, secret


@translating("sealing webhook secrets")
async def seal_clear_secrets(pool: asyncpg.Pool, key: bytes) -> int:
    """Seal every signing secret still stored in clear (rows from before migration 0045)
    under `key`; returns how many were sealed."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "SELECT endpoint_id, secret FROM webhook_endpoints WHERE secret IS NOT NULL FOR UPDATE"
        )
        await conn.executemany(
            "UPDATE webhook_endpoints SET secret_sealed = $2, secret = NULL WHERE endpoint_id = $1",
            [(r["endpoint_id"], seal_secret(key, r["endpoint_id"], r["secret"])) for r in rows],
        )
    return len(rows)


@translating("listing webhook endpoints")
async def endpoints(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int
) -> list[asyncpg.Record]:
    """The tenant's endpoints (without their secrets)."""
    return await conn.fetch(
        f"SELECT {_ENDPOINT} FROM webhook_endpoints WHERE tenant_id = $1 ORDER BY endpoint_id",
        tenant_id,
    )


async def _endpoint_or_404(
    conn: asyncpg.Connection | asyncpg.Pool,
    tenant_id: int,
    endpoint_id: int,
    sql: str,
    *args: object,
) -> asyncpg.Record:
    row = await conn.fetchrow(sql, tenant_id, endpoint_id, *args)
    if row is None:
        msg = f"no webhook endpoint {endpoint_id}"
        raise EndpointNotFoundError(msg)
    return row


@translating("reading a webhook endpoint")
async def get_endpoint(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int, endpoint_id: int
) -> asyncpg.Record:
    """One endpoint of the tenant; EndpointNotFoundError if none."""
    return await _endpoint_or_404(
        conn, tenant_id, endpoint_id,
        f"SELECT {_ENDPOINT} FROM webhook_endpoints WHERE tenant_id = $1 AND endpoint_id = $2",
    )  # fmt: skip


@translating("enabling a webhook endpoint")
async def enable(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int, endpoint_id: int
) -> asyncpg.Record:
    """Turn the endpoint back on (its failure count reset); its pending rows are due now."""
    row = await _endpoint_or_404(
        conn, tenant_id, endpoint_id,
        "UPDATE webhook_endpoints SET enabled = true, disabled_at = NULL, disabled_reason ="
        " NULL, failures = 0, failing_since = NULL WHERE tenant_id = $1 AND endpoint_id = $2"
        f" RETURNING {_ENDPOINT}",
    )  # fmt: skip
    await conn.execute(
        "UPDATE webhook_outbox SET next_attempt_at = clock_timestamp()"
        " WHERE endpoint_id = $1 AND state = 'pending'",
        endpoint_id,
    )
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(tenant_id))
    return row


@translating("deleting a webhook endpoint")
async def delete_endpoint(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int, endpoint_id: int
) -> None:
    """Remove the endpoint, its outbox rows and delivery log."""
    await _endpoint_or_404(
        conn, tenant_id, endpoint_id,
        "DELETE FROM webhook_endpoints WHERE tenant_id = $1 AND endpoint_id = $2"
        " RETURNING endpoint_id",
    )  # fmt: skip


@translating("replaying webhook events")
async def replay(
    conn: asyncpg.Connection | asyncpg.Pool,
    tenant_id: int,
    endpoint_id: int,
    *,
    since: datetime | None = None,
    event_ids: Sequence[str] | None = None,
) -> int:
    """Queue again for the endpoint the tenant's events since `since` (or those of
    `event_ids`) that its filter takes: delivered or not, and also those logged while it
    was disabled. They keep their event ids. Returns how many rows are due now."""
    await get_endpoint(conn, tenant_id, endpoint_id)
    n = await conn.fetchval(
        "WITH q AS (INSERT INTO webhook_outbox (event_id, endpoint_id)"
        " SELECT ev.event_id, e.endpoint_id FROM alarm_events ev"
        " JOIN webhook_endpoints e ON e.endpoint_id = $2 AND e.tenant_id = ev.tenant_id"
        " JOIN alarms a ON a.alarm_id = ev.alarm_id"
        " WHERE ev.tenant_id = $1 AND ($3::timestamptz IS NULL OR ev.created_at >= $3)"
        " AND ($4::uuid[] IS NULL OR ev.event_id = ANY($4::uuid[]))"
        " AND (e.kinds IS NULL OR a.kind = ANY(e.kinds))"
        " AND (e.event_types IS NULL OR ev.event_type = ANY(e.event_types))"
        " AND nbm_severity_rank(a.severity) >= nbm_severity_rank(e.min_severity)"
        " ON CONFLICT (event_id, endpoint_id) DO UPDATE SET state = 'pending',"
        " next_attempt_at = clock_timestamp(), lease_until = NULL, last_error = NULL"
        " RETURNING 1) SELECT count(*) FROM q",
        tenant_id,
        endpoint_id,
        since,
        list(event_ids) if event_ids is not None else None,
    )
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(tenant_id))
    return int(n)


@translating("reading webhook deliveries")
async def deliveries(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int, endpoint_id: int, limit: int = 100
) -> list[asyncpg.Record]:
    """The endpoint's latest delivery attempts, newest first."""
    await get_endpoint(conn, tenant_id, endpoint_id)
    return await conn.fetch(
        "SELECT delivery_id, event_id::text, attempt, attempted_at, status_code, error,"
        " duration_ms, ok FROM webhook_deliveries WHERE endpoint_id = $1"
        " ORDER BY delivery_id DESC LIMIT $2",
        endpoint_id,
        limit,
    )


# the body a receiver gets: built by the database from the stored event, so every attempt
# (and a replay) sends the same bytes
_BODY = (
    "json_build_object('id', ev.event_id, 'type', ev.event_type, 'created_at', ev.created_at,"
    " 'tenant', (SELECT slug FROM tenants t WHERE t.tenant_id = ev.tenant_id),"
    " 'data', ev.payload)::text"
)


@translating("claiming webhook deliveries")
async def claim(
    pool: asyncpg.Pool, limit: int, lease_s: float, key: bytes | None = None
) -> list[Claimed]:
    """Lease up to `limit` due rows of enabled endpoints for `lease_s` seconds, each with
    its signing secret opened with the credentials `key` (None when it does not open)."""
    rows = await pool.fetch(
        "WITH due AS (SELECT o.event_id, o.endpoint_id FROM webhook_outbox o"
        " JOIN webhook_endpoints e ON e.endpoint_id = o.endpoint_id AND e.enabled"
        " WHERE o.state = 'pending' AND o.next_attempt_at <= clock_timestamp()"
        " AND (o.lease_until IS NULL OR o.lease_until < clock_timestamp())"
        " ORDER BY o.next_attempt_at LIMIT $1 FOR UPDATE OF o SKIP LOCKED)"
        " UPDATE webhook_outbox o SET attempts = o.attempts + 1,"
        " lease_until = clock_timestamp() + make_interval(secs => $2)"
        " FROM due, webhook_endpoints e, alarm_events ev"
        " WHERE o.event_id = due.event_id AND o.endpoint_id = due.endpoint_id"
        " AND e.endpoint_id = o.endpoint_id AND ev.event_id = o.event_id"
        " RETURNING o.event_id::text, o.endpoint_id, o.attempts, e.url, e.secret,"
        " e.secret_sealed,"
        f" ev.created_at, {_BODY} AS body",
        limit,
        lease_s,
    )
    opened: dict[int, str | None] = {}
    for r in rows:
        if r["endpoint_id"] not in opened:
            sealed = r["secret_sealed"]
            opened[r["endpoint_id"]] = (
                r["secret"] if sealed is None else open_secret(key, r["endpoint_id"], sealed)
            )
    return [
        Claimed(r["event_id"], r["endpoint_id"], r["attempts"], r["url"],
                opened[r["endpoint_id"]], r["body"].encode(), r["created_at"])
        for r in rows
    ]  # fmt: skip


@translating("recording webhook deliveries")
async def record(
    pool: asyncpg.Pool,
    attempts: Sequence[Attempt],
    *,
    max_attempts: int,
    disable_after_failures: int,
    disable_after_s: float,
) -> list[int]:
    """Log the attempts and move their rows (ok -> delivered, else retry or dead); disable
    endpoints whose failures are sustained. Returns the ids of endpoints disabled now."""
    if not attempts:
        return []
    disabled: list[int] = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO webhook_deliveries (event_id, endpoint_id, attempt, attempted_at,"
            " status_code, error, duration_ms, ok) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            [(a.event_id, a.endpoint_id, a.attempt, a.attempted_at, a.status_code,
              a.error, a.duration_ms, a.ok) for a in attempts],
        )  # fmt: skip
        for a in attempts:
            outcome = "ok" if a.ok else ("give_up" if a.attempt >= max_attempts else "fail")
            state = OUTBOX_TRANSITIONS[("pending", outcome)]
            await conn.execute(
                "UPDATE webhook_outbox SET state = $3, lease_until = NULL, last_error = $4,"
                " delivered_at = CASE WHEN $5::boolean THEN $6::timestamptz END,"
                " next_attempt_at = coalesce($7::timestamptz, next_attempt_at)"
                # a row replayed while this attempt was in flight lost its lease: it
                # stays pending, due now, and goes out again as the replay asked
                " WHERE event_id = $1 AND endpoint_id = $2 AND state = 'pending'"
                " AND lease_until IS NOT NULL",
                a.event_id, a.endpoint_id, state, a.error, a.ok, a.attempted_at, a.retry_at,
            )  # fmt: skip
        for endpoint_id in sorted({a.endpoint_id for a in attempts}):
            mine = [a for a in attempts if a.endpoint_id == endpoint_id]
            last = max(mine, key=lambda a: a.attempted_at)
            if last.ok:
                await conn.execute(
                    "UPDATE webhook_endpoints SET failures = 0, failing_since = NULL"
                    " WHERE endpoint_id = $1",
                    endpoint_id,
                )
                continue
            failed = sum(not a.ok for a in mine)
            first = min(a.attempted_at for a in mine if not a.ok)
            why = f"HTTP {last.status_code}" if last.status_code else (last.error or "failed")
            off = await conn.fetchval(
                "UPDATE webhook_endpoints SET failures = failures + $2::integer,"
                " failing_since = coalesce(failing_since, $3::timestamptz),"
                " enabled = CASE WHEN failures + $2 >= $4::integer AND coalesce(failing_since, $3)"
                " <= $5::timestamptz - make_interval(secs => $6::double precision)"
                " THEN false ELSE enabled END"
                " WHERE endpoint_id = $1 RETURNING NOT enabled AND disabled_at IS NULL",
                endpoint_id, failed, first, disable_after_failures, last.attempted_at,
                disable_after_s,
            )  # fmt: skip
            if off:
                await conn.execute(
                    "UPDATE webhook_endpoints SET disabled_at = $2, disabled_reason ="
                    " format('%s consecutive failed deliveries since %s; last: %s',"
                    " failures, failing_since, $3::text) WHERE endpoint_id = $1",
                    endpoint_id, last.attempted_at, why,
                )  # fmt: skip
                disabled.append(endpoint_id)
    return disabled


@translating("claiming MQTT alerts")
async def unsent_alerts(pool: asyncpg.Pool, limit: int) -> list[asyncpg.Record]:
    """Alarm events not yet published on their tenant's MQTT alert topic, oldest first."""
    return await pool.fetch(
        f"SELECT ev.event_id::text, t.slug, {_BODY} AS body FROM alarm_events ev"
        " JOIN tenants t ON t.tenant_id = ev.tenant_id WHERE ev.mqtt_sent_at IS NULL"
        " ORDER BY ev.seq LIMIT $1",
        limit,
    )


@translating("marking MQTT alerts sent")
async def mark_alerts_sent(pool: asyncpg.Pool, event_ids: Sequence[str]) -> None:
    """Record that these events were published (acknowledged by the broker)."""
    await pool.execute(
        "UPDATE alarm_events SET mqtt_sent_at = clock_timestamp() WHERE event_id = ANY($1::uuid[])",
        list(event_ids),
    )


async def listen_alarms(dsn: str, wake: Callable[[], None], *, check_every_s: float = 5.0) -> None:
    """Forever: call `wake()` on each NOTIFY `CHANNEL` and each time listening (re)starts
    (an event committed while the connection was down was missed: look). The loop is
    `storage.notify.listen`'s."""

    def state(up: bool, why: str | None) -> None:
        if up:
            wake()
        else:
            log.info("alarms_listener.lost", why=why)

    await notify.listen(
        dsn, CHANNEL, lambda _payload: wake(), state, app_name=APP_NAME,
        check_every_s=check_every_s, check_timeout_s=check_every_s,
    )  # fmt: skip
