"""Analytics from interval data (migration 0043), raising alarms through the lifecycle.

`run` is the whole job: for each tenant it rolls up the finished local days not yet done
(`rollup`: one `meter_days` row per meter and day from the readings of that day), judges
each day against the per-meter rules of `DAY_RULES` and the districts' balance
(`district_loss`), then checks for silent meters against `meter_last_seen` (kept by a
trigger on the raw archive, so nothing here scans raw_uplinks). Alarms are raised with
`nbm_raise_alarm`, the function the meter_events trigger uses, so they de-duplicate while
open, honour the tenant's rules and reach the webhook outbox and MQTT topic; when a later
day shows the condition gone the alarm is marked cleared and the alarm sweep closes it.

Thresholds and persistence come from `alarm_rules` (threshold, periods) over the kind's
defaults in `alarm_kinds`. Everything is exact: volumes in integer mL, ratios compared
by cross-multiplying integers. One run at a time (an advisory lock); the collector runs
it every `analytics.every_s`, `nbmeter analytics run --day` recomputes given days.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from storage import alarms
from storage.pool import translating

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

# a connection of its own or one taken from a pool
Conn: TypeAlias = "asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]"

RUN_LOCK = 0x6E626D_616E6C79  # advisory lock key of `run` ("nbm" "anly")
CATCH_UP_DAYS = 3  # finished days a run looks back for days not yet rolled up

# the tenant's local day: its start s, end e, and the end of its night window n5
_BOUNDS = (
    "SELECT ($2::date::timestamp AT TIME ZONE t.timezone) AS s,"
    " (($2::date + 1)::timestamp AT TIME ZONE t.timezone) AS e,"
    " (($2::date + time '02:00') AT TIME ZONE t.timezone) AS n2,"
    " (($2::date + time '05:00') AT TIME ZONE t.timezone) AS n5"
    " FROM tenants t WHERE t.tenant_id = $1"
)

_ROLLUP = f"""
WITH b AS ({_BOUNDS}),
r AS (
    SELECT r.meter_id, nbm_at(r.read_s) AS read_at, r.register_ml,
           lag(r.register_ml) OVER w AS prev_ml, nbm_at(lag(r.read_s) OVER w) AS prev_at,
           nbm_at(lead(r.read_s) OVER w) AS next_at
    FROM readings r JOIN meters m ON m.meter_id = r.meter_id, b
    WHERE m.tenant_id = $1 AND r.read_s > nbm_floor_s(b.s - interval '1 hour')
      AND r.read_s <= nbm_floor_s(b.e)
    WINDOW w AS (PARTITION BY r.meter_id ORDER BY r.read_s)),
g AS (
    SELECT r.meter_id,
        count(*) FILTER (WHERE r.read_at >= b.s AND r.read_at < b.e) AS n,
        -- the newest reading at or before a boundary is the one whose next is past it
        -- (one row each: max() just picks it, without sorting again)
        max(r.register_ml) FILTER (WHERE r.read_at <= b.s
            AND (r.next_at IS NULL OR r.next_at > b.s)) AS start_ml,
        max(r.register_ml) FILTER (WHERE r.read_at > b.e - interval '1 hour'
            AND r.next_at IS NULL) AS end_ml,
        min(r.register_ml - r.prev_ml) FILTER (WHERE r.prev_at >= b.n2 AND r.read_at <= b.n5
            AND r.read_at - r.prev_at = interval '1 hour') AS night_ml
    FROM r, b GROUP BY r.meter_id)
INSERT INTO meter_days AS d
    (meter_id, day, tenant_id, n_readings, start_ml, end_ml, volume_ml, night_min_ml)
SELECT meter_id, $2, $1, n, start_ml, end_ml,
       CASE WHEN end_ml >= start_ml THEN end_ml - start_ml END,
       CASE WHEN night_ml >= 0 THEN night_ml END
FROM g
ON CONFLICT (meter_id, day) DO UPDATE SET n_readings = EXCLUDED.n_readings,
    start_ml = EXCLUDED.start_ml, end_ml = EXCLUDED.end_ml, volume_ml = EXCLUDED.volume_ml,
    night_min_ml = EXCLUDED.night_min_ml
"""

# the tenant's threshold and periods of kind $3
_CFG = (
    "SELECT coalesce(r.threshold, k.threshold)::bigint AS thr,"
    " coalesce(r.periods, k.periods) AS n FROM alarm_kinds k"
    " LEFT JOIN alarm_rules r ON r.tenant_id = $1 AND r.kind = k.kind WHERE k.kind = $3"
)


@dataclass(frozen=True)
class DayRule:
    """A per-meter rule on meter_days: `scope` (SQL over meters m and alarms) picks the
    meters it applies to, `value` (a meter_days d column) is compared with the threshold
    on `periods` days running, `at` (s, e, n5 of the day) is when the evidence is complete."""

    scope: str
    value: str
    at: str


DAY_RULES: Mapping[str, DayRule] = {
    # a district's bulk meter always flows at night: its losses are district_loss
    "night_flow": DayRule(
        "m.kind = 'water' AND NOT EXISTS (SELECT 1 FROM districts x"
        " WHERE x.bulk_meter_id = m.meter_id)",
        "d.night_min_ml",
        "n5",
    ),
    "gas_night_use": DayRule("m.kind = 'gas'", "d.night_min_ml", "n5"),
    "gas_overuse": DayRule("m.kind = 'gas'", "d.volume_ml", "e"),
    # the valve was reported closed before the day began and not reopened by its end: a
    # reading without the flag at the very end (a daily meter) shows it open by then
    # (judged for that day: a day rolled up after the reopen must not see today's state)
    "valve_closed_flow": DayRule(
        "EXISTS (SELECT 1 FROM alarms v WHERE v.meter_id = m.meter_id"
        " AND v.kind = 'valve_closed' AND (v.cleared_at IS NULL OR v.cleared_at > b.e)"
        " AND coalesce(v.closed_at, 'infinity') >= b.e AND v.opened_at <= b.s)",
        "d.volume_ml",
        "e",
    ),
}

# raise where `hit`, mark cleared where `clear` (tables h with meter_id, hit, clear; b; $3)
_RAISE_CLEAR = """,
raised AS (
    SELECT nbm_raise_alarm(h.meter_id, $3, b.{at}) AS id FROM h, b WHERE h.hit
    AND NOT EXISTS (SELECT 1 FROM alarms a WHERE a.meter_id = h.meter_id AND a.kind = $3
                    AND a.state <> 'closed' AND a.last_seen_at >= b.{at})),
cleared AS (
    UPDATE alarms a SET cleared_at = b.{at} FROM h, b
    WHERE h.clear AND a.meter_id = h.meter_id AND a.kind = $3 AND a.state <> 'closed'
      AND a.cleared_at IS NULL AND a.last_seen_at < b.{at}
    RETURNING 1)
SELECT (SELECT count(id) FROM raised), (SELECT count(*) FROM cleared)
"""


def _day_rule_sql(rule: DayRule) -> str:
    cond = f"({rule.scope} AND {rule.value} >= cfg.thr)"
    return (
        f"WITH b AS ({_BOUNDS}), cfg AS ({_CFG}),"
        f" h AS (SELECT d.meter_id, count(*) FILTER (WHERE {cond}) = max(cfg.n) AS hit,"
        f" bool_or(d.day = $2 AND NOT {cond}) AS clear"
        " FROM meter_days d JOIN meters m ON m.meter_id = d.meter_id, cfg, b"
        " WHERE d.tenant_id = $1 AND d.day > $2::date - cfg.n AND d.day <= $2"
        " GROUP BY d.meter_id)" + _RAISE_CLEAR.format(at=rule.at)
    )


# a covered day (bulk and every customer) whose loss is >= threshold % of the bulk volume
_DISTRICT_LOSS = (
    f"WITH b AS ({_BOUNDS}), cfg AS ({_CFG}),"
    " x AS (SELECT z.bulk_meter_id AS meter_id, z.day,"
    " (z.bulk_ml IS NOT NULL AND z.n_covered = z.n_customers) AS covered,"
    " (z.bulk_ml - z.customers_ml) * 100 >= cfg.thr * z.bulk_ml AND z.bulk_ml > 0 AS loss"
    " FROM cfg, nbm_district_balance($1, $2::date - (SELECT n FROM cfg) + 1, $2) z),"
    " h AS (SELECT x.meter_id, count(*) FILTER (WHERE x.covered AND x.loss) = max(cfg.n)"
    " AS hit, bool_or(x.day = $2 AND x.covered AND NOT x.loss) AS clear"
    " FROM x, cfg GROUP BY x.meter_id)" + _RAISE_CLEAR.format(at="e")
)

# meters that have not sent an uplink for threshold s x periods (never: since created)
_SILENT = """
WITH cfg AS (
    SELECT t.tenant_id, coalesce(r.threshold, k.threshold)::bigint
           * coalesce(r.periods, k.periods) AS limit_s
    FROM tenants t JOIN alarm_kinds k ON k.kind = 'silent'
    LEFT JOIN alarm_rules r ON r.tenant_id = t.tenant_id AND r.kind = 'silent'),
s AS (
    SELECT m.meter_id, coalesce(ls.last_uplink_at, m.created_at) AS seen,
           coalesce(ls.last_uplink_at, m.created_at) + make_interval(secs => cfg.limit_s)
           AS due
    FROM meters m JOIN cfg ON cfg.tenant_id = m.tenant_id
    LEFT JOIN meter_last_seen ls ON ls.meter_id = m.meter_id
    WHERE m.removed_at IS NULL AND ($2::bigint IS NULL OR m.tenant_id = $2)),
raised AS (
    SELECT nbm_raise_alarm(s.meter_id, 'silent', s.due) AS id FROM s WHERE s.due <= $1
    AND NOT EXISTS (SELECT 1 FROM alarms a WHERE a.meter_id = s.meter_id
                    AND a.kind = 'silent' AND a.state <> 'closed')),
cleared AS (
    UPDATE alarms a SET cleared_at = s.seen FROM s
    WHERE a.meter_id = s.meter_id AND a.kind = 'silent' AND a.state <> 'closed'
      AND a.cleared_at IS NULL AND s.due > $1
    RETURNING 1)
SELECT (SELECT count(id) FROM raised), (SELECT count(*) FROM cleared),
       (SELECT count(*) FROM s WHERE s.due <= $1)
"""


@dataclass
class RunReport:
    """What one run did: the tenant-days rolled up, alarms raised (or renewed) and marked
    cleared per kind, and the meters silent at its end."""

    days: list[tuple[int, date]] = field(default_factory=list)
    meter_days: int = 0
    raised: dict[str, int] = field(default_factory=dict)
    cleared: dict[str, int] = field(default_factory=dict)
    silent: int = 0
    skipped: bool = False  # another run held the lock

    def count(self, kind: str, raised: int, cleared: int) -> None:
        """Add one rule's counts."""
        self.raised[kind] = self.raised.get(kind, 0) + raised
        self.cleared[kind] = self.cleared.get(kind, 0) + cleared


async def rollup(conn: Conn, tenant_id: int, day: date) -> int:
    """(Re)compute the tenant's meter_days of local `day`; the number of meter rows."""
    done = await conn.execute(_ROLLUP, tenant_id, day)
    n = int(done.rsplit(" ", 1)[1])
    await conn.execute(
        "INSERT INTO analytics_days (tenant_id, day, n_meters) VALUES ($1, $2, $3)"
        " ON CONFLICT (tenant_id, day) DO UPDATE SET computed_at = now(), n_meters = $3",
        tenant_id,
        day,
        n,
    )
    return n


async def judge_day(conn: Conn, tenant_id: int, day: date, report: RunReport) -> None:
    """Raise and clear the day rules' and district_loss alarms of the tenant's `day`."""
    for kind, rule in DAY_RULES.items():
        row = await conn.fetchrow(_day_rule_sql(rule), tenant_id, day, kind)
        assert row is not None  # an aggregate: one row
        report.count(kind, *row)
    row = await conn.fetchrow(_DISTRICT_LOSS, tenant_id, day, "district_loss")
    assert row is not None
    report.count("district_loss", *row)


async def judge_silent(conn: Conn, now: datetime, tenant_id: int | None, report: RunReport) -> None:
    """Raise silent alarms for meters past their limit; clear those that spoke again."""
    row = await conn.fetchrow(_SILENT, now, tenant_id)
    assert row is not None  # an aggregate: one row
    raised, cleared, report.silent = row
    report.count("silent", raised, cleared)


@translating("running analytics")
async def run(
    pool: asyncpg.Pool,
    *,
    now: datetime | None = None,
    days: Sequence[date] | None = None,
    tenant_id: int | None = None,
) -> RunReport:
    """One analytics run at `now` (default: the database's). Without `days`: each tenant's
    finished local days of the last CATCH_UP_DAYS not yet rolled up; with `days`: those
    days again. Then the silent check. One transaction; skipped if another run holds the
    lock."""
    report = RunReport()
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RUN_LOCK):
            report.skipped = True
            return report
        at = now or await conn.fetchval("SELECT now()")
        tenants = await conn.fetch(
            "SELECT tenant_id, ($1 AT TIME ZONE timezone)::date AS today FROM tenants"
            " WHERE $2::bigint IS NULL OR tenant_id = $2 ORDER BY tenant_id",
            at,
            tenant_id,
        )
        # the alarms the readings show cleared, before a day is judged by an alarm's
        # state: a valve reported open again ends valve_closed there, whether or not the
        # alarm sweep has run since
        await alarms.mark_cleared(conn, at, tenant_id)
        for t in tenants:
            todo = list(days) if days is not None else await _due(conn, t["tenant_id"], t["today"])
            for day in sorted(todo):
                report.meter_days += await rollup(conn, t["tenant_id"], day)
                await judge_day(conn, t["tenant_id"], day, report)
                report.days.append((t["tenant_id"], day))
        await judge_silent(conn, at, tenant_id, report)
    return report


async def _due(conn: Conn, tenant_id: int, today: date) -> list[date]:
    finished = [today - timedelta(days=k) for k in range(CATCH_UP_DAYS, 0, -1)]
    done = await conn.fetch(
        "SELECT day FROM analytics_days WHERE tenant_id = $1 AND day = ANY($2::date[])",
        tenant_id,
        finished,
    )
    have = {r["day"] for r in done}
    return [d for d in finished if d not in have]


@translating("reading the read rate")
async def read_rate(conn: Conn | asyncpg.Pool, tenant_id: int, day: date) -> list[asyncpg.Record]:
    """The read success rate of local `day`: meters with at least one reading that day /
    meters installed and not removed during it, for the tenant (district_id NULL) and for
    each district (its bulk and customer meters). Columns: district_id, meters_active,
    meters_read, readings. Needs the day rolled up (see `day_computed_at`)."""
    return await conn.fetch(
        f"WITH b AS ({_BOUNDS}),"
        " a AS (SELECT m.meter_id, coalesce(d.n_readings, 0) AS n FROM b, meters m"
        " LEFT JOIN meter_days d ON d.meter_id = m.meter_id AND d.day = $2"
        " WHERE m.tenant_id = $1 AND m.installed_at < b.e"
        " AND (m.removed_at IS NULL OR m.removed_at > b.s)),"
        " members AS (SELECT district_id, bulk_meter_id AS meter_id FROM districts"
        " WHERE tenant_id = $1 UNION ALL SELECT dm.district_id, dm.meter_id"
        " FROM district_meters dm JOIN districts d ON d.district_id = dm.district_id"
        " WHERE d.tenant_id = $1)"
        " SELECT NULL::bigint AS district_id, count(*) AS meters_active,"
        " count(*) FILTER (WHERE a.n > 0) AS meters_read,"
        " coalesce(sum(a.n), 0)::bigint AS readings FROM a"
        " UNION ALL SELECT mb.district_id, count(*), count(*) FILTER (WHERE a.n > 0),"
        " coalesce(sum(a.n), 0)::bigint FROM members mb JOIN a ON a.meter_id = mb.meter_id"
        " GROUP BY mb.district_id ORDER BY district_id NULLS FIRST",
        tenant_id,
        day,
    )


@translating("reading when a day was rolled up")
async def day_computed_at(conn: Conn | asyncpg.Pool, tenant_id: int, day: date) -> datetime | None:
    """When the tenant's `day` was last rolled up (None: not yet)."""
    got: datetime | None = await conn.fetchval(
        "SELECT computed_at FROM analytics_days WHERE tenant_id = $1 AND day = $2",
        tenant_id,
        day,
    )
    return got
