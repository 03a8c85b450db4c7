"""The re-decode queue's state machine: every edge of the transition tables, walked on the
real database; claims that skip locked items; a crash (rollback) re-queues a batch."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import asyncpg
import pytest
from dbkit import migrated_database

from storage import quarantine, redecode_queue
from storage.archive import ArchiveWriter
from storage.redecode_queue import ITEMS, JOBS, InvalidTransitionError, Machine
from storage.rows import QuarantineRow


@pytest.fixture(scope="module")
async def queue_url(server_url: str) -> AsyncIterator[str]:
    """A database of this module's own: the test session's collector (tests/collector)
    drains the session database's re-decode queue, and would move these tests' rows."""
    async with migrated_database(server_url, "nbmeter_test_queue") as url:
        yield url


@pytest.fixture(scope="module")
async def pool(queue_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the module's own database."""
    async with asyncpg.create_pool(queue_url, min_size=1, max_size=4) as p:
        yield p


async def a_row(pool: asyncpg.Pool, tenant_id: int, payload: bytes) -> int:
    """One quarantine row of `tenant_id`; its id."""
    at = datetime(2025, 5, 1, tzinfo=UTC)
    await ArchiveWriter(pool).write_quarantine(
        [QuarantineRow(at, tenant_id, None, 5, None, "undecodable", "crc: x", payload)]
    )
    return int(
        await pool.fetchval("SELECT quarantine_id FROM quarantine WHERE payload = $1", payload)
    )


async def a_job(pool: asyncpg.Pool, tenant_id: int, payload: bytes) -> tuple[int, int]:
    """A queued job of one item; (job_id, quarantine_id)."""
    qid = await a_row(pool, tenant_id, payload)
    async with pool.acquire() as conn:
        job = await quarantine.request_one(conn, tenant_id, qid, "test")
    assert job is not None
    return job.job_id, qid


def edges(machine: Machine) -> list[tuple[str, str]]:
    """Every (old, new) pair of the machine's states."""
    return list(itertools.product(machine.transitions, repeat=2))


@pytest.mark.parametrize(
    ("machine", "old", "new"), [(m, o, n) for m in (JOBS, ITEMS) for o, n in edges(m)]
)
async def test_every_edge_is_allowed_exactly_when_the_table_says(
    pool: asyncpg.Pool, tenant_id: int, machine: Machine, old: str, new: str
) -> None:
    """A row in state `old` moves to `new` iff the table lists that edge; else it is left
    unchanged and InvalidTransitionError is raised."""
    job_id, qid = await a_job(pool, tenant_id, f"edge-{machine.table}-{old}-{new}".encode())
    key = (job_id,) if machine is JOBS else (job_id, qid)
    match = " AND ".join(f"{k} = ${i}" for i, k in enumerate(machine.keys, start=1))
    stamp = "NULL" if old == "queued" else "now()"
    await pool.execute(
        f"UPDATE {machine.table} SET state = '{old}', {machine.stamp} = {stamp} WHERE {match}",
        *key,
    )
    async with pool.acquire() as conn:
        if new in machine.transitions[old]:
            await redecode_queue.transition(conn, machine, [redecode_queue.Move(key, new)])
            want = new
        else:
            with pytest.raises(InvalidTransitionError):
                await redecode_queue.transition(conn, machine, [redecode_queue.Move(key, new)])
            want = old
    assert await pool.fetchval(f"SELECT state FROM {machine.table} WHERE {match}", *key) == want


async def test_a_call_with_one_refused_move_changes_nothing(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """Moves apply together: one refused move (a done item) leaves the other queued."""
    job_a, qid_a = await a_job(pool, tenant_id, b"together-a")
    job_b, qid_b = await a_job(pool, tenant_id, b"together-b")
    await pool.execute(
        "UPDATE redecode_items SET state = 'stored', done_at = now() WHERE job_id = $1", job_b
    )
    values = dict.fromkeys(ITEMS.columns)
    moves = [
        redecode_queue.Move((job_a, qid_a), "skipped", values),
        redecode_queue.Move((job_b, qid_b), "skipped", values),
    ]
    async with pool.acquire() as conn:
        with pytest.raises(InvalidTransitionError, match=str(job_b)):
            await redecode_queue.transition(conn, ITEMS, moves)
    states = await pool.fetch(
        "SELECT state FROM redecode_items WHERE job_id = ANY($1::bigint[]) ORDER BY job_id",
        [job_a, job_b],
    )
    assert [r["state"] for r in states] == ["queued", "stored"]


async def test_claims_skip_locked_items_and_a_rollback_requeues(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """Two claimers never get the same item; a batch whose block raises is queued again,
    and a recorded batch resolves its row and closes its job."""
    job_id, qid = await a_job(pool, tenant_id, b"claim-me")
    mine = lambda batch: [i for i in batch.items if i.job_id == job_id]  # noqa: E731
    async with (
        redecode_queue.claimed(pool, 1000) as first,
        redecode_queue.claimed(pool, 1000) as second,
    ):
        assert len(mine(first)) + len(mine(second)) == 1

    async def crash() -> None:
        async with redecode_queue.claimed(pool, 1000) as batch:
            assert len(mine(batch)) == 1
            raise RuntimeError("crash before recording")

    with pytest.raises(RuntimeError, match="crash"):
        await crash()
    async with redecode_queue.claimed(pool, 1000) as batch:
        [item] = mine(batch)
        # other tests' items, if any, get no result: they stay queued
        batch.results.append(redecode_queue.Result(item, "duplicate", n_readings=1, n_new=0))
    assert batch.closed == {job_id: "done"}
    row = await pool.fetchrow(
        "SELECT resolution, resolved_by_job FROM quarantine WHERE quarantine_id = $1", qid
    )
    assert tuple(row) == ("duplicate", job_id)


async def test_listen_wakes_on_notify_and_on_every_reconnect(queue_url: str) -> None:
    """redecode_queue.listen: a wake when listening starts, per NOTIFY, and after a lost
    connection comes back (a request may have been notified while it was down)."""
    wakes: list[str] = []
    states: list[bool] = []
    changed = asyncio.Event()

    def wake() -> None:
        wakes.append("wake")
        changed.set()

    def on_state(up: bool, _why: str | None) -> None:
        states.append(up)
        changed.set()

    async def until(done: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not done():
                changed.clear()
                await changed.wait()

    task = asyncio.create_task(
        redecode_queue.listen(queue_url, wake, on_state, check_every_s=0.3, retry_max_s=0.2)
    )
    conn = await asyncpg.connect(queue_url)
    try:
        await until(lambda: states == [True] and len(wakes) == 1)
        await conn.execute("SELECT pg_notify($1, '')", redecode_queue.CHANNEL)
        await until(lambda: len(wakes) == 2)
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'nbmeter-redecode' AND datname = current_database()"
        )
        assert killed == 1
        await until(lambda: states == [True, False, True])
        assert len(wakes) == 3  # the reconnect woke the caller
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await conn.close()
