"""The connection pool (created once per process, then passed in) and the error boundary.

`create_pool(dsn)` opens the pool and checks that every shipped migration is applied;
`translated()` is the one place asyncpg's exceptions become `storage.errors`:

StorageError                 any other database error (a bug or a constraint we broke)
├── StorageUnavailableError  connection lost/refused, pool closing, server shutting down,
│                            deadlock or serialization failure: retry the same batch
└── SchemaError              a table or column is missing: run `nbmeter db migrate`
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from storage.errors import SchemaError, StorageError, StorageUnavailableError
from storage.migrate import available

# errors after which the same call may succeed: the server or the network was the cause
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionRefusedError; asyncio's TimeoutError is an OSError too
    TimeoutError,
    asyncpg.InterfaceError,  # pool closing / connection released under us
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)
_SCHEMA: tuple[type[BaseException], ...] = (
    asyncpg.UndefinedTableError,
    asyncpg.UndefinedColumnError,
    asyncpg.UndefinedFunctionError,
)


@contextmanager
def translated(doing: str) -> Iterator[None]:
    """Run the block, re-raising asyncpg/OS errors as `storage.errors` (`doing` names the task)."""
    try:
        yield
    except _SCHEMA as exc:
        msg = f"{doing}: the database schema is missing something ({exc}); run `nbmeter db migrate`"
        raise SchemaError(msg) from exc
    except _TRANSIENT as exc:
        msg = f"{doing}: database unavailable ({type(exc).__name__}: {exc})"
        raise StorageUnavailableError(msg) from exc
    except asyncpg.PostgresError as exc:
        msg = f"{doing}: {type(exc).__name__}: {exc}"
        raise StorageError(msg) from exc


async def keep_session(_conn: asyncpg.Connection) -> None:
    """A pool `reset` that sends nothing, for pools whose users keep no session state.

    asyncpg rolls back an open transaction before calling it. The default reset (RESET ALL,
    CLOSE ALL, UNLISTEN *, advisory unlock) is one more round trip per release; it undoes
    nothing for a user whose settings are startup parameters or SET LOCAL and that uses no
    LISTEN, advisory locks or cursors outside transactions (the collector, the API).
    """


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    """Open a pool on `dsn` whose schema is current; raises StorageUnavailable/SchemaError."""
    with translated("opening the database pool"):
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
    try:
        await require_current_schema(pool)
    except BaseException:
        await pool.close()
        raise
    return pool


async def require_current_schema(pool: asyncpg.Pool) -> None:
    """Return if every shipped migration is recorded in the database, else raise SchemaError."""
    with translated("checking the schema version"):
        exists = await pool.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        done = (
            {r["number"] for r in await pool.fetch("SELECT number FROM schema_migrations")}
            if exists
            else set()
        )
    missing = [m.name for m in available() if m.number not in done]
    if missing:
        msg = f"the database lacks migrations {missing}: run `nbmeter db migrate`"
        raise SchemaError(msg)
