"""Meter registry queries for the API, every one scoped to a tenant.

A meter of another tenant is indistinguishable from a missing one: functions return None
(the API answers 404). A meter crosses this boundary as a `MeterRow` (registers as int
millilitres); the API renders it.

Errors (all `StorageError`):
├── DuplicateAddressError  an active meter of the tenant already has this address
└── ExchangeError          the meter cannot be exchanged (removed already, or bad times)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Literal

import asyncpg

from billing.consumption import Kind
from storage.errors import RowRefusedError, StorageError
from storage.pool import translating

Conn = asyncpg.Connection | asyncpg.Pool
# the meters table's CHECKs (migration 0001)
MeterFormat = Literal["cjt188", "oms", "mbus", "senml", "interval"]


@dataclass(frozen=True, slots=True)
class MeterRow:
    """A `meters` row of one tenant: times aware UTC, registers int mL (None: not given)."""

    meter_id: int
    address: str
    service_point: str | None
    kind: Kind
    format: MeterFormat
    unit: Literal["m3"]
    register_scale: int  # the register's smallest digit in m3 as a power of ten
    register_digits: int
    timezone: str | None  # None: the tenant's
    installed_at: datetime
    removed_at: datetime | None
    initial_register_ml: int | None
    final_register_ml: int | None
    credentials_ref: str | None
    created_at: datetime


METER_COLUMNS = ", ".join(f.name for f in fields(MeterRow))
WRITABLE = frozenset(
    {
        "address",
        "service_point",
        "kind",
        "format",
        "register_scale",
        "register_digits",
        "timezone",
        "installed_at",
        "initial_register_ml",
        "credentials_ref",
    }
)


class DuplicateAddressError(StorageError):
    """An active meter of this tenant already reports this address."""


class ExchangeError(StorageError):
    """The exchange is impossible: the meter is removed already, or the time is wrong."""


def _translate(exc: asyncpg.PostgresError, address: object) -> StorageError:
    if isinstance(exc, asyncpg.UniqueViolationError):
        return DuplicateAddressError(f"an active meter with address {address!r} exists already")
    return RowRefusedError(f"meter rejected by the database: {exc}")


@translating("registering a meter")
async def insert_meter(
    conn: asyncpg.Connection, tenant_id: int, values: dict[str, Any]
) -> MeterRow:
    """Insert a meter from `values` (keys in WRITABLE); return its row."""
    cols = [k for k in values if k in WRITABLE]
    placeholders = ", ".join(f"${i}" for i in range(2, len(cols) + 2))
    sql = (
        f"INSERT INTO meters (tenant_id{''.join(', ' + c for c in cols)})"
        f" VALUES ($1{', ' if cols else ''}{placeholders}) RETURNING {METER_COLUMNS}"
    )
    try:
        async with conn.transaction():
            row = await conn.fetchrow(sql, tenant_id, *(values[c] for c in cols))
    except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
        raise _translate(exc, values.get("address")) from exc
    assert row is not None  # INSERT ... RETURNING returns the row it inserted
    return MeterRow(**row)


@translating("reading a meter")
async def get_meter(conn: Conn, tenant_id: int, meter_id: int) -> MeterRow | None:
    """The tenant's meter `meter_id`, or None."""
    row = await conn.fetchrow(
        f"SELECT {METER_COLUMNS} FROM meters WHERE tenant_id = $1 AND meter_id = $2",
        tenant_id,
        meter_id,
    )
    return None if row is None else MeterRow(**row)


@translating("listing meters")
async def list_meters(
    conn: Conn,
    tenant_id: int,
    *,
    after: int,
    limit: int,
    address: str | None = None,
    service_point: str | None = None,
    active: bool | None = None,
) -> list[MeterRow]:
    """Up to `limit` meters with id > `after`, in id order, optionally filtered."""
    rows = await conn.fetch(
        f"SELECT {METER_COLUMNS} FROM meters WHERE tenant_id = $1 AND meter_id > $2"
        " AND ($4::text IS NULL OR address = $4) AND ($5::text IS NULL OR service_point = $5)"
        " AND ($6::boolean IS NULL OR (removed_at IS NULL) = $6)"
        " ORDER BY meter_id LIMIT $3",
        tenant_id,
        after,
        limit,
        address,
        service_point,
        active,
    )
    return [MeterRow(**r) for r in rows]


@translating("updating a meter")
async def update_meter(
    conn: asyncpg.Connection, tenant_id: int, meter_id: int, changes: dict[str, Any]
) -> MeterRow | None:
    """Apply `changes` (keys in WRITABLE) to the tenant's meter; its new row, or None."""
    cols = [k for k in changes if k in WRITABLE]
    if not cols:
        return await get_meter(conn, tenant_id, meter_id)
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(cols, start=3))
    sql = (
        f"UPDATE meters SET {sets} WHERE tenant_id = $1 AND meter_id = $2 RETURNING {METER_COLUMNS}"
    )
    try:
        async with conn.transaction():
            row = await conn.fetchrow(sql, tenant_id, meter_id, *(changes[c] for c in cols))
    except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
        raise _translate(exc, changes.get("address")) from exc
    return None if row is None else MeterRow(**row)


@translating("exchanging a meter")
async def exchange_meter(
    conn: asyncpg.Connection,
    tenant_id: int,
    meter_id: int,
    *,
    exchanged_at: datetime,
    final_register_ml: int,
    new_meter: dict[str, Any],
) -> tuple[MeterRow, MeterRow] | None:
    """Remove the meter with its final read and install `new_meter` at its service point.

    Both in one transaction; the new meter's `installed_at` is `exchanged_at` and it
    inherits service point, kind and timezone unless given. None if no such meter.
    """
    async with conn.transaction():
        old = await conn.fetchrow(
            f"SELECT {METER_COLUMNS} FROM meters WHERE tenant_id = $1 AND meter_id = $2 FOR UPDATE",
            tenant_id,
            meter_id,
        )
        if old is None:
            return None
        if old["removed_at"] is not None:
            msg = f"meter {meter_id} was removed at {old['removed_at'].isoformat()} already"
            raise ExchangeError(msg)
        if exchanged_at <= old["installed_at"]:
            msg = "exchanged_at must be after the old meter's installed_at"
            raise ExchangeError(msg)
        removed = await conn.fetchrow(
            "UPDATE meters SET removed_at = $3, final_register_ml = $4"
            f" WHERE tenant_id = $1 AND meter_id = $2 RETURNING {METER_COLUMNS}",
            tenant_id,
            meter_id,
            exchanged_at,
            final_register_ml,
        )
        assert removed is not None  # the row was locked above (FOR UPDATE): UPDATE finds it
        values = {
            "service_point": old["service_point"],
            "kind": old["kind"],
            "timezone": old["timezone"],
            **new_meter,
            "installed_at": exchanged_at,
        }
        installed = await insert_meter(conn, tenant_id, values)
    return MeterRow(**removed), installed


@translating("reading the meter's device health")
async def device_health(conn: Conn, meter_id: int) -> tuple[asyncpg.Record | None, asyncpg.Record]:
    """The meter's latest device_health row (or None) and its last reading's times."""
    health = await conn.fetchrow(
        "SELECT measured_at, battery_mv, rsrp_cdbm, sinr_cdb, ecl, battery_pct, battery_low,"
        " meter_error, cell_id, received_at"
        " FROM device_health WHERE meter_id = $1 ORDER BY measured_at DESC LIMIT 1",
        meter_id,
    )
    # readings keep no receive time (0049): a reading last arrived with the meter's newest
    # uplink that stored new readings, or was entered by a person (manual_reads)
    seen = await conn.fetchrow(
        "SELECT (SELECT max(received_at) FROM raw_uplinks WHERE meter_id = $1) AS last_uplink_at,"
        " nbm_at(r.read_s) AS last_read_at, r.register_ml, r.flags,"
        " greatest((SELECT max(received_at) FROM raw_uplinks WHERE meter_id = $1 AND n_new > 0),"
        " (SELECT max(entered_at) FROM manual_reads WHERE meter_id = $1)) AS last_received_at"
        " FROM (SELECT 1) one LEFT JOIN LATERAL (SELECT read_s, register_ml, flags"
        " FROM readings WHERE meter_id = $1 ORDER BY read_s DESC LIMIT 1) r ON true",
        meter_id,
    )
    assert seen is not None  # FROM (SELECT 1) LEFT JOIN: always exactly one row
    return health, seen


@translating("listing open alarms")
async def open_alarms(conn: Conn, tenant_id: int, meter_id: int | None) -> list[asyncpg.Record]:
    """Alarms still open: per (meter, kind) the latest event, where it is active."""
    # with the lifecycle alarm (migration 0039) of the (meter, kind) that is not closed
    return await conn.fetch(
        "SELECT latest.meter_id, latest.kind, latest.occurred_at, latest.detail, a.alarm_id,"
        " a.severity, a.state, a.acked_at, a.acked_by, a.ack_note FROM ("
        " SELECT DISTINCT ON (e.meter_id, e.kind) e.meter_id, e.kind, e.occurred_at, e.active,"
        " e.detail FROM meter_events e JOIN meters m ON m.meter_id = e.meter_id"
        " WHERE m.tenant_id = $1 AND ($2::bigint IS NULL OR e.meter_id = $2)"
        " ORDER BY e.meter_id, e.kind, e.occurred_at DESC) latest"
        " LEFT JOIN alarms a ON a.meter_id = latest.meter_id AND a.kind = latest.kind"
        " AND a.state <> 'closed' WHERE latest.active"
        " ORDER BY latest.occurred_at DESC, latest.meter_id, latest.kind LIMIT 1000",
        tenant_id,
        meter_id,
    )
