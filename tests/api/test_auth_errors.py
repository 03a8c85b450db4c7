"""Authentication, scopes and RFC 9457 problem responses; OpenAPI documents every route."""

from __future__ import annotations

import asyncpg
import httpx
from fastapi import FastAPI

from api import errors
from storage.pool import translated

PROBLEM_KEYS = {"type", "title", "status", "detail", "instance"}


def _problem(r, status):
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert set(body) >= PROBLEM_KEYS
    assert body["status"] == status
    return body


async def test_missing_and_bad_keys_are_401(api, make_tenant):
    """No key, a malformed key and an unknown key all get 401 with WWW-Authenticate."""
    await make_tenant()
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Bearer nbm_0123456789ab_" + "A" * 43},
    ):
        r = await api.get("/v1/meters", headers=headers)
        _problem(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")


async def test_scope_is_enforced_with_403(api, make_tenant):
    """A read-only key cannot write meters nor manage keys."""
    t = await make_tenant()
    r = await api.post(
        "/v1/meters", headers=t.reader, json={"address": "X", "kind": "water", "format": "oms"}
    )
    assert _problem(r, 403)["type"] == "/problems/forbidden"
    _problem(await api.get("/v1/api-keys", headers=t.writer), 403)


async def test_key_lifecycle(api, make_tenant):
    """An admin creates a key (shown once), lists it without secret, revokes it: then 401."""
    t = await make_tenant()
    r = await api.post("/v1/api-keys", headers=t.admin, json={"scopes": ["readings:read"]})
    assert r.status_code == 201
    key, key_id = r.json()["key"], r.json()["key_id"]
    listed = (await api.get("/v1/api-keys", headers=t.admin)).json()
    assert key_id in {k["key_id"] for k in listed}
    assert key not in str(listed)
    assert (
        await api.get("/v1/meters", headers={"Authorization": f"Bearer {key}"})
    ).status_code == 200
    assert (await api.delete(f"/v1/api-keys/{key_id}", headers=t.admin)).status_code == 204
    _problem(await api.get("/v1/meters", headers={"Authorization": f"Bearer {key}"}), 401)


async def test_validation_404_405_are_problems(api, make_tenant):
    """422 (with per-field errors), unknown route 404 and wrong method 405 are problem+json."""
    t = await make_tenant()
    body = _problem(await api.post("/v1/meters", headers=t.writer, json={"kind": "steam"}), 422)
    assert body["errors"]
    assert body["type"] == "/problems/validation-error"
    _problem(await api.get("/v1/nowhere", headers=t.reader), 404)
    _problem(await api.delete("/v1/meters", headers=t.reader), 405)
    _problem(await api.get("/v1/meters/abc", headers=t.reader), 422)
    _problem(await api.get("/v1/meters?cursor=zzzz", headers=t.reader), 422)


async def test_openapi_documents_examples(api):
    """/openapi.json lists every route with problem responses; bodies carry examples."""
    spec = (await api.get("/openapi.json")).json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if path.startswith("/v1"):
                assert "401" in op["responses"], (method, path)
                assert "application/problem+json" in op["responses"]["401"]["content"]
    schemas = spec["components"]["schemas"]
    for name in ("MeterCreate", "Meter", "ExchangeRequest", "Problem", "Calendar", "IntervalReads"):
        assert schemas[name].get("examples"), name


async def test_a_value_the_database_refuses_is_422_problem():
    """A data exception from PostgreSQL (SQLSTATE class 22), which storage raises as
    RowRefusedError, is the client's bad value: 422."""
    app = FastAPI()
    errors.install(app)

    @app.get("/overflow")
    async def overflow() -> None:
        with translated("storing a value"):  # as every storage function does
            raise asyncpg.exceptions.NumericValueOutOfRangeError("numeric field overflow")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        r = await client.get("/overflow")
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "/problems/invalid-value"
    assert "numeric field overflow" in r.json()["detail"]
