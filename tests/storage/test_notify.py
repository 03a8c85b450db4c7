"""storage.notify.listen: the one LISTEN loop (notify, lost and back, callback errors)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from storage.notify import STOPPED, listen

CHANNEL = "nbmeter_test_notify"
APP = "nbmeter-test-notify"


class Recorder:
    """What the loop called, and events to wait for."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.payloads: list[str] = []
        self.states: list[tuple[bool, str | None]] = []
        self.fail_on = fail_on
        self.changed = asyncio.Event()

    def on_notify(self, payload: str) -> None:
        self.payloads.append(payload)
        self.changed.set()
        if payload == self.fail_on:
            msg = f"consumer bug on {payload!r}"
            raise RuntimeError(msg)

    def on_state(self, up: bool, why: str | None) -> None:
        self.states.append((up, why))
        self.changed.set()

    async def until(self, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not done():
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def running(db_url: str, rec: Recorder) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(
        listen(
            db_url,
            CHANNEL,
            rec.on_notify,
            rec.on_state,
            app_name=APP,
            check_every_s=0.3,
            check_timeout_s=1.0,
            retry_min_s=0.05,
            retry_max_s=0.2,
        )
    )
    try:
        await rec.until(lambda: (True, None) in rec.states)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _notify(conn: asyncpg.Connection, payload: str) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(db_url)
    try:
        yield c
    finally:
        await c.close()


async def test_notifications_arrive_in_order(db_url: str, conn: asyncpg.Connection) -> None:
    """Each NOTIFY on the channel reaches on_notify with its payload, in order."""
    rec = Recorder()
    async with running(db_url, rec):
        for payload in ("a", "b", "c"):
            await _notify(conn, payload)
        await rec.until(lambda: len(rec.payloads) == 3)
    assert rec.payloads == ["a", "b", "c"]
    assert rec.states[0] == (True, None)
    assert rec.states[-1] == (False, STOPPED)


async def test_a_terminated_connection_is_lost_then_listens_again(
    db_url: str, conn: asyncpg.Connection
) -> None:
    """pg_terminate_backend on the listener: on_state(False, why), then (True) and NOTIFY works."""
    rec = Recorder()
    async with running(db_url, rec):
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1 AND datname = current_database()",
            APP,
        )
        assert killed == 1
        await rec.until(lambda: [up for up, _ in rec.states] == [True, False, True])
        lost_why = rec.states[1][1]
        await _notify(conn, "after")
        await rec.until(lambda: rec.payloads == ["after"])
    assert lost_why
    assert lost_why != STOPPED


async def test_a_callback_exception_does_not_stop_the_loop(
    db_url: str, conn: asyncpg.Connection
) -> None:
    """on_notify raising is logged; later notifications still arrive on the same connection."""
    rec = Recorder(fail_on="boom")
    async with running(db_url, rec) as task:
        await _notify(conn, "boom")
        await _notify(conn, "fine")
        await rec.until(lambda: rec.payloads == ["boom", "fine"])
        await asyncio.sleep(0.7)  # two heartbeats: the connection is still the first one
        assert not task.done()
    assert [up for up, _ in rec.states] == [True, False]  # never lost, only stopped


async def test_a_server_that_is_away_is_retried(db_url: str) -> None:
    """No server: on_state(False, why) repeatedly (with backoff), never an exception."""
    rec = Recorder()
    task = asyncio.create_task(
        listen(
            "postgresql://nobody@127.0.0.1:1/none",
            CHANNEL,
            rec.on_notify,
            rec.on_state,
            app_name=APP,
            retry_min_s=0.05,
            retry_max_s=0.1,
        )
    )
    try:
        await rec.until(lambda: len(rec.states) >= 3)
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert all(not up and why for up, why in rec.states)
    assert rec.states[-1] == (False, STOPPED)
