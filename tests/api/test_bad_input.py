"""Bad client input is a 4xx problem, never a 500; a 500 carries an error id and no data.

Each known 500 of issue 10 (out-of-range dates, deep JSON, a bare CR in a CSV, PATCH with
null) is replayed here, with its neighbours: NUL in strings, huge integers, bad limits,
tampered cursors, oversized bodies, unreadable CSV.
"""

from __future__ import annotations

import base64
import functools
import json
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from structlog.testing import capture_logs

from api.app import create_app
from api.settings import ApiSettings
from decoder.limits import MAX_DEPTH, json_depth, json_nesting
from storage.errors import StorageError

PROBLEM = "application/problem+json"


def _problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status
    return body


async def _meter(api: httpx.AsyncClient, headers: dict[str, str]) -> tuple[int, str]:
    address = uuid.uuid4().hex[:14]
    r = await api.post(
        "/v1/meters",
        headers=headers,
        json={"address": address, "kind": "water", "format": "oms", "service_point": "SP-9"},
    )
    assert r.status_code == 201, r.text
    return r.json()["meter_id"], address


@pytest.mark.parametrize(
    "query",
    ["from=9999-12-31", "to=0001-01-01", "from=1969-12-31", "to=2200-01-01", "from=0001-01-01"],
)
async def test_cycle_list_dates_out_of_range_are_422(api, make_tenant, query):
    """GET /v1/cycles with a date outside 1970..2199 is a 422 naming the parameter."""
    t = await make_tenant()
    body = _problem(await api.get(f"/v1/cycles?{query}", headers=t.reader), 422)
    assert query.split("=")[0] in body["detail"]
    assert "1970-01-01" in body["detail"]


async def test_cycle_list_at_the_range_edges_answers(api, make_tenant):
    """The edges of the range itself are served (and from after to is an empty list)."""
    t = await make_tenant()
    r = await api.get("/v1/cycles?from=2198-12-01&to=2199-12-31", headers=t.reader)
    assert r.status_code == 200, r.text
    assert [c["cycle"] for c in r.json()["cycles"]][:1] == ["2198-12-01"]
    r = await api.get("/v1/cycles?from=1970-01-01&to=1970-01-01", headers=t.reader)
    assert [c["cycle"] for c in r.json()["cycles"]] == ["1970-01-01"]
    r = await api.get("/v1/cycles?from=2030-01-01&to=2020-01-01", headers=t.reader)
    assert r.json()["cycles"] == []


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
async def test_deeply_nested_json_import_is_422(api, make_tenant, content_type):
    """'[' * 2000 posted to the import is a 422 about nesting, whatever its content type."""
    t = await make_tenant()
    headers = {**t.writer, **({"content-type": content_type} if content_type else {})}
    r = await api.post("/v1/meters/import", headers=headers, content=b"[" * 2000)
    assert "deeper than 32" in _problem(r, 422)["detail"]


async def test_deep_json_on_any_route_is_422_and_strings_do_not_count(api, make_tenant):
    """Every JSON route refuses deep nesting; brackets inside strings are not nesting."""
    t = await make_tenant()
    for method, path in (("POST", "/v1/meters"), ("PUT", "/v1/billing-calendar")):
        deep: object = 0
        for _ in range(40):
            deep = [deep]
        r = await api.request(method, path, headers=t.admin, json={"a": deep})
        _problem(r, 422)
    r = await api.post(
        "/v1/meters",
        headers=t.writer,
        json={"address": "BR-1", "kind": "water", "format": "oms", "service_point": "[" * 60},
    )
    assert r.status_code == 201, r.text
    assert r.json()["service_point"] == "[" * 60


async def test_import_json_that_is_not_an_array_or_not_json_is_422(api, make_tenant):
    """Invalid JSON, non-UTF-8 bytes, a 5,000-digit integer and an object are 422 problems."""
    t = await make_tenant()
    for raw in (b"[{", b"\xff\xfe[]", b"[" + b"9" * 5000 + b"]", b'{"address": "x"}'):
        r = await api.post(
            "/v1/meters/import",
            headers={**t.writer, "content-type": "application/json"},
            content=raw,
        )
        assert r.status_code in (200, 422), r.text
        if raw.startswith(b"[9"):
            # a number is a row that is not a meter: reported per row, the import answers
            assert r.status_code == 200 or "not valid JSON" in r.json()["detail"]
        else:
            _problem(r, 422)


async def test_csv_with_bare_cr_line_ends_is_read(api, make_tenant):
    """A CSV whose lines end in a bare CR (or mixed CR/LF/CRLF) imports every row."""
    t = await make_tenant()
    a, b, c = (uuid.uuid4().hex[:12] for _ in range(3))
    text = f"address,kind,format\r{a},water,mbus\r\n{b},gas,oms\n{c},water,cjt188\r"
    r = await api.post(
        "/v1/meters/import", headers={**t.writer, "content-type": "text/csv"}, content=text
    )
    assert r.status_code == 200, r.text
    assert r.json()["created"] == 3
    assert r.json()["errors"] == []


@pytest.mark.parametrize(
    ("raw", "line", "why"),
    [
        (b'address,kind,format\nA1,water,mbus\n"A2,water,mbus\n', 3, "unexpected end of data"),
        (b'address,kind,format\n"A1"x,water,mbus\n', 2, "expected after"),
        (b"address,kind,format\nA1,water,mbus\nA\x002,water,mbus\n", 3, "NUL"),
        (b"address,kind,format\nA1,water,mbus\r\xff\xfe,water,mbus\n", 3, "not UTF-8"),
        (b"address,kind,format\nA1,water,mbus,extra\n", 2, "4 fields but the header has 3"),
        (b"address,kind,address\nA1,water,A2\n", 1, "distinct"),
        (b"", 1, "empty"),
        (b"-5085\n", 1, "unknown columns ['-5085']"),
        (b"address,kind,colour\nA1,water,red\n", 1, "unknown columns ['colour']"),
        (b"address,kind,format\n" + b"a" * 200_000 + b",water,mbus\n", 2, "field limit"),
    ],
)
async def test_unreadable_csv_is_422_naming_the_line(api, make_tenant, raw, line, why):
    """A CSV the importer cannot read is refused whole: 422 with the line and the reason."""
    t = await make_tenant()
    r = await api.post(
        "/v1/meters/import", headers={**t.writer, "content-type": "text/csv"}, content=raw
    )
    detail = _problem(r, 422)["detail"]
    assert detail.startswith(f"line {line}:"), detail
    assert why in detail
    assert (await api.get("/v1/meters", headers=t.reader)).json()["items"] == []


@pytest.mark.parametrize("field", ["format", "register_scale", "address", "register_digits"])
async def test_patch_null_of_a_required_field_is_422_without_the_row(api, make_tenant, field):
    """PATCH {field: null} on a NOT NULL column is a 422 naming the field; nothing leaks."""
    t = await make_tenant()
    meter_id, address = await _meter(api, t.writer)
    r = await api.patch(f"/v1/meters/{meter_id}", headers=t.writer, json={field: None})
    body = _problem(r, 422)
    assert body["errors"][0]["loc"] == ["body", field]
    assert address not in r.text
    assert "Failing row" not in r.text
    after = (await api.get(f"/v1/meters/{meter_id}", headers=t.reader)).json()
    assert after["address"] == address
    assert after["format"] == "oms"
    assert after["register_scale"] == -3


async def test_patch_null_clears_a_nullable_field(api, make_tenant):
    """null on service_point or timezone clears it; an empty PATCH changes nothing."""
    t = await make_tenant()
    meter_id, _ = await _meter(api, t.writer)
    r = await api.patch(
        f"/v1/meters/{meter_id}", headers=t.writer, json={"service_point": None, "timezone": None}
    )
    assert r.status_code == 200, r.text
    assert r.json()["service_point"] is None
    r = await api.patch(f"/v1/meters/{meter_id}", headers=t.writer, json={})
    assert r.status_code == 200
    r = await api.patch(f"/v1/meters/{meter_id}", headers=t.writer, json={"register_scale": -2})
    assert r.json()["register_scale"] == -2


async def test_instants_and_days_out_of_range_are_422(api, make_tenant):
    """Year 1 or 9999 in installed_at, exchanged_at or calendar dates is a 422, not a 500."""
    t = await make_tenant()
    meter_id, _ = await _meter(api, t.writer)
    for installed in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"):
        r = await api.post(
            "/v1/meters",
            headers=t.writer,
            json={"address": "Y1", "kind": "water", "format": "oms", "installed_at": installed},
        )
        assert _problem(r, 422)["errors"][0]["loc"] == ["body", "installed_at"]
        r = await api.post(
            "/v1/meters/import",
            headers=t.writer,
            json=[{"address": "Y1", "kind": "water", "format": "oms", "installed_at": installed}],
        )
        assert r.status_code == 200
        assert r.json()["errors"][0]["detail"].startswith("installed_at:")
    exchange = {
        "exchanged_at": "9999-12-31T23:59:59-23:00",
        "final_register_m3": "1",
        "new_meter": {"address": "Y2", "format": "oms"},
    }
    r = await api.post(f"/v1/meters/{meter_id}/exchange", headers=t.writer, json=exchange)
    _problem(r, 422)
    for dates in (["9999-12-31"], ["0001-01-01"]):
        r = await api.put("/v1/billing-calendar", headers=t.admin, json={"dates": dates})
        _problem(r, 422)
    for path in (
        f"/v1/meters/{meter_id}/readings?from=0001-01-01T00:00:00&to=0001-01-02T00:00:00",
        f"/v1/meters/{meter_id}/readings?from=9999-12-31T00:00:00%2B14:00&to=9999-12-31T23:00:00",
    ):
        _problem(await api.get(path, headers=t.reader), 422)
    for path in (f"/v1/meters/{meter_id}/cycles/9999-12-01", "/v1/cycles/0001-01-01/reads"):
        _problem(await api.get(path, headers=t.reader), 404)


async def test_nul_and_control_characters_in_strings_are_422(api, make_tenant):
    """PostgreSQL text refuses NUL: every string that reaches it is checked first (422)."""
    t = await make_tenant()
    meter_id, _ = await _meter(api, t.writer)
    base = {"address": "N1", "kind": "water", "format": "oms"}
    for body in (
        {**base, "address": "N\x001"},
        {**base, "service_point": "S\x00P"},
        {**base, "timezone": "Asia/Sh\x00anghai"},
        {**base, "credentials": {"kind": "psk", "identity": "i\x00d", "secret": "12345678"}},
    ):
        _problem(await api.post("/v1/meters", headers=t.writer, json=body), 422)
    _problem(
        await api.patch(f"/v1/meters/{meter_id}", headers=t.writer, json={"service_point": "\x00"}),
        422,
    )
    for query in ("address=A%00", "service_point=S%00", "cursor=%00"):
        _problem(await api.get(f"/v1/meters?{query}", headers=t.reader), 422)
    r = await api.get("/v1/meters", headers={"Authorization": "Bearer nbm_\x00"})
    _problem(r, 401)


async def test_huge_integers_limits_and_tampered_cursors_are_422(api, make_tenant):
    """Ids beyond bigint, limits <= 0 or huge, booleans for numbers, cursors we did not
    issue, unknown or repeated query parameters: 422, no 500."""
    t = await make_tenant()
    await _meter(api, t.writer)
    paths = [
        f"/v1/meters/{2**63}",
        f"/v1/meters/{10**40}/health",
        "/v1/meters/-1",
        "/v1/meters?limit=0",
        "/v1/meters?limit=-5",
        f"/v1/meters?limit={10**30}",
        "/v1/cycles/2024-01-01/reads?limit=0",
    ]
    for cursor in ("m-5", f"m{2**64}", "x1", "m1e3", "\u00e9"):
        token = base64.urlsafe_b64encode(cursor.encode()).decode().rstrip("=")
        paths.append(f"/v1/meters?cursor={token}")
    for cursor in ("Asia/Shanghai|-1", f"Asia/Shanghai|{2**64}", "Nowhere|1", "a|b|c"):
        token = base64.urlsafe_b64encode(cursor.encode()).decode().rstrip("=")
        paths.append(f"/v1/cycles/2024-01-01/reads?cursor={token}")
    paths += ["/v1/meters?limit=5&limit=6", "/v1/meters?form=1", "/v1/cycles?from=2024-01-01&x="]
    for path in paths:
        _problem(await api.get(path, headers=t.reader), 422)
    r = await api.post(
        "/v1/meters",
        headers=t.writer,
        json={"address": "H1", "kind": "water", "format": "oms", "register_scale": 10**30},
    )
    _problem(r, 422)
    for scale in (True, False, "x", 1.5):
        r = await api.post(
            "/v1/meters",
            headers=t.writer,
            json={"address": "H1", "kind": "water", "format": "oms", "register_scale": scale},
        )
        _problem(r, 422)
    r = await api.post(
        "/v1/meters",
        headers=t.writer,
        json={"address": "H1", "kind": "water", "format": "oms", "initial_register_m3": "9" * 30},
    )
    _problem(r, 422)


@pytest.fixture
async def small_app(db_url: str) -> AsyncIterator[FastAPI]:
    """An app refusing bodies over 1 KiB, with its lifespan entered."""
    application = create_app(ApiSettings(database_url=db_url, max_body_bytes=1024))
    async with application.router.lifespan_context(application):
        yield application


async def test_oversized_bodies_are_413_declared_or_streamed(small_app, make_tenant):
    """A body over max_body_bytes is 413, with a Content-Length or streamed in chunks."""
    t = await make_tenant()
    transport = httpx.ASGITransport(app=small_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        r = await client.post(
            "/v1/meters/import",
            headers={**t.writer, "content-type": "text/csv"},
            content=b"address,kind,format\n" + b"A,water,oms\n" * 200,
        )
        assert _problem(r, 413)["type"] == "/problems/payload-too-large"

        async def chunks() -> AsyncIterator[bytes]:
            yield b"address,kind,format\n"
            for _ in range(200):
                yield b"A,water,oms\n"

        r = await client.post(
            "/v1/meters/import",
            headers={**t.writer, "content-type": "text/csv"},
            content=chunks(),
        )
        _problem(r, 413)
        r = await client.post(
            "/v1/meters", headers=t.writer, json={"address": "x" * 2000, "kind": "water"}
        )
        _problem(r, 413)


async def test_an_unexpected_exception_is_a_bare_500_with_an_error_id(db_url):
    """A bug answers 500 problem+json with an error id only; the traceback is logged."""
    application = create_app(ApiSettings(database_url=db_url))
    secret_row = "Failing row contains (1, 1, SECRET-ADDRESS)"

    @application.get("/boom")
    async def boom() -> None:
        raise RuntimeError(secret_row)

    @application.get("/storage-bug")
    async def storage_bug() -> None:
        raise StorageError(secret_row)

    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        for path in ("/boom", "/storage-bug"):
            with capture_logs() as logs:
                r = await client.get(path)
            body = _problem(r, 500)
            assert body["type"] == "/problems/internal-error"
            assert "SECRET" not in r.text
            assert "Failing row" not in r.text
            assert len(body["error_id"]) == 16
            assert body["error_id"] in body["detail"]
            logged = [e for e in logs if e.get("error_id") == body["error_id"]]
            assert len(logged) == 1
            assert logged[0]["event"] == "request.failed"
            assert logged[0]["log_level"] == "error"
            assert secret_row in str(logged[0]["exc_info"])


async def test_unreadable_json_names_its_line(api, make_tenant):
    """Too deep, broken or not UTF-8: the 422 names the line in its detail and `errors`."""
    t = await make_tenant()
    for raw, line, why in (
        (b'{\n "address": "x",\n "kind": ' + b"[" * 40 + b"\n}", 3, "deeper than 32"),
        (
            b'{\n "address": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",\n "kind": }',
            3,
            "not valid JSON",
        ),
        (b'{\n\n "address": "\xff"}', 3, "not UTF-8"),
    ):
        r = await api.post(
            "/v1/meters", headers={**t.writer, "content-type": "application/json"}, content=raw
        )
        body = _problem(r, 422)
        assert body["detail"].startswith(f"line {line}: "), body["detail"]
        assert why in body["detail"]
        assert body["errors"][0]["line"] == line


async def test_json_fastapi_cannot_parse_is_422_not_400(api, make_tenant):
    """The middleware does not parse JSON bodies: an integer of over 4,300 digits (FastAPI's
    parse answers 400) and broken JSON reach FastAPI and come back as 422 problems."""
    t = await make_tenant()
    for raw, why in (
        (b'{"address": "x", "kind": ' + b"9" * 5000 + b"}", "4300 digits"),
        (b'{"address": "x",\n "kind": }', "not valid JSON: Expecting value (column 10)"),
    ):
        r = await api.post(
            "/v1/meters", headers={**t.writer, "content-type": "application/json"}, content=raw
        )
        body = _problem(r, 422)
        assert why in body["detail"], body["detail"]
        assert body["type"] == "/problems/validation-error"
        assert body["errors"][0]["loc"] == ["body"]


@pytest.mark.parametrize(
    "doc",
    [
        b"[" + b"[]," * 50 + b"[]]",
        b"[" * 32 + b"]" * 32,
        b"[" * 33 + b"]" * 33,
        b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "b": [[[1]]]}',
        json.dumps(["\\", '\\"' + "[" * 40, {"x": [{}]}]).encode(),
        json.dumps([[[{"k": [[["a]]]]"]]]}]]] * 20).encode(),
        json.dumps(functools.reduce(lambda inner, _: [1, {"x": inner}], range(40), 0)).encode(),
    ],
)
def test_json_depth_rule_is_the_decoders(doc):
    """The API's refusal (json_nesting's offset past the limit) and decoder.limits'
    json_depth agree on real JSON: one rule."""
    json.loads(doc)
    assert (json_nesting(doc).past_at is None) == (json_depth(doc) <= MAX_DEPTH)
