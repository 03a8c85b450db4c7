"""The quarantine API: list with filters and stable keyset pages, detail with payload and
history, re-decode requests (single and bulk, idempotent), per-tenant isolation.

No collector runs in the API tests, so queued requests stay queued here; carrying them
out is tests/collector/test_redecode.py's part.
"""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from apihelpers import utc

from storage.archive import ArchiveWriter
from storage.rows import QuarantineRow

T0 = utc(2025, 3, 1)


async def quarantine_rows(pool: asyncpg.Pool, rows: list[QuarantineRow]) -> list[int]:
    """Write `rows` as the collector does (binary COPY); their ids, in the given order."""
    await ArchiveWriter(pool).write_quarantine(rows)
    found = await pool.fetch(
        "SELECT quarantine_id, received_at, payload FROM quarantine"
        " WHERE tenant_id = $1 ORDER BY quarantine_id",
        rows[0].tenant_id,
    )
    by_key = {(r["received_at"], bytes(r["payload"] or b"")): r["quarantine_id"] for r in found}
    return [by_key[(r.received_at, r.payload or b"")] for r in rows]


def row(tenant_id: int, n: int, **fields: Any) -> QuarantineRow:
    """A quarantine row of `tenant_id`, received n minutes after T0, payload unique."""
    values: dict[str, Any] = {
        "received_at": T0 + timedelta(minutes=n),
        "tenant_id": tenant_id,
        "meter_id": None,
        "transport": 1,
        "peer": "[::1]:5683",
        "reason": "undecodable",
        "detail": "crc: checksum mismatch",
        "payload": f"frame-{tenant_id}-{n}".encode(),
    }
    values.update(fields)
    return QuarantineRow(**values)


async def all_pages(api: httpx.AsyncClient, headers: dict[str, str], query: str) -> list[int]:
    """Every id of the list walked page by page."""
    ids: list[int] = []
    cursor = None
    while True:
        url = f"/v1/quarantine?{query}" + (f"&cursor={cursor}" if cursor else "")
        r = await api.get(url, headers=headers)
        assert r.status_code == 200, r.text
        page = r.json()
        ids += [item["quarantine_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


async def test_list_pages_are_stable_and_newest_first(api, make_tenant, pool):
    """Keyset pages cover every row once, in (received_at, id) descending order, ties
    included, and rows arriving between pages (newer or as old) never shift a page."""
    a = await make_tenant()
    # 12 rows, three of them sharing one receive time
    specs = [row(a.tenant_id, n) for n in range(10)]
    specs += [row(a.tenant_id, 5, payload=b"tie-1"), row(a.tenant_id, 5, payload=b"tie-2")]
    ids = await quarantine_rows(pool, specs)
    expected = [
        i for _, i in sorted(zip([s.received_at for s in specs], ids, strict=True), reverse=True)
    ]
    assert await all_pages(api, a.reader, "limit=5") == expected
    # walk again, writing rows between pages: a newer one, and one as old as the oldest
    got, cursor = [], None
    for extra in (row(a.tenant_id, 30, payload=b"late-new"), row(a.tenant_id, 0, payload=b"x")):
        url = "/v1/quarantine?limit=5" + (f"&cursor={cursor}" if cursor else "")
        page = (await api.get(url, headers=a.reader)).json()
        got += [item["quarantine_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        await quarantine_rows(pool, [extra])
    page = (await api.get(f"/v1/quarantine?limit=5&cursor={cursor}", headers=a.reader)).json()
    got += [item["quarantine_id"] for item in page["items"]]
    assert got[:10] == expected[:10]
    assert set(expected) <= set(got)
    assert len(got) == len(set(got))


async def test_list_filters(api, make_tenant, add_meter, pool):
    """reason, decoder error, meter id, meter address, receive-time range and resolved
    each narrow the list; an undecodable row shows its decoder error code."""
    a = await make_tenant()
    meter = await add_meter(a.tenant_id, address="OMS-7")
    ids = await quarantine_rows(
        pool,
        [
            row(a.tenant_id, 0, detail="no_key: no AES key for meter 7", meter_id=meter),
            row(a.tenant_id, 1, detail="no_key: no AES key for meter 8"),
            row(a.tenant_id, 2, reason="identity_mismatch", detail="frame reports meter 9"),
            row(a.tenant_id, 3, meter_id=meter),
        ],
    )
    await pool.execute(
        "UPDATE quarantine SET resolved_at = now(), resolution = 'stored' WHERE quarantine_id = $1",
        ids[3],
    )

    async def listed(query: str) -> list[int]:
        r = await api.get(f"/v1/quarantine?{query}", headers=a.reader)
        assert r.status_code == 200, r.text
        return [item["quarantine_id"] for item in r.json()["items"]]

    assert await listed("reason=identity_mismatch") == [ids[2]]
    assert await listed("error=no_key") == [ids[1], ids[0]]
    assert await listed(f"meter_id={meter}") == [ids[3], ids[0]]
    assert await listed("address=OMS-7&error=no_key") == [ids[0]]
    assert await listed("received_from=2025-03-01T00:01:00Z&received_to=2025-03-01T00:03:00Z") == [
        ids[2],
        ids[1],
    ]
    assert await listed("resolved=false&meter_id=" + str(meter)) == [ids[0]]
    assert await listed("resolved=true") == [ids[3]]
    first = (await api.get("/v1/quarantine?error=no_key", headers=a.reader)).json()["items"][0]
    assert (first["decoder_error"], first["transport"]) == ("no_key", "coap")
    for bad in ("cursor=AAAA", "limit=0", "received_from=2025-03-01T00:00:00", "reason=NO%20KEY"):
        r = await api.get(f"/v1/quarantine?{bad}", headers=a.reader)
        assert r.status_code == 422, (bad, r.text)
        assert r.headers["content-type"] == "application/problem+json"


async def test_detail_has_the_raw_bytes(api, make_tenant, pool):
    """One row: raw payload as hex and base64, reason, detail, transport, peer, times."""
    a = await make_tenant()
    payload = bytes(range(256))
    [qid] = await quarantine_rows(pool, [row(a.tenant_id, 0, payload=payload, transport=3)])
    r = await api.get(f"/v1/quarantine/{qid}", headers=a.reader)
    assert r.status_code == 200, r.text
    body = r.json()
    assert bytes.fromhex(body["payload_hex"]) == payload
    assert base64.b64decode(body["payload_base64"]) == payload
    assert (body["transport"], body["peer"], body["size_bytes"]) == ("mqtt", "[::1]:5683", 256)
    assert (body["reason"], body["detail"], body["history"]) == (
        "undecodable",
        "crc: checksum mismatch",
        [],
    )
    assert body["received_at"] == "2025-03-01T00:00:00Z"


async def test_redecode_requests_are_idempotent(api, make_tenant, pool):
    """Asking twice for one row gives the same job with one item; a bulk request then
    leaves that row in its job; the row's history lists the open attempt."""
    a = await make_tenant()
    ids = await quarantine_rows(pool, [row(a.tenant_id, n) for n in range(3)])
    first = await api.post(f"/v1/quarantine/{ids[0]}/redecode", headers=a.writer)
    assert first.status_code == 202, first.text
    again = await api.post(f"/v1/quarantine/{ids[0]}/redecode", headers=a.writer)
    assert again.json()["job_id"] == first.json()["job_id"]
    assert (again.json()["n_items"], again.json()["counts"]["queued"]) == (1, 1)
    bulk = await api.post(
        "/v1/quarantine/redecode", headers=a.writer, json={"reason": "undecodable"}
    )
    assert bulk.status_code == 202, bulk.text
    assert (bulk.json()["n_items"], bulk.json()["state"]) == (2, "queued")
    assert bulk.json()["selection"] == {"reason": "undecodable"}
    assert bulk.json()["requested_by"].startswith("api-key:")
    job = (await api.get(f"/v1/redecode-jobs/{bulk.json()['job_id']}", headers=a.reader)).json()
    assert job["counts"] == {
        "queued": 2, "stored": 0, "duplicate": 0, "quarantined": 0, "skipped": 0, "failed": 0,
    }  # fmt: skip
    items = await api.get(
        f"/v1/redecode-jobs/{bulk.json()['job_id']}/items?limit=1", headers=a.reader
    )
    page = items.json()
    assert [i["quarantine_id"] for i in page["items"]] == [ids[1]]
    rest = await api.get(
        f"/v1/redecode-jobs/{bulk.json()['job_id']}/items?cursor={page['next_cursor']}",
        headers=a.reader,
    )
    assert [i["quarantine_id"] for i in rest.json()["items"]] == [ids[2]]
    history = (await api.get(f"/v1/quarantine/{ids[0]}", headers=a.reader)).json()["history"]
    assert [(h["job_id"], h["state"]) for h in history] == [(first.json()["job_id"], "queued")]
    # nothing matches: a job of no items, done at once
    none = await api.post("/v1/quarantine/redecode", headers=a.writer, json={"reason": "nothing"})
    assert (none.json()["n_items"], none.json()["state"]) == (0, "done")


async def test_a_resolved_row_is_not_queued_again(api, make_tenant, pool):
    """Re-decoding a resolved row answers 409 naming the row it was quarantined again as."""
    a = await make_tenant()
    old, new = await quarantine_rows(pool, [row(a.tenant_id, 0), row(a.tenant_id, 1)])
    await pool.execute(
        "UPDATE quarantine SET resolved_at = now(), resolution = 'quarantined',"
        " resolved_by_job = 1, superseded_by = $2 WHERE quarantine_id = $1",
        old,
        new,
    )
    r = await api.post(f"/v1/quarantine/{old}/redecode", headers=a.writer)
    assert r.status_code == 409, r.text
    assert f"row {new}" in r.json()["detail"]
    [no_payload] = await quarantine_rows(pool, [row(a.tenant_id, 2, payload=None)])
    r = await api.post(f"/v1/quarantine/{no_payload}/redecode", headers=a.writer)
    assert r.status_code == 409, r.text
    assert "no payload" in r.json()["detail"]


async def test_cross_tenant_access_is_refused(api, make_tenant, pool):
    """Tenant B gets 404 for each of A's rows and jobs, an empty list, and a bulk request
    that queues none of A's rows; a read-only key may not request a re-decode."""
    a, b = await make_tenant(), await make_tenant()
    [qid] = await quarantine_rows(pool, [row(a.tenant_id, 0, detail="no_key: x")])
    job = (await api.post(f"/v1/quarantine/{qid}/redecode", headers=a.writer)).json()
    for method, url in (
        ("GET", f"/v1/quarantine/{qid}"),
        ("POST", f"/v1/quarantine/{qid}/redecode"),
        ("GET", f"/v1/redecode-jobs/{job['job_id']}"),
        ("GET", f"/v1/redecode-jobs/{job['job_id']}/items"),
    ):
        r = await api.request(method, url, headers=b.admin)
        assert r.status_code == 404, (method, url, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    assert (await api.get("/v1/quarantine", headers=b.admin)).json()["items"] == []
    bulk = await api.post("/v1/quarantine/redecode", headers=b.admin, json={"error": "no_key"})
    assert bulk.json()["n_items"] == 0
    forbidden = await api.post(f"/v1/quarantine/{qid}/redecode", headers=a.reader)
    assert forbidden.status_code == 403
    assert (await api.get("/v1/quarantine")).status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {"reason": "x", "unknown": 1},
        {"meter_id": 0},
        {"received_from": "2025-01-01T00:00:00"},  # no UTC offset
        {"address": "a b"},
        {"meter_id": True},  # not read as 1
        {"received_from": 0},  # not read as 1970
        {"received_to": "9999-12-31T00:00:00Z"},  # outside the supported years
    ],
)
async def test_bulk_filter_is_validated(api, make_tenant, body):
    """A bulk request with an unknown field or a bad value is a 422 problem."""
    a = await make_tenant()
    r = await api.post("/v1/quarantine/redecode", headers=a.writer, json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
