"""Manual reads (a visit, a customer's photo): stored with quality 7 and who entered them,
used as actual boundary reads and checked by VEE; bad input refused with the right 4xx."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from apihelpers import daily, local

SH = "Asia/Shanghai"
FEB = "/cycles/2024-02-01"
FEB_OPEN, FEB_CLOSE = local(SH, 2024, 2, 1), local(SH, 2024, 3, 1)


async def run(cmd: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run a command; its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def key_id(headers: dict[str, str]) -> str:
    """The key id of a bearer header (`nbm_<key_id>_<secret>`)."""
    return headers["Authorization"].split("_")[1]


async def test_manual_read_is_the_actual_opening_read(api, make_tenant, add_meter, add_readings):
    """A visit 10 min after the boundary, with no meter reading near it, is the actual
    opening read with quality 7, and the meter's manual reads name the key that entered it."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id, installed_at=local(SH, 2023, 12, 1))
    await add_readings(m, daily(FEB_OPEN - timedelta(days=10, hours=5), 8, 1_000_000, 100_000))
    await add_readings(m, daily(FEB_OPEN + timedelta(days=3, hours=5), 30, 5_000_000, 100_000))
    visit = FEB_OPEN + timedelta(minutes=10)
    r = await api.post(
        f"/v1/meters/{m}/manual-reads",
        headers=t.writer,
        json={
            "read_at": visit.isoformat(),
            "register_m3": "2.345",
            "source": "visit",
            "note": "read in the basement",
        },
    )
    assert r.status_code == 201, r.text
    stored = r.json()
    assert stored["quality"] == 7
    assert stored["register_m3"] == "2.345"
    assert stored["entered_by"] == f"key:{key_id(t.writer)}"
    assert stored["source"] == "visit"

    body = (await api.get(f"/v1/meters/{m}{FEB}", headers=t.reader)).json()
    assert body["opening"]["method"] == "actual"
    assert body["opening"]["quality"] == 7
    assert body["opening"]["register_m3"] == "2.345"
    assert body["opening"]["read_at"] == visit.isoformat().replace("+00:00", "Z")
    assert body["consumption_quality"] == 13  # 7 at the opening, 0 at the closing
    # the export (SQL twin) serves the same read with the same quality
    page = (await api.get("/v1/cycles/2024-02-01/reads", headers=t.reader)).json()
    (row,) = page["items"]
    assert (row["opening"]["quality"], row["opening"]["register_m3"]) == (7, "2.345")

    listed = (await api.get(f"/v1/meters/{m}/manual-reads", headers=t.reader)).json()
    assert [(x["register_m3"], x["note"], x["entered_by"]) for x in listed] == [
        ("2.345", "read in the basement", f"key:{key_id(t.writer)}")
    ]


async def test_manual_read_goes_through_vee(api, make_tenant, add_meter, add_readings):
    """A customer's photo showing less than the meter's last reading is reverse flow in VEE."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id, installed_at=local(SH, 2023, 12, 1))
    await add_readings(m, daily(FEB_OPEN + timedelta(hours=1), 10, 3_000_000, 100_000))
    r = await api.post(
        f"/v1/meters/{m}/manual-reads",
        headers=t.writer,
        json={
            "read_at": (FEB_OPEN + timedelta(days=10, hours=12)).isoformat(),
            "register_ml": 1_000_000,
            "source": "customer_photo",
        },
    )
    assert r.status_code == 201, r.text
    body = (await api.get(f"/v1/meters/{m}{FEB}", headers=t.reader)).json()
    codes = {(i["code"], i["end"]) for i in body["issues"]}
    assert (
        "reverse_flow",
        (FEB_OPEN + timedelta(days=10, hours=12)).isoformat()[:19] + "Z",
    ) in codes


async def test_manual_read_never_overwrites_a_stored_reading(
    api, pool, make_tenant, add_meter, add_readings
):
    """At the instant of a meter reading a manual read is refused (409) and the meter's
    reading kept; the same manual read again answers 200, a different one 409."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id, installed_at=local(SH, 2023, 12, 1))
    at = FEB_OPEN + timedelta(hours=3)
    await add_readings(m, [(at, 4_000_000)])
    post = {"read_at": at.isoformat(), "register_m3": "4.100", "source": "visit"}
    r = await api.post(f"/v1/meters/{m}/manual-reads", headers=t.writer, json=post)
    assert r.status_code == 409, r.text
    assert "meter reading of 4 m3" in r.json()["detail"]
    row = await pool.fetchrow("SELECT register_ml, quality FROM readings WHERE meter_id = $1", m)
    assert (row["register_ml"], row["quality"]) == (4_000_000, None)

    later = {**post, "read_at": (at + timedelta(hours=1)).isoformat()}
    first = await api.post(f"/v1/meters/{m}/manual-reads", headers=t.writer, json=later)
    again = await api.post(f"/v1/meters/{m}/manual-reads", headers=t.writer, json=later)
    other = await api.post(
        f"/v1/meters/{m}/manual-reads", headers=t.writer, json={**later, "register_m3": "4.200"}
    )
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 409)
    assert again.json() == first.json()
    assert "manual read of 4.1 m3" in other.json()["detail"]
    assert await pool.fetchval("SELECT count(*) FROM manual_reads WHERE meter_id = $1", m) == 1


async def test_a_fraction_of_a_second_is_dropped(api, pool, make_tenant, add_meter):
    """Readings are kept to the second (migration 0054): a manual read at 09:00:00.700 is
    stored, echoed and listed at 09:00:00; the same read at 09:00:00.200 is the same
    reading again (200), another register in that second a conflict (409)."""
    t = await make_tenant()
    m = await add_meter(t.tenant_id, installed_at=local(SH, 2023, 12, 1))
    whole = local(SH, 2024, 2, 1, 9)
    post = {"register_m3": "1.000", "source": "visit"}
    first = await api.post(
        f"/v1/meters/{m}/manual-reads",
        headers=t.writer,
        json={**post, "read_at": (whole + timedelta(milliseconds=700)).isoformat()},
    )
    assert first.status_code == 201, first.text
    assert first.json()["read_at"] == whole.isoformat().replace("+00:00", "Z")
    same_second = {**post, "read_at": (whole + timedelta(milliseconds=200)).isoformat()}
    again = await api.post(f"/v1/meters/{m}/manual-reads", headers=t.writer, json=same_second)
    other = await api.post(
        f"/v1/meters/{m}/manual-reads",
        headers=t.writer,
        json={**same_second, "register_m3": "1.001"},
    )
    assert (again.status_code, other.status_code) == (200, 409), (again.text, other.text)
    assert again.json() == first.json()
    listed = (await api.get(f"/v1/meters/{m}/manual-reads", headers=t.reader)).json()
    assert [x["read_at"] for x in listed] == [whole.isoformat().replace("+00:00", "Z")]
    assert await pool.fetchval("SELECT count(*) FROM readings WHERE meter_id = $1", m) == 1


async def test_bad_manual_reads_are_refused(api, pool, make_tenant, add_meter):
    """Future time, before installation, after removal, negative, finer or larger than the
    register, no offset or out of any calendar, two registers → 422; unknown or another
    tenant's meter → 404; a read-only key → 403; nothing is stored."""
    t = await make_tenant()
    other = await make_tenant()
    m = await add_meter(
        t.tenant_id,
        installed_at=local(SH, 2024, 1, 1),
        removed_at=local(SH, 2024, 6, 1),
        register_digits=5,
    )
    theirs = await add_meter(other.tenant_id)
    ok = {
        "read_at": local(SH, 2024, 2, 1, 9).isoformat(),
        "register_m3": "1.000",
        "source": "visit",
    }
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    cases = [
        (m, {**ok, "read_at": future}, 422, "in the future"),
        (m, {**ok, "read_at": local(SH, 2023, 12, 31).isoformat()}, 422, "before meter"),
        (m, {**ok, "read_at": local(SH, 2024, 7, 1).isoformat()}, 422, "after meter"),
        (m, {**ok, "register_m3": "-1.000"}, 422, "register_m3"),
        (m, {**ok, "register_m3": None, "register_ml": -5}, 422, "register_ml"),
        (m, {**ok, "register_m3": "1.0005"}, 422, "finer than"),
        (m, {**ok, "register_m3": "100.000"}, 422, "exceeds the register's range"),
        (m, {**ok, "read_at": "2024-02-01T09:00:00"}, 422, "read_at"),
        (
            m,
            {**ok, "read_at": "0001-01-01T00:00:00+14:00"},
            422,
            "between 1970-01-01 and 2068-01-19",
        ),
        (
            m,
            {**ok, "read_at": "9999-12-31T23:59:59-14:00"},
            422,
            "between 1970-01-01 and 2068-01-19",
        ),
        (m, {**ok, "read_at": "2068-01-19T03:14:08Z"}, 422, "between 1970-01-01 and 2068-01-19"),
        (m, {**ok, "register_ml": 1_000_000}, 422, "not both"),
        (m, {**ok, "source": "guess"}, 422, "source"),
        (999_999_999, ok, 404, "no meter"),
        (theirs, ok, 404, "no meter"),
    ]
    for meter, post, status, words in cases:
        r = await api.post(f"/v1/meters/{meter}/manual-reads", headers=t.writer, json=post)
        assert (r.status_code, r.headers["content-type"]) == (status, "application/problem+json")
        assert words in r.json()["detail"], (post, r.json())
    r = await api.post(f"/v1/meters/{m}/manual-reads", headers=t.reader, json=ok)
    assert r.status_code == 403
    stored = await pool.fetchval(
        "SELECT count(*) FROM readings WHERE meter_id = ANY($1::bigint[])", [m, theirs]
    )
    assert stored == 0
    r = await api.post(f"/v1/meters/{m}/manual-reads", headers=t.writer, json=ok)
    assert r.status_code == 201


async def test_cli_enters_a_manual_read(pool, db_url, make_tenant, add_meter):
    """`nbmeter reads manual` stores a read with quality 7 entered by cli:<name>."""
    t = await make_tenant()
    slug = await pool.fetchval("SELECT slug FROM tenants WHERE tenant_id = $1", t.tenant_id)
    m = await add_meter(t.tenant_id, installed_at=local(SH, 2024, 1, 1))
    cmd = [
        str(Path(sys.executable).with_name("nbmeter")),
        "reads",
        "manual",
        f"--tenant={slug}",
        f"--meter-id={m}",
        "--register-m3=12.5",
        f"--at={local(SH, 2024, 2, 1, 9).isoformat()}",
        "--source=customer_photo",
        "--by=reader-7",
    ]
    env = {**os.environ, "NBMETER_DATABASE_URL": db_url}
    code, _, err = await run(cmd, env)
    assert code == 0, err
    row = await pool.fetchrow(
        "SELECT r.register_ml, r.quality, mr.entered_by, mr.source FROM readings r"
        " JOIN manual_reads mr ON mr.meter_id = r.meter_id AND nbm_floor_s(mr.read_at) = r.read_s"
        " WHERE r.meter_id = $1",
        m,
    )
    assert tuple(row) == (12_500_000, 7, "cli:reader-7", "customer_photo")
    code, out, err = await run(cmd, env)
    assert (code, out.strip()) == (0, "already stored (same read)"), err
