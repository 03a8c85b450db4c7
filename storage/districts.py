"""District metered areas (migration 0043): define them, and their daily water balance.

A district is a bulk meter at its inlet plus the customer meters behind it, all of one
tenant; a customer meter belongs to one district at most. The balance of a day comes from
`meter_days` (storage.analytics.rollup): non-revenue water = bulk volume - the customers'
volumes, stated with its coverage (how many customer meters had both day boundaries).
Errors: `DistrictNotFoundError`, `DistrictMeterError` (a meter that is not the tenant's,
or already in another district), `DistrictConflictError` (the name or bulk meter is taken).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from storage.errors import StorageError
from storage.pool import translating

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

# a connection of its own or one taken from a pool
Conn: TypeAlias = "asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]"


class DistrictNotFoundError(StorageError):
    """No district with this id for this tenant."""


class DistrictMeterError(StorageError):
    """A meter is not the tenant's (or not active), or already belongs to a district."""


class DistrictConflictError(StorageError):
    """Another district of the tenant has this name or this bulk meter."""


_COLUMNS = (
    "d.district_id, d.name, d.bulk_meter_id, d.created_at,"
    " coalesce((SELECT array_agg(dm.meter_id ORDER BY dm.meter_id) FROM district_meters dm"
    " WHERE dm.district_id = d.district_id), '{}') AS meter_ids"
)


async def _check_meters(conn: Conn, tenant_id: int, ids: Sequence[int]) -> None:
    known = await conn.fetchval(
        "SELECT count(*) FROM meters WHERE tenant_id = $1 AND meter_id = ANY($2::bigint[])",
        tenant_id,
        list(ids),
    )
    if known != len(set(ids)):
        msg = "every meter of a district must be one of the tenant's meters"
        raise DistrictMeterError(msg)


async def _set_members(
    conn: Conn, tenant_id: int, district_id: int, bulk: int, ids: Sequence[int]
) -> None:
    if bulk in ids:
        msg = f"meter {bulk} is the district's bulk meter, not one of its customers"
        raise DistrictMeterError(msg)
    await _check_meters(conn, tenant_id, [bulk, *ids])
    await conn.execute("DELETE FROM district_meters WHERE district_id = $1", district_id)
    try:
        await conn.execute(
            "INSERT INTO district_meters (district_id, meter_id) SELECT $1, unnest($2::bigint[])",
            district_id,
            sorted(set(ids)),
        )
    except asyncpg.UniqueViolationError as exc:
        msg = "a customer meter already belongs to another district"
        raise DistrictMeterError(msg) from exc


@translating("creating a district")
async def create(
    pool: asyncpg.Pool, tenant_id: int, name: str, bulk_meter_id: int, meter_ids: Sequence[int]
) -> asyncpg.Record:
    """A new district of the tenant; its row (with meter_ids)."""
    async with pool.acquire() as conn, conn.transaction():
        try:
            district_id = await conn.fetchval(
                "INSERT INTO districts (tenant_id, name, bulk_meter_id) VALUES ($1, $2, $3)"
                " RETURNING district_id",
                tenant_id,
                name,
                bulk_meter_id,
            )
        except asyncpg.UniqueViolationError as exc:
            msg = "another district has this name or this bulk meter"
            raise DistrictConflictError(msg) from exc
        except asyncpg.ForeignKeyViolationError as exc:
            msg = f"no meter {bulk_meter_id}"
            raise DistrictMeterError(msg) from exc
        await _set_members(conn, tenant_id, district_id, bulk_meter_id, meter_ids)
        return await _get(conn, tenant_id, district_id)


@translating("changing a district's meters")
async def set_meters(
    pool: asyncpg.Pool, tenant_id: int, district_id: int, meter_ids: Sequence[int]
) -> asyncpg.Record:
    """Replace the district's customer meters; the new row."""
    async with pool.acquire() as conn, conn.transaction():
        row = await _get(conn, tenant_id, district_id)
        await _set_members(conn, tenant_id, district_id, row["bulk_meter_id"], meter_ids)
        return await _get(conn, tenant_id, district_id)


async def _get(conn: Conn | asyncpg.Pool, tenant_id: int, district_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM districts d WHERE d.tenant_id = $1 AND d.district_id = $2",
        tenant_id,
        district_id,
    )
    if row is None:
        msg = f"no district {district_id}"
        raise DistrictNotFoundError(msg)
    return row


@translating("reading a district")
async def get(conn: Conn | asyncpg.Pool, tenant_id: int, district_id: int) -> asyncpg.Record:
    """One district of the tenant (with meter_ids); DistrictNotFoundError if none."""
    return await _get(conn, tenant_id, district_id)


@translating("listing districts")
async def list_all(conn: Conn | asyncpg.Pool, tenant_id: int) -> list[asyncpg.Record]:
    """The tenant's districts, by id."""
    return await conn.fetch(
        f"SELECT {_COLUMNS} FROM districts d WHERE d.tenant_id = $1 ORDER BY d.district_id",
        tenant_id,
    )


@translating("deleting a district")
async def delete(pool: asyncpg.Pool, tenant_id: int, district_id: int) -> None:
    """Remove the district (its meters stay); DistrictNotFoundError if none."""
    done = await pool.execute(
        "DELETE FROM districts WHERE tenant_id = $1 AND district_id = $2", tenant_id, district_id
    )
    if done == "DELETE 0":
        msg = f"no district {district_id}"
        raise DistrictNotFoundError(msg)


@translating("reading a district balance")
async def balance(
    conn: Conn | asyncpg.Pool, tenant_id: int, district_id: int, day: date
) -> asyncpg.Record:
    """The district's water balance of `day`: bulk_ml (NULL: the bulk meter is not covered),
    customers_ml (the covered customers' sum), n_customers, n_covered, nrw_ml (NULL unless
    the bulk meter is covered), computed_at (NULL: the day is not rolled up yet)."""
    return (await _balances(conn, tenant_id, district_id, day, day))[0]


@translating("reading a district's balances")
async def balances(
    conn: Conn | asyncpg.Pool, tenant_id: int, district_id: int, day_from: date, day_to: date
) -> list[asyncpg.Record]:
    """The district's balance of each day from `day_from` to `day_to` (inclusive), by day,
    with the columns of `balance`; DistrictNotFoundError if there is no such district."""
    return await _balances(conn, tenant_id, district_id, day_from, day_to)


async def _balances(
    conn: Conn | asyncpg.Pool, tenant_id: int, district_id: int, day_from: date, day_to: date
) -> list[asyncpg.Record]:
    await _get(conn, tenant_id, district_id)
    rows = await conn.fetch(
        "SELECT b.district_id, b.day, b.bulk_meter_id, b.bulk_ml, b.n_customers,"
        " b.n_covered, b.customers_ml, b.bulk_ml - b.customers_ml AS nrw_ml, a.computed_at"
        " FROM nbm_district_balance($1, $3, $4) b"
        " LEFT JOIN analytics_days a ON a.tenant_id = $1 AND a.day = b.day"
        " WHERE b.district_id = $2 ORDER BY b.day",
        tenant_id,
        district_id,
        day_from,
        day_to,
    )
    assert day_from > day_to or rows  # the district exists: the function has its rows
    return rows
