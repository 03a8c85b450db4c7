"""Migration 0055 and storage.pending_commands on the real database: a command that
becomes pending announces its meter when its transaction commits (never before, never on
rollback), a bulk job in payloads of at most 300 ids, each meter once; claims, answers,
cancels and expiry announce nothing; the load finds every pending meter, or None past
its limit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from dbkit import queue_command

from decoder.commands import DeviceResult
from storage import mailbox, pending_commands


async def a_meter(pool: asyncpg.Pool, tenant_id: int) -> int:
    """A new active CJ/T 188 meter of the tenant; its id."""
    return int(
        await pool.fetchval(
            "INSERT INTO meters (tenant_id, address, kind, format) VALUES ($1, $2, 'water',"
            " 'cjt188') RETURNING meter_id",
            tenant_id,
            f"{uuid.uuid4().int % 10**14:014d}",
        )
    )


async def queue(conn: asyncpg.Connection, tenant_id: int, meter_id: int) -> int:
    """Queue a valve command; its id."""
    return (await queue_command(conn, meter_id, tenant_id=tenant_id)).command_id


class Heard:
    """The payloads on CHANNEL, heard over a connection of its own."""

    def __init__(self) -> None:
        self.payloads: list[str] = []

    def callback(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self.payloads.append(str(payload))

    def meters(self) -> list[int]:
        """Every meter id heard, in order, repeats kept."""
        ids = [pending_commands.parse(p) for p in self.payloads]
        assert None not in ids, self.payloads
        return [i for group in ids if group is not None for i in group]

    async def settle(self) -> None:
        """Let notifications sent so far arrive (they follow a commit by microseconds)."""
        await asyncio.sleep(0.2)


@pytest.fixture
async def heard(db_url: str) -> AsyncIterator[Heard]:
    """A listener on CHANNEL for one test."""
    rec = Heard()
    conn = await asyncpg.connect(db_url)
    await conn.add_listener(pending_commands.CHANNEL, rec.callback)
    yield rec
    await conn.close()


async def test_a_queued_command_announces_its_meter_at_commit(
    pool: asyncpg.Pool, tenant_id: int, heard: Heard
) -> None:
    """Nothing while its transaction is open, nothing for one rolled back, the meter id
    once it commits."""
    meter = await a_meter(pool, tenant_id)
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await queue(conn, tenant_id, meter)
        await heard.settle()
        assert heard.meters() == []
        await tx.rollback()
        await heard.settle()
        assert heard.meters() == []
        await queue(conn, tenant_id, meter)
    await heard.settle()
    assert heard.meters() == [meter]


async def test_a_bulk_job_announces_each_meter_once_in_bounded_payloads(
    pool: asyncpg.Pool, tenant_id: int, heard: Heard
) -> None:
    """700 meters, one job: 3 payloads of at most 300 ids (within pg_notify's 8000 bytes),
    every meter exactly once."""
    prefix = f"{uuid.uuid4().int % 10**6:06d}"
    ids = await pool.fetch(
        "INSERT INTO meters (tenant_id, address, kind, format) SELECT $1,"
        " $2 || lpad(g::text, 8, '0'), 'water', 'cjt188' FROM generate_series(1, 700) g"
        " RETURNING meter_id",
        tenant_id,
        prefix,
    )
    async with pool.acquire() as conn:
        job, _ = await mailbox.bulk(
            conn,
            tenant_id=tenant_id,
            kind="valve",
            args={"action": "open"},
            selection={"query": {"address_prefix": prefix}},
            ttl_s=3600,
            created_by="test",
        )
    assert job.n_commands == 700
    await heard.settle()
    assert len(heard.payloads) == 3
    assert all(len(p.split(",")) <= 300 and len(p) < 8000 for p in heard.payloads)
    assert sorted(heard.meters()) == sorted(int(r["meter_id"]) for r in ids)


async def test_claims_answers_cancels_and_expiry_announce_nothing(
    pool: asyncpg.Pool, tenant_id: int, heard: Heard
) -> None:
    """Every other transition of the mailbox leaves or stays in PENDING: no notification
    (a meter leaves a view at its next load); a hand-written UPDATE back into `queued`
    does announce it."""
    meter = await a_meter(pool, tenant_id)
    async with pool.acquire() as conn:
        answered = await queue(conn, tenant_id, meter)
        await mailbox.claim(conn, meter_ids=[meter])
        await mailbox.claim(conn, meter_ids=[meter])  # sent again
        cancelled = await queue(conn, tenant_id, await a_meter(pool, tenant_id))
        await heard.settle()
        heard.payloads.clear()
        await mailbox.record_results(conn, meter, [DeviceResult(answered, True, {"di": "a017"})])
        await mailbox.cancel(conn, tenant_id, cancelled, "test")
        short = await queue(conn, tenant_id, meter)
        await heard.settle()
        heard.payloads.clear()
        await conn.execute(
            "UPDATE commands SET created_at = now() - interval '2 hours',"
            " expires_at = now() - interval '1 hour' WHERE command_id = $1",
            short,
        )
        assert await mailbox.expire_due(conn, tenant_id) == 1
        await heard.settle()
        assert heard.payloads == []
        await conn.execute(
            "UPDATE commands SET state = 'queued', finished_at = NULL, reason = NULL"
            " WHERE command_id = $1",
            cancelled,
        )
    await heard.settle()
    assert heard.payloads == [str(await pool.fetchval(
        "SELECT meter_id FROM commands WHERE command_id = $1", cancelled
    ))]  # fmt: skip


async def test_the_load_finds_every_pending_meter_and_refuses_past_its_limit(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """Queued and sent commands' meters are in the load, answered ones' are not; a limit
    below the count gives None."""
    queued, sent, done = [await a_meter(pool, tenant_id) for _ in range(3)]
    async with pool.acquire() as conn:
        await queue(conn, tenant_id, queued)
        await queue(conn, tenant_id, sent)
        answered = await queue(conn, tenant_id, done)
        await mailbox.claim(conn, meter_ids=[sent, done])
        await mailbox.record_results(conn, done, [DeviceResult(answered, True, {})])
        found = await pending_commands.meters(conn, 10**6)
        assert found is not None
        assert {queued, sent} <= set(found)
        assert done not in found
        assert len(found) == len(set(found))
        assert await pending_commands.meters(conn, len(found)) is not None
        assert await pending_commands.meters(conn, len(found) - 1) is None


def test_parse_reads_meter_ids_and_refuses_anything_else() -> None:
    """A payload is meter ids, comma-separated; anything else is None."""
    assert pending_commands.parse("7") == [7]
    assert pending_commands.parse("1,22,333") == [1, 22, 333]
    assert pending_commands.parse("") is None
    assert pending_commands.parse("1,,2") is None
    assert pending_commands.parse('{"meter_id": 1}') is None
