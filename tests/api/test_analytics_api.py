"""Districts, their balance and the read rate over HTTP, on a hand-made day of readings."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
from dbkit import read_s

DAY = date(2026, 4, 2)
TZ = ZoneInfo("Asia/Shanghai")


async def _hourly(pool: asyncpg.Pool, meter_id: int, ml_h: int) -> None:
    """Readings on each local hour of DAY and the next midnight, ml_h more each hour."""
    start = datetime(DAY.year, DAY.month, DAY.day, tzinfo=TZ)
    rows = [(meter_id, read_s(start + timedelta(hours=k)), 5_000 + k * ml_h, 0) for k in range(25)]
    await pool.copy_records_to_table(
        "readings",
        records=rows,
        columns=["meter_id", "read_s", "register_ml", "flags"],
    )


async def test_district_balance_and_read_rate(api, make_tenant, add_meter, pool) -> None:
    """Bulk 2 L/h, customers 1 and 0.5 L/h: 48 L in, 36 L billed, 12 L (0.25) lost, all
    covered; the read rate counts the unread fourth meter; other tenants see 404."""
    t, other = await make_tenant(), await make_tenant()
    bulk, c1, c2, idle = [await add_meter(t.tenant_id) for _ in range(4)]
    for meter, ml_h in ((bulk, 2000), (c1, 1000), (c2, 500)):
        await _hourly(pool, meter, ml_h)
    body = {"name": "north", "bulk_meter_id": bulk, "meter_ids": [c2, c1]}
    assert (await api.post("/v1/districts", headers=t.writer, json=body)).status_code == 403
    made = await api.post("/v1/districts", headers=t.admin, json=body)
    assert made.status_code == 201
    district = made.json()
    assert (district["bulk_meter_id"], district["meter_ids"]) == (bulk, sorted([c1, c2]))
    url = f"/v1/districts/{district['district_id']}"
    assert (await api.get(url, headers=other.reader)).status_code == 404
    again = await api.post("/v1/districts", headers=t.admin, json={**body, "meter_ids": []})
    assert again.status_code == 409  # the name and the bulk meter are taken
    stranger = await add_meter(other.tenant_id)
    bad = {"name": "x", "bulk_meter_id": idle, "meter_ids": [stranger]}
    assert (await api.post("/v1/districts", headers=t.admin, json=bad)).status_code == 422

    before = (await api.get(f"{url}/balance?day={DAY}", headers=t.reader)).json()
    assert (before["computed_at"], before["complete"], before["nrw_ml"]) == (None, False, None)
    run_url = f"/v1/analytics/run?from={DAY}&to={DAY}"
    assert (await api.post(run_url, headers=t.reader)).status_code == 403
    ran = await api.post(run_url, headers=t.admin)
    assert ran.status_code == 200
    assert (ran.json()["days"], ran.json()["meter_days"]) == ([DAY.isoformat()], 3)
    backwards = f"/v1/analytics/run?from={DAY}&to={DAY - timedelta(days=1)}"
    assert (await api.post(backwards, headers=t.admin)).status_code == 422
    got = (await api.get(f"{url}/balance?day={DAY}", headers=t.reader)).json()
    assert (got["bulk_ml"], got["customers_ml"], got["nrw_ml"]) == (48_000, 36_000, 12_000)
    assert (got["n_customers"], got["n_covered"], got["complete"]) == (2, 2, True)
    assert got["nrw_ratio"] == "0.2500"
    assert got["computed_at"] is not None
    # the range form: the same day between two days not rolled up, in order
    span = f"{url}/balances?from={DAY - timedelta(days=1)}&to={DAY + timedelta(days=1)}"
    days = (await api.get(span, headers=t.reader)).json()
    assert [d["day"] for d in days] == [str(DAY + timedelta(days=k)) for k in (-1, 0, 1)]
    assert days[1] == got
    assert [d["computed_at"] for d in (days[0], days[2])] == [None, None]
    assert (await api.get(span, headers=other.reader)).status_code == 404
    reversed_span = f"{url}/balances?from={DAY}&to={DAY - timedelta(days=1)}"
    assert (await api.get(reversed_span, headers=t.reader)).status_code == 422
    too_long = f"{url}/balances?from={DAY}&to={DAY + timedelta(days=366)}"
    assert (await api.get(too_long, headers=t.reader)).status_code == 422

    rate = (await api.get(f"/v1/kpi/read-rate?day={DAY}", headers=t.reader)).json()
    assert rate["tenant"] == {
        "district_id": None, "meters_active": 4, "meters_read": 3, "readings": 72,
        "read_rate": "0.7500",
    }  # fmt: skip
    [north] = rate["districts"]
    assert (north["meters_active"], north["meters_read"], north["read_rate"]) == (3, 3, "1.0000")
    assert [d["name"] for d in (await api.get("/v1/districts", headers=t.reader)).json()] == [
        "north"
    ]
    assert (await api.delete(url, headers=t.admin)).status_code == 204
    assert (await api.get(url, headers=t.reader)).status_code == 404


async def test_analytics_rules_over_http(api, make_tenant) -> None:
    """Analytics kinds show their default threshold and periods; an admin tunes them; a
    kind without periods refuses them."""
    t = await make_tenant()
    rules = {r["kind"]: r for r in (await api.get("/v1/alarm-rules", headers=t.reader)).json()}
    assert (rules["night_flow"]["threshold"], rules["night_flow"]["periods"]) == (5000, 3)
    put = await api.put(
        "/v1/alarm-rules/night_flow", headers=t.admin, json={"threshold": 2000, "periods": 5}
    )
    assert (put.json()["threshold"], put.json()["periods"]) == (2000, 5)
    bad = await api.put("/v1/alarm-rules/leak", headers=t.admin, json={"periods": 2})
    assert bad.status_code == 422


async def test_cli_recomputes_a_day(db_url: str, pool, make_tenant, add_meter) -> None:
    """`nbmeter analytics run --tenant S --day D` rolls the day up and prints what it did:
    a meter leaking 6 L/h all night on one day is no night_flow alarm (3 nights needed)."""
    t = await make_tenant()
    slug = await pool.fetchval("SELECT slug FROM tenants WHERE tenant_id = $1", t.tenant_id)
    meter = await add_meter(t.tenant_id)
    await _hourly(pool, meter, 6000)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nbmeter.cli", "analytics", "run", "--tenant", slug,
        "--day", DAY.isoformat(),
        env={**os.environ, "NBMETER_DATABASE_URL": db_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    summary = json.loads(out)
    assert summary["days"] == [[t.tenant_id, DAY.isoformat()]]
    assert (summary["meter_days"], summary["raised"]["night_flow"]) == (1, 0)
    night = await pool.fetchval(
        "SELECT night_min_ml FROM meter_days WHERE meter_id = $1 AND day = $2", meter, DAY
    )
    assert night == 6000
