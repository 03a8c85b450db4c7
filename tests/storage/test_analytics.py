"""Analytics on hand-made hourly data whose answers are worked out by hand in each test:
night flow, districts' balance and loss, gas rules, flow behind a closed valve, silent
meters, read rate; every alarm raised through the lifecycle and none without cause."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from dbkit import read_s

from decoder.columns import Flag
from storage import alarms, analytics, districts
from storage.events import EventRow, write_events

TZ = ZoneInfo("Asia/Shanghai")  # the tenants' default zone
D = date(2026, 3, 10)  # the last day of the data; D0 = D - 2 is the first
D0 = D - timedelta(days=2)
Flow = Callable[[int, int], int]  # (day index from D0, local hour) -> mL in that hour
VALVE_CLOSED = int(Flag.VALVE_CLOSED)


def local(day: date, hour: int = 0) -> datetime:
    """Local `hour` of `day` as an aware datetime."""
    return datetime(day.year, day.month, day.day, hour, tzinfo=TZ)


async def _meter(pool: asyncpg.Pool, tenant_id: int, kind: str = "water") -> int:
    meter_id: int = await pool.fetchval(
        "INSERT INTO meters (tenant_id, address, kind, format) VALUES ($1, $2, $3, 'interval')"
        " RETURNING meter_id",
        tenant_id,
        uuid.uuid4().hex[:12],
        kind,
    )
    return meter_id


async def _hourly(
    pool: asyncpg.Pool,
    meter_id: int,
    flow: Flow,
    days: int = 3,
    flags: Callable[[datetime], int] = lambda _at: 0,
) -> None:
    """Readings on every local hour from D0 00:00 to the end of `days` days (inclusive),
    the register growing by flow(day, hour) over each hour; it starts at 1 m3. A reading's
    status flags are flags(its time)."""
    register, rows = 1_000_000, []
    for k in range(days * 24 + 1):
        at = local(D0) + timedelta(hours=k)
        rows.append((meter_id, read_s(at), register, flags(at)))
        register += flow(k // 24, k % 24)
    await pool.copy_records_to_table(
        "readings",
        records=rows,
        columns=["meter_id", "read_s", "register_ml", "flags"],
    )


def _leak(ml_h: int) -> Flow:
    return lambda _day, _hour: ml_h


def _daytime(_day: int, hour: int) -> int:
    return 10_000 if hour >= 6 else 0  # 10 L/h from 06:00 to midnight: 180 L a day


async def _alarm_set(pool: asyncpg.Pool, tenant_id: int) -> set[tuple[int, str]]:
    rows = await alarms.list_alarms(pool, tenant_id, states=alarms.STATES)
    return {(r["meter_id"], r["kind"]) for r in rows}


async def test_a_day_of_every_rule(pool: asyncpg.Pool, tenant_id: int) -> None:
    """Three days of hand-made data raise exactly the alarms worked out by hand, at the
    times the evidence was complete; balances and read rates are the hand-made sums."""
    w1 = await _meter(pool, tenant_id)  # 6 L/h day and night: a leak
    w2 = await _meter(pool, tenant_id)  # daytime use only: night minimum 0
    w3 = await _meter(pool, tenant_id)  # the leak starts on D0+1: two nights < 3
    w4 = await _meter(pool, tenant_id)  # never read
    bulk = await _meter(pool, tenant_id)  # district 1 inlet: w1 + w2 + 3 L/h lost
    bulk2 = await _meter(pool, tenant_id)  # district 2 inlet: w3 + 5 L/h lost
    gas = await _meter(pool, tenant_id, "gas")  # 2 L/h day and night
    valve = await _meter(pool, tenant_id)  # 100 mL/h; valve reported closed D0+1 10:00
    await _hourly(pool, w1, _leak(6000))
    await _hourly(pool, w2, _daytime)
    await _hourly(pool, w3, lambda day, _h: 6000 if day >= 1 else 0)
    await _hourly(pool, bulk, lambda day, h: 6000 + _daytime(day, h) + 3000)
    await _hourly(pool, bulk2, lambda day, _h: (6000 if day >= 1 else 0) + 5000)
    await _hourly(pool, gas, _leak(2000))
    closed_at = local(D - timedelta(days=1), 10)
    # the valve flag on every reading from then on, as a meter reports its closed valve
    await _hourly(pool, valve, _leak(100), flags=lambda at: VALVE_CLOSED * (at >= closed_at))
    async with pool.acquire() as conn, conn.transaction():
        await write_events(conn, [EventRow(valve, closed_at, "valve_closed", closed_at)])
    d1 = await districts.create(pool, tenant_id, "north", bulk, [w1, w2])
    d2 = await districts.create(pool, tenant_id, "south", bulk2, [w3, w4])
    await alarms.set_rule(pool, tenant_id, "district_loss", threshold=15)  # % of the bulk
    await alarms.set_rule(pool, tenant_id, "gas_overuse", threshold=40_000)  # mL a day
    await alarms.set_rule(pool, tenant_id, "gas_night_use", threshold=1000)  # off by default

    report = await analytics.run(
        pool,
        now=local(D, 12) + timedelta(days=1),
        days=[D0, D - timedelta(days=1), D],
        tenant_id=tenant_id,
    )

    assert report.meter_days == 3 * 7  # seven meters read on each of the three days
    assert await _alarm_set(pool, tenant_id) == {
        (w1, "night_flow"),  # 6000 >= 5000 mL/h on 3 nights
        (bulk, "district_loss"),  # 72 L of 396 L = 18 % >= 15 % on 2 covered days
        (gas, "gas_night_use"),  # 2000 >= 1000 mL/h on 3 nights (the tenant's rule)
        (gas, "gas_overuse"),  # 48 L >= 40 L in a day
        (valve, "valve_closed"),  # the meter's own event
        (valve, "valve_closed_flow"),  # 2.4 L on D, the valve closed all day
    }
    by_kind = {(r["meter_id"], r["kind"]): r for r in await alarms.list_alarms(pool, tenant_id)}
    assert by_kind[w1, "night_flow"]["opened_at"] == local(D, 5)
    assert by_kind[bulk, "district_loss"]["opened_at"] == local(D)  # the end of D - 1
    assert by_kind[bulk, "district_loss"]["occurrences"] == 2
    assert by_kind[gas, "gas_overuse"]["opened_at"] == local(D0 + timedelta(days=1))
    assert by_kind[valve, "valve_closed_flow"]["opened_at"] == local(D + timedelta(days=1))
    opened = await pool.fetchval(
        "SELECT count(*) FROM alarm_events e JOIN alarms a USING (alarm_id)"
        " WHERE a.tenant_id = $1 AND e.event_type = 'alarm.opened'",
        tenant_id,
    )
    assert opened == 6  # each alarm opened once, on the outbox's way to webhooks

    north = await districts.balance(pool, tenant_id, d1["district_id"], D)
    assert (north["bulk_ml"], north["customers_ml"], north["nrw_ml"]) == (396_000, 324_000, 72_000)
    assert (north["n_customers"], north["n_covered"]) == (2, 2)
    south = await districts.balance(pool, tenant_id, d2["district_id"], D)
    # w4 has no reading: one customer of two covered, so no district_loss despite 45 %
    assert (south["bulk_ml"], south["customers_ml"], south["nrw_ml"]) == (264_000, 144_000, 120_000)
    assert (south["n_customers"], south["n_covered"]) == (2, 1)

    rates = await analytics.read_rate(pool, tenant_id, D)
    assert [tuple(r) for r in rates] == [
        (None, 8, 7, 7 * 24),  # every meter but w4 read 24 times in D
        (d1["district_id"], 3, 3, 72),
        (d2["district_id"], 3, 2, 48),
    ]

    again = await analytics.run(
        pool, now=local(D, 12) + timedelta(days=1), days=[D], tenant_id=tenant_id
    )
    assert sum(again.raised.values()) == 0  # a repeated day renews nothing
    assert by_kind[w1, "night_flow"]["occurrences"] == 1


async def test_valve_reopened_clears_valve_closed(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A valve reported closed on D0 10:00 and open again (readings without the valve flag)
    from D0+1 10:00: the analytics mark valve_closed cleared at the first reading without
    the flag, without waiting for the alarm sweep, so the flow after the reopen raises no
    valve_closed_flow (100 mL/h = 2.4 L on D would be over the 1 L threshold). Nor does a
    daily meter's flow on a day whose closing read shows the valve open again."""
    valve = await _meter(pool, tenant_id)
    closed_at, opened_at = local(D0, 10), local(D0 + timedelta(days=1), 10)
    await _hourly(pool, valve, _leak(100),
                  flags=lambda at: VALVE_CLOSED * (closed_at <= at < opened_at))  # fmt: skip
    # a daily meter (CJ/T 188 reads at midnight): closed at D0 and D0+1 00:00, open at D
    # 00:00, 50 L flowed during D0+1: open by that day's end, so not closed all day
    daily = await _meter(pool, tenant_id)
    await pool.copy_records_to_table(
        "readings",
        records=[(daily, read_s(local(D0 + timedelta(days=k))), ml, flag)
                 for k, ml, flag in ((0, 10**6, 1), (1, 10**6, 1), (2, 10**6 + 50_000, 0),
                                     (3, 10**6 + 90_000, 0))],
        columns=["meter_id", "read_s", "register_ml", "flags"],
    )  # fmt: skip
    async with pool.acquire() as conn, conn.transaction():
        await write_events(conn, [EventRow(valve, closed_at, "valve_closed", closed_at),
                                  EventRow(daily, local(D0), "valve_closed", local(D0)),
                                  EventRow(daily, local(D0 + timedelta(days=1)), "valve_closed",
                                           local(D0 + timedelta(days=1)))])  # fmt: skip

    report = await analytics.run(
        pool, now=local(D, 12) + timedelta(days=1), days=[D0, D0 + timedelta(days=1), D],
        tenant_id=tenant_id,
    )  # fmt: skip

    assert await _alarm_set(pool, tenant_id) == {(valve, "valve_closed"), (daily, "valve_closed")}
    row = (await alarms.list_alarms(pool, tenant_id, meter_id=valve))[0]
    assert (row["state"], row["cleared_at"]) == ("open", opened_at)  # the sweep closes it
    row = (await alarms.list_alarms(pool, tenant_id, meter_id=daily))[0]
    assert row["cleared_at"] == local(D)
    assert report.raised.get("valve_closed_flow", 0) == 0


async def test_night_flow_clears_and_closes(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A leak on three nights raises night_flow; the fourth night without flow clears it at
    05:00 and the sweep closes it a day (the kind's auto_close_after_s) later."""
    m = await _meter(pool, tenant_id)
    await _hourly(pool, m, lambda day, _h: 8000 if day < 3 else 0, days=4)
    days = [D0 + timedelta(days=k) for k in range(4)]
    report = await analytics.run(pool, now=local(days[3], 12), days=days, tenant_id=tenant_id)
    assert (report.raised["night_flow"], report.cleared["night_flow"]) == (1, 1)
    [alarm] = await alarms.list_alarms(pool, tenant_id)
    assert (alarm["opened_at"], alarm["cleared_at"]) == (local(days[2], 5), local(days[3], 5))
    await alarms.sweep(pool, local(days[3], 5) + timedelta(days=1) - timedelta(seconds=1))
    assert len(await alarms.list_alarms(pool, tenant_id)) == 1  # not a day yet
    await alarms.sweep(pool, local(days[3], 5) + timedelta(days=1))
    [closed] = await alarms.list_alarms(pool, tenant_id, states=["closed"])
    assert closed["close_reason"] == "cleared"


async def test_silent_meter_from_the_raw_archive(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A meter whose last uplink is 4 days old is silent (3 reports of a day missed) from
    last + 3 days; one heard a day ago is not; a new uplink clears and the sweep closes."""
    quiet, chatty = await _meter(pool, tenant_id), await _meter(pool, tenant_id)
    now = datetime(2026, 3, 10, 12, tzinfo=UTC)

    async def uplink(meter_id: int, at: datetime) -> None:
        await pool.execute(
            "INSERT INTO raw_uplinks (received_at, tenant_id, meter_id, transport, payload,"
            " outcome) VALUES ($1, $2, $3, 5, '\\x00', 'stored')",
            at,
            tenant_id,
            meter_id,
        )

    await uplink(quiet, now - timedelta(days=4))
    await uplink(chatty, now - timedelta(days=4))
    await uplink(chatty, now - timedelta(days=1))
    await uplink(chatty, now - timedelta(days=2))  # older: last seen stays a day ago
    seen = await pool.fetchval(
        "SELECT last_uplink_at FROM meter_last_seen WHERE meter_id = $1", chatty
    )
    assert seen == now - timedelta(days=1)
    await analytics.run(pool, now=now, days=[], tenant_id=tenant_id)
    [alarm] = await alarms.list_alarms(pool, tenant_id)
    assert (alarm["meter_id"], alarm["kind"]) == (quiet, "silent")
    assert alarm["opened_at"] == now - timedelta(days=1)
    await uplink(quiet, now + timedelta(hours=1))
    report = await analytics.run(pool, now=now + timedelta(hours=2), days=[], tenant_id=tenant_id)
    assert report.cleared["silent"] == 1
    await alarms.sweep(pool, now + timedelta(hours=2))  # auto-close after 0 s
    assert await alarms.list_alarms(pool, tenant_id) == []


async def test_district_membership_is_checked(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A customer meter in two districts, another tenant's meter, or the bulk meter as its
    own customer is refused."""
    bulk, bulk2, c = [await _meter(pool, tenant_id) for _ in range(3)]
    await districts.create(pool, tenant_id, "a", bulk, [c])
    with pytest.raises(districts.DistrictMeterError):
        await districts.create(pool, tenant_id, "b", bulk2, [c])
    with pytest.raises(districts.DistrictMeterError):
        await districts.create(pool, tenant_id, "c", bulk2, [bulk2])
    other = await pool.fetchval(
        "INSERT INTO tenants (slug, name) VALUES ($1, 'x') RETURNING tenant_id", uuid.uuid4().hex
    )
    stranger = await _meter(pool, other)
    with pytest.raises(districts.DistrictMeterError):
        await districts.create(pool, tenant_id, "d", bulk2, [stranger])
    with pytest.raises(districts.DistrictConflictError):
        await districts.create(pool, tenant_id, "a", bulk2, [])
