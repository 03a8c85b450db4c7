"""Historical read import (CSV or JSON): all rows stored in one transaction or the whole
import refused with every bad row listed; re-posting stores nothing twice; size bounded."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from apihelpers import local

SH = "Asia/Shanghai"
CSV = {"Content-Type": "text/csv"}


async def count(pool, meter_ids: list[int]) -> int:
    """Readings stored for the meters."""
    n: int = await pool.fetchval(
        "SELECT count(*) FROM readings WHERE meter_id = ANY($1::bigint[])", meter_ids
    )
    return n


async def test_csv_import_stores_every_row_once(api, pool, make_tenant, add_meter):
    """A CSV naming meters by address or id is stored with each row's quality and the
    importing key; posting it again is a replay that stores nothing."""
    t = await make_tenant()
    a = await add_meter(t.tenant_id, address="OLD-0001", installed_at=local(SH, 2023, 1, 1))
    b = await add_meter(t.tenant_id, installed_at=local(SH, 2023, 1, 1))
    body = (
        "address,meter_id,read_at,register_m3,quality,note\n"
        "OLD-0001,,2023-12-01T00:00:00+08:00,101.250,0,\n"
        "OLD-0001,,2024-01-01T00:00:00+08:00,110.500,7,estimated by the old system's clerk\n"
        f",{b},2024-01-01T00:00:00+08:00,5.000,,\n"
    ).encode()
    r = await api.post("/v1/reads/import", headers={**t.writer, **CSV}, content=body)
    assert r.status_code == 200, r.text
    first = r.json()
    assert (first["rows"], first["stored"], first["duplicates"], first["replayed"]) == (
        3,
        3,
        0,
        False,
    )
    rows = await pool.fetch(
        "SELECT r.meter_id, r.register_ml, r.quality, mr.source, mr.import_id,"
        " mr.entered_by FROM readings r JOIN manual_reads mr ON mr.meter_id = r.meter_id"
        " AND nbm_floor_s(mr.read_at) = r.read_s"
        " WHERE r.meter_id = ANY($1::bigint[]) ORDER BY r.meter_id, r.read_s",
        [a, b],
    )
    by = "key:" + t.writer["Authorization"].split("_")[1]
    assert [tuple(x) for x in rows] == [
        (a, 101_250_000, 0, "import", first["import_id"], by),
        (a, 110_500_000, 7, "import", first["import_id"], by),
        (b, 5_000_000, 7, "import", first["import_id"], by),  # quality defaults to 7
    ]
    again = await api.post("/v1/reads/import", headers={**t.writer, **CSV}, content=body)
    assert again.json() == {**first, "stored": 0, "duplicates": 3, "replayed": True}
    assert await count(pool, [a, b]) == 3
    # the imported read at the cycle boundary is its actual read, with the file's quality
    cycle = (await api.get(f"/v1/meters/{a}/cycles/2023-12-01", headers=t.reader)).json()
    assert (cycle["opening"]["method"], cycle["opening"]["quality"]) == ("actual", 0)
    assert (cycle["closing"]["quality"], cycle["consumption_m3"]) == (7, "9.250")


async def test_json_import_overlapping_an_earlier_one(api, pool, make_tenant, add_meter):
    """A JSON import repeating rows stored before (same register) stores only the new
    rows; register_m3 as a JSON number is taken exactly."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id, installed_at=local(SH, 2023, 1, 1))
    day = [datetime(2023, 6, d, tzinfo=UTC).isoformat() for d in (1, 2, 3)]
    first = [{"meter_id": m, "read_at": day[0], "register_ml": 1_000_000, "quality": 0}]
    r = await api.post("/v1/reads/import", headers=t.writer, json=first)
    assert r.json()["stored"] == 1, r.text
    rows = (
        f'[{{"meter_id": {m}, "read_at": "{day[0]}", "register_ml": 1000000, "quality": 0}},'
        f' {{"meter_id": {m}, "read_at": "{day[1]}", "register_m3": 1.2}},'
        f' {{"meter_id": {m}, "read_at": "{day[2]}", "register_m3": "1.300"}}]'
    )
    r = await api.post(
        "/v1/reads/import",
        headers={**t.writer, "Content-Type": "application/json"},
        content=rows.encode(),
    )
    assert r.status_code == 200, r.text
    assert (r.json()["stored"], r.json()["duplicates"], r.json()["replayed"]) == (2, 1, False)
    registers = await pool.fetch(
        "SELECT register_ml FROM readings WHERE meter_id = $1 ORDER BY read_s", m
    )
    assert [x["register_ml"] for x in registers] == [1_000_000, 1_200_000, 1_300_000]


async def test_bad_rows_are_listed_and_nothing_stored(
    api, pool, make_tenant, add_meter, add_readings
):
    """Every bad row is listed with its line and reason in one 422, and no row is stored."""
    t = await make_tenant()
    other = await make_tenant()
    m = await add_meter(
        t.tenant_id, address="A-1", installed_at=local(SH, 2023, 1, 1), register_digits=5
    )
    theirs = await add_meter(other.tenant_id)
    taken = datetime(2023, 6, 1, tzinfo=UTC)
    await add_readings(m, [(taken, 7_000_000)])
    future = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    lines = [
        "address,meter_id,read_at,register_m3,quality",
        "A-1,,2023-05-01T00:00:00Z,1.000,0",  # 2: good
        "NOPE,,2023-05-01T00:00:00Z,1.000,0",  # 3: unknown address
        f",{theirs},2023-05-01T00:00:00Z,1.000,0",  # 4: another tenant's meter
        f"A-1,,{future},1.000,0",  # 5: future
        "A-1,,2022-12-01T00:00:00Z,1.000,0",  # 6: before installation
        "A-1,,2023-05-02T00:00:00Z,-1.000,0",  # 7: negative
        "A-1,,2023-05-03T00:00:00Z,100.000,0",  # 8: beyond 5 digits
        "A-1,,2023-05-04T00:00:00Z,1.000,13",  # 9: mixed is not a reading's quality
        "A-1,,2023-05-05T00:00:00,1.000,0",  # 10: no offset
        f"A-1,,{taken.isoformat()},7.500,0",  # 11: a different meter reading is stored there
        "A-1,,2023-05-01T00:00:00Z,1.000,0",  # 12: repeats line 2
        "A-1,,2023-05-06T00:00:00Z,1.000",  # 13: a cell short
        f"A-1,{m},2023-05-07T00:00:00Z,1.000,0",  # 14: good (address and id agree)
    ]
    r = await api.post(
        "/v1/reads/import", headers={**t.writer, **CSV}, content="\r\n".join(lines).encode()
    )
    assert (r.status_code, r.headers["content-type"]) == (422, "application/problem+json")
    errors = {e["line"]: e["detail"] for e in r.json()["errors"]}
    assert sorted(errors) == list(range(3, 14))
    for line, words in {
        3: "no meter with address 'NOPE'",
        4: f"no meter {theirs}",
        5: "in the future",
        6: "before meter",
        7: "register_m3",
        8: "exceeds the register's range",
        9: "quality 13",
        10: "timezone",
        11: "a meter reading of 7 m3 is stored",
        12: "on line 2 too",
        13: "4 cells, the header has 5",
    }.items():
        assert words in errors[line], (line, errors[line])
    assert "nothing stored" in r.json()["detail"]
    assert await count(pool, [m, theirs]) == 1  # only the meter's own reading
    assert (
        await pool.fetchval("SELECT count(*) FROM read_imports WHERE tenant_id = $1", t.tenant_id)
        == 0
    )


async def test_unreadable_bodies_are_refused_not_500(api, pool, make_tenant):
    """Deep JSON, a non-array, broken UTF-8, a NUL in CSV, an unknown column, an empty body
    → 422 with a line; an unknown media type → 415; over 16 MiB → 413."""
    t = await make_tenant()
    cases = [
        (b"[" * 100_000, "application/json", 422),
        (b'{"meter_id": 1}', "application/json", 422),
        (b"[NaN]", "application/json", 422),
        (b"meter_id,read_at,register_ml\n1,2023-01-01T00:00:00Z,\xff\n", "text/csv", 422),
        (b"meter_id,read_at,register_ml\n1,2023-01-01T00:00:00Z,1\x00\n", "text/csv", 422),
        (b"meter_id,read_at,register_ml\r1,2023-01-01\rT00:00:00Z,1\r", "text/csv", 422),
        (b"meter,when,value\n1,2,3\n", "text/csv", 422),
        (b"", "text/csv", 422),
        (b"meter_id\n1\n", "application/xml", 415),
        (b"x" * (16 << 20) + b"x", "text/csv", 413),
    ]
    for body, media, status in cases:
        r = await api.post(
            "/v1/reads/import", headers={**t.writer, "Content-Type": media}, content=body
        )
        assert (r.status_code, r.headers["content-type"]) == (status, "application/problem+json"), (
            body[:40],
            r.text[:300],
        )
        if status == 422:
            assert r.json()["errors"][0]["line"] >= 1
    r = await api.post("/v1/reads/import", headers={**t.reader, **CSV}, content=b"meter_id\n")
    assert r.status_code == 403
    assert json.loads(r.text)["status"] == 403


async def test_the_same_file_posted_twice_at_once_is_stored_once(api, pool, make_tenant, add_meter):
    """Two concurrent posts of one body: one imports, the other waits and is a replay."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id, installed_at=local(SH, 2023, 1, 1))
    body = "meter_id,read_at,register_ml\n" + "".join(
        f"{m},2023-03-{d:02d}T00:00:00Z,{d * 1000}\n" for d in range(1, 29)
    )
    posts = [
        api.post("/v1/reads/import", headers={**t.writer, **CSV}, content=body.encode())
        for _ in range(2)
    ]
    results = [r.json() for r in await asyncio.gather(*posts)]
    assert sorted((r["stored"], r["replayed"]) for r in results) == [(0, True), (28, False)]
    assert results[0]["import_id"] == results[1]["import_id"]
    assert await count(pool, [m]) == 28


async def test_cli_imports_a_file(pool, db_url, make_tenant, add_meter, tmp_path):
    """`nbmeter reads import --file` stores the file's rows entered by cli:<name>, and
    lists the bad rows of a refused file by line, storing nothing."""
    t = await make_tenant()
    slug = await pool.fetchval("SELECT slug FROM tenants WHERE tenant_id = $1", t.tenant_id)
    m = await add_meter(t.tenant_id, address="CLI-1", installed_at=local(SH, 2023, 1, 1))
    good, bad = tmp_path / "good.csv", tmp_path / "bad.json"
    good.write_text("address,read_at,register_m3\nCLI-1,2023-04-01T00:00:00+08:00,3.250\n")
    bad.write_text('[{"address": "CLI-1", "read_at": "2022-01-01T00:00:00Z", "register_ml": 1}]')
    env = {**os.environ, "NBMETER_DATABASE_URL": db_url}
    nbmeter = str(Path(sys.executable).with_name("nbmeter"))

    async def run(path: Path) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *[nbmeter, "reads", "import", f"--tenant={slug}", f"--file={path}", "--by=migration"],
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await run(good)
    assert (code, "1 rows, 1 stored" in out) == (0, True), err
    row = await pool.fetchrow(
        "SELECT r.register_ml, r.quality, mr.entered_by FROM readings r"
        " JOIN manual_reads mr ON mr.meter_id = r.meter_id AND nbm_floor_s(mr.read_at) = r.read_s"
        " WHERE r.meter_id = $1",
        m,
    )
    assert tuple(row) == (3_250_000, 7, "cli:migration")
    code, out, err = await run(bad)
    assert code == 1
    assert "line 1: read_at" in err
    assert "before meter" in err
    assert await count(pool, [m]) == 1
