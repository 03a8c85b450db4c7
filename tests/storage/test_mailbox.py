"""The downlink mailbox on the real database: every edge of its state machine, idempotency
keys, supersede, per-meter order, TTL expiry, bulk jobs, and answers only from the meter
the command was for."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid

import asyncpg
import pytest
from dbkit import queue_command

from decoder.commands import DeviceResult
from storage import mailbox
from storage.command_states import STATES, TRANSITIONS, may_move, sources
from storage.mailbox import (
    IdempotencyConflictError,
    InvalidCommandError,
    NoSuchMeterError,
    NotCancellableError,
)


async def a_meter(pool: asyncpg.Pool, tenant_id: int, fmt: str = "cjt188") -> int:
    """A new active meter of the tenant; its id."""
    address = f"{uuid.uuid4().int % 10**14:014d}"
    return int(
        await pool.fetchval(
            "INSERT INTO meters (tenant_id, address, kind, format) VALUES ($1, $2, 'water', $3)"
            " RETURNING meter_id",
            tenant_id,
            address,
            fmt,
        )
    )


async def queue(
    pool: asyncpg.Pool,
    tenant_id: int,
    meter_id: int,
    kind: str = "valve",
    args: dict[str, object] | None = None,
    ttl_s: int = 3600,
    key: str | None = None,
) -> mailbox.Command:
    """Queue one command (valve close by default)."""
    return await queue_command(
        pool, meter_id, tenant_id=tenant_id, kind=kind, args=args, ttl_s=ttl_s, key=key
    )


async def state_of(pool: asyncpg.Pool, command_id: int) -> tuple[str, str | None, int]:
    """(state, reason, attempts) of a command."""
    row = await pool.fetchrow(
        "SELECT state, reason, attempts FROM commands WHERE command_id = $1", command_id
    )
    return row["state"], row["reason"], row["attempts"]


async def to_state(pool: asyncpg.Pool, tenant_id: int, meter_id: int, state: str) -> int:
    """A command of the meter brought to `state` along allowed edges; its id."""
    cmd = await queue(pool, tenant_id, meter_id, kind="clock", args={})
    cid = cmd.command_id
    if state == "queued":
        return cid
    if state == "cancelled":
        async with pool.acquire() as conn:
            await mailbox.cancel(conn, tenant_id, cid, "test")
        return cid
    if state == "expired":
        await pool.execute(
            "UPDATE commands SET expires_at = created_at + interval '1 microsecond'"
            " WHERE command_id = $1",
            cid,
        )
        await mailbox.claim(pool, meter_ids=[meter_id])  # expired ones are never handed out
        await pool.execute(
            "UPDATE commands SET sent_at = now(), state = 'sent',"
            " finished_at = NULL WHERE command_id = $1",
            cid,
        )
        await mailbox.expire_due(pool, tenant_id)
        return cid
    await mailbox.claim(pool, meter_ids=[meter_id])
    if state in ("acknowledged", "failed"):
        await mailbox.record_results(pool, meter_id, [DeviceResult(cid, state == "acknowledged")])
    return cid


async def move(pool: asyncpg.Pool, tenant_id: int, meter_id: int, cid: int, new: str) -> None:
    """Try the mailbox operation that enters `new`."""
    if new == "sent":
        await mailbox.claim(pool, meter_ids=[meter_id])
    elif new == "cancelled":
        async with pool.acquire() as conn:
            with contextlib.suppress(NotCancellableError):
                await mailbox.cancel(conn, tenant_id, cid, "test")
    elif new == "expired":
        await pool.execute(
            "UPDATE commands SET expires_at = created_at + interval '1 microsecond'"
            " WHERE command_id = $1 AND expires_at > now()",
            cid,
        )
        await mailbox.expire_due(pool, tenant_id)
    elif new in ("acknowledged", "failed"):
        await mailbox.record_results(pool, meter_id, [DeviceResult(cid, new == "acknowledged")])
    elif new == "queued":
        pass  # nothing enters queued again


def test_sources_are_the_table_read_backwards() -> None:
    """sources(new) lists exactly the states whose allowed set holds `new`."""
    for new in STATES:
        expected = sorted(o for o in STATES if new in TRANSITIONS[o])
        if expected:
            assert sources(new) == expected
        else:
            with pytest.raises(ValueError, match="no command state"):
                sources(new)


@pytest.mark.parametrize(("old", "new"), list(itertools.product(STATES, repeat=2)))
async def test_every_edge_is_taken_exactly_when_the_table_allows_it(
    pool: asyncpg.Pool, tenant_id: int, old: str, new: str
) -> None:
    """From each state, the operation that enters each other state works iff it is an edge."""
    meter = await a_meter(pool, tenant_id)
    cid = await to_state(pool, tenant_id, meter, old)
    assert (await state_of(pool, cid))[0] == old
    before = (await state_of(pool, cid))[2]
    await move(pool, tenant_id, meter, cid, new)
    state, _, attempts = await state_of(pool, cid)
    if may_move(old, new):
        assert state == new
        if new == "sent":
            assert attempts == before + 1
    elif old != new:
        assert state == old


async def test_idempotency_key_returns_the_same_command(pool: asyncpg.Pool, tenant_id: int) -> None:
    """The same key and body answer the first command; another body with it is a conflict."""
    meter = await a_meter(pool, tenant_id)
    first = await queue(pool, tenant_id, meter, key="k-1")
    async with pool.acquire() as conn:
        again, created = await mailbox.create(
            conn,
            tenant_id=tenant_id,
            meter_id=meter,
            kind="valve",
            args={"action": "close"},
            ttl_s=60,
            created_by="x",
            idempotency_key="k-1",
        )
        assert (again.command_id, created) == (first.command_id, False)
        with pytest.raises(IdempotencyConflictError, match="k-1"):
            await mailbox.create(
                conn,
                tenant_id=tenant_id,
                meter_id=meter,
                kind="valve",
                args={"action": "open"},
                ttl_s=60,
                created_by="x",
                idempotency_key="k-1",
            )
    assert await pool.fetchval("SELECT count(*) FROM commands WHERE meter_id = $1", meter) == 1


async def test_a_later_command_supersedes_a_queued_one_not_a_sent_one(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """close then open while asleep: the close is cancelled `superseded_by=<open>`; a sent
    command (maybe executing) is left to its answer; other settings are untouched."""
    meter = await a_meter(pool, tenant_id)
    close = await queue(pool, tenant_id, meter)
    clock = await queue(pool, tenant_id, meter, kind="clock", args={})
    opened = await queue(pool, tenant_id, meter, args={"action": "open"})
    assert await state_of(pool, close.command_id) == (
        "cancelled",
        f"superseded_by={opened.command_id}",
        0,
    )
    assert (await state_of(pool, clock.command_id))[0] == "queued"
    await mailbox.claim(pool, meter_ids=[meter])  # clock and open are sent now
    again = await queue(pool, tenant_id, meter, args={"action": "close"})
    assert (await state_of(pool, opened.command_id))[0] == "sent"
    claimed = await mailbox.claim(pool, meter_ids=[meter])
    assert [c.pending.command_id for c in claimed] == [
        clock.command_id,
        opened.command_id,
        again.command_id,
    ]


async def test_per_meter_order_and_window_limit(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A meter's commands come in id order, at most MAX_PER_WINDOW per window."""
    meter = await a_meter(pool, tenant_id, "senml")
    ids = [
        (await queue(pool, tenant_id, meter, "reporting", {"interval_s": 60 * (i + 1)}))
        for i in range(mailbox.MAX_PER_WINDOW + 2)
    ]
    # each supersedes the one before: only the last stays queued
    assert [(await state_of(pool, c.command_id))[0] for c in ids].count("queued") == 1
    clocks = [await queue(pool, tenant_id, meter, "valve", {"action": a}) for a in ("close",)]
    claimed = await mailbox.claim(pool, meter_ids=[meter])
    assert [c.pending.command_id for c in claimed] == [ids[-1].command_id, clocks[0].command_id]
    many = await a_meter(pool, tenant_id, "senml")
    for kind, args in [
        ("valve", {"action": "open"}),
        ("clock", {}),
        ("reporting", {"interval_s": 600}),
    ] * 4:
        await pool.execute(
            "INSERT INTO commands (tenant_id, meter_id, kind, setting, args, created_by,"
            " expires_at) VALUES ($1, $2, $3, $3 || random(), $4::jsonb, 't',"
            " now() + interval '1h')",
            tenant_id,
            many,
            kind,
            json.dumps(args),
        )
    first = await mailbox.claim(pool, meter_ids=[many])
    assert len(first) == mailbox.MAX_PER_WINDOW
    ids_first = [c.pending.command_id for c in first]
    assert ids_first == sorted(ids_first)


async def test_a_read_goes_out_only_in_an_lwm2m_window(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A queued read (an LwM2M GET) is left alone by the /u and MQTT claim, which would put
    it in a JSON envelope the meter cannot act on; the LwM2M window takes it."""
    meter = await a_meter(pool, tenant_id, "senml")
    read_id = await pool.fetchval(
        "INSERT INTO commands (tenant_id, meter_id, kind, setting, args, created_by,"
        " expires_at) VALUES ($1, $2, 'read', 'read:/3/0/9', '{\"path\": \"/3/0/9\"}',"
        " 't', now() + interval '1h') RETURNING command_id",
        tenant_id,
        meter,
    )
    valve = await queue(pool, tenant_id, meter, "valve", {"action": "close"})
    plain = await mailbox.claim(pool, meter_ids=[meter])
    assert [c.pending.command_id for c in plain] == [valve.command_id]
    assert (await state_of(pool, read_id))[0] == "queued"
    window = await mailbox.claim(pool, meter_ids=[meter], lwm2m=True)  # the valve: again
    assert [(c.pending.command_id, c.pending.kind) for c in window] == [
        (read_id, "read"),
        (valve.command_id, "valve"),
    ]
    assert (await state_of(pool, read_id))[:2] == ("sent", None)


async def test_ttl_expiry_reports_whether_it_was_delivered(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """Past its TTL a command is never handed out and is expired with the reason saying
    whether it ever went out."""
    meter = await a_meter(pool, tenant_id)
    quiet = await queue(pool, tenant_id, meter, ttl_s=1)
    other = await a_meter(pool, tenant_id)
    sent = await queue(pool, tenant_id, other, ttl_s=1)
    await mailbox.claim(pool, meter_ids=[other])
    await asyncio.sleep(1.1)
    assert await mailbox.claim(pool, meter_ids=[meter, other]) == []
    listed = await mailbox.list_commands(pool, tenant_id, state="expired")
    reasons = {c.command_id: c.reason for c in listed}
    assert reasons == {
        quiet.command_id: "ttl_passed_undelivered",
        sent.command_id: "ttl_passed_unanswered",
    }


async def test_answers_count_only_for_the_meters_own_sent_commands(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """Another meter's command id is `unknown` and untouched; a repeat changes nothing."""
    mine, theirs = await a_meter(pool, tenant_id), await a_meter(pool, tenant_id)
    a = await queue(pool, tenant_id, mine)
    b = await queue(pool, tenant_id, theirs)
    await mailbox.claim(pool, meter_ids=[mine, theirs])
    got = await mailbox.record_results(
        pool, mine, [DeviceResult(a.command_id, True), DeviceResult(b.command_id, True)]
    )
    assert got == {a.command_id: "recorded", b.command_id: "unknown"}
    assert (await state_of(pool, b.command_id))[0] == "sent"
    again = await mailbox.record_results(pool, mine, [DeviceResult(a.command_id, False)])
    assert again == {a.command_id: "repeated"}
    assert await state_of(pool, a.command_id) == ("acknowledged", "device_confirmed", 1)


async def test_an_answer_with_a_nul_or_a_nan_is_recorded(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """A device's result holding a NUL character (in a value or a key) or a non-finite
    number, which jsonb cannot hold, is recorded with U+FFFD for the NUL and the number
    as text, not refused (refused, the answer would come again for ever)."""
    meter = await a_meter(pool, tenant_id)
    a = await queue(pool, tenant_id, meter)
    await mailbox.claim(pool, meter_ids=[meter])
    result = {"error": "jam\u0000med", "k\u0000": [float("nan"), float("-inf"), 1.5]}
    got = await mailbox.record_results(pool, meter, [DeviceResult(a.command_id, False, result)])
    assert got == {a.command_id: "recorded"}
    stored = await pool.fetchval("SELECT result FROM commands WHERE command_id = $1", a.command_id)
    assert json.loads(stored) == {"error": "jam\ufffdmed", "k\ufffd": ["NaN", "-Infinity", 1.5]}
    assert (await state_of(pool, a.command_id))[0] == "failed"


async def test_create_refuses_what_the_meter_cannot_take(
    pool: asyncpg.Pool, tenant_id: int
) -> None:
    """A CJ/T 188 meter has no reporting write; an M-Bus meter nothing; bad args say why."""
    cjt, mbus = await a_meter(pool, tenant_id), await a_meter(pool, tenant_id, "mbus")
    with pytest.raises(InvalidCommandError, match="cannot take a reporting"):
        await queue(pool, tenant_id, cjt, "reporting", {"interval_s": 600})
    with pytest.raises(InvalidCommandError, match="mbus meter cannot take a valve"):
        await queue(pool, tenant_id, mbus)
    with pytest.raises(InvalidCommandError, match="action must be"):
        await queue(pool, tenant_id, cjt, "valve", {"action": "half"})
    with pytest.raises(NoSuchMeterError):
        await queue(pool, tenant_id, 2**62)


async def test_bulk_job_by_list_and_by_query(pool: asyncpg.Pool, tenant_id: int) -> None:
    """A bulk close of a list, then of every gas... every cjt188 meter: one job each, counted
    per state; the second job supersedes the first job's queued commands; the same key
    returns the job; a meter that cannot take it is named."""
    meters = [await a_meter(pool, tenant_id) for _ in range(5)]
    async with pool.acquire() as conn:
        job, created = await mailbox.bulk(
            conn,
            tenant_id=tenant_id,
            kind="valve",
            args={"action": "close"},
            selection={"meter_ids": meters[:3]},
            ttl_s=600,
            created_by="t",
            idempotency_key="j1",
        )
        assert created
        assert job.n_commands == 3
        assert job.counts == {"queued": 3}
        same, created = await mailbox.bulk(
            conn,
            tenant_id=tenant_id,
            kind="valve",
            args={"action": "close"},
            selection={"meter_ids": meters[:3]},
            ttl_s=600,
            created_by="t",
            idempotency_key="j1",
        )
        assert (same.job_id, created) == (job.job_id, False)
        with pytest.raises(IdempotencyConflictError, match="j1"):
            await mailbox.bulk(
                conn,
                tenant_id=tenant_id,
                kind="valve",
                args={"action": "open"},
                selection={"meter_ids": meters[:3]},
                ttl_s=600,
                created_by="t",
                idempotency_key="j1",
            )
        second, _ = await mailbox.bulk(
            conn,
            tenant_id=tenant_id,
            kind="valve",
            args={"action": "open"},
            selection={"query": {"format": "cjt188"}},
            ttl_s=600,
            created_by="t",
        )
        assert second.n_commands == 5
        await a_meter(pool, tenant_id, "mbus")
        with pytest.raises(InvalidCommandError, match="1 selected meter"):
            await mailbox.bulk(
                conn,
                tenant_id=tenant_id,
                kind="valve",
                args={"action": "open"},
                selection={"query": {}},
                ttl_s=600,
                created_by="t",
            )
        with pytest.raises(InvalidCommandError, match="no active meter for meter_ids"):
            await mailbox.bulk(
                conn,
                tenant_id=tenant_id,
                kind="valve",
                args={"action": "open"},
                selection={"meter_ids": [2**62]},
                ttl_s=600,
                created_by="t",
            )
    first = await mailbox.get_job(pool, tenant_id, job.job_id)
    assert first is not None
    assert first.counts == {"cancelled": 3}
    await mailbox.claim(pool, meter_ids=meters[:2])
    latest = await mailbox.get_job(pool, tenant_id, second.job_id)
    assert latest is not None
    assert latest.counts == {"sent": 2, "queued": 3}
