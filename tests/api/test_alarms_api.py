"""Alarm lifecycle, rules, webhook endpoints and health views over HTTP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import httpx

from api.app import create_app
from storage.credentials import parse_key
from storage.events import write_events
from storage.health import write_health
from storage.rows import EventRow, HealthRow
from storage.webhooks import open_secret


async def _event(pool: asyncpg.Pool, meter: int, kind: str, at: datetime) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await write_events(conn, [EventRow(meter, at, kind, at)])


async def test_acknowledge_and_close_over_http(api, make_tenant, add_meter, pool) -> None:
    """/v1/alarms shows the lifecycle; acknowledge records the key and note; a second
    acknowledge is 409; close moves it to state=closed; another tenant gets 404."""
    t, other = await make_tenant(), await make_tenant()
    m = await add_meter(t.tenant_id)
    now = datetime.now(UTC)
    await _event(pool, m, "leak", now)
    [listed] = (await api.get("/v1/alarms", headers=t.reader)).json()
    assert (listed["kind"], listed["state"], listed["severity"]) == ("leak", "open", "major")
    alarm_id = listed["alarm_id"]
    url = f"/v1/alarms/{alarm_id}"
    assert (await api.post(f"{url}/acknowledge", headers=t.reader)).status_code == 403
    assert (await api.post(f"{url}/acknowledge", headers=other.writer)).status_code == 404
    acked = await api.post(f"{url}/acknowledge", headers=t.writer, json={"note": "on it"})
    assert acked.status_code == 200, acked.text
    key_id = t.writer["Authorization"].split("_")[1]
    assert (acked.json()["state"], acked.json()["acked_by"], acked.json()["ack_note"]) == (
        "acknowledged", key_id, "on it",
    )  # fmt: skip
    again = await api.post(f"{url}/acknowledge", headers=t.writer)
    assert again.status_code == 409
    closed = await api.post(f"{url}/close", headers=t.writer, json={"note": "fixed"})
    assert (closed.json()["state"], closed.json()["close_reason"]) == ("closed", "manual")
    by_state = (await api.get("/v1/alarms?state=closed", headers=t.reader)).json()
    assert [a["alarm_id"] for a in by_state] == [alarm_id]
    assert (await api.get("/v1/alarms?state=open", headers=t.reader)).json() == []
    assert (await api.get(url, headers=other.reader)).status_code == 404


async def test_rules_and_webhook_endpoints(api, make_tenant, pool, settings) -> None:
    """An admin sets a rule and adds an endpoint (secret shown once); replay needs a
    selector; readers cannot manage webhooks."""
    t = await make_tenant()
    put = await api.put(
        "/v1/alarm-rules/leak", headers=t.admin,
        json={"severity": "critical", "auto_close_after_s": 600},
    )  # fmt: skip
    assert put.status_code == 200, put.text
    assert (put.json()["severity"], put.json()["auto_close_after_s"]) == ("critical", 600)
    bad = await api.put("/v1/alarm-rules/leak", headers=t.admin, json={"threshold": 3000})
    assert bad.status_code == 422
    assert (await api.put("/v1/alarm-rules/nope", headers=t.admin, json={})).status_code == 404
    made = await api.post(
        "/v1/webhooks", headers=t.admin,
        json={"url": "http://127.0.0.1:9/hook", "kinds": ["leak"], "min_severity": "major"},
    )  # fmt: skip
    assert made.status_code == 201, made.text
    assert len(made.json()["secret"]) >= 16
    eid = made.json()["endpoint_id"]
    stored = await pool.fetchrow(
        "SELECT secret, secret_sealed FROM webhook_endpoints WHERE endpoint_id = $1", eid
    )
    assert stored["secret"] is None  # sealed (migration 0045), never kept in clear
    key = parse_key(settings.credentials_key.get_secret_value())
    assert open_secret(key, eid, stored["secret_sealed"]) == made.json()["secret"]
    [listed] = (await api.get("/v1/webhooks", headers=t.admin)).json()
    assert "secret" not in listed
    assert listed["kinds"] == ["leak"]
    assert (await api.get("/v1/webhooks", headers=t.reader)).status_code == 403
    replay = await api.post(f"/v1/webhooks/{eid}/replay", headers=t.admin, json={})
    assert replay.status_code == 422
    since = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    ok = await api.post(f"/v1/webhooks/{eid}/replay", headers=t.admin, json={"since": since})
    assert ok.json() == {"queued": 0}
    assert (await api.get(f"/v1/webhooks/{eid}/deliveries", headers=t.admin)).json() == []
    assert (await api.delete(f"/v1/webhooks/{eid}", headers=t.admin)).status_code == 204
    assert (await api.get(f"/v1/webhooks/{eid}", headers=t.admin)).status_code == 404


async def test_health_history_and_fleet(api, make_tenant, add_meter, pool) -> None:
    """/health shows the newest figures; the history lists every row; the fleet view counts
    each meter once by its latest row, with battery/coverage bands and worst cells."""
    t = await make_tenant()
    a, b = await add_meter(t.tenant_id), await add_meter(t.tenant_id)
    now = datetime.now(UTC).replace(microsecond=0)
    rows = [
        HealthRow(a, now - timedelta(hours=2), 3650, -9000, 800, 0, now, 95, False, False, 7),
        HealthRow(a, now - timedelta(hours=1), 3040, -12100, -500, 2, now, 10, True, False, 7),
        HealthRow(b, now - timedelta(hours=1), 3610, -8800, 900, 0, now, 90, False, True, 9),
    ]
    async with pool.acquire() as conn:
        await write_health(conn, rows)
    h = (await api.get(f"/v1/meters/{a}/health", headers=t.reader)).json()
    assert (h["battery_mv"], h["battery_low"], h["ecl"], h["cell_id"]) == (3040, True, 2, 7)
    hist = (await api.get(f"/v1/meters/{a}/health/history", headers=t.reader)).json()
    assert [p["battery_mv"] for p in hist] == [3040, 3650]
    fleet = (await api.get("/v1/health/fleet?days=1", headers=t.reader)).json()
    assert (fleet["meters"], fleet["battery_low"], fleet["meter_error"]) == (2, 1, 1)
    assert fleet["battery_mv_bands"] == [{"start": 3000, "meters": 1}, {"start": 3600, "meters": 1}]
    assert fleet["ecl"] == {"0": 1, "2": 1}
    assert [c["cell_id"] for c in fleet["worst_cells"]] == [7, 9]  # -121 dBm before -88 dBm
    assert fleet["worst_cells"][0]["meters_ecl2"] == 1


async def test_webhook_needs_the_credentials_key(make_tenant, settings) -> None:
    """An API started without NBMETER_CREDENTIALS_KEY cannot seal a secret: adding an
    endpoint is 503 naming the setting, and nothing is stored."""
    app = create_app(settings.model_copy(update={"credentials_key": None}))
    t = await make_tenant()
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c,
    ):
        made = await c.post("/v1/webhooks", headers=t.admin, json={"url": "http://127.0.0.1:9/"})
        assert made.status_code == 503
        assert "NBMETER_CREDENTIALS_KEY" in made.json()["detail"]
        assert (await c.get("/v1/webhooks", headers=t.admin)).json() == []
