"""A tenant's day so far, for the operations console: uplinks by outcome and the read rate.

The read rate is the AMI figure: active meters with at least one reading dated since the
tenant's local midnight, over active meters. Open lifecycle alarms are counted by kind and
severity. One call, three short queries (today's raw_uplinks chunk, one index probe per
active meter on readings_meter_time, the open alarms).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from storage.pool import Executor, translating


@dataclass(frozen=True)
class Today:
    """The figures of one tenant since `since` (its local midnight)."""

    since: datetime
    timezone: str
    uplinks: dict[str, int]  # outcome -> count
    meters_active: int
    meters_read: int
    open_alarms: list[asyncpg.Record]  # kind, severity, state, alarms


@translating("reading the tenant's day")
async def today(conn: Executor, tenant_id: int) -> Today:
    """Uplinks by outcome, active and read meters since local midnight, open alarm counts."""
    head = await conn.fetchrow(
        "SELECT timezone, date_trunc('day', now() AT TIME ZONE timezone) AT TIME ZONE timezone"
        " AS since FROM tenants WHERE tenant_id = $1",
        tenant_id,
    )
    if head is None:
        return Today(datetime.min, "UTC", {}, 0, 0, [])
    since: datetime = head["since"]
    outcomes = await conn.fetch(
        "SELECT outcome, count(*)::int AS n FROM raw_uplinks"
        " WHERE tenant_id = $1 AND received_at >= $2 GROUP BY outcome ORDER BY outcome",
        tenant_id,
        since,
    )
    meters = await conn.fetchrow(
        "SELECT count(*)::int AS active, count(*) FILTER (WHERE EXISTS ("
        "  SELECT 1 FROM readings r WHERE r.meter_id = m.meter_id AND r.read_s >= nbm_ceil_s($2)"
        "  AND r.read_s <= nbm_floor_s(now() + interval '5 minutes')))::int AS read"
        " FROM meters m WHERE m.tenant_id = $1 AND m.removed_at IS NULL",
        tenant_id,
        since,
    )
    alarms = await conn.fetch(
        "SELECT kind, severity, state, count(*)::int AS alarms FROM alarms"
        " WHERE tenant_id = $1 AND state IN ('open', 'acknowledged')"
        " GROUP BY kind, severity, state ORDER BY kind, severity, state",
        tenant_id,
    )
    return Today(
        since=since,
        timezone=head["timezone"],
        uplinks={r["outcome"]: r["n"] for r in outcomes},
        meters_active=meters["active"] if meters else 0,
        meters_read=meters["read"] if meters else 0,
        open_alarms=list(alarms),
    )
