"""The operations console: static pages at /console, and the day's overview they read.

The pages are plain HTML, CSS and JavaScript in `api/console/` (no build step, no CDN).
They hold no data: the browser asks the API with the same bearer keys as any client (the
key is typed once and kept in the tab's sessionStorage, never in a URL or a cookie, so
there is nothing for another site to ride on). Every page is served with a strict CSP
(scripts and styles from this origin only, no inline script, no framing) and the script
renders every value with `textContent`, so a value from the database is never HTML.

`GET /v1/overview` is the one figure set no other route gives: today's uplinks by outcome,
the read rate, and open alarms counted by kind and severity.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel, Field

from api.deps import PROBLEMS, Pool, Reader
from api.errors import NotFoundError
from storage import overview

STATIC = Path(__file__).parent / "console"
# the console's files by the name the browser asks for, and their media types
FILES = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
        " connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

pages = APIRouter(include_in_schema=False)
router = APIRouter(prefix="/v1", tags=["console"], responses=PROBLEMS)


@pages.get("/console")
async def console_index() -> FileResponse:
    """The console's single page (its views are chosen by the URL fragment)."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                        headers=SECURITY_HEADERS)  # fmt: skip


@pages.get("/console/")
async def console_slash() -> RedirectResponse:
    """/console/ -> /console, so relative asset paths resolve one way."""
    return RedirectResponse("/console", status_code=308)


@pages.get("/console/{name}")
async def console_file(name: str) -> FileResponse:
    """One of the console's own files; anything else is 404 (no path is joined)."""
    media = FILES.get(name)
    if media is None:
        raise NotFoundError(f"no console file {name!r}")
    return FileResponse(STATIC / name, media_type=media, headers=SECURITY_HEADERS)


class AlarmCount(BaseModel):
    """Alarms not yet closed of one kind, severity and state."""

    kind: str
    severity: str
    state: Literal["open", "acknowledged"]
    alarms: int


class Overview(BaseModel):
    """The tenant's day so far (since its local midnight)."""

    since: datetime = Field(description="the tenant's local midnight, as an instant")
    timezone: str
    uplinks: int = Field(description="uplinks received today, every outcome")
    uplinks_by_outcome: dict[str, int] = Field(description="stored, duplicate, quarantined")
    meters_active: int = Field(description="meters installed and not removed")
    meters_read: int = Field(description="active meters with a reading dated today")
    read_rate: float | None = Field(description="meters_read / meters_active; null: no meter")
    open_alarms: list[AlarmCount]


@router.get("/overview", summary="Today's uplinks, read rate and open alarms")
async def get_overview(who: Reader, pool: Pool) -> Overview:
    """Uplinks by outcome and the read rate since the tenant's local midnight, and the
    alarms not yet closed by kind, severity and state."""
    day = await overview.today(pool, who.tenant_id)
    active = day.meters_active
    return Overview(
        since=day.since,
        timezone=day.timezone,
        uplinks=sum(day.uplinks.values()),
        uplinks_by_outcome=day.uplinks,
        meters_active=active,
        meters_read=day.meters_read,
        read_rate=round(day.meters_read / active, 4) if active else None,
        open_alarms=[AlarmCount(**dict(r)) for r in day.open_alarms],
    )
