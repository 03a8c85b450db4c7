"""Alarm lifecycle (migration 0039): list, acknowledge, close, auto-close, per-tenant rules.

Alarms are *raised* in the database, by the trigger on meter_events (and on device_health
for a tenant's battery threshold), in the transaction that stores the readings: see the
migration. This module moves them along `TRANSITIONS`, the one table of allowed state
changes, so tests can walk every edge:

    open ──acknowledge──> acknowledged ──close──> closed
      │                        │
      └──────close / clear─────┴──clear──> closed      (clear: the sweep's auto-close)

Each change logs an alarm event (`nbm_alarm_event`: the webhook outbox and the MQTT
alert topic take it from there) in the same transaction. Errors: `AlarmNotFoundError`,
`AlarmStateError` (a transition `TRANSITIONS` does not allow), other `storage.errors`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Literal, TypeAlias

import asyncpg

from decoder.columns import Flag
from storage.errors import StorageError
from storage.pool import translating

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

# a connection of its own or one taken from a pool
Conn: TypeAlias = "asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]"

State = Literal["open", "acknowledged", "closed"]
Action = Literal["acknowledge", "close", "clear"]
STATES: tuple[State, ...] = ("open", "acknowledged", "closed")
SWEEP_LOCK = 0x6E626D_616C726D  # advisory lock key of `sweep` ("nbm" "alrm")
SEVERITIES = ("info", "warning", "major", "critical")
# readings with no status of their own: no evidence that a flag's condition cleared
_NO_STATUS = int(Flag.INTERVAL | Flag.BILLING_DATE)

# (state, action) -> (next state, the alarm event it logs)
TRANSITIONS: Mapping[tuple[State, Action], tuple[State, str]] = {
    ("open", "acknowledge"): ("acknowledged", "alarm.acknowledged"),
    ("open", "close"): ("closed", "alarm.closed"),
    ("open", "clear"): ("closed", "alarm.closed"),
    ("acknowledged", "close"): ("closed", "alarm.closed"),
    ("acknowledged", "clear"): ("closed", "alarm.closed"),
}

_COLUMNS = (
    "alarm_id, tenant_id, meter_id, kind, severity, state, opened_at, raised_at, last_seen_at,"
    " occurrences, cleared_at, acked_at, acked_by, ack_note, closed_at, closed_by,"
    " close_reason, close_note"
)
# what each action by a person writes besides the state ($3 key id, $4 note, $5 now);
# `clear` is the sweep's own
_SETS: Mapping[str, str] = {
    "acknowledge": "acked_at = $5, acked_by = $3, ack_note = $4",
    "close": "closed_at = $5, closed_by = $3, close_reason = 'manual', close_note = $4",
}


class AlarmNotFoundError(StorageError):
    """No alarm with this id for this tenant."""


class AlarmStateError(StorageError):
    """The alarm's state does not allow the action (say, acknowledging a closed alarm)."""


def next_state(state: State, action: Action) -> tuple[State, str]:
    """(next state, event type) of `action` from `state`; AlarmStateError if not allowed."""
    got = TRANSITIONS.get((state, action))
    if got is None:
        msg = f"the alarm is {state}: {action} is not allowed"
        raise AlarmStateError(msg)
    return got


@translating("listing alarms")
async def list_alarms(
    conn: asyncpg.Connection | asyncpg.Pool,
    tenant_id: int,
    *,
    states: Sequence[State] = ("open", "acknowledged"),
    meter_id: int | None = None,
    limit: int = 1000,
) -> list[asyncpg.Record]:
    """The tenant's alarms in `states`, newest first."""
    return await conn.fetch(
        f"SELECT {_COLUMNS} FROM alarms WHERE tenant_id = $1 AND state = ANY($2::text[])"
        " AND ($3::bigint IS NULL OR meter_id = $3) ORDER BY alarm_id DESC LIMIT $4",
        tenant_id,
        list(states),
        meter_id,
        limit,
    )


@translating("reading an alarm")
async def get_alarm(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int, alarm_id: int
) -> asyncpg.Record:
    """One alarm of the tenant; AlarmNotFoundError if there is none."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM alarms WHERE tenant_id = $1 AND alarm_id = $2",
        tenant_id,
        alarm_id,
    )
    if row is None:
        msg = f"no alarm {alarm_id}"
        raise AlarmNotFoundError(msg)
    return row


@translating("changing an alarm")
async def transition(
    pool: asyncpg.Pool,
    tenant_id: int,
    alarm_id: int,
    action: Literal["acknowledge", "close"],
    *,
    key_id: str | None,
    note: str | None = None,
) -> asyncpg.Record:
    """Apply `action` to the alarm (row-locked), log its event; return the new row."""
    async with pool.acquire() as conn, conn.transaction():
        state = await conn.fetchval(
            "SELECT state FROM alarms WHERE tenant_id = $1 AND alarm_id = $2 FOR UPDATE",
            tenant_id,
            alarm_id,
        )
        if state is None:
            msg = f"no alarm {alarm_id}"
            raise AlarmNotFoundError(msg)
        new, event = next_state(state, action)
        row = await conn.fetchrow(
            f"UPDATE alarms SET state = $2, {_SETS[action]} WHERE alarm_id = $1"
            f" RETURNING {_COLUMNS}",
            alarm_id,
            new,
            key_id,
            note,
            await conn.fetchval("SELECT now()"),
        )
        await conn.execute("SELECT nbm_alarm_event($1, $2)", alarm_id, event)
        assert row is not None  # locked above
        return row


async def mark_cleared(conn: Conn, at: datetime, tenant_id: int | None = None) -> int:
    """Mark cleared (at that reading's time) the flag-raised alarms not closed whose meter
    sent a reading without the flag after the alarm was last seen and by `at`, of one
    tenant or all; returns how many. The sweep's first step, and the analytics' before
    they judge a day by an alarm's state (valve_closed_flow), so the verdict never depends
    on whether the sweep has come round since the valve reopened.

    Readings expanded from an interval batch or a billing-date register (Flag INTERVAL,
    BILLING_DATE) carry no status of their own and are not evidence of a clear condition.
    """
    got = await conn.fetchval(
        "WITH c AS (SELECT a.alarm_id, (SELECT nbm_at(min(r.read_s)) FROM readings r"
        " WHERE r.meter_id = a.meter_id AND r.read_s > nbm_floor_s(a.last_seen_at)"
        " AND r.read_s <= nbm_floor_s($1)"
        " AND r.flags & (k.flag_bit | $3::int) = 0) AS read_at"
        " FROM alarms a JOIN alarm_kinds k ON k.kind = a.kind"
        " WHERE a.state <> 'closed' AND a.cleared_at IS NULL AND k.flag_bit <> 0"
        " AND ($2::bigint IS NULL OR a.tenant_id = $2)),"
        " u AS (UPDATE alarms SET cleared_at = c.read_at FROM c"
        " WHERE alarms.alarm_id = c.alarm_id AND c.read_at IS NOT NULL RETURNING 1)"
        " SELECT count(*) FROM u",
        at,
        tenant_id,
        _NO_STATUS,
    )
    return int(got)


@translating("sweeping alarms")
async def sweep(pool: asyncpg.Pool, now: datetime | None = None) -> tuple[int, int]:
    """Mark cleared the alarms whose meter sent a reading without the flag since the alarm
    was last seen, then close (`clear`) those cleared for their rule's auto_close_after_s
    by `now` (default: the database's now). Returns (newly cleared, closed); (0, 0) when
    another process is sweeping. The clearing is `mark_cleared`.
    """
    async with pool.acquire() as conn, conn.transaction():
        # one sweeper at a time across collector processes (the others skip this round)
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SWEEP_LOCK):
            return 0, 0
        at = now or await conn.fetchval("SELECT now()")
        cleared = await mark_cleared(conn, at)
        due = await conn.fetch(
            "SELECT a.alarm_id, a.state FROM alarms a JOIN alarm_kinds k ON k.kind = a.kind"
            " LEFT JOIN alarm_rules r ON r.tenant_id = a.tenant_id AND r.kind = a.kind"
            " WHERE a.state <> 'closed' AND a.cleared_at IS NOT NULL"
            " AND coalesce(r.auto_close_after_s, k.auto_close_after_s) >= 0"
            " AND a.cleared_at + make_interval(secs =>"
            " coalesce(r.auto_close_after_s, k.auto_close_after_s)) <= $1"
            " FOR UPDATE OF a SKIP LOCKED",
            at,
        )
        for row in due:
            new, event = next_state(row["state"], "clear")
            await conn.execute(
                "UPDATE alarms SET state = $2, closed_at = $3, close_reason = 'cleared'"
                " WHERE alarm_id = $1",
                row["alarm_id"],
                new,
                at,
            )
            await conn.execute("SELECT nbm_alarm_event($1, $2)", row["alarm_id"], event)
        return int(cleared), len(due)


@translating("reading alarm rules")
async def rules(conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int) -> list[asyncpg.Record]:
    """Every alarm kind with the tenant's effective rule (its override, else the default)."""
    return await conn.fetch(
        "SELECT k.kind, coalesce(r.enabled, true) AS enabled,"
        " coalesce(r.severity, k.severity) AS severity,"
        " coalesce(r.auto_close_after_s, k.auto_close_after_s) AS auto_close_after_s,"
        " coalesce(r.threshold, k.threshold) AS threshold,"
        " coalesce(r.periods, k.periods) AS periods FROM alarm_kinds k"
        " LEFT JOIN alarm_rules r ON r.tenant_id = $1 AND r.kind = k.kind ORDER BY k.kind",
        tenant_id,
    )


@translating("setting an alarm rule")
async def set_rule(
    conn: asyncpg.Connection | asyncpg.Pool,
    tenant_id: int,
    kind: str,
    *,
    enabled: bool = True,
    severity: str | None = None,
    auto_close_after_s: int | None = None,
    threshold: int | None = None,
    periods: int | None = None,
) -> None:
    """Set the tenant's rule for `kind` (None: the kind's default); RowRefusedError for an
    unknown kind or severity."""
    await conn.execute(
        "INSERT INTO alarm_rules (tenant_id, kind, enabled, severity, auto_close_after_s,"
        " threshold, periods) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        " ON CONFLICT (tenant_id, kind) DO UPDATE SET enabled = $3, severity = $4,"
        " auto_close_after_s = $5, threshold = $6, periods = $7",
        tenant_id,
        kind,
        enabled,
        severity,
        auto_close_after_s,
        threshold,
        periods,
    )
