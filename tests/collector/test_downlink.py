"""The mailbox delivered through the real collector: a command queued while the meter sleeps
goes out in its next window (CoAP: on the uplink's 2.04; MQTT: to its down topic), its
answer moves it to acknowledged, duplicates (retransmitted CON, repeated uplink, MQTT
redelivery) execute once, an expired command is never sent, and a device can neither read
nor answer another device's commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import asyncpg
import dbkit
import pytest
from collector_testkit import CollectorProcess, OscoreMeter, RawCoap, cjt188_frame, hour
from conftest import Broker, RunningCollector, new_address
from downlink_testkit import MqttMeter

from collector import downlink, metrics
from devices.provision import ProvisionedDevice, provision_device
from simulator.commands import CommandExecutor
from storage import mailbox

# the collector's pending view hears of a command within moments of its commit (NOTIFY)
ANNOUNCED_WITHIN_S = 0.5


async def queue_command(
    pool: asyncpg.Pool,
    device: ProvisionedDevice,
    kind: str = "valve",
    ttl_s: int = 600,
    **args: object,
) -> int:
    """Queue a command for the device's meter while it sleeps; its id. Returns once the
    running collector's pending view has heard of it (the NOTIFY at commit), or its meter
    was in the view already (then within ANNOUNCED_WITHIN_S): a window checked before that
    carries the command only next time, as `collector.pending` says."""
    heard = metrics.PENDING_VIEW_METERS._value.get()
    cmd = await dbkit.queue_command(
        pool, device.meter_id, kind=kind, args=args or None, ttl_s=ttl_s
    )
    deadline = time.monotonic() + ANNOUNCED_WITHIN_S
    while metrics.PENDING_VIEW_LIVE._value.get() and time.monotonic() < deadline:
        if metrics.PENDING_VIEW_METERS._value.get() != heard:
            break
        await asyncio.sleep(0.01)
    return cmd.command_id


def run(device: CommandExecutor, envelope: bytes) -> bytes:
    """The simulated meter executes an envelope now; its answer."""
    answer = device.handle(envelope, int(time.time()))
    assert answer is not None
    return answer


async def row(pool: asyncpg.Pool, command_id: int) -> asyncpg.Record:
    """The command's lifecycle columns."""
    return await pool.fetchrow(
        "SELECT state, reason, attempts, result, sent_at FROM commands WHERE command_id = $1",
        command_id,
    )


async def wait_state(
    pool: asyncpg.Pool, command_id: int, state: str, within_s: float = 15
) -> asyncpg.Record:
    """Poll until the command is in `state` (or fail naming where it is)."""
    deadline = time.monotonic() + within_s
    while True:
        got = await row(pool, command_id)
        if got["state"] == state or time.monotonic() > deadline:
            assert got["state"] == state, dict(got)
            return got
        await asyncio.sleep(0.05)


@pytest.fixture
def meter(device: ProvisionedDevice) -> OscoreMeter:
    """The provisioned device's side of OSCORE (it speaks through the `raw` socket)."""
    return OscoreMeter(device.oscore)


async def test_coap_command_rides_on_the_next_uplinks_answer(
    pool: asyncpg.Pool, device: ProvisionedDevice, meter: OscoreMeter, raw: RawCoap
) -> None:
    """Queued while asleep → in the 2.04 of the next uplink (CJ/T 188 A017 close frame) →
    executed once → its answer to /c makes it acknowledged with the device's reply."""
    cid = await queue_command(pool, device)
    clock = await queue_command(pool, device, kind="clock")
    assert (await row(pool, cid))["state"] == "queued"
    dev = CommandExecutor(device.address, "cjt188")
    reply = await meter.post(raw, cjt188_frame(device.address, 10_000, hour(1)))
    assert reply.code == "2.04"
    envelope = json.loads(reply.payload)
    assert [c["id"] for c in envelope["cmds"]] == [cid, clock]
    frame = bytes.fromhex(envelope["cmds"][0]["frame"])
    assert frame[9] == 0x04
    assert frame[11:13] == b"\xa0\x17"
    assert frame[14] == 0x99
    assert abs(envelope["cmds"][1]["args"]["utc_s"] - time.time()) < 30
    sent = await row(pool, cid)
    assert (sent["state"], sent["attempts"]) == ("sent", 1)
    answers = run(dev, reply.payload)
    assert dev.state.valve_closed
    answered = await meter.post(raw, answers, path="c")
    assert answered.code == "2.04"
    done = await row(pool, cid)
    assert (done["state"], done["reason"]) == ("acknowledged", "device_confirmed")
    assert json.loads(done["result"])["di"] == "a017"
    assert (await row(pool, clock))["state"] == "acknowledged"
    # the next window carries nothing
    assert (await meter.post(raw, cjt188_frame(device.address, 10_000, hour(2)))).payload == b""


async def test_a_slow_claim_answers_nothing_and_keeps_the_command(
    pool: asyncpg.Pool, device: ProvisionedDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim slower than CLAIM_TIMEOUT_S answers the uplink with no envelope and is
    cancelled with it: the command stays queued and goes out in the next window."""
    cid = await queue_command(pool, device)
    monkeypatch.setattr(downlink, "CLAIM_TIMEOUT_S", 0.5)
    downlinks = downlink.Downlinks(pool)
    async with pool.acquire() as locker, locker.transaction():
        await locker.execute("LOCK TABLE commands IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        assert await downlinks.for_meter(device.meter_id) == b""
        assert time.monotonic() - started < 3
    await asyncio.sleep(0.5)  # a claim still running would have marked it sent by now
    assert (await row(pool, cid))["state"] == "queued"
    envelope = json.loads(await downlinks.for_meter(device.meter_id))
    assert [c["id"] for c in envelope["cmds"]] == [cid]
    assert (await row(pool, cid))["state"] == "sent"


async def test_coap_duplicates_execute_once(
    pool: asyncpg.Pool, device: ProvisionedDevice, meter: OscoreMeter, raw: RawCoap
) -> None:
    """A retransmitted CON gets the same answer (no second claim); a repeated uplink while
    the answer is outstanding carries the command again; the device runs it once, and a
    repeated answer changes nothing."""
    cid = await queue_command(pool, device)
    dev = CommandExecutor(device.address, "cjt188")
    frame = cjt188_frame(device.address, 20_000, hour(3))
    datagram, token, request_id = meter.request(frame)
    first = meter.answer(await raw.exchange(datagram, token), request_id)
    second = meter.answer(await raw.exchange(datagram, token), request_id)  # same MID
    assert first.payload == second.payload
    assert json.loads(first.payload)["cmds"][0]["id"] == cid
    assert (await row(pool, cid))["attempts"] == 1
    run(dev, first.payload)
    run(dev, second.payload)
    again = await meter.post(raw, frame)  # the device repeats its uplink (a duplicate)
    assert again.code == "2.04"
    assert json.loads(again.payload)["cmds"][0]["id"] == cid
    assert (await row(pool, cid))["attempts"] == 2
    answers = run(dev, again.payload)
    assert dev.executed[cid] == 1
    assert (await meter.post(raw, answers, path="c")).code == "2.04"
    assert (await meter.post(raw, answers, path="c")).code == "2.04"  # repeat
    assert (await row(pool, cid))["state"] == "acknowledged"


async def test_coap_expired_never_sent_and_other_meters_commands_refused(
    pool: asyncpg.Pool,
    db_url: str,
    tenant_slug: str,
    broker: Broker,
    credentials_key: str,
    device: ProvisionedDevice,
    meter: OscoreMeter,
    raw: RawCoap,
) -> None:
    """A command past its TTL is not in the window and is reported expired; answering
    another meter's command id is 4.04 and leaves it untouched."""
    stale = await queue_command(pool, device, ttl_s=1)
    await asyncio.sleep(1.2)
    reply = await meter.post(raw, cjt188_frame(device.address, 30_000, hour(4)))
    assert reply.code == "2.04"
    assert reply.payload == b""
    await mailbox.expire_due(pool)
    assert (await row(pool, stale))["reason"] == "ttl_passed_undelivered"
    other = await provision_device(
        db_url, tenant_slug, new_address(), credentials_key=credentials_key
    )
    theirs = await queue_command(pool, other)
    await mailbox.claim(pool, meter_ids=[other.meter_id])  # sent to the other meter
    forged = await meter.post(raw, json.dumps({"id": theirs, "ok": True}).encode(), path="c")
    assert forged.code == "4.04"
    assert (await row(pool, theirs))["state"] == "sent"
    bad = await meter.post(raw, b"not json", path="c")
    assert bad.code == "4.00"


async def test_mqtt_command_goes_to_the_down_topic_once_executed(
    pool: asyncpg.Pool, broker: Broker, device: ProvisionedDevice, collector: RunningCollector
) -> None:
    """Queued while asleep → published QoS 1 to nbmeter/<t>/<a>/down after the next uplink →
    an MQTT redelivery of the uplink carries it again → executed once → its answer on
    /res makes it acknowledged."""
    cid = await queue_command(pool, device, kind="clock")
    dev = CommandExecutor(device.address, "cjt188")
    client = MqttMeter(broker.port, device.mqtt)
    try:
        assert client.subscribe() == [1]
        frame = cjt188_frame(device.address, 40_000, hour(5))
        assert client.publish(client.topic_up, frame) == 0
        got = await asyncio.to_thread(client.next_message, 15)
        assert got is not None
        assert got[0] == client.topic_down
        assert json.loads(got[1])["cmds"][0]["id"] == cid
        assert client.publish(client.topic_up, frame) == 0  # the same uplink again
        again = await asyncio.to_thread(client.next_message, 15)
        assert again is not None
        assert json.loads(again[1])["cmds"][0]["id"] == cid
        answers = run(dev, got[1])
        assert run(dev, again[1]) == answers  # from memory
        assert dev.executed[cid] == 1
        assert (await row(pool, cid))["attempts"] == 2
        assert client.publish(client.topic_res, answers) == 0
        done = await wait_state(pool, cid, "acknowledged")
        assert done["reason"] == "device_confirmed"
    finally:
        client.close()


async def test_mqtt_acl_keeps_devices_to_their_own_commands(
    pool: asyncpg.Pool,
    db_url: str,
    tenant_slug: str,
    broker: Broker,
    credentials_key: str,
    device: ProvisionedDevice,
    collector: RunningCollector,
) -> None:
    """A device cannot subscribe to another device's down topic (SUBACK 0x87), receives
    none of its commands, and its publish to the other's result topic is refused."""
    other = await provision_device(
        db_url,
        tenant_slug,
        new_address(),
        credentials_key=credentials_key,
        mqtt_admin_url=broker.admin_url,
    )
    theirs = await queue_command(pool, other)
    spy = MqttMeter(broker.port, device.mqtt)
    victim = MqttMeter(broker.port, other.mqtt)
    try:
        assert spy.subscribe(victim.topic_down) == [0x87]
        assert spy.subscribe("nbmeter/#") == [0x87]
        assert victim.subscribe() == [1]
        assert victim.publish(victim.topic_up, cjt188_frame(other.address, 1_000, hour(6))) == 0
        got = await asyncio.to_thread(victim.next_message, 15)
        assert got is not None
        assert json.loads(got[1])["cmds"][0]["id"] == theirs
        assert await asyncio.to_thread(spy.next_message, 1.0) is None
        forged = json.dumps({"id": theirs, "ok": False}).encode()
        with contextlib.suppress(RuntimeError):  # refused (the broker may also disconnect it)
            spy.publish(victim.topic_res, forged)
        spy.close()
        spy = MqttMeter(broker.port, device.mqtt)
        assert spy.publish(spy.topic_res, forged) == 0  # its own topic: not its command
        await asyncio.sleep(1.0)
        assert (await row(pool, theirs))["state"] == "sent"
    finally:
        spy.close()
        victim.close()


async def test_kill_9_loses_no_command_and_runs_none_twice(
    pool: asyncpg.Pool, db_url: str, device: ProvisionedDevice, credentials_key: str
) -> None:
    """Queued, then the collector is killed -9 before the meter shows up: the restarted one
    delivers it; killed again after delivery, before the answer: the next window carries it
    again, the device runs it once and its answer to the third process acknowledges it."""
    cid = await queue_command(pool, device)
    dev = CommandExecutor(device.address, "cjt188")
    proc = CollectorProcess(db_url, NBMETER_CREDENTIALS_KEY=credentials_key)
    udp = await RawCoap.open(proc.port)
    oscore = OscoreMeter(device.oscore)
    try:
        await proc.start()
        proc.kill()  # between queueing and delivery
        await proc.wait()
        await proc.start()
        first = await oscore.post(udp, cjt188_frame(device.address, 50_000, hour(7)))
        assert json.loads(first.payload)["cmds"][0]["id"] == cid
        run(dev, first.payload)
        proc.kill()  # between delivery and acknowledgement: the answer was never sent
        await proc.wait()
        assert (await row(pool, cid))["state"] == "sent"
        await proc.start()
        second = await oscore.post(udp, cjt188_frame(device.address, 51_000, hour(8)))
        answers = run(dev, second.payload)
        assert dev.executed[cid] == 1
        assert (await oscore.post(udp, answers, path="c")).code == "2.04"
    finally:
        udp.close()
        if proc.proc is not None and proc.proc.returncode is None:
            proc.kill()
            await proc.wait()
    done = await row(pool, cid)
    assert (done["state"], done["attempts"]) == ("acknowledged", 2)


async def skipped_since(before: float, within_s: float) -> bool:
    """True once a window has skipped its claim since the count was `before`."""
    deadline = time.monotonic() + within_s
    while metrics.COMMAND_CLAIMS_SKIPPED._value.get() == before:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_coap_windows_without_commands_run_no_claim(
    pool: asyncpg.Pool, device: ProvisionedDevice, meter: OscoreMeter, raw: RawCoap
) -> None:
    """The running collector's pending view skips the claim of a meter with nothing
    pending; a command queued afterwards is announced and rides on the next 2.04."""
    before = metrics.COMMAND_CLAIMS_SKIPPED._value.get()
    for n in range(20):  # the view is live moments after the collector starts
        reply = await meter.post(raw, cjt188_frame(device.address, 60_000 + n, hour(20 + n)))
        assert (reply.code, reply.payload) == ("2.04", b"")
        if await skipped_since(before, 0.5):
            break
    assert metrics.COMMAND_CLAIMS_SKIPPED._value.get() > before
    cid = await queue_command(pool, device)
    await asyncio.sleep(ANNOUNCED_WITHIN_S)
    reply = await meter.post(raw, cjt188_frame(device.address, 61_000, hour(50)))
    assert json.loads(reply.payload)["cmds"][0]["id"] == cid


async def test_mqtt_windows_without_commands_run_no_claim(
    pool: asyncpg.Pool, broker: Broker, device: ProvisionedDevice, collector: RunningCollector
) -> None:
    """MQTT too: the meter the store resolved from the topic has nothing pending, so its
    window runs no claim; a command queued afterwards goes to its down topic."""
    client = MqttMeter(broker.port, device.mqtt)
    try:
        assert client.subscribe() == [1]
        before = metrics.COMMAND_CLAIMS_SKIPPED._value.get()
        for n in range(20):
            frame = cjt188_frame(device.address, 70_000 + n, hour(60 + n))
            assert client.publish(client.topic_up, frame) == 0
            if await skipped_since(before, 1.0):
                break
        assert metrics.COMMAND_CLAIMS_SKIPPED._value.get() > before
        assert await asyncio.to_thread(client.next_message, 0.5) is None
        cid = await queue_command(pool, device)
        await asyncio.sleep(ANNOUNCED_WITHIN_S)
        assert client.publish(client.topic_up, cjt188_frame(device.address, 71_000, hour(90))) == 0
        got = await asyncio.to_thread(client.next_message, 15)
        assert got is not None
        assert json.loads(got[1])["cmds"][0]["id"] == cid
    finally:
        client.close()


async def answered_behind(
    pool: asyncpg.Pool, broker: Broker, device: ProvisionedDevice, poison: bytes, h: int
) -> None:
    """A command's window over MQTT, then 30 result messages `poison` on the device's
    result topic (more than the broker keeps in flight to the collector: 20) and then its
    real answer, which must make the command acknowledged."""
    cid = await queue_command(pool, device, kind="clock")
    dev = CommandExecutor(device.address, "cjt188")
    client = MqttMeter(broker.port, device.mqtt)
    try:
        assert client.subscribe() == [1]
        frame = cjt188_frame(device.address, 80_000 + h, hour(h))
        assert client.publish(client.topic_up, frame) == 0
        got = await asyncio.to_thread(client.next_message, 15)
        assert got is not None
        for _ in range(30):
            assert client.publish(client.topic_res, poison) == 0
        assert client.publish(client.topic_res, run(dev, got[1])) == 0
        assert (await wait_state(pool, cid, "acknowledged"))["reason"] == "device_confirmed"
    finally:
        client.close()


async def test_results_nested_past_the_parser_are_refused_and_acknowledged(
    pool: asyncpg.Pool,
    broker: Broker,
    device: ProvisionedDevice,
    collector: RunningCollector,
    meter: OscoreMeter,
    raw: RawCoap,
) -> None:
    """A result message nested deeper than the JSON parser recurses is refused like any
    malformed one: over MQTT acknowledged, so that more of them than the broker keeps in
    flight do not hold back the device's real answer behind them; over CoAP 4.00."""
    await answered_behind(pool, broker, device, b"[" * 1500 + b"]" * 1500, 7)
    # a well-formed answer (read as one before the limit: 2.04 or 4.04, not 4.00) whose
    # result nests past the depth limit, within one CoAP message
    nested = b'{"id":1,"ok":true,"result":' + b'{"a":' * 40 + b"0" + b"}" * 41
    assert (await meter.post(raw, nested, path="c")).code == "4.00"


async def test_a_result_that_fails_unexpectedly_is_acknowledged(
    pool: asyncpg.Pool,
    broker: Broker,
    device: ProvisionedDevice,
    collector: RunningCollector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A result message whose handling fails for a reason no one foresaw (a fault of ours,
    injected here) is logged and acknowledged: more of them than the broker keeps in
    flight do not hold back the device's real answer."""
    real = downlink.Downlinks.answer

    async def faulty(
        self: downlink.Downlinks, meter_id: int, address: str, body: bytes
    ) -> dict[int, str]:
        if body == b'{"fault":1}':
            raise RuntimeError("injected")
        return await real(self, meter_id, address, body)

    monkeypatch.setattr(downlink.Downlinks, "answer", faulty)
    await answered_behind(pool, broker, device, b'{"fault":1}', 8)
