"""Bulk export of a tenant's cycle reads: JSON pages (cursor), NDJSON and CSV streams, close."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import pytest
from apihelpers import daily, local

from storage import billing

SH = "Asia/Shanghai"
OPEN, CLOSE = local(SH, 2024, 2, 1), local(SH, 2024, 3, 1)


async def _fleet(make_tenant, add_meter, add_readings, n=5):
    t = await make_tenant()
    ids = []
    for i in range(n):
        m = await add_meter(t.tenant_id, service_point=f"SP-{i}")
        await add_readings(
            m, daily(OPEN - timedelta(days=2, hours=12), 35, 1_000_000 * i, 10_000 * (i + 1))
        )
        ids.append(m)
    return t, ids


async def test_json_pages_with_opaque_cursor(api, make_tenant, add_meter, add_readings):
    """limit=2 over 5 meters gives 3 pages, every meter once, in id order."""
    t, ids = await _fleet(make_tenant, add_meter, add_readings)
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        r = await api.get("/v1/cycles/2024-02-01/reads", headers=t.reader, params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [row["meter_id"] for row in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    assert pages == 3
    assert page["items"][-1]["consumption_m3"] == "1.450"  # 29 days * 50 L


async def test_ndjson_and_csv_streams_agree(api, make_tenant, add_meter, add_readings):
    """format=ndjson and Accept: text/csv stream the same reads as the JSON page."""
    t, ids = await _fleet(make_tenant, add_meter, add_readings)
    page = (await api.get("/v1/cycles/2024-02-01/reads", headers=t.reader)).json()["items"]
    r = await api.get("/v1/cycles/2024-02-01/reads?format=ndjson", headers=t.reader)
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert lines == page
    r = await api.get("/v1/cycles/2024-02-01/reads", headers={**t.reader, "Accept": "text/csv"})
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [int(x["meter_id"]) for x in rows] == ids
    assert [x["consumption_m3"] for x in rows] == [p["consumption_m3"] for p in page]
    r = await api.get(
        "/v1/cycles/2024-02-01/reads", headers={**t.reader, "Accept": "application/x-ndjson"}
    )
    assert len(r.text.splitlines()) == len(ids)


@pytest.mark.parametrize("window", [None, 1], ids=["one_window", "a_window_per_meter_id"])
async def test_close_publishes_then_revises(
    api, make_tenant, add_meter, add_readings, monkeypatch, window
):
    """Closing publishes every boundary once (whatever the meter-id windows it publishes
    in); a late reading then shows up as a revision."""
    if window is not None:
        monkeypatch.setattr(billing, "PUBLISH_WINDOW", window)
    t, ids = await _fleet(make_tenant, add_meter, add_readings, n=3)
    r = await api.post("/v1/cycles/2024-02-01/close", headers=t.admin)
    assert r.json() == {"cycle": "2024-02-01", "boundaries": 6, "published": 6, "revised": 0}
    again = (await api.post("/v1/cycles/2024-02-01/close", headers=t.admin)).json()
    assert (again["published"], again["revised"]) == (0, 0)
    await add_readings(ids[0], [(CLOSE - timedelta(minutes=10), 9_000_000)])
    rows = (await api.get("/v1/cycles/2024-02-01/reads", headers=t.reader)).json()["items"]
    assert [row["revised"] for row in rows] == [True, False, False]
    assert rows[0]["closing"]["published_register_m3"] != rows[0]["closing"]["register_m3"]
    third = await api.post("/v1/cycles/2024-02-01/close", headers=t.reader)
    assert third.status_code == 403
    third = (await api.post("/v1/cycles/2024-02-01/close", headers=t.admin)).json()
    assert third["revised"] == 1


async def test_close_of_open_cycle_is_409(api, make_tenant):
    """A cycle that has not ended cannot be closed."""
    t = await make_tenant()
    r = await api.post("/v1/cycles/2198-12-01/close", headers=t.admin)
    assert r.status_code == 409
    assert r.json()["type"] == "/problems/conflict"
