"""API test fixtures: the app on the session's database, tenants with keys, reading writers.

`api` is an httpx.AsyncClient on create_app through ASGITransport (lifespan run by hand);
`server` is the same app under a real uvicorn on a loopback port (one per test module);
`make_tenant` returns a Tenant with an admin key and a read-only key; `add_meter` and
`add_readings` write rows with plain SQL/COPY (tests never depend on the ingest writer).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from brokerkit import free_port
from dbkit import read_s
from fastapi import FastAPI
from pydantic import SecretStr

from api.app import create_app
from api.settings import ApiSettings
from decoder.columns import Flag
from storage.apikeys import create_api_key, create_tenant
from storage.credentials import new_key
from storage.rows import FUTURE_TOLERANCE_S


@dataclass(frozen=True)
class Tenant:
    """A test tenant and its keys."""

    tenant_id: int
    admin: dict[str, str]
    reader: dict[str, str]
    writer: dict[str, str]


def bearer(key: str) -> dict[str, str]:
    """Authorization header for `key`."""
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def settings(db_url: str) -> ApiSettings:
    """API settings on the session database (key cache off, so revocation is immediate;
    the stack's credentials key, or a fresh one, seals webhook secrets)."""
    key = os.environ.get("NBMETER_CREDENTIALS_KEY") or new_key()
    return ApiSettings(
        database_url=db_url, key_cache_ttl_s=0, api_pool_max=8, credentials_key=SecretStr(key)
    )


@pytest.fixture(scope="session")
async def app(settings: ApiSettings) -> AsyncIterator[FastAPI]:
    """The app with its lifespan entered (pool open) for the whole session."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
def server(settings: ApiSettings) -> Iterator[str]:
    """The API under uvicorn in a thread (its own event loop and pool); yields its base URL."""
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:  # uvicorn has no started event
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=20)


@pytest.fixture
async def api(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to the app in-process."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client


MakeTenant = Callable[..., Awaitable[Tenant]]


@pytest.fixture
def make_tenant(pool: asyncpg.Pool) -> MakeTenant:
    """Factory: a fresh tenant (timezone given or Asia/Shanghai) with three keys."""

    async def make(timezone: str = "Asia/Shanghai") -> Tenant:
        slug = f"t-{uuid.uuid4().hex[:12]}"
        async with pool.acquire() as conn:
            tid = await create_tenant(conn, slug, slug, timezone)
            admin = await create_api_key(conn, tid, ["admin"])
            reader = await create_api_key(conn, tid, ["readings:read"])
            writer = await create_api_key(conn, tid, ["meters:write", "readings:read"])
        return Tenant(tid, bearer(admin), bearer(reader), bearer(writer))

    return make


AddMeter = Callable[..., Awaitable[int]]


@pytest.fixture
def add_meter(pool: asyncpg.Pool) -> AddMeter:
    """Factory: insert a meter row for a tenant; returns its id."""

    async def add(tenant_id: int, **fields: Any) -> int:
        row = {"address": uuid.uuid4().hex[:14], "kind": "water", "format": "cjt188"}
        row.update(fields)
        cols = ", ".join(row)
        marks = ", ".join(f"${i}" for i in range(2, len(row) + 2))
        meter_id: int = await pool.fetchval(
            f"INSERT INTO meters (tenant_id, {cols}) VALUES ($1, {marks}) RETURNING meter_id",
            tenant_id,
            *row.values(),
        )
        return meter_id

    return add


AddReadings = Callable[..., Awaitable[None]]


@pytest.fixture
def add_readings(pool: asyncpg.Pool) -> AddReadings:
    """Factory: COPY readings (read_at, register_ml[, flags[, received_at]]) of one meter.

    A reading dated more than FUTURE_TOLERANCE_S after the `received_at` given gets
    Flag.CLOCK_AHEAD, as ingest sets it (readings keep no receive time).
    """

    async def add(meter_id: int, rows: list[tuple[Any, ...]]) -> None:
        records = []
        for row in rows:
            read_at, ml = row[0], row[1]
            flags = row[2] if len(row) > 2 else 0
            received = row[3] if len(row) > 3 else read_at + timedelta(minutes=2)
            if read_at > received + timedelta(seconds=FUTURE_TOLERANCE_S):
                flags |= Flag.CLOCK_AHEAD
            records.append((meter_id, read_s(read_at), ml, int(flags)))
        async with pool.acquire() as conn:
            await conn.copy_records_to_table(
                "readings",
                records=records,
                columns=["meter_id", "read_s", "register_ml", "flags"],
            )

    return add


def utc(*args: int) -> datetime:
    """A UTC datetime."""
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]
