"""Collector fixtures: a real Mosquitto (the stack's, or one started from our template),
an in-process collector on free ports, lab/OSCORE/MQTT devices, CJ/T 188 frames.

Broker: when NBMETER_MQTT_URL and NBMETER_MQTT_ADMIN_URL are set (the stack's broker,
`eval $(nbmeter stack env)`), they are used; otherwise the session starts Mosquitto
from `nbmeter/stack/mosquitto.conf` on a free loopback port in a temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
from brokerkit import Broker, free_port
from collector_testkit import RawCoap, cjt188_frame
from dbkit import new_tenant

from collector.main import run
from collector.settings import (
    AnalyticsSettings,
    CoapSettings,
    CollectorSettings,
    MqttSettings,
    PipelineSettings,
    WebhookSettings,
)
from devices.provision import ProvisionedDevice, provision_device
from storage.credentials import new_key

__all__ = ["Broker", "cjt188_frame", "free_port"]


@pytest.fixture(scope="session")
def credentials_key() -> str:
    """The key that seals OSCORE secrets (the stack's, or a fresh one)."""
    return os.environ.get("NBMETER_CREDENTIALS_KEY") or new_key()


def collector_settings(
    db_url: str, broker: Broker, key: str, **pipeline: object
) -> CollectorSettings:
    """Settings for an in-process collector on a free UDP port, metrics off."""
    return CollectorSettings(
        database_url=db_url,
        mqtt_url=broker.url,
        credentials_key=key,  # type: ignore[arg-type]
        metrics_port=0,
        coap=CoapSettings(host="127.0.0.1", port=free_port(socket.SOCK_DGRAM), ack_wait_s=10),
        # a share group of its own, and a short session expiry: the persistent sessions of
        # earlier runs' collectors stay subscribed on the shared broker and would take
        # their share of this run's messages
        mqtt=MqttSettings(
            client_id=f"test-collector-{uuid.uuid4().hex[:8]}",
            share_group=f"test-{uuid.uuid4().hex[:8]}",
            session_expiry_s=300,
        ),
        pipeline=PipelineSettings(**pipeline),  # type: ignore[arg-type]
        # the webhook tests run dispatchers of their own, whose timing they control
        webhooks=WebhookSettings(enabled=False),
        analytics=AnalyticsSettings(enabled=False),  # the analytics tests run it themselves
    )


@dataclass
class RunningCollector:
    """An in-process collector: its settings and the event that stops it."""

    settings: CollectorSettings
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def coap_port(self) -> int:
        """The UDP port it serves CoAP on."""
        return self.settings.coap.port


@pytest.fixture(scope="session")
async def collector(
    db_url: str, broker: Broker, credentials_key: str
) -> AsyncIterator[RunningCollector]:
    """One collector for the session (tests use their own tenants, so they never collide)."""
    async with running(collector_settings(db_url, broker, credentials_key)) as collector:
        yield collector


@contextlib.asynccontextmanager
async def running(settings: CollectorSettings) -> AsyncIterator[RunningCollector]:
    """An in-process collector with `settings`, started, then stopped (drained)."""
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(settings, stop=stop, started=started))
    await asyncio.wait_for(started.wait(), 20)
    yield RunningCollector(settings, stop, task)
    stop.set()
    await asyncio.wait_for(task, 40)


@pytest.fixture
async def raw(collector: RunningCollector) -> RawCoap:
    """A raw-UDP CoAP client pointed at the session's collector."""
    client = await RawCoap.open(collector.coap_port)
    yield client  # type: ignore[misc]
    client.close()


@pytest.fixture
async def tenant_slug(pool: asyncpg.Pool) -> str:
    """A tenant of its own for one test, plain CoAP NOT allowed."""
    return await new_tenant(pool, "t")


@pytest.fixture
async def lab_tenant(pool: asyncpg.Pool) -> str:
    """A lab tenant (allow_plain_coap) of its own for one test; returns its slug."""
    return await new_tenant(pool, "lab", plain_coap=True)


def new_address() -> str:
    """A fresh 14-digit CJ/T 188 meter address."""
    return f"{uuid.uuid4().int % 10**14:014d}"


async def add_meter(pool: asyncpg.Pool, slug: str, address: str) -> int:
    """Create meter `address` in tenant `slug`; return its meter_id."""
    return int(
        await pool.fetchval(
            "INSERT INTO meters (tenant_id, address, kind, format) SELECT tenant_id, $2,"
            " 'water', 'cjt188' FROM tenants WHERE slug = $1 RETURNING meter_id",
            slug,
            address,
        )
    )


@pytest.fixture
async def device(
    db_url: str, tenant_slug: str, broker: Broker, credentials_key: str
) -> ProvisionedDevice:
    """A provisioned meter (OSCORE context and MQTT account) in its own tenant."""
    return await provision_device(
        db_url,
        tenant_slug,
        new_address(),
        credentials_key=credentials_key,
        mqtt_admin_url=broker.admin_url,
    )


@pytest.fixture
async def own_broker_device(
    db_url: str, tenant_slug: str, own_broker: Broker, credentials_key: str
) -> ProvisionedDevice:
    """A provisioned meter whose MQTT account is on the session's own broker (`own_broker`)."""
    return await provision_device(
        db_url,
        tenant_slug,
        new_address(),
        credentials_key=credentials_key,
        mqtt_admin_url=own_broker.admin_url,
    )


async def count(pool: asyncpg.Pool, sql: str, *args: object) -> int:
    """SELECT count(*) helper."""
    return int(await pool.fetchval(sql, *args))


async def wait_count(
    pool: asyncpg.Pool, want: int, sql: str, *args: object, within_s: float = 15
) -> int:
    """Poll `sql` (a count) until it reaches `want` or `within_s` passes; return the last."""
    deadline = time.monotonic() + within_s
    got = await count(pool, sql, *args)
    while got < want and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        got = await count(pool, sql, *args)
    return got
