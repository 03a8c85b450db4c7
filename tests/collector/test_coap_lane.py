"""The uplink lane (`collector.coap_lane`): the common uplink answered beside aiocoap's
message layer, everything else handed to aiocoap's path unchanged.

The option parser is checked against aiocoap's decoder on built and mutated datagrams;
the rest runs the real collector (database, pipeline, OSCORE contexts) over raw UDP."""

from __future__ import annotations

import asyncio
import random
import secrets
import struct
import time
from collections.abc import AsyncIterator
from typing import cast

import aiocoap
import asyncpg
import pytest
from collector_testkit import OscoreMeter, RawCoap, cjt188_frame, hour, parse_reply
from conftest import Broker, RunningCollector, add_meter, collector_settings, count, running
from prometheus_client import REGISTRY

from collector import metrics
from collector.coap_lane import UplinkLane, options
from collector.settings import CoapSettings
from devices.provision import ProvisionedDevice

READINGS = "SELECT count(*) FROM readings WHERE meter_id = $1"
RAW = "SELECT count(*) FROM raw_uplinks WHERE meter_id = $1"


def lane(outcome: str) -> float:
    """nbmeter_collector_coap_lane_total{outcome}: answered or handed_on."""
    value = REGISTRY.get_sample_value("nbmeter_collector_coap_lane_total", {"outcome": outcome})
    return value or 0.0


def _random_message(rng: random.Random) -> bytes:
    msg = aiocoap.Message(code=aiocoap.POST, _mtype=aiocoap.CON, _mid=rng.randrange(65536))
    msg.token = rng.randbytes(rng.randrange(9))
    msg.opt.uri_path = tuple("x" * rng.choice((1, 12, 13, 14, 268, 269, 300)) for _ in range(2))
    if rng.random() < 0.5:
        msg.opt.oscore = rng.randbytes(rng.randrange(1, 20))
    if rng.random() < 0.5:
        msg.opt.uri_query = ("t=" + "q" * rng.randrange(30),)
    if rng.random() < 0.5:
        msg.opt.content_format = rng.choice((0, 60, 112, 11542))
    if rng.random() < 0.3:
        msg.opt.size1 = rng.randrange(1 << 20)
    msg.payload = rng.randbytes(rng.randrange(3))
    return bytes(msg.encode())


def test_option_parser_agrees_with_aiocoap() -> None:
    """Whatever the lane's parser reads from a datagram, aiocoap's decoder reads the same
    options and payload; a format error aiocoap refuses, the lane's parser refuses too
    (what it refuses beyond that goes to aiocoap's path)."""
    rng = random.Random(7)
    agreed = refused = 0
    for n in range(3000):
        data = bytearray(_random_message(rng))
        if n % 2:  # mutate: bit flips, truncation, extension
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            data = data[: rng.randrange(4, len(data) + 1)] + rng.randbytes(rng.randrange(3))
        raw = bytes(data)
        parsed = options(raw, 4 + (raw[0] & 15)) if raw[0] & 15 <= 8 else None
        try:
            decoded = aiocoap.Message.decode(raw)
        except UnicodeDecodeError:  # a value aiocoap cannot read: not "u", never taken
            continue
        except aiocoap.error.UnparsableMessage as exc:
            if str(exc).startswith("undecodable message"):  # the same, once the collector
                continue  # ran (coap_patches.patch_message_decode)
            assert parsed is None, raw.hex()  # a format error: the lane's parser too
            refused += 1
            continue
        if parsed is None:
            continue
        found, start = parsed
        assert [(n, v) for n, v in found] == [
            (int(o.number), o.encode()) for o in decoded.opt.option_list()
        ], raw.hex()
        assert raw[start:] == decoded.payload
        agreed += 1
    assert agreed > 1000
    assert refused > 100


def _new_mid(datagram: bytes, step: int) -> bytes:
    """`datagram` under another message id (a new request, not a retransmission)."""
    mid = (int.from_bytes(datagram[2:4]) + step) % 65536
    return datagram[:2] + struct.pack("!H", mid) + datagram[4:]


async def test_lane_answers_an_oscore_uplink_and_its_retransmission(
    raw: RawCoap, pool: asyncpg.Pool, device: ProvisionedDevice
) -> None:
    """An OSCORE uplink is answered by the lane (2.04, piggybacked, the device decrypts
    it); the same datagram again gets the same bytes, and is stored once."""
    dev = OscoreMeter(device.oscore)
    datagram, token, request_id = dev.request(cjt188_frame(device.address, 10_000, hour(1)))
    before = lane("answered")
    first = await raw.exchange(datagram, token)
    assert lane("answered") == before + 1
    assert parse_reply(first).mtype == 2  # ACK: piggybacked
    assert dev.answer(first, request_id).code == "2.04"
    again = await raw.exchange(datagram, token)
    assert again == first
    assert lane("answered") == before + 1
    assert await count(pool, READINGS, device.meter_id) == 1
    assert await count(pool, RAW, device.meter_id) == 1


async def test_lane_answers_a_non_uplink_with_a_non(
    raw: RawCoap, pool: asyncpg.Pool, device: ProvisionedDevice
) -> None:
    """A NON uplink is the lane's too: its answer is a NON of ours (RFC 7252 §5.2.3) the
    device decrypts to 2.04; the same datagram again is a duplicate, answered with
    nothing and stored once."""
    dev = OscoreMeter(device.oscore)
    datagram, token, request_id = dev.request(cjt188_frame(device.address, 15_000, hour(1)))
    non = bytes([datagram[0] | 0x10]) + datagram[1:]  # type 1: NON
    before, seen = lane("answered"), len(raw.replies)
    first = await raw.exchange(non, token)
    reply = parse_reply(first)
    assert reply.mtype == 1  # NON
    assert dev.answer(first, request_id).code == "2.04"
    assert lane("answered") == before + 1
    raw.send(non)
    await asyncio.sleep(0.5)
    assert len(raw.replies) == seen + 1
    assert lane("answered") == before + 1
    assert await count(pool, READINGS, device.meter_id) == 1


async def test_lane_answers_failed_decryption_and_hands_on_replays(
    raw: RawCoap, pool: asyncpg.Pool, device: ProvisionedDevice
) -> None:
    """A tampered ciphertext gets the lane's 4.00 "decryption failed" (aiocoap's path's
    answer, without its machinery and a second decryption), noted once, and leaves the
    replay window alone (the genuine request is then taken); its sequence number sent
    again under a new message id is a replay: aiocoap's path answers the recorded 2.04
    with a partial IV of ours (RFC 8613 §7.5.1), and nothing is stored twice."""
    dev = OscoreMeter(device.oscore)
    datagram, token, request_id = dev.request(cjt188_frame(device.address, 20_000, hour(2)))
    # another message id: the same one would be a retransmission, answered as the first
    tampered = _new_mid(datagram[:-1] + bytes([datagram[-1] ^ 1]), 3)
    handed, answered = lane("handed_on"), lane("answered")
    refused = metrics.COAP_REJECTED.labels("oscore_decrypt.failed")._value.get()
    reply = await raw.exchange(tampered, token)
    bad = dev.answer(reply, request_id)
    assert (bad.code, bad.payload) == ("4.00", b"decryption failed")
    assert aiocoap.Message.decode(reply).mtype == aiocoap.ACK
    assert (lane("handed_on"), lane("answered")) == (handed, answered + 1)
    assert metrics.COAP_REJECTED.labels("oscore_decrypt.failed")._value.get() == refused + 1
    good = await raw.exchange(datagram, token)
    assert dev.answer(good, request_id).code == "2.04"
    assert lane("answered") == answered + 2
    again = dev.answer(await raw.exchange(_new_mid(datagram, 7), token), request_id)
    assert (again.code, again.own_piv) == ("2.04", True)
    assert lane("handed_on") == handed + 1
    assert await count(pool, READINGS, device.meter_id) == 1


async def test_lane_takes_lab_uplinks_once_the_tenant_is_known(
    raw: RawCoap, pool: asyncpg.Pool, lab_tenant: str
) -> None:
    """A lab tenant's first plain uplink goes through aiocoap's path (which looks the
    tenant up); later ones are the lane's. An unknown tenant is aiocoap's 4.01."""
    address = f"{secrets.randbelow(10**14):014d}"
    meter_id = await add_meter(pool, lab_tenant, address)
    query = f"t={lab_tenant}"
    first = await raw.post(cjt188_frame(address, 1_000, hour(1)), query=query)
    assert first.code_str == "2.04"
    answered = lane("answered")
    second = await raw.post(cjt188_frame(address, 2_000, hour(2)), query=query)
    assert second.code_str == "2.04"
    assert lane("answered") == answered + 1
    refused = await raw.post(cjt188_frame(address, 3_000, hour(3)), query="t=no-such-lab")
    assert refused.code_str == "4.01"
    assert await count(pool, READINGS, meter_id) == 2


class _Captured(RawCoap):
    """A raw client that keeps every datagram, empty ACKs included."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.seen.append(data)
        super().datagram_received(data, addr)


async def test_a_late_answer_gets_an_empty_ack_then_a_separate_con(
    collector: RunningCollector, pool: asyncpg.Pool, device: ProvisionedDevice
) -> None:
    """While the commit waits (a lock held on the credentials table, longer than
    empty_ack_delay_s), the device gets an empty ACK at once, then the answer as a CON
    of ours, which it acknowledges; a retransmission meanwhile gets the empty ACK again."""
    udp = cast(_Captured, await _Captured.open(collector.coap_port))
    dev = OscoreMeter(device.oscore)
    datagram, token, request_id = dev.request(cjt188_frame(device.address, 30_000, hour(3)))
    mid = int.from_bytes(datagram[2:4])
    delay_s = collector.settings.coap.empty_ack_delay_s
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE device_credentials IN SHARE MODE")
            udp.send(datagram)
            await asyncio.sleep(delay_s + 0.4)
            empty = [parse_reply(d) for d in udp.seen]
            assert [(r.mtype, r.code, r.mid) for r in empty] == [(2, 0, mid)]
            udp.send(datagram)  # the device's retransmission: the empty ACK again
            await asyncio.sleep(0.2)
            assert udp.seen[1] == udp.seen[0]
        started = time.monotonic()
        while len(udp.seen) < 3 and time.monotonic() - started < 10:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        separate = parse_reply(udp.seen[2])
        assert (separate.mtype, separate.token) == (0, token)  # a CON of ours
        assert dev.answer(udp.seen[2], request_id).code == "2.04"
        await asyncio.sleep(3.5)  # acknowledged (RawCoap ACKs CONs): no retransmission
        assert len(udp.seen) == 3
    finally:
        udp.close()
    assert await count(pool, READINGS, device.meter_id) == 1


@pytest.fixture
async def laneless(
    db_url: str, broker: Broker, credentials_key: str
) -> AsyncIterator[RunningCollector]:
    """An in-process collector with the lane switched off (aiocoap's path for all)."""
    settings = collector_settings(db_url, broker, credentials_key)
    coap = CoapSettings(**{**settings.coap.model_dump(), "uplink_lane": False})
    async with running(settings.model_copy(update={"coap": coap})) as collector:
        yield collector


async def test_without_the_lane_aiocoap_answers_the_same(
    laneless: RunningCollector, pool: asyncpg.Pool, device: ProvisionedDevice
) -> None:
    """uplink_lane = false: the same uplink, answered by aiocoap's path alone."""
    udp = await RawCoap.open(laneless.coap_port)
    dev = OscoreMeter(device.oscore)
    datagram, token, request_id = dev.request(cjt188_frame(device.address, 40_000, hour(4)))
    answered, handed = lane("answered"), lane("handed_on")
    try:
        first = await udp.exchange(datagram, token)
        assert dev.answer(first, request_id).code == "2.04"
        assert await udp.exchange(datagram, token) == first
    finally:
        udp.close()
    assert (lane("answered"), lane("handed_on")) == (answered, handed)
    assert await count(pool, READINGS, device.meter_id) == 1


def _rejected(kind: str) -> float:
    value = REGISTRY.get_sample_value("nbmeter_collector_coap_rejected_total", {"kind": kind})
    return value or 0.0


async def test_a_fault_in_the_lane_costs_no_uplink(
    raw: RawCoap, pool: asyncpg.Pool, device: ProvisionedDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault (an exception injected where a bug would raise) before the lane admits an
    uplink hands the datagram to aiocoap's path, which stores and answers it; one after
    the commit drops the deduplication entry, so the device's retransmission is answered
    from the recorded answer. Each is noted (coap_rejected{kind="coap_lane.failed"})."""

    def fault(*args: object) -> None:
        raise RuntimeError("injected")

    dev = OscoreMeter(device.oscore)
    noted = _rejected("coap_lane.failed")
    with monkeypatch.context() as patch:
        patch.setattr(UplinkLane, "_open", fault)
        answer = await dev.post(raw, cjt188_frame(device.address, 50_000, hour(5)))
    assert answer.code == "2.04"
    assert _rejected("coap_lane.failed") == noted + 1
    with monkeypatch.context() as patch:
        patch.setattr(UplinkLane, "_answer_outcome", fault)
        late = await dev.post(raw, cjt188_frame(device.address, 60_000, hour(6)))
    assert (late.code, late.own_piv) == ("2.04", True)  # the retransmission's answer
    assert _rejected("coap_lane.failed") == noted + 2
    assert await count(pool, READINGS, device.meter_id) == 2
    assert await count(pool, RAW, device.meter_id) == 2
