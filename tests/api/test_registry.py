"""Meter registry: create, list, update, bulk import, exchange, device health and open alarms."""

from __future__ import annotations

from datetime import timedelta

from apihelpers import utc

METER = {"address": "M-1", "kind": "water", "format": "cjt188", "service_point": "SP-1"}


async def test_create_get_list_and_filter(api, make_tenant):
    """Meters are created, fetched, paged with a cursor and filtered by address."""
    t = await make_tenant()
    ids = []
    for i in range(3):
        r = await api.post("/v1/meters", headers=t.writer, json={**METER, "address": f"M-{i}"})
        assert r.status_code == 201, r.text
        ids.append(r.json()["meter_id"])
    got = (await api.get(f"/v1/meters/{ids[0]}", headers=t.reader)).json()
    assert got["register_scale"] == -3
    assert got["unit"] == "m3"
    assert got["has_credentials"] is False
    page = (await api.get("/v1/meters?limit=2", headers=t.reader)).json()
    rest = (
        await api.get(f"/v1/meters?limit=2&cursor={page['next_cursor']}", headers=t.reader)
    ).json()
    assert [m["meter_id"] for m in page["items"] + rest["items"]] == ids
    assert rest["next_cursor"] is None
    only = (await api.get("/v1/meters?address=M-1", headers=t.reader)).json()["items"]
    assert [m["meter_id"] for m in only] == [ids[1]]


async def test_invalid_meters_are_rejected(api, make_tenant):
    """Duplicate address 409, unknown timezone 422, register finer than its unit 422."""
    t = await make_tenant()
    assert (await api.post("/v1/meters", headers=t.writer, json=METER)).status_code == 201
    dup = await api.post("/v1/meters", headers=t.writer, json=METER)
    assert dup.status_code == 409
    assert dup.json()["type"] == "/problems/duplicate-address"
    tz = await api.post(
        "/v1/meters", headers=t.writer, json={**METER, "address": "M-2", "timezone": "Mars/Olympus"}
    )
    assert tz.status_code == 422
    assert tz.json()["type"] == "/problems/invalid-timezone"
    fine = await api.post(
        "/v1/meters",
        headers=t.writer,
        json={**METER, "address": "M-3", "initial_register_m3": "1.0005"},
    )
    assert fine.status_code == 422


async def test_update_and_credentials_reference(api, make_tenant, pool):
    """PATCH changes fields; credentials are kept only as a sha256 reference."""
    t = await make_tenant()
    mid = (await api.post("/v1/meters", headers=t.writer, json=METER)).json()["meter_id"]
    r = await api.patch(
        f"/v1/meters/{mid}",
        headers=t.writer,
        json={
            "timezone": "Europe/Berlin",
            "credentials": {"kind": "psk", "secret": "s3cret-value"},
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["timezone"] == "Europe/Berlin"
    assert r.json()["has_credentials"] is True
    ref = await pool.fetchval("SELECT credentials_ref FROM meters WHERE meter_id = $1", mid)
    assert ref.startswith("sha256:")
    assert "s3cret" not in ref
    bad = await api.patch(f"/v1/meters/{mid}", headers=t.writer, json={"kind": "gas", "x": 1})
    assert bad.status_code == 422


async def test_bulk_import_keeps_valid_rows(api, make_tenant):
    """JSON and CSV imports insert the valid rows and report each invalid one by row number."""
    t = await make_tenant()
    rows = [
        {**METER, "address": "I-1"},
        {"address": "I-2", "kind": "steam", "format": "oms"},
        {**METER, "address": "I-3"},
        {**METER, "address": "I-1"},
    ]
    r = await api.post("/v1/meters/import", headers=t.writer, json=rows)
    body = r.json()
    assert r.status_code == 200
    assert body["created"] == 2
    assert [e["row"] for e in body["errors"]] == [2, 4]
    csv_text = (
        "address,kind,format,service_point,register_digits\nC-1,gas,mbus,SP-9,6\nC-2,gas,,,\n"
    )
    r = await api.post(
        "/v1/meters/import", headers={**t.writer, "Content-Type": "text/csv"}, content=csv_text
    )
    assert r.json()["created"] == 1
    assert r.json()["errors"][0]["row"] == 2
    got = (await api.get("/v1/meters?address=C-1", headers=t.reader)).json()["items"][0]
    assert got["register_digits"] == 6
    assert got["kind"] == "gas"
    bad = await api.post("/v1/meters/import", headers=t.writer, content=b"{not json")
    assert bad.status_code == 422


async def test_exchange_twice_is_409(api, make_tenant):
    """A removed meter cannot be exchanged again, nor before its installation."""
    t = await make_tenant()
    mid = (
        await api.post(
            "/v1/meters", headers=t.writer, json={**METER, "installed_at": "2024-01-01T00:00:00Z"}
        )
    ).json()["meter_id"]
    early = {
        "exchanged_at": "2023-06-01T00:00:00Z",
        "final_register_m3": "1",
        "new_meter": {"address": "E-1", "format": "oms"},
    }
    assert (
        await api.post(f"/v1/meters/{mid}/exchange", headers=t.writer, json=early)
    ).status_code == 409
    ok = {**early, "exchanged_at": "2024-06-01T00:00:00+08:00"}
    first = await api.post(f"/v1/meters/{mid}/exchange", headers=t.writer, json=ok)
    assert first.status_code == 201
    assert first.json()["removed"]["final_register_m3"] == "1.000"
    assert first.json()["installed"]["installed_at"] == "2024-05-31T16:00:00Z"
    again = await api.post(
        f"/v1/meters/{mid}/exchange",
        headers=t.writer,
        json={**ok, "new_meter": {"address": "E-2", "format": "oms"}},
    )
    assert again.status_code == 409
    assert again.json()["type"] == "/problems/exchange-impossible"


async def test_health_and_open_alarms(api, make_tenant, add_meter, add_readings, pool):
    """Health shows the last reading, its flags and radio; alarms list only still-active ones."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id)
    at = utc(2024, 5, 1, 8)
    await add_readings(m, [(at - timedelta(days=1), 1_000_000), (at, 1_234_000, 4 | 8)])
    await pool.execute(
        "INSERT INTO device_health (meter_id, measured_at, battery_mv, rsrp_cdbm, ecl, received_at)"
        " VALUES ($1, $2, 3550, -10550, 1, $2)",
        m,
        at,
    )
    await pool.executemany(
        "INSERT INTO meter_events (meter_id, occurred_at, kind, active, received_at)"
        " VALUES ($1, $2, $3, $4, $2)",
        [
            (m, at - timedelta(hours=5), "leak", True),
            (m, at - timedelta(hours=1), "leak", False),
            (m, at - timedelta(hours=2), "tamper", True),
        ],
    )
    h = (await api.get(f"/v1/meters/{m}/health", headers=t.reader)).json()
    assert h["last_register_m3"] == "1.234"
    assert set(h["last_flags"]) == {"low_battery", "leak"}
    assert (h["battery_mv"], h["rsrp_cdbm"], h["ecl"]) == (3550, -10550, 1)
    alarms = (await api.get(f"/v1/meters/{m}/alarms", headers=t.reader)).json()
    assert [a["kind"] for a in alarms] == ["tamper"]
