"""The pending-command view (collector.pending) with Downlinks, each test on a database of
its own (the view loads every pending meter of its database): a window of a meter with
nothing pending runs no claim; a command queued while the view runs is claimed in the
next window (NOTIFY); one queued while the listener is down is claimed meanwhile (every
window claims) or after the reconnect's reload; past its cap, or after a notification it
cannot read, the view claims for every meter until a load says otherwise."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from dbkit import TcpProxy, migrated_database, new_tenant, queue_command

from collector import downlink, metrics
from collector.downlink import Downlinks
from collector.pending import PendingView
from storage import mailbox, pending_commands


@dataclass
class Db:
    """A database of the test's own, its pool, and a proxy to it whose cut is an outage."""

    url: str
    pool: asyncpg.Pool
    proxy: TcpProxy
    via_proxy: str
    tenant_id: int


@pytest.fixture
async def db(server_url: str) -> AsyncIterator[Db]:
    """A migrated database with one tenant, dropped after the test."""
    async with migrated_database(server_url, "nbmeter_pending") as url:
        parts = urlsplit(url)
        proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
        await proxy.start()
        netloc = f"{parts.netloc.rsplit('@', 1)[0]}@127.0.0.1:{proxy.port}"
        async with asyncpg.create_pool(url, min_size=1, max_size=4) as pool:
            slug = await new_tenant(pool, "pending")
            tenant_id = await pool.fetchval("SELECT tenant_id FROM tenants WHERE slug = $1", slug)
            yield Db(url, pool, proxy, urlunsplit(parts._replace(netloc=netloc)), tenant_id)
        await proxy.cut()


async def new_meters(db: Db, n: int) -> list[int]:
    """`n` new CJ/T 188 meters of the test's tenant; their ids."""
    rows = await db.pool.fetch(
        "INSERT INTO meters (tenant_id, address, kind, format) SELECT $1,"
        " lpad((floor(random() * 1e14))::bigint::text, 14, '0'), 'water', 'cjt188'"
        " FROM generate_series(1, $2) RETURNING meter_id",
        db.tenant_id,
        n,
    )
    return [int(r["meter_id"]) for r in rows]


async def queue(db: Db, meter_id: int) -> int:
    """Queue a valve command to the meter (committed); its id."""
    cmd = await queue_command(db.pool, meter_id, tenant_id=db.tenant_id, ttl_s=600)
    return cmd.command_id


def ids_in(envelope: bytes) -> list[int]:
    """The command ids an envelope carries."""
    return [c["id"] for c in json.loads(envelope)["cmds"]]


def skipped() -> float:
    """Windows that ran no claim so far (the process-wide counter)."""
    return metrics.COMMAND_CLAIMS_SKIPPED._value.get()


async def until(done: Callable[[], bool], within_s: float = 10.0) -> None:
    """Poll `done` (the view's state: there is no event to wait on) until it holds."""
    deadline = time.monotonic() + within_s
    while not done():
        assert time.monotonic() < deadline, "the view did not get there in time"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running(view: PendingView, *, live: bool = True) -> AsyncIterator[PendingView]:
    """The view's task for the block (waiting until it is live, if `live`)."""
    task = asyncio.create_task(view.run())
    try:
        if live:
            await until(lambda: view.live)
        yield view
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_window_with_nothing_pending_runs_no_claim(db: Db) -> None:
    """With the commands table locked (a claim would wait its CLAIM_TIMEOUT_S), the windows
    of meters with nothing pending answer at once and count as skipped; the meter with a
    command, in the view's first load, still gets it."""
    quiet = await new_meters(db, 20)
    [busy] = await new_meters(db, 1)
    cid = await queue(db, busy)
    view = PendingView(db.pool, db.url, reload_every_s=3600)
    downlinks = Downlinks(db.pool, pending=view)
    async with running(view):
        assert view.may_have(busy)
        before = skipped()
        async with db.pool.acquire() as locker, locker.transaction():
            await locker.execute("LOCK TABLE commands IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            answers = await asyncio.gather(*(downlinks.for_meter(m) for m in quiet))
            assert time.monotonic() - started < 1.0 < downlink.CLAIM_TIMEOUT_S
        assert answers == [b""] * len(quiet)
        assert skipped() - before == len(quiet)
        assert ids_in(await downlinks.for_meter(busy)) == [cid]
        assert skipped() - before == len(quiet)


async def test_a_command_queued_while_running_goes_out_in_the_next_window(db: Db) -> None:
    """The meter's first window is skipped; its command, queued afterwards, is announced
    (no reload in between) and claimed in the next window."""
    [meter] = await new_meters(db, 1)
    view = PendingView(db.pool, db.url, reload_every_s=3600)
    downlinks = Downlinks(db.pool, pending=view)
    async with running(view):
        before = skipped()
        assert await downlinks.for_meter(meter) == b""
        assert skipped() - before == 1
        cid = await queue(db, meter)
        await until(lambda: view.may_have(meter))
        assert ids_in(await downlinks.for_meter(meter)) == [cid]
        assert skipped() - before == 1


async def test_a_command_queued_while_the_listener_is_down_goes_out(db: Db) -> None:
    """Listener cut: the view is not live and every window claims (a command queued then
    goes out in the meter's window at once); another one, queued while it was down and
    never announced, goes out once the reconnect's reload has brought its meter in."""
    now, later, quiet = await new_meters(db, 3)
    view = PendingView(db.pool, db.via_proxy, reload_every_s=3600, check_every_s=0.2)
    downlinks = Downlinks(db.pool, pending=view)
    async with running(view):
        assert not view.may_have(now)
        await db.proxy.cut()
        await until(lambda: not view.live)
        assert metrics.PENDING_VIEW_LIVE._value.get() == 0
        first = await queue(db, now)
        missed = await queue(db, later)
        before = skipped()
        assert ids_in(await downlinks.for_meter(now)) == [first]
        assert await downlinks.for_meter(quiet) == b""
        assert skipped() == before  # both windows claimed
        await db.proxy.start()
        await until(lambda: view.live)
        assert view.may_have(later)
        assert ids_in(await downlinks.for_meter(later)) == [missed]
        assert await downlinks.for_meter(quiet) == b""
        assert skipped() - before == 1


async def test_past_its_cap_the_view_claims_for_every_meter(db: Db) -> None:
    """More pending meters than the cap at a load: not live, every window claims; live again
    once they are fewer; more than the cap again by notifications: not live at once."""
    meters = await new_meters(db, 6)
    commands = [await queue(db, m) for m in meters[:4]]
    quiet = meters[5]
    view = PendingView(db.pool, db.url, cap=3, reload_every_s=0.1)
    downlinks = Downlinks(db.pool, pending=view)
    async with running(view, live=False):
        await asyncio.sleep(0.5)  # several loads, each over the cap
        assert not view.live
        before = skipped()
        assert await downlinks.for_meter(quiet) == b""
        assert skipped() == before  # claimed
        async with db.pool.acquire() as conn:
            for cid in commands[:2]:
                await mailbox.cancel(conn, db.tenant_id, cid, "test")
        await until(lambda: view.live)  # two pending meters: within the cap
        assert not view.may_have(meters[0])
        view_reloads_slowly = PendingView(db.pool, db.url, cap=3, reload_every_s=3600)
        async with running(view_reloads_slowly) as slow:
            await queue(db, meters[4])
            await until(lambda: slow.may_have(meters[4]))
            assert slow.live  # three: the cap
            await queue(db, meters[0])
            await until(lambda: not slow.live)  # four, by notification
            before = skipped()
            assert await Downlinks(db.pool, pending=slow).for_meter(quiet) == b""
            assert skipped() == before  # claimed


async def test_an_unreadable_notification_makes_the_view_load_again(db: Db) -> None:
    """A command stored without its notification (the trigger off) is found by the load
    that a payload the view cannot read starts."""
    [meter] = await new_meters(db, 1)
    view = PendingView(db.pool, db.url, reload_every_s=3600)
    async with running(view):
        async with db.pool.acquire() as conn, conn.transaction():
            await conn.execute("ALTER TABLE commands DISABLE TRIGGER commands_notify_inserted")
            await conn.execute(
                "INSERT INTO commands (tenant_id, meter_id, kind, setting, args, created_by,"
                " expires_at) VALUES ($1, $2, 'valve', 'valve', '{\"action\": \"close\"}',"
                " 'test', now() + interval '1 hour')",
                db.tenant_id,
                meter,
            )
            await conn.execute("ALTER TABLE commands ENABLE TRIGGER commands_notify_inserted")
        await asyncio.sleep(0.2)
        assert not view.may_have(meter)  # nobody said
        await db.pool.execute("SELECT pg_notify($1, 'not a meter id')", pending_commands.CHANNEL)
        await until(lambda: view.may_have(meter) and view.live)


async def test_a_load_begun_before_the_listener_was_lost_leaves_the_view_not_live(
    db: Db,
) -> None:
    """A load waiting (here on a table lock) while the listener is lost completes with a
    set nobody keeps current any more: the view stays not live until it listens again."""
    [meter] = await new_meters(db, 1)
    view = PendingView(db.pool, db.via_proxy, reload_every_s=0.1, check_every_s=0.2)
    async with running(view):
        async with db.pool.acquire() as locker:
            async with locker.transaction():
                await locker.execute("LOCK TABLE commands IN ACCESS EXCLUSIVE MODE")
                deadline = time.monotonic() + 10
                while not await db.pool.fetchval(  # a load waits for the lock
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                ):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                await db.proxy.cut()
                await until(lambda: not view.live)
            deadline = time.monotonic() + 0.5  # the load completes; none other begins
            while time.monotonic() < deadline:
                assert not view.live
                assert view.may_have(meter)
                await asyncio.sleep(0.005)
        await db.proxy.start()
        await until(lambda: view.live)
        assert not view.may_have(meter)
