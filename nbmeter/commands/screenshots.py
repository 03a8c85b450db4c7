"""`nbmeter screenshots --out DIR`: a PNG of every console page, from a running API.

Signs in to the console of `--api-url` with `--api-key` (or NBMETER_API_KEY) in Debian's
Chromium driven by Playwright (the dev extras; `nbmeter stack tools` installs Chromium, no
browser is downloaded) and saves full-page PNGs: overview, alarms, meters, one meter's
page (a meter with commands: a valve one if any), the districts list and one district's
balance chart. After `make demo`, this is how docs/console/*.png are made from the demo's
data. Exit status 1 with a message when a page does not render.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

CHROMIUM = "/usr/bin/chromium"
RENDER_TIMEOUT_MS = 30_000  # a 30-day meter page of the demo fleet renders in ~1 s


class ScreenshotError(Exception):
    """The console could not be shown: no browser, a refused key, a page that failed."""


@dataclass(frozen=True)
class Page:
    """One console page: its file name, its fragment, and a selector it must show."""

    name: str
    fragment: str
    ready: str


def _pick_meter(client: httpx.Client) -> int | None:
    """A meter with commands (a valve one first), else one with an alarm, else the first."""
    commands = client.get("/v1/commands", params={"limit": 200})
    if commands.status_code == 200:
        items = commands.json()["items"]
        valve = [c for c in items if c["kind"] == "valve"]
        if valve or items:
            return int((valve or items)[0]["meter_id"])
    alarms = client.get("/v1/alarms")
    if alarms.status_code == 200 and alarms.json():
        return int(alarms.json()[0]["meter_id"])
    meters = client.get("/v1/meters", params={"limit": 1}).json()["items"]
    return int(meters[0]["meter_id"]) if meters else None


def pages(api_url: str, api_key: str, days: int) -> list[Page]:
    """The pages to shoot for this tenant (the meter and district are looked up)."""
    auth = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=api_url, headers=auth, timeout=30) as client:
        if client.get("/v1/alarm-rules").status_code == 401:
            msg = "the API refused the key"
            raise ScreenshotError(msg)
        meter = _pick_meter(client)
        listed = client.get("/v1/districts")
        district = listed.json()[0]["district_id"] if listed.status_code == 200 else None
    out = [
        Page("overview", "#/overview", "[data-testid=kpi-uplinks]"),
        Page("alarms", "#/alarms", "#view[data-view=alarms] h1"),
        Page("meters", "#/meters", "[data-testid=meter-table]"),
    ]
    if meter is not None:
        out.append(Page("meter", f"#/meters/{meter}?days={days}", "[data-testid=meter-title]"))
    out.append(Page("districts", "#/districts", "#view[data-view=districts] h1"))
    if district is not None:
        out.append(
            Page("district", f"#/districts/{district}?days={days}", "[data-testid=district-title]")
        )
    return out


def _prepare(api_url: str, api_key: str, out_dir: Path, chromium: str, days: int) -> list[Page]:
    if not Path(chromium).exists():
        msg = f"no Chromium at {chromium} (`nbmeter stack tools` installs Debian's)"
        raise ScreenshotError(msg)
    todo = pages(api_url.rstrip("/"), api_key, days)
    out_dir.mkdir(parents=True, exist_ok=True)
    return todo


async def take(
    api_url: str, api_key: str, out_dir: Path, *, chromium: str = CHROMIUM, days: int = 30
) -> list[Path]:
    """Save a PNG of each of `pages` under `out_dir`; the files written, in page order.
    Raises ScreenshotError (no Playwright or Chromium, a refused key, a page in error)."""
    try:
        from playwright.async_api import async_playwright
    except ImportError as exc:
        msg = "Playwright is missing: install the dev extras (pip install -e '.[dev]')"
        raise ScreenshotError(msg) from exc
    todo = await asyncio.to_thread(_prepare, api_url, api_key, out_dir, chromium, days)
    written: list[Path] = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(RENDER_TIMEOUT_MS)
            await page.goto(f"{api_url.rstrip('/')}/console")
            await page.fill("#key", api_key)
            await page.click("#login button[type=submit]")
            await page.wait_for_selector("#view[data-view=overview][aria-busy=false]")
            for shot in todo:
                await page.evaluate("f => { location.hash = f; }", shot.fragment)
                await page.wait_for_selector(shot.ready)
                await page.wait_for_selector("#view[aria-busy=false]")
                failed = page.locator("#view > p.error", has_text="Could not load this page")
                if await failed.count():
                    msg = f"{shot.name} ({shot.fragment}): {await failed.text_content()}"
                    raise ScreenshotError(msg)
                path = out_dir / f"{shot.name}.png"
                await page.screenshot(path=str(path), full_page=True)
                written.append(path)
        finally:
            await browser.close()
    return written


def _run(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("NBMETER_API_KEY")
    if not key:
        print("nbmeter: give --api-key or set NBMETER_API_KEY", file=sys.stderr)
        return 2
    try:
        written = asyncio.run(
            take(args.api_url, key, Path(args.out), chromium=args.chromium, days=args.days)
        )
    except (ScreenshotError, httpx.HTTPError) as exc:
        print(f"nbmeter: screenshots: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `nbmeter screenshots`."""
    parser.add_argument("--api-url", default="http://127.0.0.1:8000", help="the API's base URL")
    parser.add_argument("--api-key", help="a key of the tenant (default: NBMETER_API_KEY)")
    parser.add_argument("--out", required=True, help="folder for the PNGs (created)")
    parser.add_argument("--chromium", default=CHROMIUM, help=f"the browser (default {CHROMIUM})")
    parser.add_argument("--days", type=int, default=30, help="range of the meter and district")
    parser.set_defaults(func=_run)
