"""Local time: cycle boundaries and interval steps across DST switches and in Asia/Shanghai."""

from __future__ import annotations

from datetime import timedelta

from apihelpers import local, utc


def hourly(start, hours, first_ml=1_000_000, per_hour_ml=1_000):
    """Readings every UTC hour, 1 L per hour by default."""
    return [(start + timedelta(hours=h), first_ml + h * per_hour_ml) for h in range(hours)]


async def test_berlin_cycle_boundary_on_spring_forward(api, make_tenant, add_meter, add_readings):
    """A cycle starting 2024-03-31 (CET->CEST that day) runs 23:00Z..22:00Z and bills 719 h."""
    t = await make_tenant("Europe/Berlin")
    r = await api.put(
        "/v1/billing-calendar",
        headers=t.admin,
        json={"dates": ["2024-03-01", "2024-03-31", "2024-04-30"]},
    )
    assert r.status_code == 200, r.text
    m = await add_meter(t.tenant_id)
    await add_readings(m, hourly(utc(2024, 3, 25), 24 * 40))
    body = (await api.get(f"/v1/meters/{m}/cycles/2024-03-31", headers=t.reader)).json()
    assert (body["start"], body["end"]) == ("2024-03-30T23:00:00Z", "2024-04-29T22:00:00Z")
    assert body["opening"]["method"] == body["closing"]["method"] == "actual"
    assert body["consumption_m3"] == "0.719"  # 30 local days, one of 23 h
    assert (await api.get(f"/v1/meters/{m}/cycles/2024-04-01", headers=t.reader)).status_code == 404


async def test_new_york_cycle_boundaries_on_both_switches(
    api, make_tenant, add_meter, add_readings
):
    """Cycles starting 2024-03-10 and 2024-11-03 (US switch days) start at local midnight."""
    t = await make_tenant("America/New_York")
    await api.put(
        "/v1/billing-calendar",
        headers=t.admin,
        json={"dates": ["2024-03-10", "2024-11-03", "2024-12-01"]},
    )
    m = await add_meter(t.tenant_id)
    await add_readings(m, hourly(utc(2024, 3, 9), 24 * 30))
    await add_readings(m, hourly(utc(2024, 11, 2), 24 * 32, 9_000_000))
    march = (await api.get(f"/v1/meters/{m}/cycles/2024-03-10", headers=t.reader)).json()
    assert march["start"] == "2024-03-10T05:00:00Z"
    assert march["end"] == "2024-11-03T04:00:00Z"
    nov = (await api.get(f"/v1/meters/{m}/cycles/2024-11-03", headers=t.reader)).json()
    assert (nov["start"], nov["end"]) == ("2024-11-03T04:00:00Z", "2024-12-01T05:00:00Z")
    assert nov["consumption_m3"] == "0.673"  # 28 local days, one of 25 h
    assert nov["opening"] == march["closing"] | {
        "revision": nov["opening"]["revision"],
        "published_register_m3": nov["opening"]["published_register_m3"],
    }


async def test_shanghai_default_cycle_day(api, make_tenant, add_meter, add_readings):
    """The default calendar starts cycles on day 1, 00:00 Asia/Shanghai (16:00Z the day before)."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id)
    await add_readings(m, hourly(utc(2024, 5, 30), 24 * 35))
    cal = (await api.get("/v1/billing-calendar", headers=t.reader)).json()
    assert cal == {"cycle_day": 1, "dates": []}
    body = (await api.get(f"/v1/meters/{m}/cycles/2024-06-01", headers=t.reader)).json()
    assert (body["start"], body["end"]) == ("2024-05-31T16:00:00Z", "2024-06-30T16:00:00Z")
    assert body["consumption_m3"] == "0.720"
    cycles = (await api.get("/v1/cycles?from=2024-01-01&to=2024-03-31", headers=t.reader)).json()
    assert [c["cycle"] for c in cycles["cycles"]] == ["2024-01-01", "2024-02-01", "2024-03-01"]


async def test_daily_steps_are_23_and_25_hours_on_switch_days(
    api, make_tenant, add_meter, add_readings
):
    """1d steps follow Berlin midnights: 23 h on 2024-03-31, 25 h on 2024-10-27."""
    t = await make_tenant("Europe/Berlin")
    m = await add_meter(t.tenant_id)
    await add_readings(m, hourly(utc(2024, 3, 28), 24 * 6))
    await add_readings(m, hourly(utc(2024, 10, 24), 24 * 6, 5_000_000))
    spring = (
        await api.get(
            f"/v1/meters/{m}/readings",
            headers=t.reader,
            params={"from": "2024-03-30T00:00:00", "to": "2024-04-01T00:00:00", "step": "1d"},
        )
    ).json()
    assert [i["consumption_m3"] for i in spring["intervals"]] == ["0.024", "0.023"]
    assert spring["intervals"][1]["start"] == "2024-03-30T23:00:00Z"
    autumn = (
        await api.get(
            f"/v1/meters/{m}/readings",
            headers=t.reader,
            params={"from": "2024-10-27T00:00:00+02:00", "to": "2024-10-28T00:00:00+01:00"},
        )
    ).json()
    assert [i["consumption_m3"] for i in autumn["intervals"]] == ["0.025"]
    hours = (
        await api.get(
            f"/v1/meters/{m}/readings",
            headers=t.reader,
            params={"from": "2024-03-31T00:00:00", "to": "2024-03-31T05:00:00", "step": "1h"},
        )
    ).json()
    assert len(hours["intervals"]) == 4  # 00, 01, 03, 04 local: 02:00 does not exist
    assert all(i["consumption_m3"] == "0.001" for i in hours["intervals"])


async def test_monthly_steps_and_missing_outside_service(api, make_tenant, add_meter, add_readings):
    """1mo steps start on local month starts; steps before installation are 'missing'."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id, installed_at=local("Asia/Shanghai", 2024, 2, 1))
    await add_readings(
        m, [(local("Asia/Shanghai", 2024, mo, 1), mo * 1_000_000) for mo in (2, 3, 4)]
    )
    body = (
        await api.get(
            f"/v1/meters/{m}/readings",
            headers=t.reader,
            params={"from": "2024-01-01", "to": "2024-04-01", "step": "1mo"},
        )
    ).json()
    iv = body["intervals"]
    assert [i["start"] for i in iv] == [
        "2023-12-31T16:00:00Z",
        "2024-01-31T16:00:00Z",
        "2024-02-29T16:00:00Z",
    ]
    assert iv[0]["start_method"] == "missing"
    assert iv[0]["consumption_m3"] is None
    assert [i["consumption_m3"] for i in iv[1:]] == ["1.000", "1.000"]


async def test_too_many_steps_is_422(api, make_tenant, add_meter):
    """A range needing more than 2,000 steps is refused with 422 problem+json."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id)
    r = await api.get(
        f"/v1/meters/{m}/readings",
        headers=t.reader,
        params={"from": "2020-01-01", "to": "2024-01-01", "step": "1h"},
    )
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
