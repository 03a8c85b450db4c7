"""LwM2M 1.1 on the collector's CoAP endpoint, against the real collector and database: an
LwM2M client written here with aiocoap (one socket that both sends its requests and
serves the server's Device Management requests, as a real client does)."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import asyncpg
import cbor2
import pytest
from aiocoap import resource
from aiocoap.credentials import CredentialsMap
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper
from aiocoap.transports.oscore import OSCOREAddress
from collector_testkit import DeviceOscore, OscoreMeter, RawCoap, mutated
from conftest import (
    Broker,
    RunningCollector,
    collector_settings,
    count,
    free_port,
    running,
    wait_count,
)
from dbkit import queue_command

from collector import metrics
from devices.provision import ProvisionedDevice

OBJECTS = b"</1/0>,</3/0>,</4/0>,</3306/0>,</3424/0>"


class Recorder(resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
    """A client resource: records each Write (PUT) / Execute (POST) and answers 2.04."""

    def __init__(
        self, path: str, seen: list[tuple[str, str, bytes]], secured: list[bool] | None = None
    ) -> None:
        super().__init__()
        self._path = path
        self._seen = seen
        self._secured = secured if secured is not None else []

    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        self._seen.append(("write", self._path, bytes(request.payload)))
        self._secured.append(isinstance(request.remote, OSCOREAddress))
        return aiocoap.Message(code=aiocoap.CHANGED)

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        self._seen.append(("execute", self._path, bytes(request.payload)))
        return aiocoap.Message(code=aiocoap.CHANGED)


class Readable(resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
    """A client resource that answers a Read (GET) with fixed content."""

    def __init__(self, content_format: int, payload: bytes) -> None:
        super().__init__()
        self._format = content_format
        self._payload = payload

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        del request
        return aiocoap.Message(content_format=self._format, payload=self._payload)


class MeterObject(resource.ObservableResource):  # type: ignore[misc]  # aiocoap is untyped
    """The client's /3424: a SenML CBOR pack of its register; `show` notifies observers."""

    def __init__(self) -> None:
        super().__init__()
        self.pack = b""
        self.observers: list[bytes] = []  # the token of each GET with Observe 0
        self.refuse = 0  # GETs to answer 5.03 first

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        if self.refuse:
            self.refuse -= 1
            return aiocoap.Message(code=aiocoap.SERVICE_UNAVAILABLE)
        # aiocoap renders each notification with the observing request again
        if request.opt.observe == 0 and request.token not in self.observers:
            self.observers.append(request.token)
        return aiocoap.Message(content_format=112, payload=self.pack)

    def show(self, t: int, m3: float) -> None:
        """The register is now `m3` at `t`: notify."""
        self.pack = cbor2.dumps([{-2: "/3424/0/", -3: t, 0: "1", 2: m3}])
        self.updated_state()


METER_OBJECT = cbor2.dumps([{-2: "/3424/0/", 0: "1", 2: 12.345}, {0: "3", 2: 2}])


class Client:
    """An LwM2M client: objects 1, 3, 3306 served on the socket it talks from."""

    def __init__(self, ctx: Any, server: str) -> None:
        self.ctx = ctx
        self.server = server
        self.seen: list[tuple[str, str, bytes]] = []
        self.port = 0

    @classmethod
    async def start(cls, port: int, meter: MeterObject | None = None) -> Client:
        """A client bound to a free loopback port, talking to the collector on `port`;
        with `meter`, its observable /3424."""
        site = resource.Site()
        if meter is not None:
            site.add_resource(["3424"], meter)
        client = cls(None, f"coap://127.0.0.1:{port}")
        client.port = free_port(socket.SOCK_DGRAM)
        for path in ("1/0/1", "1/0/8", "3/0/13", "3306/0/5850"):
            site.add_resource(path.split("/"), Recorder(path, client.seen))
        site.add_resource(["3", "0", "9"], Readable(0, b"87"))  # battery level, text/plain
        site.add_resource(["3424", "0"], Readable(112, METER_OBJECT))  # SenML CBOR
        client.ctx = await aiocoap.Context.create_server_context(
            site, bind=("127.0.0.1", client.port), transports=["udp6"]
        )
        return client

    async def call(
        self,
        code: aiocoap.Code,
        path: str,
        query: tuple[str, ...] = (),
        payload: bytes = b"",
        content_format: int | None = None,
    ) -> aiocoap.Message:
        """One CON request to the collector; its answer."""
        msg = aiocoap.Message(code=code, uri=f"{self.server}/{path}", payload=payload)
        msg.opt.uri_query = query
        if content_format is not None:
            msg.opt.content_format = content_format
        return await asyncio.wait_for(self.ctx.request(msg).response, 20)

    async def close(self) -> None:
        """Close the socket."""
        await self.ctx.shutdown()


async def lab_meter(pool: asyncpg.Pool, slug: str) -> tuple[int, str]:
    """A SenML water meter named by an IMEI endpoint in lab tenant `slug`."""
    ep = f"urn:imei:{uuid.uuid4().int % 10**15:015d}"
    meter_id = await pool.fetchval(
        "INSERT INTO meters (tenant_id, address, kind, format) SELECT tenant_id, $2, 'water',"
        " 'senml' FROM tenants WHERE slug = $1 RETURNING meter_id",
        slug,
        ep,
    )
    return int(meter_id), ep


@pytest.fixture
async def client(collector: RunningCollector) -> AsyncIterator[Client]:
    """An LwM2M client pointed at the session's collector."""
    c = await Client.start(collector.coap_port)
    yield c
    await c.close()


def code(msg: aiocoap.Message) -> str:
    """Dotted response code."""
    value = int(msg.code)
    return f"{value >> 5}.{value & 0x1F:02d}"


async def queue(pool: asyncpg.Pool, meter_id: int, kind: str, args: dict[str, Any]) -> int:
    """Put a command in the meter's mailbox; its id."""
    return (await queue_command(pool, meter_id, kind=kind, args=args, ttl_s=600)).command_id


async def test_register_send_update_deregister_with_queue_mode_delivery(
    pool: asyncpg.Pool, client: Client, lab_tenant: str
) -> None:
    """Register (Queue Mode) → Send stored as readings and health → commands queued while
    the client sleeps go out as Write/Execute on its Update and are acknowledged →
    De-register; afterwards Update and Send are refused."""
    meter_id, ep = await lab_meter(pool, lab_tenant)
    query = (f"ep={ep}", "lt=300", "lwm2m=1.1", "b=U", "Q")
    reg = await client.call(aiocoap.POST, "rd", query, OBJECTS)
    assert code(reg) == "2.01", reg.payload
    assert reg.opt.location_path[0] == "rd"
    reg_path = "/".join(reg.opt.location_path)
    row = await pool.fetchrow(
        "SELECT * FROM lwm2m_registrations WHERE registration_id = $1", reg.opt.location_path[1]
    )
    assert row["meter_id"] == meter_id
    assert (row["lifetime_s"], row["binding"], row["queue_mode"]) == (300, "U", True)
    assert row["peer"] == f"[::ffff:127.0.0.1]:{client.port}"  # where commands will go
    assert row["objects"] == OBJECTS.decode()

    t0 = (int(time.time()) // 3600 - 1) * 3600
    pack = cbor2.dumps(
        [
            {-2: "/3424/0/", -3: t0, 0: "1", 2: 12.345},
            {-2: "/3/0/", 0: "7", 2: 3600},
            {0: "9", 2: 87},
            {-2: "/4/0/", 0: "2", 2: -97},
            {0: "8", 2: 12345},
        ]
    )
    sent = await client.call(aiocoap.POST, "dp", payload=pack, content_format=112)
    assert code(sent) == "2.04", sent.payload
    reading = await pool.fetchrow("SELECT register_ml FROM readings WHERE meter_id = $1", meter_id)
    assert tuple(reading) == (12_345_000,)
    transport = await pool.fetchval(
        "SELECT transport FROM raw_uplinks WHERE meter_id = $1 AND outcome = 'stored'", meter_id
    )
    assert transport == 1  # plain CoAP, kept per uplink
    health = await pool.fetchrow(
        "SELECT battery_mv, rsrp_cdbm FROM device_health WHERE meter_id = $1", meter_id
    )
    assert tuple(health) == (3600, -9700)
    again = await client.call(aiocoap.POST, "dp", payload=pack, content_format=112)
    assert code(again) == "2.04"  # a duplicate: answered, stored once
    assert await count(pool, "SELECT count(*) FROM readings WHERE meter_id = $1", meter_id) == 1

    # nothing pending: the collector's pending view lets the update's window skip its claim
    skipped = metrics.COMMAND_CLAIMS_SKIPPED._value.get()
    assert code(await client.call(aiocoap.POST, reg_path)) == "2.04"
    for _ in range(50):
        if metrics.COMMAND_CLAIMS_SKIPPED._value.get() > skipped:
            break
        await asyncio.sleep(0.02)
    assert metrics.COMMAND_CLAIMS_SKIPPED._value.get() > skipped
    assert client.seen == []

    # the client sleeps: commands wait in the mailbox
    valve = await queue(pool, meter_id, "valve", {"action": "close"})
    interval = await queue(pool, meter_id, "reporting", {"interval_s": 600})
    await asyncio.sleep(0.5)
    assert client.seen == []
    update = await client.call(aiocoap.POST, reg_path)
    assert code(update) == "2.04"
    done = await wait_count(
        pool,
        2,
        "SELECT count(*) FROM commands WHERE meter_id = $1 AND state = 'acknowledged'",
        meter_id,
    )
    assert done == 2
    assert [(op, path) for op, path, _ in client.seen] == [
        ("write", "3306/0/5850"),
        ("write", "1/0/1"),
        ("execute", "1/0/8"),
    ]
    assert cbor2.loads(client.seen[0][2]) == [{-2: "/3306/0/5850", 4: False}]
    assert cbor2.loads(client.seen[1][2]) == [{-2: "/1/0/1", 2: 600}]
    rows = await pool.fetch(
        "SELECT command_id, attempts, result FROM commands WHERE meter_id = $1 ORDER BY 1",
        meter_id,
    )
    assert [(r["command_id"], r["attempts"]) for r in rows] == [(valve, 1), (interval, 1)]
    assert '"execute /1/0/8"' in rows[1]["result"]

    # a Send opens a window too
    client.seen.clear()
    clock = await queue(pool, meter_id, "clock", {})
    later = cbor2.dumps([{-2: "/3424/0/", -3: t0 + 3600, 0: "1", 2: 12.5}])
    assert code(await client.call(aiocoap.POST, "dp", payload=later, content_format=112)) == "2.04"
    sql = "SELECT count(*) FROM commands WHERE command_id = $1 AND state = 'acknowledged'"
    assert await wait_count(pool, 1, sql, clock) == 1
    assert [(op, path) for op, path, _ in client.seen] == [("write", "3/0/13")]

    bye = await client.call(aiocoap.DELETE, reg_path)
    assert code(bye) == "2.02"
    assert code(await client.call(aiocoap.POST, reg_path)) == "4.04"
    late = await client.call(aiocoap.POST, "dp", payload=pack, content_format=112)
    assert code(late) == "4.04"


async def test_clock_and_unfit_commands_and_expired_registration(
    pool: asyncpg.Pool, client: Client, lab_tenant: str
) -> None:
    """A clock set is a Write of /3/0/13 with the server's time; a valve command to a client
    without object 3306 fails unsent; an expired registration is ignored."""
    meter_id, ep = await lab_meter(pool, lab_tenant)
    clock = await queue(pool, meter_id, "clock", {})
    valve = await queue(pool, meter_id, "valve", {"action": "open"})
    before = int(time.time())
    reg = await client.call(
        aiocoap.POST, "rd", (f"ep={ep}", "lt=120", "lwm2m=1.1", "b=UQ"), b"</1/0>,</3/0>"
    )
    assert code(reg) == "2.01"
    sql = "SELECT count(*) FROM commands WHERE meter_id = $1 AND finished_at IS NOT NULL"
    assert await wait_count(pool, 2, sql, meter_id) == 2
    states = dict(
        await pool.fetch("SELECT command_id, state FROM commands WHERE meter_id = $1", meter_id)
    )
    assert states == {clock: "acknowledged", valve: "failed"}
    assert [(op, path) for op, path, _ in client.seen] == [("write", "3/0/13")]
    (record,) = cbor2.loads(client.seen[0][2])
    assert before <= record[2] <= time.time() + 1
    reason = await pool.fetchval("SELECT result FROM commands WHERE command_id = $1", valve)
    assert "no object 3306" in reason
    queue_mode = await pool.fetchval(
        "SELECT queue_mode FROM lwm2m_registrations WHERE meter_id = $1", meter_id
    )
    assert queue_mode is True  # LwM2M 1.0 style b=UQ

    await pool.execute(
        "UPDATE lwm2m_registrations SET expires_at = now() - interval '1 s',"
        " registered_at = now() - interval '1 h', updated_at = now() - interval '1 h'"
        " WHERE meter_id = $1",
        meter_id,
    )
    assert code(await client.call(aiocoap.POST, "/".join(reg.opt.location_path))) == "4.04"
    pack = b'[{"bn":"/3424/0/","n":"1","v":1.5}]'
    assert code(await client.call(aiocoap.POST, "dp", payload=pack, content_format=110)) == "4.04"


async def test_a_client_cannot_be_another_meter(
    pool: asyncpg.Pool,
    client: Client,
    lab_tenant: str,
    collector: RunningCollector,
    device: ProvisionedDevice,
) -> None:
    """Plain CoAP: an endpoint outside the lab tenants is refused, and a Send naming
    another meter is quarantined (4.03); OSCORE: only the context's own meter registers."""
    _, ep = await lab_meter(pool, lab_tenant)
    other_id, other = await lab_meter(pool, lab_tenant)
    refused = await client.call(aiocoap.POST, "rd", (f"ep={device.address}", "lwm2m=1.1"))
    assert code(refused) == "4.04"  # an OSCORE tenant's meter: not for plain CoAP
    reg = await client.call(aiocoap.POST, "rd", (f"ep={ep}", "lwm2m=1.1"), OBJECTS)
    assert code(reg) == "2.01"
    pack = f'[{{"bn":"{other}/3424/0/","n":"1","v":2.5}}]'.encode()
    sent = await client.call(aiocoap.POST, "dp", payload=pack, content_format=110)
    assert code(sent) == "4.03"
    assert await count(pool, "SELECT count(*) FROM readings WHERE meter_id = $1", other_id) == 0

    udp = await RawCoap.open(collector.coap_port)
    meter = OscoreMeter(device.oscore)
    try:
        for ep_asked, want in ((other, "4.03"), (device.address, "2.01")):
            msg = aiocoap.Message(
                code=aiocoap.POST,
                uri_path=("rd",),
                uri_query=(f"ep={ep_asked}", "lwm2m=1.1", "lt=300"),
                payload=OBJECTS,
            )
            protected, request_id = meter.ctx.protect(msg)
            protected.mtype = aiocoap.CON
            protected.mid = secrets.randbelow(65536)
            protected.token = secrets.token_bytes(4)
            answer = meter.answer(
                await udp.exchange(protected.encode(), protected.token), request_id
            )
            assert answer.code == want
    finally:
        udp.close()
    transport = await pool.fetchval(
        "SELECT transport FROM lwm2m_registrations WHERE meter_id = $1", device.meter_id
    )
    assert transport == 2  # OSCORE


async def test_oscore_client_gets_its_queued_commands_protected(
    pool: asyncpg.Pool, collector: RunningCollector, device: ProvisionedDevice
) -> None:
    """An OSCORE client: commands queued before it registers go out on its Register as
    requests protected with its context, its protected answers acknowledge them (a Read's
    with its content), and its Send is stored as its meter's reading."""
    valve = await queue(pool, device.meter_id, "valve", {"action": "close"})
    clock = await queue(pool, device.meter_id, "clock", {})
    await pool.execute(  # a read is for LwM2M clients: this meter registered before
        "INSERT INTO lwm2m_registrations (registration_id, tenant_id, meter_id, endpoint,"
        " lwm2m_version, lifetime_s, binding, queue_mode, peer, transport, expires_at,"
        " deregistered_at, reason) SELECT $1, tenant_id, meter_id, address, '1.1', 60, 'U',"
        " true, '[::1]:1', 2, now(), now(), 'deregistered' FROM meters WHERE meter_id = $2",
        secrets.token_hex(8),
        device.meter_id,
    )
    battery = await queue(pool, device.meter_id, "read", {"path": "/3/0/9"})
    sc = DeviceOscore(device.oscore)
    server_credentials = CredentialsMap()
    server_credentials[":collector"] = sc  # the collector's requests to us
    seen: list[tuple[str, str, bytes]] = []
    secured: list[bool] = []
    site = resource.Site()
    for path in ("3/0/13", "3306/0/5850"):
        site.add_resource(path.split("/"), Recorder(path, seen, secured))
    site.add_resource(["3", "0", "9"], Readable(0, b"42"))
    ctx = await aiocoap.Context.create_server_context(
        OscoreSiteWrapper(site, server_credentials),
        bind=("127.0.0.1", free_port(socket.SOCK_DGRAM)),
        transports=["oscore", "udp6"],
    )
    server = f"coap://127.0.0.1:{collector.coap_port}"
    ctx.client_credentials[f"{server}/*"] = sc  # our requests to the collector
    try:
        msg = aiocoap.Message(code=aiocoap.POST, uri=f"{server}/rd", payload=OBJECTS)
        msg.opt.uri_query = (f"ep={device.address}", "lwm2m=1.1", "lt=300", "Q")
        reg = await asyncio.wait_for(ctx.request(msg).response, 20)
        assert code(reg) == "2.01"
        sql = "SELECT count(*) FROM commands WHERE meter_id = $1 AND state = 'acknowledged'"
        assert await wait_count(pool, 3, sql, device.meter_id) == 3
        pack = b'[{"bn":"/3424/0/","bt":1700000000,"n":"1","v":4.25}]'
        msg = aiocoap.Message(code=aiocoap.POST, uri=f"{server}/dp", payload=pack)
        msg.opt.content_format = 110
        sent = await asyncio.wait_for(ctx.request(msg).response, 20)
        assert code(sent) == "2.04"
    finally:
        await ctx.shutdown()
    assert [(op, path) for op, path, _ in seen] == [("write", "3306/0/5850"), ("write", "3/0/13")]
    assert secured == [True, True]  # both came OSCORE-protected with the device's context
    assert cbor2.loads(seen[0][2]) == [{-2: "/3306/0/5850", 4: False}]
    rows = await pool.fetch(
        "SELECT command_id, attempts FROM commands WHERE meter_id = $1 ORDER BY 1",
        device.meter_id,
    )
    assert [tuple(r) for r in rows] == [(valve, 1), (clock, 1), (battery, 1)]
    result = await pool.fetchval("SELECT result FROM commands WHERE command_id = $1", battery)
    assert json.loads(result)["content"] == {"content_format": 0, "format": "text", "value": "42"}
    reading = await pool.fetchval(
        "SELECT register_ml FROM readings WHERE meter_id = $1", device.meter_id
    )
    assert reading == 4_250_000
    transports = await pool.fetch(
        "SELECT DISTINCT transport FROM raw_uplinks WHERE meter_id = $1 AND outcome = 'stored'",
        device.meter_id,
    )
    assert [r[0] for r in transports] == [2]  # the Send, archived as OSCORE


async def test_refusals_bad_query_block1_registration_and_wrong_content_format(
    pool: asyncpg.Pool, client: Client, lab_tenant: str
) -> None:
    """A Register without lwm2m version is 4.00, one sent block-wise 4.13 (no unbounded
    assembly); a Send that is not SenML CBOR/JSON is 4.15."""
    _, ep = await lab_meter(pool, lab_tenant)
    bad = await client.call(aiocoap.POST, "rd", (f"ep={ep}",))
    assert code(bad) == "4.00"
    assert b"lwm2m" in bad.payload
    big = b",".join(f"</{i}/0>".encode() for i in range(30000, 30400))
    assert len(big) > 2048  # aiocoap sends it in Block1 blocks
    assert code(await client.call(aiocoap.POST, "rd", (f"ep={ep}", "lwm2m=1.1"), big)) == "4.13"
    reg = await client.call(aiocoap.POST, "rd", (f"ep={ep}", "lwm2m=1.1"), OBJECTS)
    assert code(reg) == "2.01"
    text = await client.call(aiocoap.POST, "dp", payload=b"12.5", content_format=0)
    assert code(text) == "4.15"


async def test_a_register_or_update_with_control_characters_is_4_00(
    pool: asyncpg.Pool, client: Client, lab_tenant: str
) -> None:
    """Objects (CoRE link format) with a NUL or another control character are refused
    4.00, not answered 5.03 "database unavailable" (PostgreSQL text holds no NUL, and
    the device would retry forever)."""
    _, ep = await lab_meter(pool, lab_tenant)
    query = (f"ep={ep}", "lwm2m=1.1")
    bad = await client.call(aiocoap.POST, "rd", query, b"</1/0>,\x00</3/0>")
    assert code(bad) == "4.00", bad.payload
    assert b"control characters" in bad.payload
    reg = await client.call(aiocoap.POST, "rd", query, OBJECTS)
    assert code(reg) == "2.01"
    path = "/".join(reg.opt.location_path)
    assert code(await client.call(aiocoap.POST, path, (), b"</3/0>\x07")) == "4.00"
    assert code(await client.call(aiocoap.POST, path, (), OBJECTS)) == "2.04"


async def test_a_send_of_health_alone_stores_the_health(
    pool: asyncpg.Pool, client: Client, lab_tenant: str
) -> None:
    """A Send of objects 3/4 only (no volume) is answered 2.04: its health is stored, its
    raw uplink archived as stored with no reading; one naming another meter is 4.03 and
    stores nothing."""
    meter_id, ep = await lab_meter(pool, lab_tenant)
    _, other = await lab_meter(pool, lab_tenant)
    reg = await client.call(aiocoap.POST, "rd", (f"ep={ep}", "lwm2m=1.1", "Q"), OBJECTS)
    assert code(reg) == "2.01"
    pack = cbor2.dumps([{-2: "/3/0/", 0: "9", 2: 64}, {-2: "/4/0/", 0: "2", 2: -101}])
    sent = await client.call(aiocoap.POST, "dp", payload=pack, content_format=112)
    assert code(sent) == "2.04", sent.payload
    health = await pool.fetchrow(
        "SELECT battery_pct, rsrp_cdbm FROM device_health WHERE meter_id = $1", meter_id
    )
    assert tuple(health) == (64, -10100)
    raw = await pool.fetchrow(
        "SELECT outcome, n_readings, error_code FROM raw_uplinks WHERE meter_id = $1", meter_id
    )
    assert tuple(raw) == ("stored", 0, None)
    assert await count(pool, "SELECT count(*) FROM readings WHERE meter_id = $1", meter_id) == 0
    assert await count(pool, "SELECT count(*) FROM quarantine WHERE meter_id = $1", meter_id) == 0

    foreign = f'[{{"bn":"{other}/3/0/","n":"9","v":5}}]'.encode()
    refused = await client.call(aiocoap.POST, "dp", payload=foreign, content_format=110)
    assert code(refused) == "4.03"
    sql = "SELECT count(*) FROM device_health WHERE meter_id = $1"
    assert await count(pool, sql, meter_id) == 1  # not the other meter's battery
    nothing = b'[{"bn":"/3/0/","n":"0","vs":"ACME"}]'  # object 3 but no health figure
    kept = await client.call(aiocoap.POST, "dp", payload=nothing, content_format=110)
    assert code(kept) == "4.00"  # undecodable: no_register, as before


async def test_read_through_the_mailbox(
    pool: asyncpg.Pool, client: Client, lab_tenant: str
) -> None:
    """Reads queued while the client sleeps go out as GETs on its Register: a text/plain
    resource and a SenML CBOR instance are acknowledged with the decoded content, a path
    the client does not serve fails with 4.04, one of an object it did not register fails
    unsent."""
    meter_id, ep = await lab_meter(pool, lab_tenant)
    query = (f"ep={ep}", "lt=300", "lwm2m=1.1", "Q")
    assert code(await client.call(aiocoap.POST, "rd", query, OBJECTS)) == "2.01"
    bye = await client.call(
        aiocoap.DELETE,
        "rd/"
        + await pool.fetchval(
            "SELECT registration_id FROM lwm2m_registrations WHERE meter_id = $1", meter_id
        ),
    )
    assert code(bye) == "2.02"  # now an LwM2M client: it may be sent reads
    battery = await queue(pool, meter_id, "read", {"path": "/3/0/9"})
    instance = await queue(pool, meter_id, "read", {"path": "/3424/0"})
    missing = await queue(pool, meter_id, "read", {"path": "/3/0/99"})
    unregistered = await queue(pool, meter_id, "read", {"path": "/5/0/1"})
    assert code(await client.call(aiocoap.POST, "rd", query, OBJECTS)) == "2.01"
    sql = "SELECT count(*) FROM commands WHERE meter_id = $1 AND finished_at IS NOT NULL"
    assert await wait_count(pool, 4, sql, meter_id) == 4
    rows = {
        r["command_id"]: (r["state"], json.loads(r["result"]))
        for r in await pool.fetch(
            "SELECT command_id, state, result FROM commands WHERE meter_id = $1", meter_id
        )
    }
    assert rows[battery] == (
        "acknowledged",
        {
            "ops": [{"op": "read /3/0/9", "code": "2.05"}],
            "content": {"content_format": 0, "format": "text", "value": "87"},
        },
    )
    state, result = rows[instance]
    assert state == "acknowledged"
    records = [{k: v for k, v in r.items() if k != "t"} for r in result["content"]["records"]]
    assert records == [{"n": "/3424/0/1", "v": "12.345"}, {"n": "/3424/0/3", "v": 2}]
    assert rows[missing] == ("failed", {"ops": [{"op": "read /3/0/99", "code": "4.04"}]})
    assert rows[unregistered][0] == "failed"
    assert "no object 5" in rows[unregistered][1]["error"]


async def test_the_server_observes_the_meter_object(
    pool: asyncpg.Pool, collector: RunningCollector, lab_tenant: str
) -> None:
    """On Register the server observes /3424: its first answer and each notification are
    stored as readings; a notification repeated is stored once; a new Register observes
    again; after De-register a notification stores nothing."""
    meter_id, ep = await lab_meter(pool, lab_tenant)
    meter = MeterObject()
    t0 = (int(time.time()) // 3600 - 3) * 3600
    meter.pack = cbor2.dumps([{-2: "/3424/0/", -3: t0, 0: "1", 2: 10.5}])
    client = await Client.start(collector.coap_port, meter)
    readings = "SELECT count(*) FROM readings WHERE meter_id = $1"
    try:
        query = (f"ep={ep}", "lt=300", "lwm2m=1.1", "Q")
        reg = await client.call(aiocoap.POST, "rd", query, OBJECTS)
        assert code(reg) == "2.01"
        assert await wait_count(pool, 1, readings, meter_id) == 1  # the Observe's answer
        assert len(meter.observers) == 1
        meter.show(t0 + 3600, 11.25)
        assert await wait_count(pool, 2, readings, meter_id) == 2
        meter.show(t0 + 7200, 12.0)
        assert await wait_count(pool, 3, readings, meter_id) == 3
        meter.show(t0 + 7200, 12.0)  # the same notification again (a new Observe number)
        await asyncio.sleep(1.0)
        assert await count(pool, readings, meter_id) == 3
        raw = "SELECT count(*) FROM raw_uplinks WHERE meter_id = $1 AND outcome = 'duplicate'"
        assert await wait_count(pool, 1, raw, meter_id) == 1  # received, stored nothing new
        rows = await pool.fetch(
            "SELECT register_ml FROM readings WHERE meter_id = $1 ORDER BY read_s", meter_id
        )
        assert [r[0] for r in rows] == [10_500_000, 11_250_000, 12_000_000]
        transports = await pool.fetch(
            "SELECT DISTINCT transport FROM raw_uplinks WHERE meter_id = $1", meter_id
        )
        assert [r[0] for r in transports] == [1]  # plain CoAP, kept per uplink

        again = await client.call(aiocoap.POST, "rd", query, OBJECTS)  # re-register
        assert code(again) == "2.01"
        for _ in range(100):
            if len(meter.observers) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(meter.observers) == 2  # observed again
        meter.show(t0 + 10800, 12.5)
        assert await wait_count(pool, 4, readings, meter_id) == 4

        bye = await client.call(aiocoap.DELETE, "/".join(again.opt.location_path))
        assert code(bye) == "2.02"
        meter.show(t0 + 14400, 13.0)
        await asyncio.sleep(1.0)
        assert await count(pool, readings, meter_id) == 4  # the observation ended
    finally:
        await client.close()


async def test_an_update_observes_when_the_register_could_not(
    pool: asyncpg.Pool, collector: RunningCollector, lab_tenant: str
) -> None:
    """The client refuses the Observe after its Register (5.03): its next Update sets the
    observation up, and its notifications are stored; a later Update does not observe
    again while the observation lives."""
    meter_id, ep = await lab_meter(pool, lab_tenant)
    meter = MeterObject()
    meter.refuse = 1
    t0 = (int(time.time()) // 3600 - 3) * 3600
    meter.pack = cbor2.dumps([{-2: "/3424/0/", -3: t0, 0: "1", 2: 1.5}])
    client = await Client.start(collector.coap_port, meter)
    readings = "SELECT count(*) FROM readings WHERE meter_id = $1"
    try:
        reg = await client.call(aiocoap.POST, "rd", (f"ep={ep}", "lwm2m=1.1", "Q"), OBJECTS)
        assert code(reg) == "2.01"
        for _ in range(100):
            if meter.refuse == 0:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert meter.refuse == 0  # asked, refused
        assert (meter.observers, await count(pool, readings, meter_id)) == ([], 0)
        reg_path = "/".join(reg.opt.location_path)
        assert code(await client.call(aiocoap.POST, reg_path)) == "2.04"
        assert await wait_count(pool, 1, readings, meter_id) == 1
        assert len(meter.observers) == 1
        assert code(await client.call(aiocoap.POST, reg_path)) == "2.04"
        meter.show(t0 + 3600, 2.5)
        assert await wait_count(pool, 2, readings, meter_id) == 2
        assert len(meter.observers) == 1  # the second Update kept the observation
    finally:
        await client.close()


async def test_a_notification_is_kept_when_the_pipeline_is_full_and_the_database_away() -> None:
    """A notification is ACKed before it is stored, so it is never dropped: with the
    database away (its registration cannot be checked) and the pipeline at its bound, it
    is still queued, as the meter of the registration its observation was set up under."""
    from datetime import UTC, datetime

    from collector.lwm2m import Lwm2m
    from collector.pipeline import Pipeline, PipelineFull
    from collector.settings import CoapSettings, PipelineSettings
    from collector.uplink import Transport, Uplink
    from storage.lwm2m import Registration

    async def never(batch: list[Uplink]) -> list[Any]:
        raise AssertionError("nothing commits in this test")

    away = await asyncpg.create_pool(
        f"postgresql://nobody@127.0.0.1:{free_port(socket.SOCK_STREAM)}/none", min_size=0
    )
    pipeline = Pipeline(PipelineSettings(max_pending=1), never)
    pipeline.offer(Uplink(b"\x00", Transport.COAP, "[::1]:1"))
    with pytest.raises(PipelineFull):
        pipeline.offer(Uplink(b"\x00", Transport.COAP, "[::1]:1"))
    now = datetime.now(UTC)
    reg = Registration(
        "r1", 7, 42, "ep-42", "1.1", 300, "UQ", True, "[::1]:5683", 1, "</3424/0>", now, now,
        now, None, "",
    )  # fmt: skip
    note = aiocoap.Message(code=aiocoap.CONTENT, payload=cbor2.dumps([{0: "/3424/0/1", 2: 1.5}]))
    shared = Lwm2m(away, CoapSettings(), pipeline)
    task = asyncio.create_task(shared._notified(reg, None, note))
    try:
        for _ in range(100):
            if pipeline.pending == 2:
                break
            await asyncio.sleep(0.05)
        assert pipeline.pending == 2  # queued past the bound, not dropped
        queued = pipeline._queue[-1]
        assert queued.device is not None
        assert (queued.device.meter_id, queued.device.tenant_id) == (42, 7)
        assert not task.done()  # waiting for its outcome, which the database will give
    finally:
        task.cancel()
        await away.close()


async def test_every_notification_is_kept_in_order_not_only_the_latest() -> None:
    """Notifications that arrive while one is being stored all come out, in order (aiocoap's
    own iterator keeps only the latest); past the limit a flood is dropped and counted; the
    observation's end ends the iteration after them."""
    from aiocoap.protocol import ClientObservation

    from collector.notifications import Notifications

    def note(n: int) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CONTENT, payload=bytes([n]))

    observation = ClientObservation()
    notes = Notifications(observation, limit=3)
    lossy = observation.__aiter__()  # aiocoap's iterator, beside ours
    for n in range(5):  # arriving while nobody reads
        observation.callback(note(n))
    assert bytes((await lossy.__anext__()).payload) == b"\x04"  # aiocoap's: the latest only
    observation.error(aiocoap.error.ObservationCancelled())
    got = [bytes(m.payload)[0] async for m in notes]
    assert got == [0, 1, 2]
    assert notes.dropped == 2


def _lwm2m_datagram(
    code: aiocoap.Code,
    path: str,
    query: tuple[str, ...],
    payload: bytes,
    content_format: int | None = None,
) -> bytes:
    """A CON request as a raw datagram (its message id and token random)."""
    msg = aiocoap.Message(code=code, payload=payload)
    msg.mtype = aiocoap.CON
    msg.opt.uri_path = tuple(path.split("/"))
    msg.opt.uri_query = query
    if content_format is not None:
        msg.opt.content_format = content_format
    msg.mid, msg.token = secrets.randbelow(65536), secrets.token_bytes(4)
    return bytes(msg.encode())


async def test_mutated_registrations_and_sends_never_get_5_00(
    pool: asyncpg.Pool,
    collector: RunningCollector,
    lab_tenant: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Seeded mutations of Register, Update and Send requests (header, options, query,
    link format, SenML CBOR/JSON) from a registered peer get 2.xx, 4.xx or the busy
    5.03, never 5.00, and nothing is logged with a traceback."""
    capsys.readouterr()
    _, ep = await lab_meter(pool, lab_tenant)
    udp = await RawCoap.open(collector.coap_port)
    try:
        register = _lwm2m_datagram(
            aiocoap.POST, "rd", (f"ep={ep}", "lt=300", "lwm2m=1.1", "b=U"), OBJECTS
        )
        token = register[4:8]
        reply = aiocoap.Message.decode(await udp.exchange(register, token))
        assert reply.code == aiocoap.CREATED, reply
        location = reply.opt.location_path
        t0 = (int(time.time()) // 3600 - 1) * 3600
        pack = cbor2.dumps(
            [{-2: "/3424/0/", -3: t0, 0: "1", 2: 12.345}, {-2: "/3/0/", 0: "9", 2: 87}]
        )
        valid = [
            register,
            _lwm2m_datagram(aiocoap.POST, "/".join(location), ("lt=300",), b""),
            _lwm2m_datagram(aiocoap.POST, "dp", (), pack, content_format=112),
            _lwm2m_datagram(
                aiocoap.POST,
                "dp",
                (),
                json.dumps([{"bn": "/3424/0/", "n": "1", "v": 12.5, "bt": t0}]).encode(),
                content_format=110,
            ),
        ]
        rng = random.Random(16)
        udp.replies.clear()
        for i in range(600):
            udp.send(mutated(valid[i % len(valid)], rng))
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        await udp.settled()
        assert len(udp.replies) >= 200  # (seen: 352, most 4.00 and 4.04)
        # 5.03 (with Max-Age) is the busy answer to a flood; any other 5.xx is a fault
        faults = sorted({hex(r.code) for r in udp.replies if r.code >> 5 == 5} - {"0xa3"})
        assert not faults, faults
        out = capsys.readouterr()
        assert "Traceback" not in out.out + out.err
    finally:
        udp.close()


async def test_a_register_while_the_last_observe_waits_leaves_a_clean_shutdown(
    pool: asyncpg.Pool, db_url: str, broker: Broker, credentials_key: str, lab_tenant: str
) -> None:
    """A client that ACKs the server's Observe but never answers it (asleep), then
    registers again: the first observation ends with its request, and the collector
    stops cleanly (aiocoap raised from its shutdown for an observation cancelled while
    its request was still out)."""
    _, ep = await lab_meter(pool, lab_tenant)
    async with running(collector_settings(db_url, broker, credentials_key)) as collector:
        udp = await RawCoap.open(collector.coap_port)
        try:
            for _ in range(2):
                register = _lwm2m_datagram(
                    aiocoap.POST, "rd", (f"ep={ep}", "lt=300", "lwm2m=1.1", "b=U"), OBJECTS
                )
                reply = aiocoap.Message.decode(await udp.exchange(register, register[4:8]))
                assert reply.code == aiocoap.CREATED
                for _ in range(100):  # the server's GET /3424 (Observe), ACKed by RawCoap
                    if any(r.code == aiocoap.GET for r in udp.replies):
                        break
                    await asyncio.sleep(0.02)
                else:
                    pytest.fail("the collector sent no Observe after the Register")
                udp.replies.clear()
        finally:
            udp.close()
        collector.stop.set()
        await asyncio.wait_for(collector.task, 40)  # raises what the collector raised
