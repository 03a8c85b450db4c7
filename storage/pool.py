"""The connection pool (created once per process, then passed in) and the error boundary.

`create_pool(dsn, ...)` is the one way the project opens a pool; `connection(pool)` lends
one of its connections; `connected(dsn)` opens one of its own for a short job;
`ping(pool)` asks the database whether it answers. `translated()` is the one place
asyncpg's (and the socket's) exceptions become `storage.errors`, whose tree is drawn in
that module: every storage function that talks to the database runs inside it (a block
`with translated(...)`, or the whole function `@translating(...)`), so no caller ever
sees a driver exception.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, ParamSpec, TypeAlias, TypeVar, cast

import asyncpg

from storage.errors import RowRefusedError, SchemaError, StorageError, StorageUnavailableError

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

Pool: TypeAlias = asyncpg.Pool
Connection: TypeAlias = asyncpg.Connection
Record: TypeAlias = asyncpg.Record
Executor: TypeAlias = asyncpg.Connection | asyncpg.Pool
"""Anything a query runs on: a connection (inside its transaction), or the pool."""
ConnectionHook: TypeAlias = Callable[[asyncpg.Connection], Coroutine[Any, Any, None]]
"""An `init` or `reset` hook: called with the connection opened or released."""
SetupHook: TypeAlias = Callable[["PoolConnectionProxy[Record]"], Coroutine[Any, Any, None]]
"""A `setup` hook: called with the connection a caller is about to acquire."""
_P = ParamSpec("_P")
_R = TypeVar("_R")

# errors after which the same call may succeed: the server, the network or the load was
# the cause (SQLSTATE classes 08, 40, 53, 57; OSError includes ConnectionRefusedError)
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # 08: includes ConnectionDoesNotExistError
    asyncpg.TransactionRollbackError,  # 40: deadlock, serialization failure
    asyncpg.InsufficientResourcesError,  # 53: too many connections, disk full, memory
    asyncpg.OperatorInterventionError,  # 57: shutdown, cannot connect now, query canceled
)
# the data as sent cannot be stored (SQLSTATE classes 22 and 23; asyncpg's own DataError
# is an argument it cannot encode)
_REFUSED: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.exceptions._base.DataError,  # asyncpg exports it under no other name
)
_SCHEMA: tuple[type[BaseException], ...] = (
    asyncpg.UndefinedTableError,
    asyncpg.UndefinedColumnError,
    asyncpg.UndefinedFunctionError,
)


def _closing(exc: BaseException) -> bool:
    """An asyncpg InterfaceError saying the pool or the connection is closing or closed."""
    return isinstance(exc, asyncpg.InterfaceError) and "clos" in str(exc)


@contextmanager
def translated(doing: str) -> Iterator[None]:
    """Run the block, re-raising asyncpg/OS errors as `storage.errors` (`doing` names the task).

    Transient conditions raise StorageUnavailableError, refused data RowRefusedError, a
    missing table or column SchemaError, any other database error StorageError. Other
    exceptions (the caller's own) pass through unchanged.
    """
    try:
        yield
    except StorageError:
        raise
    except _SCHEMA as exc:
        msg = f"{doing}: the database schema is missing something ({exc}); run `nbmeter db migrate`"
        raise SchemaError(msg) from exc
    except _REFUSED as exc:
        msg = f"{doing}: the database refused the data ({type(exc).__name__}: {exc})"
        raise RowRefusedError(msg) from exc
    except _TRANSIENT as exc:
        msg = f"{doing}: database unavailable ({type(exc).__name__}: {exc})"
        raise StorageUnavailableError(msg) from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        msg = f"{doing}: {type(exc).__name__}: {exc}"
        if _closing(exc):
            raise StorageUnavailableError(f"{doing}: database unavailable ({msg})") from exc
        raise StorageError(msg) from exc


def translating(
    doing: str,
) -> Callable[[Callable[_P, Awaitable[_R]]], Callable[_P, Coroutine[Any, Any, _R]]]:
    """Decorate a storage coroutine function so that its whole call runs in `translated`."""

    def decorate(fn: Callable[_P, Awaitable[_R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
        @functools.wraps(fn)
        async def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with translated(doing):
                return await fn(*args, **kwargs)

        return call

    return decorate


async def keep_session(_conn: asyncpg.Connection) -> None:
    """A pool `reset` that sends nothing, for pools whose users keep no session state.

    asyncpg rolls back an open transaction before calling it. The default reset (RESET ALL,
    CLOSE ALL, UNLISTEN *, advisory unlock) is one more round trip per release; it undoes
    nothing for a user whose settings are startup parameters or SET LOCAL and that uses no
    LISTEN, advisory locks or cursors outside transactions (the collector, the API).
    """


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    connect_timeout_s: float = 60.0,
    command_timeout_s: float | None = None,
    max_inactive_connection_lifetime_s: float = 300.0,
    server_settings: Mapping[str, str] | None = None,
    init: ConnectionHook | None = None,
    setup: SetupHook | None = None,
    reset: ConnectionHook | None = None,
) -> asyncpg.Pool:
    """Open a pool on `dsn` with `min_size` connections ready; raises storage errors.

    The hooks and timeouts are asyncpg's (`init` per new connection, `setup` per acquire,
    `reset` per release; None keeps asyncpg's default). With `min_size=0` nothing is
    connected yet, so a process can start while the database is away.
    """
    with translated("opening the database pool"):
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=connect_timeout_s,
            command_timeout=command_timeout_s,
            max_inactive_connection_lifetime=max_inactive_connection_lifetime_s,
            server_settings=dict(server_settings) if server_settings else None,
            init=init,
            setup=setup,
            reset=reset,
        )


@asynccontextmanager
async def connection(
    pool: asyncpg.Pool, doing: str, *, timeout_s: float | None = None
) -> AsyncIterator[asyncpg.Connection]:
    """Lend a connection of `pool` for the block (waiting at most `timeout_s` for one).

    Database errors raised in the block, or while acquiring and releasing, become storage
    errors (see `translated`, `doing` names the task); the block's own exceptions pass.
    """
    with translated(doing):
        async with pool.acquire(timeout=timeout_s) as proxy:
            # the pool's proxy forwards every Connection method: it is one, for callers
            yield cast("asyncpg.Connection", proxy)


@asynccontextmanager
async def connected(
    dsn: str, doing: str, *, timeout_s: float = 60.0
) -> AsyncIterator[asyncpg.Connection]:
    """A connection of its own on `dsn` for the block (a command, a one-off job), then closed.

    For a process that needs one connection briefly, not a pool. Database errors raised
    while connecting, in the block or while closing become storage errors (`translated`,
    `doing` names the task); the block's own exceptions pass.
    """
    with translated(doing):
        conn = await asyncpg.connect(dsn, timeout=timeout_s)
        try:
            yield conn
        finally:
            await conn.close()


async def ping(pool: asyncpg.Pool, *, timeout_s: float = 2.0) -> None:
    """Return if the database answers a query within `timeout_s`; else StorageUnavailableError."""
    try:
        with translated("checking the database"):
            await pool.fetchval("SELECT 1", timeout=timeout_s)
    except StorageUnavailableError:
        raise
    except StorageError as exc:  # the database answered with an error: not usable either
        msg = f"database unreachable: {exc}"
        raise StorageUnavailableError(msg) from exc
