"""Cycle reads of one meter: methods, rounding, estimation, rollover, exchange, revisions."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from apihelpers import daily, local, utc

SH = "Asia/Shanghai"
FEB = "/cycles/2024-02-01"  # [2024-01-31T16:00Z, 2024-02-29T16:00Z) in Shanghai
FEB_OPEN, FEB_CLOSE = local(SH, 2024, 2, 1), local(SH, 2024, 3, 1)


async def test_actual_reads_at_local_midnight(api, make_tenant, add_meter, add_readings):
    """Readings at the local-midnight boundaries are actual reads (quality 0)."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id)
    await add_readings(m, daily(local(SH, 2024, 1, 20), 50, 1_000_000, 100_000))
    body = (await api.get(f"/v1/meters/{m}{FEB}", headers=t.reader)).json()
    assert body["start"] == "2024-01-31T16:00:00Z"
    assert body["opening"] | {"revision": None} == {
        "at": "2024-01-31T16:00:00Z",
        "register_m3": "2.200",
        "method": "actual",
        "basis": None,
        "quality": 0,
        "read_at": "2024-01-31T16:00:00Z",
        "gap": False,
        "revision": None,
        "published_register_m3": "2.200",
    }
    assert body["closing"]["register_m3"] == "5.100"
    assert body["consumption_m3"] == "2.900"
    assert body["consumption_quality"] == 0
    assert body["closed"] is True


async def test_reading_within_window_is_actual(api, make_tenant, add_meter, add_readings):
    """A reading 30 min after the boundary is its actual read; none within 1 h interpolates."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id)
    await add_readings(
        m,
        [
            (FEB_OPEN - timedelta(hours=5), 1_000_000),
            (FEB_OPEN + timedelta(minutes=30), 1_500_000),
            (FEB_CLOSE - timedelta(hours=2), 3_000_000),
            (FEB_CLOSE + timedelta(hours=2), 3_004_000),
        ],
    )
    body = (await api.get(f"/v1/meters/{m}{FEB}", headers=t.reader)).json()
    assert (body["opening"]["method"], body["opening"]["register_m3"]) == ("actual", "1.500")
    assert body["closing"]["method"] == "interpolated"
    assert body["closing"]["quality"] == 9
    assert body["closing"]["register_m3"] == "3.002"
    assert body["consumption_quality"] == 13


async def test_interpolation_rounds_half_up_to_register_unit(
    api, make_tenant, add_meter, add_readings
):
    """Interpolation is exact and rounds half up to the register's smallest unit (1 L)."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id)
    await add_readings(
        m,
        [
            (FEB_OPEN - timedelta(hours=6), 1_000_000),  # 0.75 L -> 1 L
            (FEB_OPEN + timedelta(hours=18), 1_003_000),
            (FEB_CLOSE - timedelta(hours=12), 2_000_000),  # 0.5 L -> 1 L
            (FEB_CLOSE + timedelta(hours=12), 2_001_000),
        ],
    )
    body = (await api.get(f"/v1/meters/{m}{FEB}", headers=t.reader)).json()
    assert body["opening"]["register_m3"] == "1.001"
    assert body["closing"]["register_m3"] == "2.001"
    assert body["consumption_m3"] == "1.000"


async def test_estimated_from_average_daily_use(api, make_tenant, add_meter, add_readings):
    """With no reading after the boundary, the close is projected at the average daily use."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id)
    # readings 10:00 local every day, 10 L/day, last one 2024-02-26 (3 d 14 h before close)
    await add_readings(m, daily(local(SH, 2024, 1, 10, 10), 48, 5_000_000, 10_000))
    body = (await api.get(f"/v1/meters/{m}{FEB}", headers=t.reader)).json()
    close = body["closing"]
    assert (close["method"], close["basis"], close["quality"]) == (
        "estimated",
        "average_daily_use",
        12,
    )
    # last 5.470 m3 + 10 L/day * (3 + 14/24) days = 35.833 L -> 36 L
    assert close["register_m3"] == "5.506"


async def test_estimated_from_reference_day(api, make_tenant, add_meter, add_readings):
    """Readings a week before both instants make a like-day estimate (ESPI 8)."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id)
    start = local(SH, 2024, 2, 10)
    rows, ml = [], 1_000_000
    for d in range(17):  # to 2024-02-26 00:00; weekends use 50 L, weekdays 10 L
        rows.append((start + timedelta(days=d), ml))
        ml += 50_000 if (start + timedelta(days=d, hours=8)).weekday() >= 5 else 10_000
    await add_readings(m, rows)
    close = (await api.get(f"/v1/meters/{m}{FEB}", headers=t.reader)).json()["closing"]
    assert (close["method"], close["basis"], close["quality"]) == ("estimated", "reference_day", 8)
    last, week_ago, boundary_week_ago = rows[-1][1], rows[-8][1], rows[-4][1]
    assert close["register_m3"] == f"{(last + boundary_week_ago - week_ago) / 1e6:.3f}"


async def test_rollover_plausible_flow(api, make_tenant, add_meter, add_readings):
    """A register wrapping at 10^digits units is a rollover when the implied flow is plausible."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id, register_digits=5)  # 99.999 m3 then 0.000
    rows = [
        (FEB_OPEN + timedelta(days=d), (99_000_000 + d * 100_000) % 100_000_000)
        for d in range(-3, 31)
    ]
    await add_readings(m, rows)
    body = (await api.get(f"/v1/meters/{m}{FEB}", headers=t.reader)).json()
    assert body["opening"]["register_m3"] == "99.000"
    assert body["closing"]["register_m3"] == "1.900"
    assert body["consumption_m3"] == "2.900"
    assert body["segments"][0]["rolled_over"] is True
    assert "rollover" in {i["code"] for i in body["issues"]}


async def test_implausible_drop_is_reverse_flow(api, make_tenant, add_meter, add_readings):
    """A drop whose wrap would need an impossible flow is negative consumption, flagged."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id)
    await add_readings(
        m,
        [
            (FEB_OPEN, 50_000_000),
            (FEB_OPEN + timedelta(days=3), 49_000_000),
            (FEB_CLOSE, 49_500_000),
        ],
    )
    body = (await api.get(f"/v1/meters/{m}{FEB}", headers=t.reader)).json()
    assert body["consumption_m3"] == "-0.500"
    assert body["segments"][0]["reverse"] is True
    codes = {(i["code"], i["severity"]) for i in body["issues"]}
    assert ("reverse_flow", "error") in codes


async def test_meter_exchange_sums_both_meters(api, make_tenant, add_meter, add_readings):
    """An exchange inside the cycle bills old (open..final) plus new (initial..close)."""
    t = await make_tenant()
    old = await add_meter(t.tenant_id, service_point="SP-X", installed_at=utc(2023, 1, 1))
    await add_readings(old, daily(FEB_OPEN - timedelta(days=5), 15, 10_000_000, 100_000))
    at = FEB_OPEN + timedelta(days=10, hours=3)
    r = await api.post(
        f"/v1/meters/{old}/exchange",
        headers=t.writer,
        json={
            "exchanged_at": at.isoformat(),
            "final_register_m3": "11.800",
            "new_meter": {"address": "NEW-1", "format": "cjt188", "initial_register_m3": "0.005"},
        },
    )
    assert r.status_code == 201, r.text
    new = r.json()["installed"]["meter_id"]
    assert r.json()["installed"]["service_point"] == "SP-X"
    await add_readings(new, daily(FEB_OPEN + timedelta(days=11), 25, 100_000, 200_000))
    for mid in (old, new):
        body = (await api.get(f"/v1/meters/{mid}{FEB}", headers=t.reader)).json()
        segs = body["segments"]
        assert [s["meter_id"] for s in segs] == [old, new]
        assert (segs[0]["closing"]["method"], segs[0]["closing"]["register_m3"]) == (
            "removal",
            "11.800",
        )
        assert (segs[1]["opening"]["method"], segs[1]["opening"]["register_m3"]) == (
            "installation",
            "0.005",
        )
        # old: 11.800 - 10.500 = 1.300; new: closes at 0.100 + 18 * 0.2 = 3.700, minus 0.005
        assert body["consumption_m3"] == "4.995"
        assert "meter_exchange" in {i["code"] for i in body["issues"]}


async def test_late_reading_revises_closed_cycle(api, make_tenant, add_meter, add_readings):
    """A late reading changes a published close: revision 2, both kept, next opening agrees."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id)
    await add_readings(m, daily(local(SH, 2024, 1, 1, 12), 58, 1_000_000, 10_000))  # to Feb 27
    first = (await api.get(f"/v1/meters/{m}{FEB}", headers=t.reader)).json()
    assert first["closing"]["method"] == "estimated"
    assert first["revised"] is False
    assert first["closing"]["revision"] == 1
    await add_readings(m, [(FEB_CLOSE + timedelta(hours=12), 2_000_000)])  # a burst of use, late
    again = (await api.get(f"/v1/meters/{m}{FEB}", headers=t.reader)).json()
    assert again["revised"] is True
    assert again["closing"]["method"] == "interpolated"
    assert again["closing"]["revision"] == 2
    closes = [v for v in again["revisions"] if v["at"] == again["closing"]["at"]]
    assert [v["revision"] for v in closes] == [1, 2]
    assert closes[0]["register_m3"] == first["closing"]["register_m3"]
    assert closes[1]["register_m3"] == again["closing"]["register_m3"] != closes[0]["register_m3"]
    march = (await api.get(f"/v1/meters/{m}/cycles/2024-03-01", headers=t.reader)).json()
    assert march["opening"] | {"read_at": None} == again["closing"] | {"read_at": None}


async def test_a_read_published_meanwhile_is_not_published_again(
    api, pool, make_tenant, add_meter, add_readings
):
    """Another request publishes the same reads while this one computes them: its insert
    waits on the other's uncommitted rows, then does nothing, and it serves revision 1."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id)
    await add_readings(m, daily(local(SH, 2024, 1, 20), 50, 1_000_000, 100_000))
    async with pool.acquire() as other, other.transaction():
        await other.executemany(
            "INSERT INTO published_boundary_reads"
            " (meter_id, boundary_at, revision, register_ml, method, quality)"
            " VALUES ($1, $2, 1, $3, 'actual', 0)",
            [(m, FEB_OPEN, 2_200_000), (m, FEB_CLOSE, 5_100_000)],
        )
        read = asyncio.create_task(api.get(f"/v1/meters/{m}{FEB}", headers=t.reader))
        for _ in range(100):  # until the read's insert waits on our rows
            waiting = await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%INSERT INTO published_boundary_reads%'"
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting == 1
    body = (await read).json()
    assert (body["opening"]["revision"], body["closing"]["revision"]) == (1, 1)
    assert body["closing"]["published_register_m3"] == body["closing"]["register_m3"] == "5.100"
    assert body["revised"] is False
    assert [v["revision"] for v in body["revisions"]] == [1, 1]
    stored = await pool.fetchval(
        "SELECT count(*) FROM published_boundary_reads WHERE meter_id = $1", m
    )
    assert stored == 2


async def test_clock_sanity_excludes_readings(api, make_tenant, add_meter, add_readings):
    """Readings dated after their receipt, or before installation, are never used, and reported."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id, installed_at=FEB_OPEN - timedelta(days=2))
    await add_readings(
        m,
        [
            (FEB_OPEN - timedelta(days=3), 9_000_000),  # before installation
            (FEB_OPEN - timedelta(days=1), 1_000_000),
            (FEB_OPEN + timedelta(days=1), 1_100_000),
            (
                FEB_OPEN + timedelta(days=5),
                7_000_000,
                0,
                FEB_OPEN + timedelta(days=2),
            ),  # future clock
            (FEB_CLOSE, 3_000_000),
        ],
    )
    body = (await api.get(f"/v1/meters/{m}{FEB}", headers=t.reader)).json()
    assert body["opening"]["register_m3"] == "1.050"
    codes = {i["code"] for i in body["issues"]}
    assert {"clock_future", "before_installation"} <= codes
    assert body["consumption_m3"] == "1.950"


async def test_vee_spikes_zero_streak_gap_and_alarms(
    api, make_tenant, add_meter, add_readings, pool
):
    """High use, an unchanged register, a gap, leak flags and a tamper event are all reported."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id)
    rows, ml = [], 1_000_000
    for d in range(-60, 30):
        at = FEB_OPEN + timedelta(days=d)
        if 15 <= d < 19:  # 2024-02-16..19: gap of 4 days
            continue
        use = 1_000_000 if d == 3 else 0 if 6 <= d < 11 else 200_000
        rows.append((at, ml, 8 if d in (20, 21) else 0))  # LEAK flag
        ml += use
    await add_readings(m, rows)
    await pool.execute(
        "INSERT INTO meter_events (meter_id, occurred_at, kind, received_at)"
        " VALUES ($1, $2, 'tamper', $2)",
        m,
        FEB_OPEN + timedelta(days=8),
    )
    body = (await api.get(f"/v1/meters/{m}{FEB}", headers=t.reader)).json()
    codes = {i["code"] for i in body["issues"]}
    assert {"spike_high", "zero_consumption", "gap"} <= codes
    alarms = {(a["kind"], a["source"]) for a in body["alarms"]}
    assert {("leak", "flag"), ("tamper", "event")} <= alarms


async def test_unknown_cycle_is_404(api, make_tenant, add_meter):
    """A date that starts no cycle of the calendar answers 404 problem+json."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id)
    r = await api.get(f"/v1/meters/{m}/cycles/2024-02-02", headers=t.reader)
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
