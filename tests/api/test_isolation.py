"""Cross-tenant isolation: every endpoint, called with another tenant's key and ids, says 404."""

from __future__ import annotations

from apihelpers import daily, local


async def test_every_meter_endpoint_hides_foreign_ids(api, make_tenant, add_meter, add_readings):
    """Tenant B's admin key gets 404 problem+json for each of tenant A's meters' routes."""
    a, b = await make_tenant(), await make_tenant()
    m = await add_meter(a.tenant_id, service_point="SP-A")
    await add_readings(m, daily(local("Asia/Shanghai", 2024, 1, 25), 40, 0, 10_000))
    exchange = {
        "exchanged_at": "2024-02-10T00:00:00Z",
        "final_register_m3": "1.000",
        "new_meter": {"address": "N1", "format": "oms"},
    }
    calls = [
        ("GET", f"/v1/meters/{m}", None),
        ("PATCH", f"/v1/meters/{m}", {"service_point": "stolen"}),
        ("POST", f"/v1/meters/{m}/exchange", exchange),
        ("GET", f"/v1/meters/{m}/health", None),
        ("GET", f"/v1/meters/{m}/alarms", None),
        ("GET", f"/v1/meters/{m}/readings?from=2024-02-01&to=2024-02-05", None),
        ("GET", f"/v1/meters/{m}/cycles/2024-02-01", None),
    ]
    for method, url, body in calls:
        r = await api.request(method, url, headers=b.admin, json=body)
        assert r.status_code == 404, (method, url, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    # the owner sees an untouched meter, and every call works with the owner's key
    assert (await api.get(f"/v1/meters/{m}", headers=a.reader)).json()["service_point"] == "SP-A"
    for method, url, body in calls:
        assert (await api.request(method, url, headers=a.admin, json=body)).status_code < 300


async def test_collections_and_keys_are_per_tenant(api, make_tenant, add_meter, add_readings, pool):
    """Lists, alarms, export, close and key revocation never reach another tenant's rows."""
    a, b = await make_tenant(), await make_tenant()
    m = await add_meter(a.tenant_id, address="SHARED-ADDR")
    await add_readings(m, daily(local("Asia/Shanghai", 2024, 1, 25), 40, 0, 10_000))
    await pool.execute(
        "INSERT INTO meter_events (meter_id, occurred_at, kind, received_at)"
        " VALUES ($1, $2, 'leak', $2)",
        m,
        local("Asia/Shanghai", 2024, 2, 3),
    )
    assert (await api.get("/v1/meters", headers=b.reader)).json()["items"] == []
    assert (await api.get("/v1/meters?address=SHARED-ADDR", headers=b.reader)).json()["items"] == []
    assert (await api.get("/v1/alarms", headers=b.reader)).json() == []
    assert len((await api.get("/v1/alarms", headers=a.reader)).json()) == 1
    assert (await api.get("/v1/cycles/2024-02-01/reads", headers=b.reader)).json()["items"] == []
    for fmt in ("ndjson", "csv"):
        text = (await api.get(f"/v1/cycles/2024-02-01/reads?format={fmt}", headers=b.reader)).text
        assert "SHARED-ADDR" not in text
    closed = (await api.post("/v1/cycles/2024-02-01/close", headers=b.admin)).json()
    assert closed["boundaries"] == 0
    # the same address is free in tenant B: addresses are per tenant
    r = await api.post(
        "/v1/meters",
        headers=b.writer,
        json={"address": "SHARED-ADDR", "kind": "gas", "format": "mbus"},
    )
    assert r.status_code == 201
    key_id = a.reader["Authorization"].split("_")[1]
    assert (await api.delete(f"/v1/api-keys/{key_id}", headers=b.admin)).status_code == 404
    assert (await api.get("/v1/meters", headers=a.reader)).status_code == 200
    assert key_id not in str((await api.get("/v1/api-keys", headers=b.admin)).json())
    # a paging cursor is only a position: it never carries a tenant
    page = (await api.get("/v1/meters?limit=1", headers=a.reader)).json()
    assert page["next_cursor"] is not None
    other = await api.get(f"/v1/meters?cursor={page['next_cursor']}", headers=b.reader)
    assert other.json()["items"] == [] or all(
        i["address"] != "SHARED-ADDR" or i["kind"] == "gas" for i in other.json()["items"]
    )
