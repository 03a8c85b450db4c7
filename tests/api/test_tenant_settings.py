"""Tenant settings by API: read, change (admin only, validated), and every change audited."""

from __future__ import annotations

import pytest


async def test_settings_are_read_and_changed_with_an_audit_trail(api, make_tenant, pool):
    """An admin turns allow_plain_coap on and renames the tenant: the row changes, and each
    change is recorded with the key that made it, its old and new value."""
    a = await make_tenant()
    got = await api.get("/v1/tenant/settings", headers=a.reader)
    assert got.status_code == 200, got.text
    before = got.json()
    assert (before["tenant_id"], before["allow_plain_coap"]) == (a.tenant_id, False)
    r = await api.patch(
        "/v1/tenant/settings", headers=a.admin, json={"allow_plain_coap": True, "name": "Water Co"}
    )
    assert r.status_code == 200, r.text
    assert (r.json()["allow_plain_coap"], r.json()["name"]) == (True, "Water Co")
    assert r.json()["slug"] == before["slug"]
    row = await pool.fetchrow(
        "SELECT allow_plain_coap, name FROM tenants WHERE tenant_id = $1", a.tenant_id
    )
    assert tuple(row) == (True, "Water Co")
    changes = (await api.get("/v1/tenant/settings/changes", headers=a.admin)).json()
    key_id = a.admin["Authorization"].split("_")[1]
    assert sorted((c["field"], c["old_value"], c["new_value"]) for c in changes) == [
        ("allow_plain_coap", False, True),
        ("name", before["name"], "Water Co"),
    ]
    assert {c["changed_by"] for c in changes} == {f"api-key:{key_id}"}
    # the same values again change nothing and audit nothing
    same = await api.patch("/v1/tenant/settings", headers=a.admin, json={"allow_plain_coap": True})
    assert same.status_code == 200
    assert len((await api.get("/v1/tenant/settings/changes", headers=a.admin)).json()) == 2


async def test_timezone_is_validated_and_audited(api, make_tenant):
    """A known IANA zone is taken; an unknown one is a 422 that changes nothing."""
    a = await make_tenant()
    ok = await api.patch("/v1/tenant/settings", headers=a.admin, json={"timezone": "Europe/Paris"})
    assert (ok.status_code, ok.json()["timezone"]) == (200, "Europe/Paris")
    bad = await api.patch("/v1/tenant/settings", headers=a.admin, json={"timezone": "Mars/Base"})
    assert bad.status_code == 422, bad.text
    assert "Mars/Base" in bad.json()["detail"]
    assert (await api.get("/v1/tenant/settings", headers=a.reader)).json()["timezone"] == (
        "Europe/Paris"
    )


@pytest.mark.parametrize(
    "body",
    [
        {"allow_plain_coap": None},
        {"allow_plain_coap": "yes please"},
        {"slug": "renamed"},
        {"tenant_id": 1},
        {"name": ""},
        {"name": "bad\x00name"},
    ],
)
async def test_bad_changes_are_refused(api, make_tenant, body):
    """null, a wrong type, an identity field or a bad name: 422 problem, nothing audited."""
    a = await make_tenant()
    r = await api.patch("/v1/tenant/settings", headers=a.admin, json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert (await api.get("/v1/tenant/settings/changes", headers=a.admin)).json() == []


async def test_only_admins_change_settings_and_only_their_own(api, make_tenant):
    """A writer key may read but not change settings; a change by tenant B leaves A alone."""
    a, b = await make_tenant(), await make_tenant()
    r = await api.patch("/v1/tenant/settings", headers=a.writer, json={"allow_plain_coap": True})
    assert r.status_code == 403
    assert (await api.get("/v1/tenant/settings/changes", headers=a.writer)).status_code == 403
    await api.patch("/v1/tenant/settings", headers=b.admin, json={"allow_plain_coap": True})
    assert (await api.get("/v1/tenant/settings", headers=a.reader)).json()[
        "allow_plain_coap"
    ] is False
    assert (await api.get("/v1/tenant/settings/changes", headers=a.admin)).json() == []
    assert (await api.get("/v1/tenant/settings")).status_code == 401
