"""CoAP security under attack, on the real stack: credential changes take effect at once,
unauthenticated senders cost little, malformed OSCORE gets 4.02 without a traceback,
answers survive kill -9, and a process with other settings cannot join the port."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import struct
import time
from collections.abc import AsyncIterator

import aiocoap
import asyncpg
import pytest
from collector_testkit import (
    MIDS,
    CollectorProcess,
    OscoreMeter,
    RawCoap,
    cjt188_frame,
    coap_post,
    free_udp_port,
    hour,
    mutated,
)
from conftest import Broker, RunningCollector, count, new_address

from collector import metrics
from collector.coap import start_server
from collector.pipeline import Pipeline
from collector.settings import PipelineSettings
from devices.provision import ProvisionedDevice, derive, provision_device, revoke_device
from storage import credentials
from storage.coap_peers import PeerMismatchError
from storage.credentials import parse_key

# while the collector LISTENs, a rotation or revocation reaches it with the commit's NOTIFY
LISTENING_BOUND_S = 1.0
# README: the worst case, while the LISTEN connection is down (context_fallback_ttl_s)
FALLBACK_BOUND_S = 5.0

READINGS = "SELECT count(*) FROM readings WHERE meter_id = $1"
RAW = "SELECT count(*) FROM raw_uplinks WHERE meter_id = $1"


def _oscore_datagram(option: bytes, payload: bytes = b"\x00" * 12) -> tuple[bytes, bytes]:
    """A CON POST /u carrying `option` as its OSCORE option (9); (datagram, token)."""
    token = secrets.token_bytes(4)
    head = bytes([0x44, 0x02]) + struct.pack("!H", next(MIDS) % 65536) + token
    # option 9 (OSCORE; a length of 13 and more in one extra byte) then 11 (Uri-Path "u")
    assert len(option) < 269
    length = (
        bytes([(9 << 4) | len(option)]) if len(option) < 13 else bytes([0x9D, len(option) - 13])
    )
    out = head + length + option + bytes([(2 << 4) | 1]) + b"u"
    return out + b"\xff" + payload, token


async def _post_until(
    device: OscoreMeter, udp: RawCoap, payload_of: object, want: str, within_s: float
) -> float:
    """Post new uplinks until one is answered `want`; return the seconds it took."""
    started = time.monotonic()
    n = 0
    while True:
        n += 1
        answer = await device.post(udp, payload_of(n))  # type: ignore[operator]
        if answer.code == want:
            return time.monotonic() - started
        if time.monotonic() - started > within_s:
            pytest.fail(f"still {answer.code} after {within_s} s (wanted {want})")
        await asyncio.sleep(0.02)


@pytest.fixture
async def udp(collector: RunningCollector) -> AsyncIterator[RawCoap]:
    """A raw UDP socket to the session's collector."""
    sock = await RawCoap.open(collector.coap_port)
    yield sock
    sock.close()


async def test_rotated_oscore_context_is_refused_within_the_bound(
    collector: RunningCollector,
    udp: RawCoap,
    pool: asyncpg.Pool,
    db_url: str,
    device: ProvisionedDevice,
    credentials_key: str,
) -> None:
    """After `device provision` rotates a device, its old context gets 4.01 within 1 s and
    the new one is stored."""
    old = OscoreMeter(device.oscore)
    assert (await old.post(udp, cjt188_frame(device.address, 10_000, hour(1)))).code == "2.04"
    rotated = await provision_device(
        db_url, device.tenant, device.address, credentials_key=credentials_key
    )
    took = await _post_until(
        old,
        udp,
        lambda n: cjt188_frame(device.address, 10_000 * (n + 1), hour(1 + n)),
        "4.01",
        LISTENING_BOUND_S,
    )
    assert took < LISTENING_BOUND_S
    new = OscoreMeter(rotated.oscore)
    assert (await new.post(udp, cjt188_frame(device.address, 990_000, hour(99)))).code == "2.04"
    stored = await pool.fetch(
        "SELECT register_ml FROM readings WHERE meter_id = $1 ORDER BY read_s", device.meter_id
    )
    assert [r[0] for r in stored] == [10_000, 990_000]


async def test_contexts_stored_with_and_without_derived_keys_both_work(
    collector: RunningCollector,
    udp: RawCoap,
    pool: asyncpg.Pool,
    device: ProvisionedDevice,
    credentials_key: str,
) -> None:
    """Provisioning seals the context's derived keys (equal to aiocoap's derivation from
    the master secret); a context sealed without them (before) is derived on load, and
    one sealed as JSON (the layout before the binary one) opens: all authenticate and
    store."""
    key = parse_key(credentials_key)
    kid = bytes.fromhex(device.oscore["sender_id"])
    secret = bytes.fromhex(device.oscore["master_secret"])
    salt = bytes.fromhex(device.oscore["master_salt"])
    async with pool.acquire() as conn:
        found, _ = await credentials.load_oscore_many(conn, key, [kid])
    assert found[kid].derived == derive(kid, b"\x00", secret, salt)
    dev = OscoreMeter(device.oscore)
    assert (await dev.post(udp, cjt188_frame(device.address, 10_000, hour(1)))).code == "2.04"
    meter = credentials.MeterRef(device.meter_id, found[kid].tenant_id, device.address)
    # then, each under a key id never seen (so only loading that row can authenticate the
    # device): a context as stored before derived keys were kept (master secret and salt
    # only), and one sealed as JSON of hex strings (the layout before the binary one)
    json_blob = json.dumps({"secret": secret.hex(), "salt": salt.hex()}).encode()
    for n, sealed_as in enumerate([None, json_blob], start=2):
        new_kid = secrets.token_bytes(6)
        async with pool.acquire() as conn:
            await credentials.store_oscore(
                conn,
                key,
                meter,
                kid=new_kid,
                sender_id=b"\x00",
                master_secret=secret,
                master_salt=salt,
            )
            if sealed_as is not None:
                await conn.execute(
                    "UPDATE device_credentials SET oscore_sealed = $2 WHERE meter_id = $1",
                    device.meter_id,
                    credentials.seal(key, sealed_as, device.meter_id),
                )
            loaded, _ = await credentials.load_oscore_many(conn, key, [new_kid])
        assert loaded[new_kid].derived is None
        old_dev = OscoreMeter(dict(device.oscore, sender_id=new_kid.hex()))
        frame = cjt188_frame(device.address, n * 10_000, hour(n))
        assert (await old_dev.post(udp, frame)).code == "2.04"
        assert await pool.fetchval(READINGS, device.meter_id) == n


async def test_revoked_device_is_refused_within_the_bound(
    collector: RunningCollector,
    udp: RawCoap,
    db_url: str,
    device: ProvisionedDevice,
    broker: Broker,
) -> None:
    """`device revoke` makes the device's next OSCORE request a 4.01 within 1 s."""
    dev = OscoreMeter(device.oscore)
    assert (await dev.post(udp, cjt188_frame(device.address, 10_000, hour(1)))).code == "2.04"
    revoked = await revoke_device(
        db_url, device.tenant, device.address, mqtt_admin_url=broker.admin_url
    )
    assert revoked.oscore
    assert revoked.mqtt is not None
    took = await _post_until(
        dev,
        udp,
        lambda n: cjt188_frame(device.address, 10_000 * (n + 1), hour(1 + n)),
        "4.01",
        LISTENING_BOUND_S,
    )
    assert took < LISTENING_BOUND_S


async def test_rotation_while_the_listener_is_down_is_refused_within_the_fallback_ttl(
    collector: RunningCollector,
    udp: RawCoap,
    pool: asyncpg.Pool,
    db_url: str,
    device: ProvisionedDevice,
    credentials_key: str,
) -> None:
    """With its LISTEN connection killed, the collector drops its contexts and a rotated
    credential is still refused within the stated worst case (5 s)."""
    old = OscoreMeter(device.oscore)
    assert (await old.post(udp, cjt188_frame(device.address, 10_000, hour(1)))).code == "2.04"
    killed = await pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = 'nbmeter-credentials' AND datname = current_database()"
    )
    assert killed >= 1
    await provision_device(db_url, device.tenant, device.address, credentials_key=credentials_key)
    took = await _post_until(
        old,
        udp,
        lambda n: cjt188_frame(device.address, 10_000 * (n + 1), hour(1 + n)),
        "4.01",
        FALLBACK_BOUND_S,
    )
    assert took < FALLBACK_BOUND_S
    # and the listener comes back by itself
    deadline = time.monotonic() + 10
    while metrics.CREDENTIALS_LISTENING._value.get() != 1 and time.monotonic() < deadline:  # noqa: ASYNC110 (a gauge, no event to wait on)
        await asyncio.sleep(0.1)
    assert metrics.CREDENTIALS_LISTENING._value.get() == 1


async def test_unknown_kid_flood_costs_a_query_per_batch_not_per_datagram(
    collector: RunningCollector, udp: RawCoap
) -> None:
    """3,000 requests with made-up key ids all get 4.01, from a tenth as many queries or less;
    sent again, they are answered from the negative cache with no query at all."""
    kids = [secrets.token_bytes(6) for _ in range(3000)]
    # flags: k (0x08) + 1-byte partial IV; then the piv, then the kid
    datagrams = [_oscore_datagram(bytes([0x09, 0x01]) + kid) for kid in kids]
    before = metrics.OSCORE_LOOKUPS._value.get()

    gate = asyncio.Semaphore(100)  # 100 in flight: a flood, without overflowing our socket

    async def one(datagram: bytes, token: bytes) -> bytes:
        async with gate:
            return await udp.exchange(datagram, token, timeout_s=20)

    async def send_all() -> list[bytes]:
        return list(await asyncio.gather(*(one(d, t) for d, t in datagrams)))

    answers = await send_all()
    queries = metrics.OSCORE_LOOKUPS._value.get() - before
    assert {aiocoap.Message.decode(a).code for a in answers} == {aiocoap.UNAUTHORIZED}
    assert 1 <= queries <= len(kids) / 10
    datagrams = [_oscore_datagram(bytes([0x09, 0x02]) + kid) for kid in kids]  # new requests
    again = await send_all()
    assert {aiocoap.Message.decode(a).code for a in again} == {aiocoap.UNAUTHORIZED}
    assert metrics.OSCORE_LOOKUPS._value.get() - before == queries


async def test_unknown_kid_negative_cache_is_cleared_by_provisioning(
    collector: RunningCollector, udp: RawCoap, db_url: str, tenant_slug: str, credentials_key: str
) -> None:
    """A key id first seen unknown works as soon as a device is provisioned with it."""
    # provision, revoke (kid known-unknown after a request), provision again: the new kid
    # is unknown first, then known; the NOTIFY of the provisioning clears the negative entry
    address = new_address()
    first = await provision_device(db_url, tenant_slug, address, credentials_key=credentials_key)
    dev = OscoreMeter(first.oscore)
    assert (await dev.post(udp, cjt188_frame(address, 10_000, hour(1)))).code == "2.04"
    await revoke_device(db_url, tenant_slug, address)
    await _post_until(dev, udp, lambda n: cjt188_frame(address, 10_000, hour(1 + n)), "4.01", 1.0)
    again = await provision_device(db_url, tenant_slug, address, credentials_key=credentials_key)
    new = OscoreMeter(again.oscore)
    took = await _post_until(
        new, udp, lambda n: cjt188_frame(address, 10_000 * n, hour(10 + n)), "2.04", 1.0
    )
    assert took < LISTENING_BOUND_S


async def test_malformed_oscore_options_get_4_02_without_a_traceback(
    collector: RunningCollector, udp: RawCoap, capsys: pytest.CaptureFixture[str]
) -> None:
    """Undecodable OSCORE options are answered 4.02 Bad Option (RFC 8613 §8.2), never 5.00;
    nothing is logged with a traceback and at most a few lines per 10 s window."""
    capsys.readouterr()
    bad = [
        bytes([0xE0]),  # reserved flag bits
        bytes([0x05, 0x01]),  # a 5-byte partial IV announced, one byte present
        bytes([0x10]),  # kid context announced (h), nothing follows
        bytes([0x19, 0x01, 0x09]),  # kid context of 9 bytes announced, none present
    ]
    before = metrics.COAP_REJECTED.labels("oscore_option.rejected")._value.get()
    n = 400
    datagrams = [_oscore_datagram(bad[i % len(bad)]) for i in range(n)]
    answers = await asyncio.gather(*(udp.exchange(d, t) for d, t in datagrams))
    codes = [aiocoap.Message.decode(a).code for a in answers]
    assert set(codes) == {aiocoap.BAD_OPTION}
    counted = metrics.COAP_REJECTED.labels("oscore_option.rejected")._value.get() - before
    assert counted == n
    out = capsys.readouterr()
    logged = out.out + out.err
    assert "Traceback" not in logged
    assert logged.count("oscore_option.rejected") <= 2 * collector.settings.coap.log_per_window


async def test_a_partial_iv_past_5_bytes_gets_4_00_without_a_traceback(
    collector: RunningCollector,
    udp: RawCoap,
    device: ProvisionedDevice,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A known key id with a 6- or 7-byte partial IV (the option's 3 bits allow them, RFC
    8613 §6.1 reserves them) makes no nonce: 4.00 as a message that does not decrypt,
    never 5.00, no lane fault, no traceback (aiocoap refuses such a nonce by an assertion
    only; the collector refuses it itself)."""
    capsys.readouterr()
    kid = OscoreMeter(device.oscore).ctx.sender_id
    failed = metrics.COAP_REJECTED.labels("coap_lane.failed")._value.get()
    refused = metrics.COAP_REJECTED.labels("oscore_decrypt.failed")._value.get()
    n = 20
    datagrams = [
        _oscore_datagram(bytes([0x08 | size]) + secrets.token_bytes(size) + kid)
        for size in (6, 7)
        for _ in range(n // 2)
    ]
    answers = await asyncio.gather(*(udp.exchange(d, t) for d, t in datagrams))
    assert {aiocoap.Message.decode(a).code for a in answers} == {aiocoap.BAD_REQUEST}
    assert metrics.COAP_REJECTED.labels("coap_lane.failed")._value.get() == failed
    assert metrics.COAP_REJECTED.labels("oscore_decrypt.failed")._value.get() - refused == n
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    # the meter's own uplinks are unaffected
    meter = OscoreMeter(device.oscore)
    assert (await meter.post(udp, cjt188_frame(device.address, 10_000, hour(1)))).code == "2.04"


async def test_mutated_uplinks_never_get_5_00(
    collector: RunningCollector,
    udp: RawCoap,
    device: ProvisionedDevice,
    lab_tenant: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Seeded mutations of valid OSCORE and plain uplinks (header, options, ciphertext,
    lengths): every answer is a 2.04 or a 4.xx, never 5.00; no lane fault, no rendering
    fault, no traceback; the meter's next real uplink is stored."""
    capsys.readouterr()
    rng = random.Random(16)
    meter = OscoreMeter(device.oscore)
    kinds = ("coap_lane.failed", "coap.render_failed")
    faults = {kind: metrics.COAP_REJECTED.labels(kind)._value.get() for kind in kinds}
    for i in range(600):
        frame = cjt188_frame(device.address, 10_000 * (i + 1), hour(1 + i))
        if i % 3:
            datagram, _, _ = meter.request(frame)
        else:
            datagram = coap_post(0, secrets.token_bytes(4), frame, query=f"t={lab_tenant}")
        udp.send(mutated(datagram, rng))
    await udp.settled()  # the answers of the last ones
    assert len(udp.replies) >= 200  # (seen: 338, nearly all 4.00 and 4.01)
    codes = {reply.code >> 5 for reply in udp.replies}
    assert codes <= {2, 4}, sorted(hex(reply.code) for reply in udp.replies if reply.code >> 5 == 5)
    assert {kind: metrics.COAP_REJECTED.labels(kind)._value.get() for kind in kinds} == faults
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    answer = await meter.post(udp, cjt188_frame(device.address, 9_990_000, hour(700)))
    assert answer.code == "2.04"


def _odd_inner_request(rng: random.Random, frame: bytes) -> aiocoap.Message:
    """A request an authenticated device could protect: any method, path, options and
    payload (a frame, random bytes, nothing)."""
    code = rng.choice(
        [aiocoap.GET, aiocoap.POST, aiocoap.PUT, aiocoap.DELETE, aiocoap.FETCH, aiocoap.iPATCH]
    )
    path = rng.choice([("u",), ("c",), ("rd",), ("dp",), (".well-known", "core"), ("x",),
                       ("u", "x"), ("rd", "nope"), ()])  # fmt: skip
    payload = rng.choice([frame, rng.randbytes(rng.randrange(1, 300)), b"", frame[:5]])
    msg = aiocoap.Message(code=code, uri_path=path, payload=payload)
    if rng.random() < 0.4:
        msg.opt.content_format = rng.choice([0, 42, 50, 60, 110, 112, 11542, 65000])
    if rng.random() < 0.2:
        msg.opt.observe = rng.choice([0, 1])
    if rng.random() < 0.2:
        msg.opt.uri_query = (rng.choice(["t=x", "ep=1", "lt=abc", "lwm2m=1.1", "b=U", "=", ""]),)
    if rng.random() < 0.15:
        msg.opt.block1 = aiocoap.optiontypes.BlockOption.BlockwiseTuple(
            rng.randrange(4), rng.random() < 0.5, rng.randrange(7)
        )
    if rng.random() < 0.1:
        msg.opt.accept = rng.choice([0, 112, 60000])
    return msg


async def test_odd_requests_of_an_authenticated_device_never_get_5_00(
    udp: RawCoap, device: ProvisionedDevice, capsys: pytest.CaptureFixture[str]
) -> None:
    """Well-protected requests of a known device with any method, path, options and
    payload: each answered (decryptably) with 2.xx or 4.xx, never 5.xx; no lane or
    rendering fault, no traceback; its real uplink is stored afterwards."""
    capsys.readouterr()
    rng = random.Random(16)
    meter = OscoreMeter(device.oscore)
    kinds = ("coap_lane.failed", "coap.render_failed")
    faults = {kind: metrics.COAP_REJECTED.labels(kind)._value.get() for kind in kinds}
    codes: dict[str, int] = {}
    for batch in range(10):
        sent = []
        for i in range(30):
            frame = cjt188_frame(device.address, 10_000 * (batch * 30 + i + 1), hour(1))
            protected, request_id = meter.ctx.protect(_odd_inner_request(rng, frame))
            protected.mtype = aiocoap.CON
            protected.mid = next(MIDS) % 65536
            protected.token = secrets.token_bytes(4)
            sent.append((protected.encode(), protected.token, request_id))
        answers = await asyncio.gather(*(udp.exchange(d, t) for d, t, _ in sent))
        for (_, _, request_id), data in zip(sent, answers, strict=True):
            code = meter.answer(data, request_id).code
            codes[code] = codes.get(code, 0) + 1
    # the database is up and the pipeline idle: no 5.03 either (an Update carrying a NUL
    # in its link format was one, "database unavailable", until its text was checked)
    assert not [c for c in codes if c.startswith("5.")], codes
    assert len(codes) >= 5, codes  # (seen: 2.04, 2.31 and 4.00, 4.04, 4.05, 4.08, 4.13, 4.15)
    assert {kind: metrics.COAP_REJECTED.labels(kind)._value.get() for kind in kinds} == faults
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    answer = await meter.post(udp, cjt188_frame(device.address, 9_990_000, hour(700)))
    assert answer.code == "2.04"


async def test_unauthenticated_block1_starts_keep_bounded_state(
    collector: RunningCollector, udp: RawCoap, lab_tenant: str
) -> None:
    """Block1 starts without a lab tenant are refused (4.01) before any state is kept; a
    lab tenant's source holds at most `block1_max_per_source` transfers, the older ones
    evicted (their next block gets 4.08)."""
    limit = collector.settings.coap.block1_max_per_source
    base = metrics.BLOCK1_TRANSFERS._value.get()
    refused = []
    for _ in range(50):
        token = secrets.token_bytes(4)
        dgram = coap_post(next(MIDS) % 65536, token, b"x" * 16, block1=(0 << 4) | 8 | 0)
        refused.append(await udp.exchange(dgram, token))
    assert {aiocoap.Message.decode(a).code for a in refused} == {aiocoap.UNAUTHORIZED}
    assert metrics.BLOCK1_TRANSFERS._value.get() == base
    # a transfer is its endpoint plus its options (RFC 7959 §2.4), so one socket each
    senders = [await RawCoap.open(collector.coap_port) for _ in range(20)]
    try:
        for n, sender in enumerate(senders):
            token = secrets.token_bytes(4)
            dgram = coap_post(
                next(MIDS) % 65536, token, b"x" * 16, query=f"t={lab_tenant}", block1=8
            )
            reply = aiocoap.Message.decode(await sender.exchange(dgram, token))
            assert reply.code == aiocoap.CONTINUE, n
        assert metrics.BLOCK1_TRANSFERS._value.get() - base <= limit
        # the oldest transfer was evicted: its last block is 4.08 Request Entity Incomplete
        token = secrets.token_bytes(4)
        dgram = coap_post(
            next(MIDS) % 65536, token, b"y" * 16, query=f"t={lab_tenant}", block1=(1 << 4)
        )
        reply = aiocoap.Message.decode(await senders[0].exchange(dgram, token))
        assert reply.code == aiocoap.REQUEST_ENTITY_INCOMPLETE
        # the newest is still held: its last block completes the upload (undecodable: 4.00)
        token = secrets.token_bytes(4)
        dgram = coap_post(
            next(MIDS) % 65536, token, b"y" * 16, query=f"t={lab_tenant}", block1=(1 << 4)
        )
        reply = aiocoap.Message.decode(await senders[-1].exchange(dgram, token))
        assert reply.code == aiocoap.BAD_REQUEST
    finally:
        for sender in senders:
            sender.close()


async def test_retransmission_after_kill_9_gets_the_stored_answer(
    pool: asyncpg.Pool, db_url: str, device: ProvisionedDevice, credentials_key: str
) -> None:
    """A CON stored just before kill -9, sent again to the restarted collector, gets 2.04
    protected with a fresh server sequence number (not 4.01 "Replay detected"), and
    nothing is stored twice."""
    proc = CollectorProcess(db_url, NBMETER_CREDENTIALS_KEY=credentials_key)
    await proc.start()
    udp = await RawCoap.open(proc.port)
    try:
        dev = OscoreMeter(device.oscore)
        datagram, token, request_id = dev.request(cjt188_frame(device.address, 70_000, hour(7)))
        first = dev.answer(await udp.exchange(datagram, token), request_id)
        assert first.code == "2.04"
        proc.kill()
        await proc.wait()
        await proc.start()
        again_raw = await udp.exchange(datagram, token)
        again = dev.answer(again_raw, request_id)
        assert (again.outer, again.code) == (aiocoap.CHANGED, "2.04")
        # RFC 8613 §7.5.1: a second answer carries a partial IV of its own
        assert aiocoap.Message.decode(again_raw).opt.oscore not in (None, b"")
        # a new uplink after the restart is stored as usual
        assert (await dev.post(udp, cjt188_frame(device.address, 80_000, hour(8)))).code == "2.04"
    finally:
        udp.close()
        if proc.proc is not None and proc.proc.returncode is None:
            proc.kill()
            await proc.wait(30)
    assert await count(pool, READINGS, device.meter_id) == 2
    assert await count(pool, RAW, device.meter_id) == 2


async def test_second_process_with_other_settings_is_refused(
    collector: RunningCollector, pool: asyncpg.Pool, credentials_key: str
) -> None:
    """A second server on the port with another max_payload_bytes refuses to start, naming
    the setting; one with the same settings joins and is announced."""
    settings = collector.settings.coap
    pipeline = Pipeline(PipelineSettings(), _never_commit)
    key = parse_key(credentials_key)
    other = settings.model_copy(update={"max_payload_bytes": settings.max_payload_bytes * 2})
    with pytest.raises(PeerMismatchError, match="max_payload_bytes"):
        await start_server(other, pipeline, pool, key)
    metrics.COAP_PEERS.set(0)  # the gauge is process-wide: only this join may raise it
    same = await start_server(settings, pipeline, pool, key)
    try:
        assert metrics.COAP_PEERS._value.get() >= 1
    finally:
        await same.shutdown()


async def test_second_collector_process_with_other_settings_exits(
    collector: RunningCollector, db_url: str, credentials_key: str
) -> None:
    """`python -m collector.main` on a busy port with other settings exits 2, saying which
    setting differs."""
    proc = CollectorProcess(
        db_url,
        collector.coap_port,
        NBMETER_CREDENTIALS_KEY=credentials_key,
        NBMETER_COAP__ACK_WAIT_S="3",
    )
    code, err = await proc.run_to_exit()
    assert code == 2, err.decode()[-3000:]
    assert b"ack_wait_s" in err
    assert b"Traceback" not in err


async def _never_commit(batch: list[object]) -> list[object]:
    raise AssertionError("nothing is offered in this test")


async def test_retransmission_to_another_process_gets_the_recorded_answer(
    collector: RunningCollector,
    udp: RawCoap,
    pool: asyncpg.Pool,
    device: ProvisionedDevice,
    credentials_key: str,
) -> None:
    """A CON stored through one collector, sent again to another process of the same
    database (as after a NAT rebinding between processes sharing a port), gets 2.04 there
    too, from the recorded answer; nothing is stored twice."""
    dev = OscoreMeter(device.oscore)
    datagram, token, request_id = dev.request(cjt188_frame(device.address, 60_000, hour(6)))
    assert dev.answer(await udp.exchange(datagram, token), request_id).code == "2.04"
    other_settings = collector.settings.coap.model_copy(update={"port": free_udp_port()})
    other = await start_server(
        other_settings,
        Pipeline(PipelineSettings(), _never_commit),
        pool,
        parse_key(credentials_key),
    )
    sock = await RawCoap.open(other_settings.port)
    try:
        again = dev.answer(await sock.exchange(datagram, token), request_id)
    finally:
        sock.close()
        await other.shutdown()
    assert (again.outer, again.code) == (aiocoap.CHANGED, "2.04")
    assert await count(pool, READINGS, device.meter_id) == 1
    assert await count(pool, RAW, device.meter_id) == 1
