"""Device health read back: one meter's history and the fleet's distributions.

The fleet views use each meter's latest `device_health` row inside the window (a meter
that reported twice counts once, with its newest figures): battery in 100 mV bands, the
NB-IoT coverage classes, RSRP in 5 dB bands, and the worst cells by median RSRP.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from storage.pool import translating

_LATEST = (
    "WITH latest AS (SELECT DISTINCT ON (h.meter_id) h.* FROM device_health h"
    " JOIN meters m ON m.meter_id = h.meter_id WHERE m.tenant_id = $1 AND h.measured_at >= $2"
    " ORDER BY h.meter_id, h.measured_at DESC) "
)


@translating("reading a meter's health history")
async def history(
    conn: asyncpg.Connection | asyncpg.Pool,
    meter_id: int,
    since: datetime | None,
    until: datetime | None,
    limit: int,
) -> list[asyncpg.Record]:
    """The meter's device_health rows in [since, until), newest first."""
    return await conn.fetch(
        "SELECT measured_at, battery_mv, battery_pct, battery_low, meter_error, rsrp_cdbm,"
        " sinr_cdb, ecl, cell_id, received_at FROM device_health WHERE meter_id = $1"
        " AND ($2::timestamptz IS NULL OR measured_at >= $2)"
        " AND ($3::timestamptz IS NULL OR measured_at < $3)"
        " ORDER BY measured_at DESC LIMIT $4",
        meter_id,
        since,
        until,
        limit,
    )


@dataclass(frozen=True)
class Fleet:
    """The fleet views' rows (see `fleet`)."""

    summary: asyncpg.Record
    battery: list[asyncpg.Record]
    ecl: list[asyncpg.Record]
    rsrp: list[asyncpg.Record]
    worst_cells: list[asyncpg.Record]


@translating("reading the fleet's health")
async def fleet(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: int, since: datetime, worst: int
) -> Fleet:
    """Distributions over the tenant's meters reporting since `since`: `summary`,
    `battery` (100 mV bands), `ecl`, `rsrp` (5 dB bands), `worst_cells`."""
    summary = await conn.fetchrow(
        _LATEST + "SELECT count(*) AS meters, count(*) FILTER (WHERE battery_low) AS battery_low,"
        " count(*) FILTER (WHERE meter_error) AS meter_error,"
        " count(battery_mv) AS with_battery, count(rsrp_cdbm) AS with_radio FROM latest",
        tenant_id,
        since,
    )
    battery = await conn.fetch(
        _LATEST + "SELECT (battery_mv / 100) * 100 AS from_mv, count(*) AS meters FROM latest"
        " WHERE battery_mv IS NOT NULL GROUP BY 1 ORDER BY 1",
        tenant_id,
        since,
    )
    ecl = await conn.fetch(
        _LATEST + "SELECT ecl, count(*) AS meters FROM latest WHERE ecl IS NOT NULL"
        " GROUP BY ecl ORDER BY ecl",
        tenant_id,
        since,
    )
    rsrp = await conn.fetch(
        _LATEST + "SELECT floor(rsrp_cdbm / 500.0)::int * 500 AS from_cdbm, count(*) AS meters"
        " FROM latest WHERE rsrp_cdbm IS NOT NULL GROUP BY 1 ORDER BY 1",
        tenant_id,
        since,
    )
    cells = await conn.fetch(
        _LATEST + "SELECT cell_id, count(*) AS meters,"
        " percentile_disc(0.5) WITHIN GROUP (ORDER BY rsrp_cdbm) AS median_rsrp_cdbm,"
        " percentile_disc(0.5) WITHIN GROUP (ORDER BY sinr_cdb) AS median_sinr_cdb,"
        " count(*) FILTER (WHERE ecl = 2) AS meters_ecl2 FROM latest"
        " WHERE cell_id IS NOT NULL AND rsrp_cdbm IS NOT NULL GROUP BY cell_id"
        " ORDER BY median_rsrp_cdbm, cell_id LIMIT $3",
        tenant_id,
        since,
        worst,
    )
    assert summary is not None  # an aggregate without GROUP BY: always one row
    return Fleet(summary, battery, ecl, rsrp, cells)
