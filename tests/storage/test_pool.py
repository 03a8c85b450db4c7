"""storage.pool: the one pool function and the one translation of driver errors."""

from __future__ import annotations

import socket

import asyncpg
import pytest

from storage.errors import RowRefusedError, SchemaError, StorageError, StorageUnavailableError
from storage.pool import connection, create_pool, keep_session, ping, translated


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_create_pool_passes_settings_and_hooks(db_url: str) -> None:
    """create_pool applies server settings, runs init per connection and the given reset."""
    opened: list[int] = []

    async def init(conn: asyncpg.Connection) -> None:
        opened.append(conn.get_server_pid())

    pool = await create_pool(
        db_url,
        min_size=1,
        max_size=2,
        server_settings={"TimeZone": "Pacific/Auckland"},
        init=init,
        reset=keep_session,
    )
    async with pool:
        assert await pool.fetchval("SHOW TimeZone") == "Pacific/Auckland"
        assert len(opened) == 1
        assert pool.get_min_size() == 1
        assert pool.get_max_size() == 2


async def test_pool_to_an_absent_server_is_unavailable() -> None:
    """Opening a pool on a port nobody listens on is StorageUnavailableError, not OSError."""
    dsn = f"postgresql://nobody@127.0.0.1:{_free_port()}/none"
    with pytest.raises(StorageUnavailableError, match="opening the database pool"):
        await create_pool(dsn, min_size=1, connect_timeout_s=2.0)


async def test_lazy_pool_opens_without_the_server() -> None:
    """min_size=0 opens no connection: a process starts while the database is away."""
    pool = await create_pool(f"postgresql://nobody@127.0.0.1:{_free_port()}/none", min_size=0)
    async with pool:
        with pytest.raises(StorageUnavailableError):
            await ping(pool, timeout_s=2.0)
        with pytest.raises(StorageUnavailableError, match="storing"):
            async with connection(pool, "storing", timeout_s=2.0):
                pass


async def test_ping_and_closed_pool(db_url: str) -> None:
    """ping returns while the database answers; on a closed pool it is StorageUnavailableError."""
    pool = await create_pool(db_url, min_size=1, max_size=1)
    await ping(pool)
    await pool.close()
    with pytest.raises(StorageUnavailableError):
        await ping(pool)
    with pytest.raises(StorageUnavailableError):
        async with connection(pool, "after close"):
            pass


@pytest.mark.parametrize(
    ("sql", "args", "error"),
    [
        ("SELECT 1 / $1::int", (0,), RowRefusedError),  # 22012 division_by_zero
        ("SELECT $1::int", ("not a number",), RowRefusedError),  # argument not encodable
        ("INSERT INTO tenants (slug, name) VALUES (NULL, 'x')", (), RowRefusedError),  # 23502
        ("SELECT * FROM no_such_table", (), SchemaError),
        ("SELECT FROM WHERE", (), StorageError),  # a bug in our SQL: neither transient nor data
        ("SELECT pg_sleep(1)", (), StorageUnavailableError),  # canceled by statement_timeout
    ],
    ids=["data", "encode", "constraint", "schema", "syntax", "timeout"],
)
async def test_translated_classifies_database_errors(
    pool: asyncpg.Pool, sql: str, args: tuple[object, ...], error: type[StorageError]
) -> None:
    """translated maps each kind of driver error to its storage error, never asyncpg's."""
    async with connection(pool, "testing") as conn, conn.transaction():
        await conn.execute("SET LOCAL statement_timeout = 50")
        with pytest.raises(StorageError, match="testing") as raised, translated("testing"):
            await conn.fetchval(sql, *args)
    assert type(raised.value) is error
    assert isinstance(raised.value.__cause__, asyncpg.PostgresError | asyncpg.InterfaceError)


async def test_connection_lets_the_blocks_own_errors_pass(pool: asyncpg.Pool) -> None:
    """An exception of the caller's block that is no database error is raised unchanged."""

    async def block() -> None:
        async with connection(pool, "testing") as conn:
            await conn.fetchval("SELECT 1")
            raise KeyError("mine")

    with pytest.raises(KeyError, match="mine"):
        await block()
