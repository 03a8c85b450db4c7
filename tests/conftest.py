"""Shared fixtures: the real stack (TimescaleDB + Mosquitto) that `nbmeter stack up` starts.

`make test` exports NBMETER_DATABASE_URL and NBMETER_MQTT_URL. Each test session gets a
fresh database on that server, migrated from scratch, and drops it at the end, so runs
never see each other's rows. Tests that need the stack request `db_url`, `pool` or
`mqtt_url`; pure tests (the decoders) need nothing running.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import uvloop
from brokerkit import Broker, free_port, start_broker
from dbkit import migrated_database
from hypothesis import settings

from devices.broker import ensure_collector_acls, prepare_broker_files

# CI replays the same examples on every run, so a landing gate is never a lottery; local
# runs keep exploring new examples (and keep what they find in .hypothesis/)
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")

_HOW = "run the suite with `make test`, or `eval $(nbmeter stack env)` after `nbmeter stack up`"


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: {_HOW}", pytrace=False)
    return value


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every test on uvloop's loop: the loop the collector and the API run on
    (`collector.main`, uvicorn)."""
    del config, item
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def server_url() -> str:
    """URL of the stack's TimescaleDB server (its default database)."""
    return _env("NBMETER_DATABASE_URL")


@pytest.fixture(scope="session")
async def db_url(server_url: str) -> AsyncIterator[str]:
    """A fresh database on the stack's server with every migration applied."""
    async with migrated_database(server_url) as url:
        yield url


@pytest.fixture(scope="session")
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    """An asyncpg pool on the session's migrated database."""
    async with asyncpg.create_pool(db_url, min_size=1, max_size=8) as p:
        yield p


@pytest.fixture
async def tenant_id(pool: asyncpg.Pool) -> int:
    """A new tenant of its own for one test (so tests never share meters)."""
    slug = f"t-{uuid.uuid4().hex[:12]}"
    value: int = await pool.fetchval(
        "INSERT INTO tenants (slug, name) VALUES ($1, $2) RETURNING tenant_id", slug, slug
    )
    return value


@pytest.fixture(scope="session")
def mqtt_url() -> str:
    """URL of the stack's Mosquitto broker."""
    return _env("NBMETER_MQTT_URL")


def _own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    state = tmp_path_factory.mktemp("mosquitto")
    port, tls_port = free_port(), free_port()
    env = prepare_broker_files(state, port)
    proc = start_broker(state, port, tls_port)
    yield Broker(
        env["NBMETER_MQTT_URL"], env["NBMETER_MQTT_ADMIN_URL"], port, tls_port, state / "tls/ca.crt"
    )
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The stack's broker (NBMETER_MQTT_URL + NBMETER_MQTT_ADMIN_URL) or our own."""
    url, admin = os.environ.get("NBMETER_MQTT_URL"), os.environ.get("NBMETER_MQTT_ADMIN_URL")
    if url and admin:
        # a broker state from before the collector's control topics gets their ACLs, live
        ensure_collector_acls(admin)
        tls_url, ca = os.environ.get("NBMETER_MQTTS_URL"), os.environ.get("NBMETER_MQTT__CA_FILE")
        tls_port = urlsplit(tls_url).port if tls_url else None
        yield Broker(url, admin, int(url.rsplit(":", 1)[1]), tls_port, Path(ca) if ca else None)
        return
    yield from _own_broker(tmp_path_factory)


@pytest.fixture(scope="session")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A Mosquitto of this session's own (plain and TLS listeners, its own CA), from the
    project's template: for tests that stop collectors or need a listener the stack's
    broker may not have yet."""
    yield from _own_broker(tmp_path_factory)
