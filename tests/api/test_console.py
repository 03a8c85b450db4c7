"""The operations console in a real browser: Playwright driving Debian's Chromium against
the API under uvicorn on the session's database, with a demo-like tenant seeded in it.

The browser tests skip when Playwright or /usr/bin/chromium is absent (`nbmeter stack
tools` installs Chromium). Set NBMETER_CONSOLE_SCREENSHOTS to a folder to keep a PNG of
each page there (the README's docs/console/*.png come from this run).
"""

from __future__ import annotations

import asyncio
import os
import re
import struct
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
from dbkit import read_s

from decoder.encode_cjt188 import encode_cjt188
from nbmeter.commands import screenshots
from storage import analytics, districts
from storage.apikeys import create_api_key, create_tenant
from storage.events import EventRow, write_events
from storage.health import HealthRow, write_health

CHROMIUM = "/usr/bin/chromium"
try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - the dev extras pin it
    async_playwright = None

needs_browser = pytest.mark.skipif(
    async_playwright is None or not Path(CHROMIUM).exists(),
    reason="console browser tests need playwright (dev extras) and Debian's chromium at"
    f" {CHROMIUM} (`nbmeter stack tools` installs it)",
)
HOSTILE = '<img src=x onerror="window.pwned=1">'
DISTRICT_CUSTOMERS = range(10, 16)  # meter indices; meters[0] is their bulk meter


@dataclass(frozen=True)
class Seeded:
    """The demo-like tenant: its writer key, meters, open alarm ids and today's uplinks."""

    key: str
    meters: list[int]
    alarms: dict[str, int]  # kind -> alarm id
    uplinks_today: int
    read_today: int
    district: int  # bulk meters[0], customers meters[10..15]


async def seed(pool: asyncpg.Pool, n_meters: int = 24, days: int = 14) -> Seeded:
    """A tenant like the demo's: hourly reads, daily health with battery decay and three
    cells, a few alarms of each severity, today's uplinks for most meters."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    slug = f"console-{uuid.uuid4().hex[:8]}"
    async with pool.acquire() as conn:
        tid = await create_tenant(conn, slug, "Console demo water", "UTC")
        key = await create_api_key(conn, tid, ["meters:write", "readings:read"])
        meters = [
            await conn.fetchval(
                "INSERT INTO meters (tenant_id, address, service_point, kind, format)"
                " VALUES ($1, $2, $3, 'water', 'cjt188') RETURNING meter_id",
                tid,
                f"{20260000000000 + i:014d}",
                HOSTILE if i == 1 else f"SP-{i:04d}",
            )
            for i in range(n_meters)
        ]
        readings, uplinks, health = [], [], []
        silent = set(meters[-3:])  # no uplink today: the read rate is below 100 %

        def use_ml(i: int, at: datetime) -> int:
            """Meter i's volume in the hour before `at`; meter 0 is the bulk meter of the
            district of meters 10..15, so it counts theirs plus a pipe leak, bigger from
            five days ago (the non-revenue water the district chart shows)."""
            if i == 0:
                leak = 60_000 if at >= now - timedelta(days=5) else 8_000
                return sum(use_ml(c, at) for c in DISTRICT_CUSTOMERS) + leak
            hourly = (20_000 if 6 <= at.hour <= 22 else 2_000) * (1 + i % 4)
            return hourly * (8 + (at.day * 7 + i) % 5) // 10 + (i == 5) * 15_000

        gap = (now - timedelta(days=3)).replace(hour=0)  # meter 15 misses one midnight read
        for i, m in enumerate(meters):
            total = 100_000 * (i + 1)
            for h in range(days * 24, -1, -1):
                at = now - timedelta(hours=h)
                total += use_ml(i, at)
                if (m in silent and at.date() == now.date()) or (i == 15 and at == gap):
                    continue
                readings.append((m, read_s(at), total, 0))
            for d in range(days, -1, -1):
                at = now - timedelta(days=d)
                mv = 3650 - 9 * (days - d) - 40 * (i % 7) - (500 if i == 3 else 0)
                rsrp = -8500 - 350 * (i % 9) - (2500 if i % 11 == 4 else 0)
                sinr, ecl, pct = 1200 - 150 * (i % 9), min(2, i % 9 // 3), max(0, (mv - 2900) // 8)
                low, cell = mv < 3200, 4101 + i % 3
                health.append(HealthRow(m, at, mv, rsrp, sinr, ecl, at, pct, low, i == 7, cell))
            if m not in silent:
                frame = encode_cjt188(
                    address=f"{20260000000000 + i:014d}", total_ml=total - total % 10_000
                )
                got = datetime.now(UTC)
                uplinks.append((got, tid, m, 1, frame, "cjt188", "stored", 1, 1, 0, None, None))
                if i == 5:  # the same frame again, one byte hit on the way: quarantined
                    bad = frame[:20] + bytes([frame[20] ^ 0x10]) + frame[21:]
                    uplinks.append((got, tid, m, 1, bad, None, "quarantined", 0, 0, None,
                                    5, "CJ/T 188 CS mismatch"))  # fmt: skip
        await conn.copy_records_to_table(
            "readings", records=readings,
            columns=["meter_id", "read_s", "register_ml", "flags"],
        )  # fmt: skip
        await conn.executemany(
            "INSERT INTO raw_uplinks (received_at, tenant_id, meter_id, transport, payload, format,"
            " outcome, n_readings, n_new, decode_flags, error_code, error_message)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            uplinks,
        )
        await write_health(conn, health)
        kinds = {"leak": meters[5], "burst": meters[2], "low_battery": meters[3],
                 "tamper": meters[9], "meter_error": meters[7]}  # fmt: skip
        async with conn.transaction():
            await write_events(conn, [EventRow(m, now, k, now) for k, m in kinds.items()])
        rows = await conn.fetch("SELECT kind, alarm_id FROM alarms WHERE tenant_id = $1", tid)
    district = await districts.create(
        pool, tid, "Centre", meters[0], [meters[c] for c in DISTRICT_CUSTOMERS]
    )
    async with pool.acquire() as conn, conn.transaction():
        for d in range(days - 1, 0, -1):  # the finished days: their balance (no alarm judged)
            await analytics.rollup(conn, tid, now.date() - timedelta(days=d))
    read_today = n_meters - len(silent)
    return Seeded(
        key, meters, {r["kind"]: r["alarm_id"] for r in rows}, len(uplinks), read_today,
        district["district_id"],
    )  # fmt: skip


@pytest.fixture(scope="module")
async def seeded(pool: asyncpg.Pool) -> Seeded:
    """One demo-like tenant for the module's tests."""
    return await seed(pool)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:  # only used by @needs_browser tests
    """Debian's Chromium, headless, driven by Playwright (never a downloaded browser)."""
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        await b.close()


async def signed_in(browser: Browser, server: str, key: str) -> Page:
    """A fresh page (own context, so its own sessionStorage) signed in with `key`."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # a 404 from an endpoint not on this server yet (uplinks, commands, districts) is logged
    # by the browser as a failed load; the console shows its placeholder for it
    page.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    await page.goto(f"{server}/console")
    await page.fill("#key", key)
    await page.click("#login button[type=submit]")
    await expect(page.locator("#view[data-view=overview]")).to_be_visible()
    page.errors = errors  # type: ignore[attr-defined]  # collected for the asserts
    return page


SHOTS = os.environ.get("NBMETER_CONSOLE_SCREENSHOTS")


async def shoot(page: Page, name: str) -> None:
    """Keep a full-page PNG when NBMETER_CONSOLE_SCREENSHOTS names a folder."""
    if SHOTS:  # Playwright creates the folder
        await page.screenshot(path=f"{SHOTS}/{name}.png", full_page=True)


async def view(page: Page, fragment: str, name: str) -> None:
    """Navigate inside the console and wait until the view has rendered."""
    await page.evaluate("f => { location.hash = f; }", fragment)
    await expect(page.locator(f"#view[data-view={name}][aria-busy=false]")).to_be_visible()


def test_console_served_with_security_headers(server: str) -> None:
    """/console and its files carry a CSP with no inline script; only its own files are
    served (no path joined); the overview JSON needs a key."""
    with httpx.Client(base_url=server) as c:
        page = c.get("/console")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert "<script" in page.text
        assert "<script>" not in page.text  # no inline script: the CSP would block it
        js = c.get("/console/console.js")
        assert js.headers["content-type"].startswith("text/javascript")
        assert "innerHTML" not in js.text
        assert c.get("/console/app.py").status_code == 404
        assert c.get("/console/..%2Fapp.py").status_code == 404
        assert c.get("/v1/overview").status_code == 401


async def test_overview_counts_today(server: str, seeded: Seeded) -> None:
    """/v1/overview counts today's uplinks, the read rate and open alarms by kind."""
    async with httpx.AsyncClient(base_url=server) as c:
        got = (
            await c.get("/v1/overview", headers={"Authorization": f"Bearer {seeded.key}"})
        ).json()
    assert got["uplinks"] == seeded.uplinks_today
    assert got["uplinks_by_outcome"] == {"quarantined": 1, "stored": seeded.read_today}
    assert (got["meters_read"], got["meters_active"]) == (seeded.read_today, len(seeded.meters))
    assert got["read_rate"] == round(seeded.read_today / len(seeded.meters), 4)
    kinds = {(a["kind"], a["severity"], a["state"]): a["alarms"] for a in got["open_alarms"]}
    assert kinds[("burst", "critical", "open")] == 1
    assert sum(kinds.values()) == len(seeded.alarms)


async def test_overview_of_an_empty_tenant(server: str, pool: asyncpg.Pool) -> None:
    """A tenant with no meter and no uplink: zeros, no read rate (not a division by zero),
    and its midnight in its own timezone."""
    async with pool.acquire() as conn:
        tid = await create_tenant(conn, f"empty-{uuid.uuid4().hex[:8]}", "Empty", "Asia/Shanghai")
        key = await create_api_key(conn, tid, ["readings:read"])
    async with httpx.AsyncClient(base_url=server) as c:
        got = (await c.get("/v1/overview", headers={"Authorization": f"Bearer {key}"})).json()
    assert (got["uplinks"], got["meters_active"], got["read_rate"]) == (0, 0, None)
    assert got["open_alarms"] == []
    since = datetime.fromisoformat(got["since"]).astimezone(ZoneInfo("Asia/Shanghai"))
    assert (since.hour, since.minute) == (0, 0)


@needs_browser
async def test_pages_render_seeded_data(browser: Browser, server: str, seeded: Seeded) -> None:
    """Signed in with a key, each page shows the tenant's data: today's uplinks and read
    rate, alarm counts and health charts; the alarm list; a meter's register plot, health
    history, raw frames with their decode and its commands; the districts list."""
    page = await signed_in(browser, server, seeded.key)
    kpi = page.locator("[data-testid=kpi-uplinks] .value")
    assert await kpi.text_content() == str(seeded.uplinks_today)
    rate = await page.locator("[data-testid=kpi-read-rate] .sub").text_content()
    assert rate == f"{seeded.read_today} of {len(seeded.meters)} meters"
    await expect(page.locator("[data-testid=alarm-counts]")).to_contain_text("tamper")
    assert await page.locator("svg.chart rect.bar").count() > 3
    await shoot(page, "overview")

    await view(page, "#/alarms", "alarms")
    rows = page.locator("[data-testid=alarm-table] tbody tr")
    assert await rows.count() == len(seeded.alarms)
    await expect(rows.first.locator("button[data-action=acknowledge]")).to_be_visible()
    await shoot(page, "alarms")

    meter = seeded.meters[5]
    auth = {"Authorization": f"Bearer {seeded.key}"}
    async with httpx.AsyncClient(base_url=server) as c:
        queued = await c.post(f"/v1/meters/{meter}/commands", headers=auth,
                              json={"kind": "valve", "args": {"action": "close"}})  # fmt: skip
    await view(page, f"#/meters/{meter}?days=7", "meters")
    await expect(page.locator("[data-testid=meter-title]")).to_contain_text("20260000000005")
    assert await page.locator("svg.chart path.line").count() >= 2  # register, battery
    assert await page.locator("[data-testid=health-table] tbody tr").count() == 8
    frames = page.locator("[data-testid=uplink-table]")
    await expect(frames).to_contain_text("cjt188")
    await expect(frames).to_contain_text("error 5: CJ/T 188 CS mismatch")
    await expect(frames.locator("td.mono").first).to_contain_text("68")  # CJ/T 188 start
    assert queued.status_code == 201, queued.text
    commands = page.locator("[data-testid=command-table]")
    await expect(commands).to_contain_text('{"action":"close"}')
    await expect(commands).to_contain_text("queued")
    await shoot(page, "meter")

    await view(page, "#/districts", "districts")
    await expect(page.locator("#view h1")).to_have_text("Districts")
    await expect(page.locator("[data-testid=district-table]")).to_contain_text("Centre")
    await shoot(page, "districts")
    assert page.errors == []  # type: ignore[attr-defined]


@needs_browser
async def test_district_page_draws_the_balance(
    browser: Browser, server: str, seeded: Seeded
) -> None:
    """The district page charts the seeded balance: per rolled-up day a bulk and a
    customers bar, an NRW point, and that day's coverage; the two days around the
    midnight read customer meter 15 missed show 5/6, faded; the figures are the API's."""
    page = await signed_in(browser, server, seeded.key)
    await view(page, "#/districts", "districts")
    await page.click("[data-testid=district-table] a >> text=Centre")
    await expect(page.locator("[data-testid=district-title]")).to_have_text("District Centre")
    chart = page.locator("[data-testid=balance-chart]")
    await expect(chart).to_be_visible()
    auth = {"Authorization": f"Bearer {seeded.key}"}
    today = datetime.now(UTC).date()
    async with httpx.AsyncClient(base_url=server) as c:
        got = await c.get(
            f"/v1/districts/{seeded.district}/balances", headers=auth,
            params={"from": str(today - timedelta(days=29)), "to": str(today)},
        )  # fmt: skip
    assert got.status_code == 200, got.text
    days = [d for d in got.json() if d["computed_at"] is not None]
    assert len(days) == 13  # the seeded finished days (the first one is partial)
    partial = {d["day"] for d in days if not d["complete"]}
    gap = today - timedelta(days=3)
    assert partial >= {str(gap - timedelta(days=1)), str(gap)}
    full = [d for d in days if d["complete"]]
    assert all(d["n_covered"] == 6 and d["nrw_ml"] > 0 for d in full)
    assert full[-1]["nrw_ml"] == 60_000 * 24  # the leak of the last five days, exactly

    groups = chart.locator("g[data-day]")
    assert await groups.count() == 30  # every day of the range has its slot
    assert await groups.locator("rect.bar:not(.alt)").count() == len(days)
    assert await groups.locator("rect.bar.alt").count() == len(days)
    assert await chart.locator("circle.dot.nrw").count() == len(days)
    assert await chart.locator("circle.dot.nrw.partial").count() == len(partial)
    short = chart.locator(f"g[data-day='{gap}'] text.coverage")
    await expect(short).to_have_text("5/6")
    assert "short" in (await short.get_attribute("class") or "")
    await expect(chart.locator(f"g[data-day='{full[-1]['day']}'] text.coverage")).to_have_text(
        "6/6"
    )
    tip = await chart.locator(f"g[data-day='{full[-1]['day']}'] > title").text_content()
    assert tip is not None
    assert "NRW 1.440 m³" in tip
    table = page.locator("[data-testid=balance-table] tbody tr")
    assert await table.count() == len(days)
    await expect(table.first).to_contain_text("1.440")
    await shoot(page, "district")
    assert page.errors == []  # type: ignore[attr-defined]


@needs_browser
async def test_acknowledge_in_browser_reaches_api(
    browser: Browser, server: str, seeded: Seeded
) -> None:
    """An acknowledge clicked in the console is the alarm's state in GET /v1/alarms/{id},
    recorded with the signed-in key; the row then offers only Close, and a Close clicked
    closes it (manual) and takes it off the active list."""
    page = await signed_in(browser, server, seeded.key)
    await view(page, "#/alarms", "alarms")
    alarm_id = seeded.alarms["leak"]
    first_cell = page.locator("td:first-child", has_text=re.compile(rf"^{alarm_id}$"))
    row = page.locator("[data-testid=alarm-table] tbody tr").filter(has=first_cell)
    await row.locator("button[data-action=acknowledge]").click()
    await expect(page.locator("[data-testid=alarm-status]")).to_have_text(
        f"Alarm {alarm_id} is acknowledged."
    )
    async with httpx.AsyncClient(base_url=server) as c:
        got = (
            await c.get(f"/v1/alarms/{alarm_id}", headers={"Authorization": f"Bearer {seeded.key}"})
        ).json()
    assert got["state"] == "acknowledged"
    assert got["acked_by"] is not None
    assert got["acked_by"] in seeded.key
    await expect(row.locator("button[data-action=acknowledge]")).to_have_count(0)
    await row.locator("button[data-action=close]").click()
    await expect(page.locator("[data-testid=alarm-status]")).to_have_text(
        f"Alarm {alarm_id} is closed."
    )
    await expect(row).to_have_count(0)  # the active list no longer holds it
    async with httpx.AsyncClient(base_url=server) as c:
        got = (
            await c.get(f"/v1/alarms/{alarm_id}", headers={"Authorization": f"Bearer {seeded.key}"})
        ).json()
    assert (got["state"], got["close_reason"]) == ("closed", "manual")


@needs_browser
async def test_values_are_text_and_bad_key_refused(
    browser: Browser, server: str, seeded: Seeded
) -> None:
    """A service point holding markup is shown as text (no element, no script run); a wrong
    key is refused on the sign-in form and nothing is shown."""
    page = await signed_in(browser, server, seeded.key)
    await view(page, "#/meters", "meters")
    cell = page.locator("[data-testid=meter-table] td", has_text="onerror")
    assert await cell.text_content() == HOSTILE
    assert await page.locator("[data-testid=meter-table] img").count() == 0
    assert await page.evaluate("() => window.pwned") is None
    await shoot(page, "meters")

    context = await browser.new_context()
    other = await context.new_page()
    await other.goto(f"{server}/console")
    await other.fill("#key", "nbm_nothere_" + "x" * 32)
    await other.click("#login button[type=submit]")
    await expect(other.locator("#login-error")).to_contain_text("refused")
    assert await other.locator("#view").inner_html() == ""
    assert await other.evaluate("() => sessionStorage.length") == 0


@needs_browser
async def test_screenshots_command_shoots_every_page(
    server: str, seeded: Seeded, tmp_path: Path
) -> None:
    """`nbmeter screenshots` (what makes docs/console/*.png from the demo's data) signs in
    with the key and writes a full-page PNG of each page: the meter shot is the one with a
    valve command, the district shot has its balance chart; a refused key is an error."""
    meter = seeded.meters[4]
    auth = {"Authorization": f"Bearer {seeded.key}"}
    async with httpx.AsyncClient(base_url=server) as c:
        queued = await c.post(f"/v1/meters/{meter}/commands", headers=auth,
                              json={"kind": "valve", "args": {"action": "open"}})  # fmt: skip
    assert queued.status_code == 201, queued.text
    shots = await asyncio.to_thread(screenshots.pages, server, seeded.key, 30)
    by_name = {s.name: s.fragment for s in shots}
    # the first valve command of the tenant: the one the browser test queued, else this one
    valve_meters = {seeded.meters[5], meter}
    assert int(by_name["meter"].split("/")[2].split("?")[0]) in valve_meters
    assert by_name["district"] == f"#/districts/{seeded.district}?days=30"

    written = await screenshots.take(server, seeded.key, tmp_path / "shots", chromium=CHROMIUM)
    names = ["overview", "alarms", "meters", "meter", "districts", "district"]
    assert written == [tmp_path / "shots" / f"{n}.png" for n in names]
    for path in written:
        head = path.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", head[16:24])
        assert width == 1280
        assert height >= 600  # a full page, not an empty one
    with pytest.raises(screenshots.ScreenshotError, match="refused"):
        await screenshots.take(server, "nbm_nothere_" + "x" * 32, tmp_path / "no")
