"""Collector fault tests: a real collector subprocess under CoAP load, then kill -9,
a database outage, or SIGTERM. The invariant each time: every uplink that was answered
2.04 is stored (acknowledged ⊆ stored), and nothing is stored twice.

The database outage is modelled by a TCP proxy between the collector and PostgreSQL that
the test cuts (all connections reset, new ones refused) and later restores: to the
collector that is indistinguishable from PostgreSQL going away and coming back, and it
works against a shared development server the test may not stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "collector"))
from collector_testkit import CollectorProcess, RawCoap, cjt188_frame, hour
from dbkit import TcpProxy

pytestmark = pytest.mark.slow
OUTAGE_S = float(os.environ.get("NBMETER_E2E_OUTAGE_S", "30"))
# under load: an answer within 2 s, else 5.03 with Max-Age 1 (the load retries)
_ANSWER_FAST = {"NBMETER_COAP__ACK_WAIT_S": "2", "NBMETER_COAP__BUSY_MAX_AGE_S": "1"}


class Load:
    """Many concurrent devices posting distinct hourly readings over plain CoAP (CON)."""

    def __init__(self, slug: str, addresses: list[str], port: int) -> None:
        self.slug, self.addresses, self.port = slug, addresses, port
        self.acked: set[tuple[str, int]] = set()
        self.running = True

    async def device(self, address: str) -> None:
        """Post this meter's hours one after the other, retrying until answered 2.04."""
        client = await RawCoap.open(self.port)
        try:
            h = 0
            while self.running:
                try:
                    reply = await client.post(
                        cjt188_frame(address, 10_000 * (h + 1), hour(h)),
                        query=f"t={self.slug}",
                        timeout_s=4,
                    )
                except TimeoutError:
                    continue  # collector dead or stalled: the device retries later
                if reply.code_str == "2.04":
                    self.acked.add((address, hour(h)))
                    h += 1
                else:
                    await asyncio.sleep(0.2)  # 5.03: back off (Max-Age) and retry
        finally:
            client.close()

    @contextlib.asynccontextmanager
    async def running_on(self, port: int) -> AsyncIterator[None]:
        """Run the devices against `port` inside the block."""
        self.port, self.running = port, True
        tasks = [asyncio.create_task(self.device(a)) for a in self.addresses]
        try:
            yield
        finally:
            self.running = False
            await asyncio.gather(*tasks, return_exceptions=True)


async def _lab(pool: asyncpg.Pool, n: int) -> tuple[str, list[str]]:
    slug = f"e2e-{uuid.uuid4().hex[:10]}"
    tenant = await pool.fetchval(
        "INSERT INTO tenants (slug, name, allow_plain_coap) VALUES ($1, $1, true)"
        " RETURNING tenant_id",
        slug,
    )
    addresses = [f"{uuid.uuid4().int % 10**14:014d}" for _ in range(n)]
    for a in addresses:
        await pool.execute(
            "INSERT INTO meters (tenant_id, address, kind, format)"
            " VALUES ($1, $2, 'water', 'cjt188')",
            tenant,
            a,
        )
    return slug, addresses


async def _stored(pool: asyncpg.Pool, slug: str) -> list[tuple[str, int]]:
    rows = await pool.fetch(
        "SELECT m.address, extract(epoch FROM nbm_at(r.read_s))::bigint FROM readings r"
        " JOIN meters m USING (meter_id) JOIN tenants t USING (tenant_id) WHERE t.slug = $1",
        slug,
    )
    return [(r[0], int(r[1])) for r in rows]


async def _until(condition: object, limit_s: float = 30) -> None:
    for _ in range(int(limit_s * 20)):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)


async def test_kill_9_loses_no_acknowledged_reading(db_url: str, pool: asyncpg.Pool) -> None:
    """kill -9 under load: every reading answered 2.04 is stored, none twice; a restart
    on the same port carries on."""
    slug, addresses = await _lab(pool, 20)
    first = CollectorProcess(db_url, **_ANSWER_FAST)
    await first.start()
    load = Load(slug, addresses, first.port)
    async with load.running_on(first.port):
        await _until(lambda: len(load.acked) >= 200)
        first.signal(signal.SIGKILL)
        await first.wait()
        acked_at_kill = set(load.acked)
        second = CollectorProcess(db_url, **_ANSWER_FAST)
        second.port = first.port
        await second.start()
        await _until(lambda: len(load.acked) >= len(acked_at_kill) + 100)
    second.signal(signal.SIGTERM)
    assert await second.wait() == 0
    stored = await _stored(pool, slug)
    assert len(stored) == len(set(stored))
    assert acked_at_kill <= set(stored)
    assert load.acked <= set(stored)


async def test_database_outage_loses_nothing_and_recovers(db_url: str, pool: asyncpg.Pool) -> None:
    """PostgreSQL away (proxy cut) under load: acknowledged readings are all stored, and
    the same collector process acknowledges again once the database is back."""
    parts = urlsplit(db_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    via_proxy = urlunsplit(
        parts._replace(netloc=f"{parts.netloc.rsplit('@', 1)[0]}@127.0.0.1:{proxy.port}")
    )
    slug, addresses = await _lab(pool, 20)
    collector = CollectorProcess(via_proxy, **_ANSWER_FAST)
    await collector.start()
    load = Load(slug, addresses, collector.port)
    async with load.running_on(collector.port):
        await _until(lambda: len(load.acked) >= 100)
        await proxy.cut()
        before_outage = len(load.acked)
        await asyncio.sleep(OUTAGE_S)
        during = len(load.acked) - before_outage
        await proxy.start()
        await _until(lambda: len(load.acked) >= before_outage + during + 100, limit_s=60)
        after = len(load.acked) - before_outage - during
    collector.signal(signal.SIGTERM)
    assert await collector.wait() == 0
    assert after >= 100, "the collector did not recover without a restart"
    stored = await _stored(pool, slug)
    assert len(stored) == len(set(stored))
    assert load.acked <= set(stored)
    await proxy.cut()


async def test_sigterm_drains_before_exit(db_url: str, pool: asyncpg.Pool) -> None:
    """SIGTERM under load: the collector answers what it accepted, stores it, exits 0."""
    slug, addresses = await _lab(pool, 20)
    collector = CollectorProcess(db_url, **_ANSWER_FAST)
    await collector.start()
    load = Load(slug, addresses, collector.port)
    async with load.running_on(collector.port):
        await _until(lambda: len(load.acked) >= 200)
        collector.signal(signal.SIGTERM)
        code = await collector.wait()
    assert code == 0
    stored = await _stored(pool, slug)
    assert len(stored) == len(set(stored))
    assert load.acked <= set(stored)
