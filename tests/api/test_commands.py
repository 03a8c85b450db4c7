"""The command API: create (idempotent), supersede, list by meter and state, cancel, bulk
jobs by list and by query, scopes and tenant isolation.

No collector runs in the API tests: delivery is tests/collector/test_downlink.py's part.
"""

from __future__ import annotations

import uuid

import httpx


async def test_create_idempotent_and_superseded(api, make_tenant, add_meter):
    """201 then 200 for the same key and body, 409 for another body; a later valve command
    cancels the queued one with reason superseded_by=<id>, visible by state."""
    t = await make_tenant()
    meter = await add_meter(t.tenant_id)
    body = {"kind": "valve", "args": {"action": "close"}, "idempotency_key": "close-1"}
    first = await api.post(f"/v1/meters/{meter}/commands", json=body, headers=t.writer)
    assert first.status_code == 201, first.text
    cmd = first.json()
    assert (cmd["state"], cmd["attempts"], cmd["kind"]) == ("queued", 0, "valve")
    again = await api.post(f"/v1/meters/{meter}/commands", json=body, headers=t.writer)
    assert again.status_code == 200
    assert again.json()["command_id"] == cmd["command_id"]
    other = {**body, "args": {"action": "open"}}
    clash = await api.post(f"/v1/meters/{meter}/commands", json=other, headers=t.writer)
    assert clash.status_code == 409
    assert clash.json()["type"] == "/problems/idempotency-conflict"
    opened = await api.post(
        f"/v1/meters/{meter}/commands",
        json={"kind": "valve", "args": {"action": "open"}},
        headers=t.writer,
    )
    assert opened.status_code == 201
    old = (await api.get(f"/v1/commands/{cmd['command_id']}", headers=t.reader)).json()
    assert (old["state"], old["reason"]) == (
        "cancelled",
        f"superseded_by={opened.json()['command_id']}",
    )
    listed = await api.get(f"/v1/meters/{meter}/commands?state=queued", headers=t.reader)
    assert [c["command_id"] for c in listed.json()["items"]] == [opened.json()["command_id"]]
    everything = await api.get(f"/v1/commands?meter_id={meter}", headers=t.reader)
    assert [c["state"] for c in everything.json()["items"]] == ["cancelled", "queued"]


async def test_refusals_say_why(api, make_tenant, add_meter):
    """A kind the meter's format cannot take is 422 invalid-command; unknown meter 404;
    a reader key cannot queue (403); bad TTL 422."""
    t = await make_tenant()
    cjt = await add_meter(t.tenant_id)
    r = await api.post(
        f"/v1/meters/{cjt}/commands",
        json={"kind": "reporting", "args": {"interval_s": 600}},
        headers=t.writer,
    )
    assert r.status_code == 422
    assert "cannot take a reporting" in r.json()["detail"]
    r = await api.post("/v1/meters/999999999/commands", json={"kind": "clock"}, headers=t.writer)
    assert r.status_code == 404
    r = await api.post(f"/v1/meters/{cjt}/commands", json={"kind": "clock"}, headers=t.reader)
    assert r.status_code == 403
    r = await api.post(
        f"/v1/meters/{cjt}/commands", json={"kind": "clock", "ttl_s": 5}, headers=t.writer
    )
    assert r.status_code == 422


async def test_read_is_for_lwm2m_clients_only(api, make_tenant, add_meter, pool):
    """A read of an LwM2M path: 422 for a meter that never registered as an LwM2M client
    (whatever its format) and for a bad path; 201 once it has a registration; a read of
    another path does not supersede it, a read of the same path does."""
    t = await make_tenant()
    senml = await add_meter(t.tenant_id, format="senml")
    cjt = await add_meter(t.tenant_id)
    read = {"kind": "read", "args": {"path": "/3/0/9"}}
    r = await api.post(f"/v1/meters/{senml}/commands", json=read, headers=t.writer)
    assert r.status_code == 422
    assert "is no LwM2M client" in r.json()["detail"]
    r = await api.post(f"/v1/meters/{cjt}/commands", json=read, headers=t.writer)
    assert r.status_code == 422
    assert f"meter {cjt} is no LwM2M client" in r.json()["detail"]
    await pool.execute(
        "INSERT INTO lwm2m_registrations (registration_id, tenant_id, meter_id, endpoint,"
        " lwm2m_version, lifetime_s, binding, queue_mode, peer, transport, expires_at)"
        " VALUES ($1, $2, $3, 'ep', '1.1', 300, 'U', true, '[::1]:5683', 1, now())",
        uuid.uuid4().hex[:16],
        t.tenant_id,
        senml,
    )
    bad = {"kind": "read", "args": {"path": "3/0/9"}}
    r = await api.post(f"/v1/meters/{senml}/commands", json=bad, headers=t.writer)
    assert r.status_code == 422
    assert "LwM2M path" in r.json()["detail"]
    first = await api.post(f"/v1/meters/{senml}/commands", json=read, headers=t.writer)
    assert first.status_code == 201
    assert first.json()["args"] == {"path": "/3/0/9"}
    other = {"kind": "read", "args": {"path": "/3424/0"}}
    assert (
        await api.post(f"/v1/meters/{senml}/commands", json=other, headers=t.writer)
    ).status_code == 201
    again = await api.post(f"/v1/meters/{senml}/commands", json=read, headers=t.writer)
    assert again.status_code == 201
    states = await pool.fetch(
        "SELECT args->>'path' AS path, state FROM commands WHERE meter_id = $1"
        " ORDER BY 1, command_id",
        senml,
    )
    assert [tuple(r) for r in states] == [
        ("/3/0/9", "cancelled"),
        ("/3/0/9", "queued"),
        ("/3424/0", "queued"),
    ]


async def test_cancel_only_while_queued(api, make_tenant, add_meter, pool):
    """Cancel a queued command (reason cancelled_by=api-key:<id>); a sent one answers 409."""
    t = await make_tenant()
    meter = await add_meter(t.tenant_id)
    a = (
        await api.post(f"/v1/meters/{meter}/commands", json={"kind": "clock"}, headers=t.writer)
    ).json()
    r = await api.post(f"/v1/commands/{a['command_id']}/cancel", headers=t.writer)
    assert r.status_code == 200
    assert r.json()["state"] == "cancelled"
    assert r.json()["reason"].startswith("cancelled_by=api-key:")
    b = (
        await api.post(f"/v1/meters/{meter}/commands", json={"kind": "clock"}, headers=t.writer)
    ).json()
    await pool.execute(
        "UPDATE commands SET state = 'sent', sent_at = now(), attempts = 1 WHERE command_id = $1",
        b["command_id"],
    )
    r = await api.post(f"/v1/commands/{b['command_id']}/cancel", headers=t.writer)
    assert r.status_code == 409
    assert r.json()["type"] == "/problems/not-cancellable"


async def test_bulk_by_query_and_list(api, make_tenant, add_meter):
    """Close every gas meter's valve: 202 with a job counting its commands; the same key
    answers the same job; exactly one selector must be given."""
    t = await make_tenant()
    gas = [await add_meter(t.tenant_id, kind="gas") for _ in range(4)]
    await add_meter(t.tenant_id, kind="water")
    body = {
        "kind": "valve",
        "args": {"action": "close"},
        "query": {"kind": "gas"},
        "idempotency_key": "gas-close",
    }
    r = await api.post("/v1/commands/bulk", json=body, headers=t.writer)
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["n_commands"], job["counts"]) == (4, {"queued": 4})
    again = await api.post("/v1/commands/bulk", json=body, headers=t.writer)
    assert again.json()["job_id"] == job["job_id"]
    followed = await api.get(f"/v1/command-jobs/{job['job_id']}", headers=t.reader)
    assert followed.json()["counts"] == {"queued": 4}
    items = await api.get(f"/v1/commands?job_id={job['job_id']}", headers=t.reader)
    assert sorted(c["meter_id"] for c in items.json()["items"]) == gas
    listed = await api.post(
        "/v1/commands/bulk",
        json={"kind": "valve", "args": {"action": "open"}, "meter_ids": gas[:2]},
        headers=t.writer,
    )
    assert listed.status_code == 202
    assert listed.json()["n_commands"] == 2
    after = await api.get(f"/v1/command-jobs/{job['job_id']}", headers=t.reader)
    assert after.json()["counts"] == {"queued": 2, "cancelled": 2}
    both = await api.post(
        "/v1/commands/bulk",
        json={"kind": "clock", "meter_ids": gas, "query": {}},
        headers=t.writer,
    )
    assert both.status_code == 422


async def test_tenants_never_see_each_others_commands(api, make_tenant, add_meter):
    """Another tenant's command, meter and job are 404 (ids do not leak)."""
    a, b = await make_tenant(), await make_tenant()
    meter = await add_meter(a.tenant_id)
    cmd = (
        await api.post(f"/v1/meters/{meter}/commands", json={"kind": "clock"}, headers=a.writer)
    ).json()
    job = (
        await api.post(
            "/v1/commands/bulk", json={"kind": "clock", "meter_ids": [meter]}, headers=a.writer
        )
    ).json()
    for r in (
        await api.get(f"/v1/commands/{cmd['command_id']}", headers=b.reader),
        await api.post(f"/v1/commands/{cmd['command_id']}/cancel", headers=b.writer),
        await api.post(f"/v1/meters/{meter}/commands", json={"kind": "clock"}, headers=b.writer),
        await api.get(f"/v1/command-jobs/{job['job_id']}", headers=b.reader),
    ):
        assert isinstance(r, httpx.Response)
        assert r.status_code == 404
    bulk = await api.post(
        "/v1/commands/bulk", json={"kind": "clock", "meter_ids": [meter]}, headers=b.writer
    )
    assert bulk.status_code == 422
    assert (await api.get("/v1/commands", headers=b.reader)).json()["items"] == []
