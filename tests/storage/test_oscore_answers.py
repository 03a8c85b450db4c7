"""OSCORE replay state on the real database (`storage.credentials.save_replay_windows`):
windows move forward only, each (kid, partial IV) is recorded once, and a pair recorded
by an earlier transaction comes back as a replay, while a pair twice in one batch does not.
"""

from __future__ import annotations

import uuid

import asyncpg

from storage import credentials

KEY = bytes(range(32))


async def oscore_meter(pool: asyncpg.Pool, tenant_id: int) -> tuple[int, bytes]:
    """A new meter with an OSCORE context; (meter_id, kid)."""
    address = f"{uuid.uuid4().int % 10**14:014d}"
    kid = uuid.uuid4().bytes[:6]
    async with pool.acquire() as conn:
        meter_id = int(
            await conn.fetchval(
                "INSERT INTO meters (tenant_id, address, kind, format)"
                " VALUES ($1, $2, 'water', 'interval') RETURNING meter_id",
                tenant_id,
                address,
            )
        )
        await credentials.store_oscore(
            conn,
            KEY,
            credentials.MeterRef(meter_id, tenant_id, address),
            kid=kid,
            sender_id=b"\x00",
            master_secret=bytes(16),
            master_salt=bytes(8),
        )
    return meter_id, kid


def commit(meter_id: int, kid: bytes, piv: int) -> credentials.OscoreCommit:
    """One committed uplink of partial IV `piv` (its window at `piv`, the bit below set)."""
    return (meter_id, piv, 1, piv, kid, "stored", "", "")


async def save(pool: asyncpg.Pool, rows: list[credentials.OscoreCommit]) -> set[tuple[bytes, int]]:
    """`save_replay_windows` in a transaction of its own."""
    async with pool.acquire() as conn, conn.transaction():
        return await credentials.save_replay_windows(conn, rows)


async def test_pairs_recorded_before_come_back_as_replays(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """New pairs: nothing back. A batch with two pairs recorded by an earlier transaction
    and one new pair given twice: exactly the two old pairs back, all three recorded."""
    meter_id, kid = await oscore_meter(pool, tenant_id)
    assert await save(pool, [commit(meter_id, kid, 5), commit(meter_id, kid, 6)]) == set()
    again = [commit(meter_id, kid, 5), commit(meter_id, kid, 7), commit(meter_id, kid, 7)]
    again.append(commit(meter_id, kid, 6))
    assert await save(pool, again) == {(kid, 5), (kid, 6)}
    recorded = await pool.fetchval("SELECT count(*) FROM oscore_answers WHERE kid = $1", kid)
    assert recorded == 3
    async with pool.acquire() as conn:
        assert await credentials.oscore_answer(conn, kid, 7) == ("stored", "", "")


async def test_windows_never_move_backwards(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A window saved at index 9 stays there when an older uplink's (index 4) commits later."""
    meter_id, kid = await oscore_meter(pool, tenant_id)
    await save(pool, [commit(meter_id, kid, 9)])
    await save(pool, [commit(meter_id, kid, 4)])
    index = await pool.fetchval(
        "SELECT oscore_replay_index FROM device_credentials WHERE meter_id = $1", meter_id
    )
    assert index == 9


async def test_window_updates_stay_on_their_page(pool: asyncpg.Pool, tenant_id: int) -> None:
    """Migration 0056: contexts provisioned one after the other leave room on their pages,
    so each one's window update is HOT (the row keeps its page, no index entry). One
    uplink per transaction, as a day's uplinks of one page's meters come: a committed
    update's old version is pruned when the page is next touched."""
    meters = [await oscore_meter(pool, tenant_id) for _ in range(120)]
    ids = [m for m, _ in meters]
    blocks = (
        "SELECT meter_id, (ctid::text::point)[0] FROM device_credentials WHERE meter_id = ANY($1)"
    )
    async with pool.acquire() as conn:
        before = dict(await conn.fetch(blocks, ids))
        options = await conn.fetchval(
            "SELECT reloptions FROM pg_class WHERE oid = 'device_credentials'::regclass"
        )
    assert "fillfactor=70" in options
    for m, kid in meters:
        assert await save(pool, [commit(m, kid, 3)]) == set()
    async with pool.acquire() as conn:
        after = dict(await conn.fetch(blocks, ids))
        windows = await conn.fetch(
            "SELECT oscore_replay_index FROM device_credentials WHERE meter_id = ANY($1)", ids
        )
    assert [w[0] for w in windows] == [3] * len(ids)
    assert after == before


async def test_a_removed_meters_context_is_not_loaded(pool: asyncpg.Pool, tenant_id: int) -> None:
    """`load_oscore_many` finds a meter's context with its meter's address and install
    time, and nothing once the meter is removed (its key id is then unknown)."""
    meter_id, kid = await oscore_meter(pool, tenant_id)
    async with pool.acquire() as conn:
        found, bad = await credentials.load_oscore_many(conn, KEY, [kid, b"\x7f"])
        assert list(found) == [kid]
        assert bad == []
        address, installed_s = await conn.fetchrow(
            "SELECT address, floor(extract(epoch FROM installed_at))::bigint FROM meters"
            " WHERE meter_id = $1",
            meter_id,
        )
        assert (found[kid].meter_id, found[kid].address) == (meter_id, address)
        assert found[kid].installed_s == installed_s
        await conn.execute("UPDATE meters SET removed_at = now() WHERE meter_id = $1", meter_id)
        assert await credentials.load_oscore_many(conn, KEY, [kid]) == ({}, [])
