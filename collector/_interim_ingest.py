"""TEMPORARY SQL for the collector's event and health writes, until storage has writers
for meter_events and device_health. Readings go through `storage.ingest.ReadingWriter`,
the raw archive and quarantine through `storage.archive.ArchiveWriter`.

Each function takes an open connection (inside the batch's transaction) and plain column
lists; events and health rows are written in key order, idempotently.
"""

from __future__ import annotations

import asyncpg


async def insert_events(conn: asyncpg.Connection, rows: list[tuple[int, int, str, float]]) -> None:
    """Record alarms: (meter_id, occurred_at_s, kind, received_at_s); repeats are ignored."""
    if not rows:
        return
    cols = list(zip(*rows, strict=True))
    await conn.execute(
        "INSERT INTO meter_events (meter_id, occurred_at, kind, received_at)"
        " SELECT m, to_timestamp(o), k, to_timestamp(r) FROM unnest($1::bigint[],"
        " $2::bigint[], $3::text[], $4::float8[]) AS u(m, o, k, r) ORDER BY m, k, o"
        " ON CONFLICT DO NOTHING",
        *(list(c) for c in cols),
    )


async def insert_health(
    conn: asyncpg.Connection,
    rows: list[tuple[int, int, int | None, int | None, int | None, int | None, float]],
) -> None:
    """Record modem health: (meter_id, measured_at_s, battery_mv, rsrp_cdbm, sinr_cdb, ecl,
    received_at_s); a repeated (meter, time) is ignored."""
    if not rows:
        return
    cols = list(zip(*rows, strict=True))
    await conn.execute(
        "INSERT INTO device_health (meter_id, measured_at, battery_mv, rsrp_cdbm, sinr_cdb,"
        " ecl, received_at) SELECT m, to_timestamp(t), b, r, s, e, to_timestamp(rc)"
        " FROM unnest($1::bigint[], $2::bigint[], $3::int[], $4::int[], $5::int[],"
        " $6::smallint[], $7::float8[]) AS u(m, t, b, r, s, e, rc) ORDER BY m, t"
        " ON CONFLICT DO NOTHING",
        *(list(c) for c in cols),
    )
