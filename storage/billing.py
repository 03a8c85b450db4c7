"""Billing queries: cycle calendar, cycle boundary reads (set-wise), publication, interval reads.

Set-wise boundary reads (export, cycle close, interval series) come from the SQL function
`nbm_boundary_read` (migrations 0020/0021/0033/0049). A single meter's cycle read computes the
same reads in Python from one range scan (billing.boundary, storage.meter_cycle), held
equal to the SQL by tests/api/test_boundary_twin.py: every path agrees to the millilitre.
The SQL here is the set-wise twin of the billing core, kept for the export's speed:
`_m3` of billing.units.m3, `nbm_consumption` of billing.consumption.consumption, `_gap`
of billing.boundary.gap_across, `_CONSUMPTION_QUALITY` of billing.quality.mixed,
`_REVISED` of billing.cycle.Side.revised, PUBLISH_SQL of billing.cycle.to_publish.
Registers are int millilitres here; the export's SQL renders m3 decimal strings with the
register's own number of decimals (`round(ml / 1e6, -register_scale)`), never a float.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any, TypeAlias
from zoneinfo import ZoneInfo

import asyncpg

from billing import quality
from billing.boundary import Method, Reading, Tuning
from billing.consumption import MAX_FLOW_ML_H
from billing.cycle import Published
from billing.units import ML_PER_M3
from billing.vee import Event
from storage.pool import connection, translating

Conn: TypeAlias = asyncpg.Connection | asyncpg.Pool


def _max_flow_sql(kind: str) -> str:
    """billing.consumption.MAX_FLOW_ML_H as an SQL CASE on the meter kind."""
    cases = " ".join(f"WHEN '{k}' THEN {v}" for k, v in MAX_FLOW_ML_H.items())
    return f"(CASE {kind} {cases} END)::numeric"


def _m3(ml: str, scale: str) -> str:
    """m3 text of `ml` with the register's decimals. Python twin: billing.units.m3 (numeric
    round() is half away from zero, and never gives -0)."""
    return f"round(({ml})::numeric / {ML_PER_M3}, -({scale}))::text"


# $1 tenant, $2 cycle start date, $3 cycle end date (local), $4 after meter_id, $5 limit
# (NULL: all), $6 actual window, $7 / $8 the cycle's start / end
# instants in zone $9: one query per timezone, so the boundaries are plan-time constants
# (see nbm_boundary_read on chunk exclusion); $10 the last meter_id (a segment's end);
# $11 the VEE gap limit (every statement names it, so each takes the same arguments).
_CORE = f"""
WITH m AS (
    SELECT m.meter_id, m.address, m.service_point, m.kind, m.register_scale AS scale,
           m.register_digits AS digits, m.installed_at, m.removed_at, m.initial_register_ml,
           m.final_register_ml, {_max_flow_sql("m.kind")} AS max_flow, w.open_at, w.close_at,
           $2::date AS cycle_start, $3::date AS cycle_end, $11::interval AS max_gap
    FROM meters m JOIN tenants t ON t.tenant_id = m.tenant_id
    CROSS JOIN LATERAL (SELECT $7::timestamptz AS open_at, $8::timestamptz AS close_at) w
    WHERE m.tenant_id = $1 AND m.meter_id > $4 AND m.meter_id <= $10
      AND coalesce(m.timezone, t.timezone) = $9
      AND m.installed_at < w.close_at AND (m.removed_at IS NULL OR m.removed_at > w.open_at)
    ORDER BY m.meter_id LIMIT $5
), b AS (
    SELECT m.*, greatest(m.open_at, m.installed_at) AS o_at,
           CASE WHEN m.installed_at >= m.open_at THEN 'install' END AS o_edge,
           least(m.close_at, m.removed_at) AS c_at,
           CASE WHEN m.removed_at <= m.close_at THEN 'remove' END AS c_edge
    FROM m
)
SELECT {{columns}}
FROM b
-- OFFSET 0 keeps each boundary read a computed row: flattened, every reference to one of its
-- columns would re-evaluate the function's CASE arithmetic (3x slower export)
CROSS JOIN LATERAL (SELECT * FROM nbm_boundary_read(b.meter_id, b.o_at, b.o_edge, $7,
    b.installed_at, b.removed_at, b.initial_register_ml, b.final_register_ml, b.scale, b.digits,
    b.max_flow, $6) OFFSET 0) o
CROSS JOIN LATERAL (SELECT * FROM nbm_boundary_read(b.meter_id, b.c_at, b.c_edge, $8,
    b.installed_at, b.removed_at, b.initial_register_ml, b.final_register_ml, b.scale, b.digits,
    b.max_flow, $6) OFFSET 0) c
CROSS JOIN LATERAL (SELECT nbm_consumption(o.register_ml, c.register_ml,
    extract(epoch FROM b.c_at - b.o_at), b.scale, b.digits, b.max_flow) AS ml) u
{{published}}
ORDER BY b.meter_id
"""

_PUBLISHED = """
LEFT JOIN LATERAL (SELECT p.register_ml, p.revision FROM published_boundary_reads p
    WHERE p.meter_id = b.meter_id AND p.boundary_at = b.o_at
    ORDER BY p.revision DESC LIMIT 1) po ON true
LEFT JOIN LATERAL (SELECT p.register_ml, p.revision FROM published_boundary_reads p
    WHERE p.meter_id = b.meter_id AND p.boundary_at = b.c_at
    ORDER BY p.revision DESC LIMIT 1) pc ON true
"""


def _gap(s: str) -> str:
    """A boundary read interpolated across an outage longer than the gap limit: the gap
    measured between the readings around the boundary, not cut at the cycle edge.
    Python twin: billing.boundary.gap_across."""
    return f"({s}.method = 'interpolated' AND {s}.next_at - {s}.prev_at > b.max_gap)"


def _side_json(s: str, pub: str) -> str:
    register = _m3(f"{s}.register_ml", "b.scale")
    return f"""json_build_object('at', b.{s}_at, 'register_m3', {register},
        'method', {s}.method, 'basis', {s}.basis, 'quality', {s}.quality,
        'read_at', {s}.basis_at, 'gap', {_gap(s)}, 'revision', {pub}.revision,
        'published_register_m3', {_m3(f"{pub}.register_ml", "b.scale")})"""


# Python twin: billing.quality.mixed
_CONSUMPTION_QUALITY = (
    "CASE WHEN o.quality IS NULL OR c.quality IS NULL THEN NULL"
    f" WHEN o.quality = c.quality THEN o.quality ELSE {quality.MIXED} END"
)
# Python twin: billing.cycle.Side.revised
_REVISED = (
    "(coalesce(po.revision, 0) > 1 OR coalesce(pc.revision, 0) > 1"
    " OR (po.revision IS NOT NULL AND po.register_ml IS DISTINCT FROM o.register_ml)"
    " OR (pc.revision IS NOT NULL AND pc.register_ml IS DISTINCT FROM c.register_ml))"
)

JSON_COLUMNS = f"""json_build_object('meter_id', b.meter_id, 'address', b.address,
    'service_point', b.service_point, 'kind', b.kind, 'cycle', $2::date, 'unit', 'm3',
    'opening', {_side_json("o", "po")},
    'closing', {_side_json("c", "pc")},
    'consumption_m3', {_m3("u.ml", "b.scale")}, 'consumption_quality', {_CONSUMPTION_QUALITY},
    'rolled_over', coalesce(u.ml > c.register_ml - o.register_ml, false),
    'reverse', coalesce(u.ml < 0, false), 'revised', {_REVISED})::text AS line"""

CSV_HEADER = (
    "meter_id,address,service_point,kind,cycle,unit,opening_at,opening_register_m3,opening_method,"
    "opening_quality,closing_at,closing_register_m3,closing_method,closing_quality,consumption_m3,"
    "consumption_quality,rolled_over,reverse,revised,opening_gap,closing_gap"
)
CSV_COLUMNS = f"""b.meter_id, b.address, b.service_point, b.kind, $2::date, 'm3',
    b.o_at, {_m3("o.register_ml", "b.scale")}, o.method, o.quality,
    b.c_at, {_m3("c.register_ml", "b.scale")}, c.method, c.quality,
    {_m3("u.ml", "b.scale")}, {_CONSUMPTION_QUALITY},
    coalesce(u.ml > c.register_ml - o.register_ml, false), coalesce(u.ml < 0, false), {_REVISED},
    {_gap("o")}, {_gap("c")}"""

# nbm_consumption: Python twin billing.consumption.consumption; rolled_over and reverse as
# billing.cycle.cycle_row has them
CYCLE_JSON_SQL = _CORE.format(columns=JSON_COLUMNS, published=_PUBLISHED)
CYCLE_CSV_SQL = _CORE.format(columns=CSV_COLUMNS, published=_PUBLISHED)


# Python twin: billing.cycle.to_publish (one meter's reads, storage.meter_cycle)
PUBLISH_SQL = (
    "WITH src AS ("
    + _CORE.format(
        columns="b.meter_id, b.o_at, o.register_ml AS o_ml, o.method AS o_method, o.quality AS"
        " o_quality, b.c_at, c.register_ml AS c_ml, c.method AS c_method, c.quality AS c_quality",
        published="",
    )
    + """), sides AS (
    SELECT s.meter_id, v.at, v.ml, v.method, v.quality FROM src s
    CROSS JOIN LATERAL (VALUES (s.o_at, s.o_ml, s.o_method, s.o_quality),
                               (s.c_at, s.c_ml, s.c_method, s.c_quality))
        v(at, ml, method, quality)
    WHERE v.at <= now()
), ins AS (
    INSERT INTO published_boundary_reads
        (meter_id, boundary_at, revision, register_ml, method, quality)
    SELECT s.meter_id, s.at, coalesce(l.revision, 0) + 1, s.ml, s.method, s.quality FROM sides s
    LEFT JOIN LATERAL (SELECT p.revision, p.register_ml FROM published_boundary_reads p
        WHERE p.meter_id = s.meter_id AND p.boundary_at = s.at
        ORDER BY p.revision DESC LIMIT 1) l ON true
    WHERE l.revision IS NULL OR l.register_ml IS DISTINCT FROM s.ml
    ON CONFLICT DO NOTHING RETURNING revision
)
SELECT (SELECT count(*) FROM sides) AS boundaries,
       count(*) FILTER (WHERE revision = 1) AS published,
       count(*) FILTER (WHERE revision > 1) AS revised FROM ins"""
)


LAST_ID = 2**63 - 1  # no upper meter_id bound

# The API's session settings (api.app), as startup parameters: they survive the RESET ALL
# the pool runs when a connection is released (a SET in the pool's `init` would be lost
# after the first query). The cycle queries here are planned for them:
# - UTC: JSON timestamps come out as +00:00.
# - no JIT: compiling the wide cycle query costs seconds, far more than it saves.
# - no runtime chunk exclusion: cycle boundaries are plan-time constants already, and
#   re-checking ~60 chunks on every per-meter rescan cost 8x the index probes themselves.
# - generic plans: the cycle query spans every chunk and takes ~100 ms to plan; planned once
#   per connection, its boundary parameters still exclude chunks at executor startup.
SESSION_SETTINGS = {
    "TimeZone": "UTC",
    "jit": "off",
    "timescaledb.enable_runtime_exclusion": "off",
    "plan_cache_mode": "force_generic_plan",
}


@dataclass(frozen=True)
class CycleQuery:
    """One cycle query: tenant, local cycle dates, and the zone whose meters it covers."""

    tenant_id: int
    start: date
    end: date
    zone: str
    tuning: Tuning

    def args(
        self, *, after: int = 0, limit: int | None = None, upto: int = LAST_ID
    ) -> tuple[Any, ...]:
        """Positional arguments $1..$11 of CYCLE_JSON_SQL / CYCLE_CSV_SQL / PUBLISH_SQL."""
        tz = ZoneInfo(self.zone)
        open_at = datetime.combine(self.start, time(), tzinfo=tz).astimezone(UTC)
        close_at = datetime.combine(self.end, time(), tzinfo=tz).astimezone(UTC)
        return (
            self.tenant_id,
            self.start,
            self.end,
            after,
            limit,
            self.tuning.actual_window,
            open_at,
            close_at,
            self.zone,
            upto,
            self.tuning.max_gap,
        )


@translating("listing the tenant's timezones")
async def zones(conn: Conn, tenant_id: int) -> list[str]:
    """The timezones of the tenant's meters: the tenant's own first, then the others sorted."""
    rows = await conn.fetch(
        "SELECT z, z = t.timezone AS own FROM tenants t CROSS JOIN LATERAL ("
        " SELECT DISTINCT m.timezone AS z FROM meters m WHERE m.tenant_id = t.tenant_id"
        " AND m.timezone IS NOT NULL"  # the partial index meters_tenant_timezone
        " UNION SELECT t.timezone) zs WHERE t.tenant_id = $1 ORDER BY own DESC, z",
        tenant_id,
    )
    return [r["z"] for r in rows]


@translating("reading billing-cycle lines")
async def cycle_lines(conn: Conn, args: tuple[Any, ...]) -> list[str]:
    """The JSON text of each meter's cycle read (one page: give `limit` in args)."""
    rows = await conn.fetch(CYCLE_JSON_SQL, *args)
    return [r["line"] for r in rows]


@translating("publishing billing-cycle reads")
async def publish(conn: Conn, args: tuple[Any, ...]) -> dict[str, int]:
    """Publish boundary reads of ended boundaries: first ones, and changed ones as revisions.

    Returns the counts `boundaries`, `published` (first revisions) and `revised`. (One
    meter's reads publish through storage.meter_cycle, with the same rule.)

    Sequential scans are off for the statement: its lookup of each boundary's latest
    revision must walk the primary key. Planned while published_boundary_reads is empty
    (a first close), it was a scan of the whole table per boundary, and the API's generic
    plan (api.app) kept it for every later window as the table grew: 89 s instead of 7 s
    to close 200k meters (bench/cityday.py).
    """
    if isinstance(conn, asyncpg.Pool):
        async with connection(conn, "publishing billing-cycle reads") as held:
            return await publish(held, args)
    async with conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        row = await conn.fetchrow(PUBLISH_SQL, *args)
    assert row is not None  # PUBLISH_SQL aggregates: always exactly one row
    return {k: row[k] for k in ("boundaries", "published", "revised")}


PUBLISH_WINDOW = 20_000  # meters per PUBLISH_SQL statement
ANALYZE_AFTER_ROWS = 10_000  # a close that published this many refreshes the statistics


@translating("publishing billing-cycle reads")
async def publish_cycle(
    conn: Conn, q: CycleQuery, *, analyze_after: int = ANALYZE_AFTER_ROWS
) -> dict[str, int]:
    """`publish` for every meter of `q`, in windows of PUBLISH_WINDOW of the tenant's meters
    (by meter id): each statement's cost grows with its meters, and one statement over a
    whole 200k-meter tenant took a plan that did not finish in 24 min where 20k-meter
    windows take ~0.1 ms a meter (bench/cityday.py). The windows' ends are the tenant's
    own ids, so sparse ids (other tenants' meters between) cost no empty statements.
    Returns the summed counts.

    Having published `analyze_after` rows or more, it ANALYZEs published_boundary_reads:
    the pages of cycle reads look each read up there, and a session's cached generic plan
    made while the table was empty would scan it whole per meter until autovacuum's
    statistics (a minute or so later) made the plans again; ANALYZE does that now."""
    ends = await conn.fetch(
        "SELECT meter_id FROM (SELECT meter_id, row_number() OVER (ORDER BY meter_id) AS k"
        " FROM meters WHERE tenant_id = $1) m WHERE k % $2 = 0 ORDER BY meter_id",
        q.tenant_id,
        PUBLISH_WINDOW,
    )
    totals = {"boundaries": 0, "published": 0, "revised": 0}
    after = 0
    for upto in [int(r["meter_id"]) for r in ends] + [LAST_ID]:
        got = await publish(conn, q.args(after=after, upto=upto))
        totals = {k: totals[k] + got[k] for k in totals}
        after = upto
    if totals["published"] + totals["revised"] >= analyze_after:
        await conn.execute("ANALYZE published_boundary_reads")
    return totals


@translating("reading published revisions")
async def revisions(conn: Conn, meter_ids: list[int], at: list[datetime]) -> list[Published]:
    """Every published revision of the given meters at the given boundaries, oldest first."""
    rows = await conn.fetch(
        "SELECT meter_id, boundary_at, revision, register_ml, method, quality, published_at"
        " FROM published_boundary_reads WHERE meter_id = ANY($1) AND boundary_at = ANY($2)"
        " ORDER BY meter_id, boundary_at, revision",
        meter_ids,
        at,
    )
    return [Published(*r) for r in rows]


@dataclass(frozen=True, slots=True)
class StepRead:
    """A boundary read at one step instant and the consumption since the previous step."""

    at: datetime
    register_ml: int | None
    method: Method | None  # None: outside the meter's service, or in the future
    quality: int | None
    used_ml: int | None


@translating("reading interval reads")
async def interval_reads(
    conn: asyncpg.Connection, meter_id: int, boundaries: list[datetime], tuning: Tuning
) -> list[StepRead]:
    """Boundary reads of one meter at each instant, with consumption since the previous one.

    Here each boundary is a per-row value, so runtime chunk exclusion (off for the API's
    sessions, see api.app) is switched on for this one transaction.
    """
    async with conn.transaction():
        await conn.execute("SET LOCAL timescaledb.enable_runtime_exclusion = on")
        rows = await conn.fetch(
            f"""SELECT t.at, r.register_ml, r.method, r.basis, r.quality, m.register_scale AS scale,
            nbm_consumption(lag(r.register_ml) OVER w, r.register_ml,
                extract(epoch FROM t.at - lag(t.at) OVER w), m.register_scale,
                m.register_digits, {_max_flow_sql("m.kind")}) AS used_ml,
            lag(r.quality) OVER w AS prev_quality
        FROM meters m CROSS JOIN unnest($2::timestamptz[]) AS t(at)
        LEFT JOIN LATERAL nbm_boundary_read(m.meter_id, t.at, NULL, t.at, m.installed_at,
            m.removed_at, NULL, NULL, m.register_scale, m.register_digits,
            {_max_flow_sql("m.kind")}, $3) r
            ON t.at >= m.installed_at AND t.at <= coalesce(m.removed_at, 'infinity')
               AND t.at <= now()
        WHERE m.meter_id = $1
        WINDOW w AS (ORDER BY t.at)
        ORDER BY t.at""",
            meter_id,
            boundaries,
            tuning.actual_window,
        )
    return [
        StepRead(r["at"], r["register_ml"], r["method"], r["quality"], r["used_ml"]) for r in rows
    ]


@translating("reading readings")
async def readings_between(
    conn: Conn, meter_ids: list[int], start: datetime, end: datetime
) -> list[Reading]:
    """All stored readings (valid or not) of the meters in [start, end), by meter and time."""
    rows = await conn.fetch(
        "SELECT meter_id, nbm_at(read_s) AS read_at, register_ml, flags, quality FROM readings"
        " WHERE meter_id = ANY($1) AND read_s >= nbm_ceil_s($2) AND read_s < nbm_ceil_s($3)"
        " ORDER BY meter_id, read_s",
        meter_ids,
        start,
        end,
    )
    return [Reading(*r) for r in rows]


@translating("reading meter events")
async def events_between(
    conn: Conn, meter_ids: list[int], start: datetime, end: datetime
) -> list[Event]:
    """Meter events (alarms) of the meters in [start, end), oldest first."""
    rows = await conn.fetch(
        "SELECT meter_id, kind, occurred_at, active, detail FROM meter_events"
        " WHERE meter_id = ANY($1) AND occurred_at >= $2 AND occurred_at < $3"
        " ORDER BY occurred_at, meter_id, kind",
        meter_ids,
        start,
        end,
    )
    return [Event(*r) for r in rows]


@translating("reading the billing calendar")
async def calendar(conn: Conn, tenant_id: int) -> tuple[int, list[date]]:
    """The tenant's cycle day (default 1) and explicit cycle start dates (may be empty)."""
    day = await conn.fetchval(
        "SELECT cycle_day FROM billing_calendars WHERE tenant_id = $1", tenant_id
    )
    rows = await conn.fetch(
        "SELECT starts_on FROM billing_cycle_dates WHERE tenant_id = $1 ORDER BY starts_on",
        tenant_id,
    )
    return (day or 1), [r["starts_on"] for r in rows]


@translating("setting the billing calendar")
async def set_calendar(
    conn: asyncpg.Connection, tenant_id: int, cycle_day: int, dates: list[date]
) -> None:
    """Replace the tenant's calendar: its cycle day and explicit start dates."""
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO billing_calendars (tenant_id, cycle_day) VALUES ($1, $2)"
            " ON CONFLICT (tenant_id) DO UPDATE SET cycle_day = $2, updated_at = now()",
            tenant_id,
            cycle_day,
        )
        await conn.execute("DELETE FROM billing_cycle_dates WHERE tenant_id = $1", tenant_id)
        await conn.executemany(
            "INSERT INTO billing_cycle_dates (tenant_id, starts_on) VALUES ($1, $2)",
            [(tenant_id, d) for d in sorted(set(dates))],
        )
