"""A migrated scratch database on the stack's server, dropped afterwards.

Shared by the session's `db_url` fixture (tests/conftest.py) and tests that need a database
no other part of the session touches (e.g. one no running collector drains).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from storage.migrate import migrate


def with_database(url: str, database: str) -> str:
    """`url` pointing at `database` instead of its own."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@asynccontextmanager
async def migrated_database(server_url: str, prefix: str = "nbmeter_test") -> AsyncIterator[str]:
    """Create a database on `server_url`'s server, apply every migration, yield its URL,
    then drop it (even if connections are still open)."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        url = with_database(server_url, name)
        await migrate(url)
        yield url
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
