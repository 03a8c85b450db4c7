"""Webhooks end to end against a real HTTP receiver: signature, retries with exactly-once
by event id, kill -9 of the dispatcher, disabled endpoints, replay, filters."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from webhook_receiver import FAST, KEY, KEY_TEXT, Receiver, dispatching, start_receiver

from collector.webhooks import (
    EVENT_HEADER,
    NO_SECRET,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    backoff,
    sign,
    verify,
)
from storage import alarms
from storage import webhooks as hooks
from storage.credentials import new_key, parse_key
from storage.events import write_events
from storage.rows import EventRow

REPO = Path(__file__).parents[2]


@pytest.fixture
async def receiver(pool: asyncpg.Pool) -> AsyncIterator[Receiver]:
    """A receiver for one test; afterwards every endpoint is switched off, so the next
    test's dispatcher does not retry towards a receiver that is gone."""
    r = start_receiver()
    yield r
    r.close()
    await pool.execute("UPDATE webhook_endpoints SET enabled = false")


async def _tenant(pool: asyncpg.Pool) -> int:
    slug = f"w-{uuid.uuid4().hex[:12]}"
    tenant: int = await pool.fetchval(
        "INSERT INTO tenants (slug, name) VALUES ($1, $1) RETURNING tenant_id", slug
    )
    return tenant


async def _raise(pool: asyncpg.Pool, tenant: int, n: int, kind: str = "leak") -> list[int]:
    """n meters of the tenant, each raising one `kind` alarm, committed as the collector does."""
    meters = []
    async with pool.acquire() as conn, conn.transaction():
        for _ in range(n):
            m = await conn.fetchval(
                "INSERT INTO meters (tenant_id, address, kind, format)"
                " VALUES ($1, $2, 'water', 'cjt188') RETURNING meter_id",
                tenant,
                uuid.uuid4().hex[:14],
            )
            meters.append(m)
        now = datetime.now(UTC)
        await write_events(conn, [EventRow(m, now, kind, now) for m in meters])
    return meters


async def _events_of(pool: asyncpg.Pool, tenant: int) -> set[str]:
    rows = await pool.fetch("SELECT event_id::text FROM alarm_events WHERE tenant_id = $1", tenant)
    return {r["event_id"] for r in rows}


async def test_a_replay_asked_while_its_delivery_is_in_flight_is_kept(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """Replay an event whose delivery is leased and under way: the attempt's success is
    logged but does not mark the row delivered, so the replay still goes out."""
    tenant = await _tenant(pool)
    endpoint, _ = await hooks.create_endpoint(pool, tenant, receiver.url, key=KEY)
    eid = endpoint["endpoint_id"]
    await _raise(pool, tenant, 1)
    (leased,) = [c for c in await hooks.claim(pool, 100, 30.0, KEY) if c.endpoint_id == eid]
    assert await hooks.replay(pool, tenant, eid, event_ids=[leased.event_id]) == 1
    now = datetime.now(UTC)
    done = hooks.Attempt(leased.event_id, eid, leased.attempt, now, True, 200, None, 5, None)
    await hooks.record(
        pool, [done], max_attempts=5, disable_after_failures=10, disable_after_s=60.0
    )
    row = await pool.fetchrow(
        "SELECT state, lease_until FROM webhook_outbox WHERE event_id = $1::uuid"
        " AND endpoint_id = $2",
        leased.event_id,
        eid,
    )
    assert (row["state"], row["lease_until"]) == ("pending", None)
    logged = await pool.fetchval(
        "SELECT count(*) FROM webhook_deliveries WHERE event_id = $1::uuid AND ok",
        leased.event_id,
    )
    assert logged == 1
    (again,) = [c for c in await hooks.claim(pool, 100, 30.0, KEY) if c.endpoint_id == eid]
    assert again.event_id == leased.event_id


def test_sign_and_backoff() -> None:
    """The signature covers timestamp and body; backoff doubles, caps and jitters upward."""
    sig = sign("s" * 32, 1_700_000_000, b'{"a":1}')
    assert verify("s" * 32, "1700000000", b'{"a":1}', sig, now=1_700_000_010)
    assert not verify("s" * 32, "1700000001", b'{"a":1}', sig, now=1_700_000_010)
    assert not verify("s" * 32, "1700000000", b'{"a":2}', sig, now=1_700_000_010)
    assert not verify("s" * 32, "1700000000", b'{"a":1}', sig, now=1_700_001_000)  # stale
    assert [backoff(a, 1.0, 60.0, lambda: 1.0) for a in (1, 2, 3, 8)] == [1, 2, 4, 60]
    assert [backoff(a, 1.0, 60.0, lambda: 0.0) for a in (1, 2, 3)] == [0.5, 1, 2]


@pytest.mark.parametrize(("state", "outcome"), list(hooks.OUTBOX_TRANSITIONS))
def test_outbox_transitions_are_data(state: str, outcome: str) -> None:
    """Every outbox edge leads to a state the table's CHECK allows."""
    assert hooks.OUTBOX_TRANSITIONS[(state, outcome)] in {"pending", "delivered", "dead"}


async def test_signature_verifies_at_the_receiver(
    pool: asyncpg.Pool, db_url: str, receiver: Receiver
) -> None:
    """A raised alarm arrives signed; the receiver verifies it with the endpoint's secret."""
    tenant = await _tenant(pool)
    _, secret = await hooks.create_endpoint(pool, tenant, receiver.url, key=KEY)
    [meter] = await _raise(pool, tenant, 1, "burst")
    async with dispatching(pool, db_url):
        [event_id] = await receiver.wait_for(1)
    got = receiver.seen[0]
    headers = {k.lower(): v for k, v in got.headers.items()}
    assert verify(secret, headers[TIMESTAMP_HEADER.lower()], got.body,
                  headers[SIGNATURE_HEADER.lower()], now=time.time())  # fmt: skip
    assert not verify("x" * 32, headers[TIMESTAMP_HEADER.lower()], got.body,
                      headers[SIGNATURE_HEADER.lower()], now=time.time())  # fmt: skip
    body = json.loads(got.body)
    assert body["id"] == event_id == headers[EVENT_HEADER.lower()]
    assert (body["type"], body["data"]["kind"], body["data"]["meter_id"]) == (
        "alarm.opened", "burst", meter,
    )  # fmt: skip
    assert body["data"]["severity"] == "critical"


async def test_receiver_failing_three_times_gets_every_event_once(
    pool: asyncpg.Pool, db_url: str, receiver: Receiver
) -> None:
    """Three 500s, then recovery: every event is accepted exactly once (by event id), the
    failures are in the delivery log, and the endpoint is healthy again."""
    tenant = await _tenant(pool)
    endpoint, _ = await hooks.create_endpoint(pool, tenant, receiver.url, key=KEY)
    receiver.fail_first = 3
    await _raise(pool, tenant, 6)
    async with dispatching(pool, db_url):
        await receiver.wait_for(6)
        await asyncio.sleep(0.3)  # anything delivered twice would arrive meanwhile
    accepted = Counter(receiver.delivered())
    assert set(accepted) == await _events_of(pool, tenant)
    assert set(accepted.values()) == {1}
    log = await hooks.deliveries(pool, tenant, endpoint["endpoint_id"])
    assert sum(not r["ok"] for r in log) == 3
    assert {r["status_code"] for r in log if not r["ok"]} == {500}
    state = await hooks.get_endpoint(pool, tenant, endpoint["endpoint_id"])
    assert (state["enabled"], state["failures"]) == (True, 0)
    pending = await pool.fetchval(
        "SELECT count(*) FROM webhook_outbox WHERE endpoint_id = $1 AND state <> 'delivered'",
        endpoint["endpoint_id"],
    )
    assert pending == 0


async def test_kill_9_of_the_dispatcher_loses_no_event(
    pool: asyncpg.Pool, db_url: str, receiver: Receiver
) -> None:
    """A dispatcher process killed (SIGKILL) while it holds leases: a second one delivers
    every event after the lease runs out (at least once; ids cover every event)."""
    tenant = await _tenant(pool)
    await hooks.create_endpoint(pool, tenant, receiver.url, key=KEY)
    receiver.hang_s = 3.0  # the first process is mid-request when it dies
    env = {
        **os.environ,
        "NBMETER_DATABASE_URL": db_url,
        "NBMETER_WEBHOOKS__LEASE_S": "1",
        "NBMETER_WEBHOOKS__POLL_S": "0.1",
        "NBMETER_LOG_JSON": "true",
        "NBMETER_CREDENTIALS_KEY": KEY_TEXT,
    }
    first = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "collector.webhooks", cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await _raise(pool, tenant, 5)
        deadline = time.monotonic() + 15
        while not await pool.fetchval(
            "SELECT count(*) FROM webhook_outbox o JOIN alarm_events e USING (event_id)"
            " WHERE e.tenant_id = $1 AND o.lease_until IS NOT NULL",
            tenant,
        ):
            assert time.monotonic() < deadline, "the first dispatcher never claimed a row"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # its requests are in flight at the receiver
        first.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(first.wait(), 10) == -signal.SIGKILL
    finally:
        if first.returncode is None:
            first.kill()
    assert receiver.delivered() == []  # nothing was answered before the kill
    receiver.hang_s = 0.0
    async with dispatching(pool, db_url):
        await receiver.wait_for(5)
    assert set(receiver.delivered()) == await _events_of(pool, tenant)
    states = await pool.fetch(
        "SELECT state FROM webhook_outbox o JOIN alarm_events e USING (event_id)"
        " WHERE e.tenant_id = $1",
        tenant,
    )
    assert {r["state"] for r in states} == {"delivered"}


async def test_sustained_failure_disables_then_enable_and_replay(
    pool: asyncpg.Pool, db_url: str, receiver: Receiver
) -> None:
    """An endpoint failing `disable_after_failures` times is disabled with its reason; while
    off it is not called; enable delivers what waited; replay sends an event again."""
    tenant = await _tenant(pool)
    endpoint, _ = await hooks.create_endpoint(pool, tenant, receiver.url, key=KEY)
    eid = endpoint["endpoint_id"]
    receiver.always_fail = True
    strict = FAST.model_copy(update={"disable_after_failures": 3, "disable_after_s": 0.0})
    await _raise(pool, tenant, 1)
    async with dispatching(pool, db_url, strict):
        deadline = time.monotonic() + 15
        while (await hooks.get_endpoint(pool, tenant, eid))["enabled"]:
            assert time.monotonic() < deadline, "endpoint never disabled"
            await asyncio.sleep(0.05)
        off = await hooks.get_endpoint(pool, tenant, eid)
        assert off["disabled_at"] is not None
        assert "consecutive failed deliveries" in off["disabled_reason"]
        assert "HTTP 500" in off["disabled_reason"]
        calls = len(receiver.seen)
        await _raise(pool, tenant, 1)  # raised while disabled: no outbox row
        await asyncio.sleep(0.5)
        assert len(receiver.seen) == calls  # a disabled endpoint is not called
        receiver.always_fail = False
        await hooks.enable(pool, tenant, eid)
        first = await receiver.wait_for(1)
        assert len(first) == 1
        # replay since the start: both events (the one raised while off too)
        assert (
            await hooks.replay(pool, tenant, eid, since=datetime.now(UTC) - timedelta(hours=1)) == 2
        )
        again = await receiver.wait_for(3)
    assert set(again) == await _events_of(pool, tenant)
    assert Counter(again)[first[0]] == 2  # replayed: the same stable event id


async def test_filters_and_ack_events(pool: asyncpg.Pool, db_url: str, receiver: Receiver) -> None:
    """kinds / event types / min severity filter per endpoint; an acknowledge is an event."""
    tenant = await _tenant(pool)
    other = start_receiver()
    try:
        await hooks.create_endpoint(pool, tenant, receiver.url, key=KEY, kinds=["burst"])
        await hooks.create_endpoint(
            pool,
            tenant,
            other.url,
            key=KEY,
            event_types=["alarm.acknowledged"],
            min_severity="major",
        )
        [leak_meter] = await _raise(pool, tenant, 1, "leak")
        await _raise(pool, tenant, 1, "burst")
        await _raise(pool, tenant, 1, "low_battery")
        [leak] = await alarms.list_alarms(pool, tenant, meter_id=leak_meter)
        await alarms.transition(pool, tenant, leak["alarm_id"], "acknowledge", key_id=None)
        async with dispatching(pool, db_url):
            await receiver.wait_for(1)
            await other.wait_for(1)
            await asyncio.sleep(0.3)
        assert [json.loads(r.body)["data"]["kind"] for r in receiver.seen] == ["burst"]
        [acked] = [json.loads(r.body) for r in other.seen]
        assert (acked["type"], acked["data"]["kind"]) == ("alarm.acknowledged", "leak")
    finally:
        other.close()


async def test_secrets_sealed_clear_ones_sealed_at_start_wrong_key_never_sends(
    pool: asyncpg.Pool, db_url: str, receiver: Receiver
) -> None:
    """A new endpoint's secret is stored sealed, bound to its row; a dispatcher with another
    credentials key sends nothing unsigned (the attempt fails with the reason in the log);
    a row from before 0045 with a clear secret is sealed when a dispatcher with the key
    starts, and its events still verify with that secret."""
    tenant = await _tenant(pool)
    endpoint, secret = await hooks.create_endpoint(pool, tenant, receiver.url, key=KEY)
    eid = endpoint["endpoint_id"]
    row = await pool.fetchrow(
        "SELECT secret, secret_sealed FROM webhook_endpoints WHERE endpoint_id = $1", eid
    )
    assert row["secret"] is None
    assert secret.encode() not in bytes(row["secret_sealed"])
    assert hooks.open_secret(KEY, eid, row["secret_sealed"]) == secret
    assert hooks.open_secret(KEY, eid + 1, row["secret_sealed"]) is None  # bound to its row

    await _raise(pool, tenant, 1, "burst")
    async with dispatching(pool, db_url, key=parse_key(new_key())):
        deadline = time.monotonic() + 10
        while not (log := await hooks.deliveries(pool, tenant, eid)):
            assert time.monotonic() < deadline, "no attempt recorded"
            await asyncio.sleep(0.05)
    assert receiver.seen == []  # never sent unsigned
    assert (log[0]["ok"], log[0]["error"]) == (False, NO_SECRET)
    await hooks.delete_endpoint(pool, tenant, eid)

    legacy = "legacy-clear-secret-0123456789"
    old = await pool.fetchval(
        "INSERT INTO webhook_endpoints (tenant_id, url, secret) VALUES ($1, $2, $3)"
        " RETURNING endpoint_id",
        tenant, receiver.url, legacy,
    )  # fmt: skip
    await _raise(pool, tenant, 1, "leak")
    async with dispatching(pool, db_url):
        [event_id] = await receiver.wait_for(1)
    stored = await pool.fetchrow(
        "SELECT secret, secret_sealed FROM webhook_endpoints WHERE endpoint_id = $1", old
    )
    assert stored["secret"] is None
    assert hooks.open_secret(KEY, old, stored["secret_sealed"]) == legacy
    [got] = receiver.seen
    headers = {k.lower(): v for k, v in got.headers.items()}
    assert headers[EVENT_HEADER.lower()] == event_id
    assert verify(legacy, headers[TIMESTAMP_HEADER.lower()], got.body,
                  headers[SIGNATURE_HEADER.lower()], now=time.time())  # fmt: skip
