"""Two collector processes on one CoAP port and one MQTT share group, one of them killed
with -9 mid-traffic, on the real stack (PostgreSQL and Mosquitto on this machine).

What the README's scale-out paragraph claims, shown: while both run, the kernel spreads
the port's senders over both (SO_REUSEPORT) and the broker spreads the share group's
messages; after the kill, CoAP devices' retransmissions reach the survivor and their
uplinks are stored exactly once, the dead process's MQTT share is taken over by the
survivor (Mosquitto itself never hands a member's unacknowledged messages to another
member), and the OSCORE replay state the dead process advanced is the survivor's too: a
device's sequence numbers move on there, and a replay of any request already accepted,
by either process, is answered from the recorded answer, never accepted again.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from brokerkit import Broker, free_port
from collector_testkit import OscoreAnswer, OscoreMeter, RawCoap, cjt188_frame, hour
from conftest import count, new_address, wait_count
from mqtt_testkit import CollectorProcess, Streamer

from devices.provision import ProvisionedDevice, provision_device

READINGS = "SELECT count(*) FROM readings WHERE meter_id = $1"
DISTINCT = "SELECT count(DISTINCT read_s) FROM readings WHERE meter_id = $1"
RAW = "SELECT count(*) FROM raw_uplinks WHERE meter_id = $1"
RAW_STORED = "SELECT count(*) FROM raw_uplinks WHERE meter_id = $1 AND outcome = 'stored'"
ANSWERS = "SELECT count(*) FROM oscore_answers WHERE meter_id = $1"
UPLINKS = "nbmeter_collector_uplinks_total"
WILL_DELAY_S = 3

COAP_METERS = 12  # each on a source port of its own: the kernel hashes them over both
COAP_EACH = 30  # uplinks per CoAP meter, one after the other
MQTT_N = 600
MQTT_RATE_PER_S = 100.0


class Pair:
    """Collector processes of one share group on one CoAP port, each with its metrics."""

    def __init__(self, tmp_path: Path, db_url: str, broker: Broker, key: str) -> None:
        self._args = (tmp_path, db_url, broker, key)
        self.coap_port = free_port(socket.SOCK_DGRAM)
        self.group = f"g-{uuid.uuid4().hex[:8]}"
        self.procs: list[CollectorProcess] = []

    def start(self, name: str) -> CollectorProcess:
        """A process on the pair's port and group, once it serves CoAP and is a member."""
        tmp_path, db_url, broker, key = self._args
        proc = CollectorProcess(
            tmp_path,
            db_url=db_url,
            mqtt_url=broker.url,
            key=key,
            client_id=f"{name}-{uuid.uuid4().hex[:8]}",
            group=self.group,
            will_delay_s=WILL_DELAY_S,
            coap_port=self.coap_port,
            NBMETER_METRICS_PORT=str(free_port()),
        )
        self.procs.append(proc)
        proc.wait_log("coap.started", port=self.coap_port)
        proc.wait_log("broker.connected", client_id=proc.client_id, role="member")
        return proc

    def close(self) -> None:
        """Kill what still runs."""
        for proc in self.procs:
            proc.close()


@pytest.fixture
def pair(tmp_path: Path, db_url: str, own_broker: Broker, credentials_key: str) -> Iterator[Pair]:
    """Two-process scenes on the session's own broker (this test kills a member)."""
    scene = Pair(tmp_path, db_url, own_broker, credentials_key)
    yield scene
    scene.close()


async def _devices(
    db_url: str, slug: str, broker: Broker, key: str, n: int
) -> list[ProvisionedDevice]:
    return [
        await provision_device(
            db_url, slug, new_address(), credentials_key=key, mqtt_admin_url=broker.admin_url
        )
        for _ in range(n)
    ]


async def test_two_processes_share_the_port_and_the_group_and_survive_a_kill_9(
    pair: Pair,
    pool: asyncpg.Pool,
    db_url: str,
    tenant_slug: str,
    own_broker: Broker,
    credentials_key: str,
) -> None:
    """Both processes take uplinks (CoAP by source port, MQTT by the share group); one is
    killed mid-traffic: every CoAP uplink is answered 2.04 and stored once (retransmissions
    reach the survivor), every MQTT message is stored once (the survivor takes over the
    dead process's session within the will delay)."""
    devices = await _devices(db_url, tenant_slug, own_broker, credentials_key, COAP_METERS + 1)
    coap_devices, mqtt_device = devices[:COAP_METERS], devices[-1]
    a, b = pair.start("a"), pair.start("b")
    assert b.events("coap.port_shared") or a.events("coap.port_shared")
    socks = [await RawCoap.open(pair.coap_port) for _ in coap_devices]
    answered: list[OscoreAnswer] = []
    slowest_s, retransmitted = [0.0], [0]
    halfway = asyncio.Event()

    async def meter_day(device: ProvisionedDevice, sock: RawCoap) -> None:
        meter = OscoreMeter(device.oscore)
        for h in range(COAP_EACH):
            started = time.monotonic()
            frame = cjt188_frame(device.address, 10_000 * (h + 1), hour(h))
            datagram, token, request_id = meter.request(frame)
            # retransmitted every 2 s (the same datagram) until answered, as a device does
            raw = await sock.exchange(datagram, token, timeout_s=40)
            answered.append(meter.answer(raw, request_id))
            if len(answered) >= COAP_METERS * COAP_EACH // 2:
                halfway.set()
            took_s = time.monotonic() - started
            slowest_s[0] = max(slowest_s[0], took_s)
            retransmitted[0] += took_s >= 2.0  # RawCoap sends it again every 2 s

    frames = [cjt188_frame(mqtt_device.address, 10_000 * (i + 1), hour(i)) for i in range(MQTT_N)]
    streamer = Streamer(own_broker.url, own_broker.port, mqtt_device.mqtt, frames)
    try:
        streamer.start(MQTT_RATE_PER_S)
        await asyncio.to_thread(streamer.wait_sent, MQTT_N // 3)
        # the meters send back to back: at any moment some request waits in each process
        days = asyncio.gather(*(meter_day(d, s) for d, s in zip(coap_devices, socks, strict=True)))
        await asyncio.wait_for(halfway.wait(), 60)
        before = {
            p.client_id: (
                p.counter(UPLINKS, transport="coap_oscore", outcome="stored"),
                p.counter(UPLINKS, transport="mqtt", outcome="stored"),
            )
            for p in (a, b)
        }
        a.kill()
        killed = time.monotonic()
        at_kill = len(answered)
        await asyncio.wait_for(days, 120)
        coap_done_s = time.monotonic() - killed
        acks = await asyncio.to_thread(streamer.finish)
        assert acks == [0] * MQTT_N
        mqtt_stored = await wait_count(
            pool, MQTT_N, READINGS, mqtt_device.meter_id, within_s=WILL_DELAY_S + 20
        )
        mqtt_done_s = time.monotonic() - killed
    finally:
        for sock in socks:
            sock.close()
    assert at_kill < COAP_METERS * COAP_EACH * 3 // 4, "the CoAP traffic was nearly over"
    # while both ran, both served the port and the group
    assert all(coap > 0 and mqtt > 0 for coap, mqtt in before.values()), before
    assert [x.code for x in answered] == ["2.04"] * (COAP_METERS * COAP_EACH)
    for device in coap_devices:
        assert await count(pool, READINGS, device.meter_id) == COAP_EACH
        assert await count(pool, RAW, device.meter_id) == COAP_EACH
        assert await count(pool, ANSWERS, device.meter_id) == COAP_EACH
    assert mqtt_stored == MQTT_N
    assert await count(pool, DISTINCT, mqtt_device.meter_id) == MQTT_N
    # at least once: a message the killed process committed but had not acknowledged yet
    # comes again with its session, and is archived as a duplicate, storing nothing
    assert await count(pool, RAW_STORED, mqtt_device.meter_id) == MQTT_N
    again = await count(pool, RAW, mqtt_device.meter_id) - MQTT_N
    # Mosquitto kept the dead member's share in its session (it never moves it to another
    # member): the survivor took that session over, with what was waiting in it
    adopted = b.wait_log("broker.session_adopted", peer=a.client_id)
    assert adopted["messages"] > 0
    retried = sum(x.own_piv for x in answered)
    print(
        f"before the kill (coap, mqtt stored): {before}; after: {COAP_METERS * COAP_EACH} "
        f"CoAP uplinks answered 2.04 and stored once ({at_kill} before the kill, "
        f"{retransmitted[0]} retransmitted, {retried} answered from the record), "
        f"the last {coap_done_s:.1f} s after the kill, slowest {slowest_s[0]:.1f} s; "
        f"{MQTT_N} MQTT stored once, the last {mqtt_done_s:.1f} s after the kill "
        f"(will delay {WILL_DELAY_S} s, {adopted['messages']} taken over, {again} of them "
        "delivered again)"
    )


async def test_oscore_state_moves_to_the_survivor_and_replays_are_refused(
    pair: Pair,
    pool: asyncpg.Pool,
    device: ProvisionedDevice,
) -> None:
    """The survivor, which cached the device's context before the other process accepted
    some of its requests, accepts the device's next sequence numbers after the kill and
    answers a replay of every accepted request from the record (a second answer with its
    own Partial IV), never as a new request: nothing is stored twice."""
    meter = OscoreMeter(device.oscore)
    sent: list[tuple[bytes, bytes, object]] = []

    async def uplink(h: int, sock: RawCoap | None = None) -> OscoreAnswer:
        datagram, token, request_id = meter.request(cjt188_frame(device.address, 0, hour(h)))
        sent.append((datagram, token, request_id))
        return await _exchange(meter, pair.coap_port, datagram, token, request_id, sock)

    b = pair.start("b")
    home = await RawCoap.open(pair.coap_port)
    try:
        assert (await uplink(0, home)).code == "2.04"  # b alone: b holds the context now
        a = pair.start("a")
        # new source ports (a NAT rebinding each time): the kernel spreads them over both
        for h in range(1, 13):
            assert (await uplink(h)).code == "2.04"
        by_a = a.counter(UPLINKS, transport="coap_oscore", outcome="stored")
        by_b = b.counter(UPLINKS, transport="coap_oscore", outcome="stored")
        assert by_a > 0, "no uplink reached the process about to be killed"
        a.kill()
        killed = time.monotonic()
        moved_on = [await uplink(h, home if h % 2 else None) for h in range(13, 17)]
        first_after_s = time.monotonic() - killed
        assert [x.code for x in moved_on] == ["2.04"] * 4
        assert not any(x.own_piv for x in moved_on)  # first answers: new requests accepted
        replays = [
            await _exchange(meter, pair.coap_port, datagram, token, request_id)
            for datagram, token, request_id in sent
        ]
    finally:
        home.close()
    assert [x.code for x in replays] == ["2.04"] * len(sent)
    refused = [x.own_piv for x in replays]
    assert all(refused), f"replays accepted as new requests: {refused.count(False)}"
    assert b.counter("nbmeter_collector_oscore_replay_answers_total", answer="recorded") >= len(
        sent
    )
    stored = [await count(pool, sql, device.meter_id) for sql in (READINGS, RAW, ANSWERS)]
    assert stored == [len(sent)] * 3
    print(
        f"before the kill: {by_a:.0f} uplinks accepted by the killed process, {by_b:.0f} by "
        f"the survivor; after: 4 new sequence numbers accepted (the first "
        f"{first_after_s:.2f} s after the kill), {len(sent)} replays answered from the record"
    )


async def _exchange(
    meter: OscoreMeter,
    port: int,
    datagram: bytes,
    token: bytes,
    request_id: object,
    sock: RawCoap | None = None,
) -> OscoreAnswer:
    """Send a protected request (from `sock`, or a new source port) until answered."""
    own = sock is None
    sock = sock or await RawCoap.open(port)
    try:
        return meter.answer(await sock.exchange(datagram, token, timeout_s=30), request_id)
    finally:
        if own:
            sock.close()
