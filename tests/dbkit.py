"""A migrated scratch database on the stack's server, dropped afterwards; a TCP proxy to
it whose cut models a database outage; `read_s`, a time as readings store it;
`queue_command`, a command in a meter's mailbox.

Shared by the session's `db_url` fixture (tests/conftest.py) and tests that need a database
no other part of the session touches (e.g. one no running collector drains).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from storage import mailbox
from storage.migrate import migrate
from storage.rows import READ_S_EPOCH


def read_s(at: datetime) -> int:
    """`at` as readings.read_s: whole seconds since 2000-01-01T00:00:00Z (migration 0054),
    for tests that COPY readings in directly."""
    return math.floor(at.timestamp()) - READ_S_EPOCH


def with_database(url: str, database: str) -> str:
    """`url` pointing at `database` instead of its own."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@asynccontextmanager
async def migrated_database(
    server_url: str, prefix: str = "nbmeter_test", *, before: int | None = None
) -> AsyncIterator[str]:
    """Create a database on `server_url`'s server, apply every migration (or those numbered
    below `before`), yield its URL, then drop it (even if connections are still open)."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        url = with_database(server_url, name)
        await migrate(url, before=before)
        yield url
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the database; `cut()` and `restore()` model an outage."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """Listen (on the same port again after a cut); nothing if it listens already."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Reset every open connection and refuse new ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers -= {writer, up_writer}


async def new_tenant(pool: asyncpg.Pool, prefix: str, *, plain_coap: bool = False) -> str:
    """A tenant of its own (slug `prefix-<random>`), plain CoAP allowed or not; its slug."""
    slug = f"{prefix}-{secrets.token_hex(6)}"
    await pool.execute(
        "INSERT INTO tenants (slug, name, allow_plain_coap) VALUES ($1, $1, $2)", slug, plain_coap
    )
    return slug


async def queue_command(
    db: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy | asyncpg.Pool,
    meter_id: int,
    *,
    tenant_id: int | None = None,
    kind: str = "valve",
    args: dict[str, object] | None = None,
    ttl_s: int = 3600,
    key: str | None = None,
) -> mailbox.Command:
    """Queue (and commit) one command to meter `meter_id`, a valve close unless told; the
    tenant is the meter's unless given."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await queue_command(
                conn, meter_id, tenant_id=tenant_id, kind=kind, args=args, ttl_s=ttl_s, key=key
            )
    if tenant_id is None:
        tenant_id = await db.fetchval("SELECT tenant_id FROM meters WHERE meter_id = $1", meter_id)
    cmd, _ = await mailbox.create(
        db,
        tenant_id=tenant_id,
        meter_id=meter_id,
        kind=kind,
        args={"action": "close"} if args is None and kind == "valve" else (args or {}),
        ttl_s=ttl_s,
        created_by="test",
        idempotency_key=key,
    )
    return cmd
