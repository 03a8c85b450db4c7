"""DTLS-PSK CoAP (coaps://) interop: Debian's coap-client-openssl (libcoap3-bin), a DTLS
client that is not ours, against an in-process collector with the coaps listener on.

RFC 6347 (DTLS 1.2) with RFC 4279 PSK: the device sends its PSK identity in the
handshake; the collector finds the key (and the meter) by it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from brokerkit import free_port
from collector_testkit import cjt188_frame, hour
from conftest import count, new_address

from collector.main import run
from collector.settings import CoapSettings, CollectorSettings, DtlsSettings
from devices.provision import provision_device, revoke_device

CLIENT = shutil.which("coap-client-openssl")
pytestmark = [
    pytest.mark.skipif(
        CLIENT is None, reason="coap-client-openssl not installed (nbmeter stack tools)"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("DTLSSocket") is None,
        reason="DTLSSocket (tinydtls) not installed: pip install '.[dtls]' (nbmeter stack tools)",
    ),
]

_READINGS = "SELECT count(*) FROM readings r JOIN meters m USING (meter_id) WHERE m.address = $1"
_ARCHIVED = (
    "SELECT count(*) FROM raw_uplinks WHERE transport = 7"
    " AND meter_id = (SELECT meter_id FROM meters WHERE address = $1)"
)
_QUARANTINED = (
    "SELECT count(*) FROM quarantine q JOIN meters m USING (meter_id)"
    " WHERE m.address = $1 AND q.reason = $2"
)


@pytest.fixture(scope="module")
async def coaps_port(db_url: str, credentials_key: str) -> AsyncIterator[int]:
    """An in-process collector with coaps on a free UDP port (credential reload 0.2 s)."""
    port = free_port(socket.SOCK_DGRAM)
    settings = CollectorSettings(
        database_url=db_url,
        mqtt_url=None,
        credentials_key=credentials_key,  # type: ignore[arg-type]
        metrics_port=0,
        coap=CoapSettings(host="127.0.0.1", port=free_port(socket.SOCK_DGRAM)),
        dtls=DtlsSettings(host="127.0.0.1", port=port, reload_s=0.2),
    )
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(settings, stop=stop, started=started))
    await asyncio.wait_for(started.wait(), 20)
    yield port
    stop.set()
    await asyncio.wait_for(task, 40)


@pytest.fixture
async def dtls_device(
    pool: asyncpg.Pool, db_url: str, credentials_key: str
) -> tuple[str, dict[str, str]]:
    """A meter provisioned with a DTLS-PSK credential (in a tenant of its own); waits for
    the collector's credential table to pick it up."""
    slug = f"d-{uuid.uuid4().hex[:12]}"
    await pool.execute("INSERT INTO tenants (slug, name) VALUES ($1, $1)", slug)
    address = new_address()
    device = await provision_device(
        db_url, slug, address, credentials_key=credentials_key, oscore=False, dtls_psk=True
    )
    await asyncio.sleep(0.5)  # > reload_s
    return address, device.dtls


async def _post(port: int, identity: str, key: str, frame: bytes, tmp: Path) -> tuple[int, str]:
    """coap-client-openssl -u IDENTITY -k KEY POSTing `frame` to coaps://.../u."""
    path = tmp / f"{uuid.uuid4().hex}.bin"
    path.write_bytes(frame)
    assert CLIENT is not None
    proc = await asyncio.create_subprocess_exec(
        CLIENT,
        "-m", "post", "-f", str(path), "-u", identity, "-k", key, "-v", "7", "-B", "8",
        f"coaps://127.0.0.1:{port}/u",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(errors="replace")


async def test_psk_client_gets_changed_after_storage(
    coaps_port: int, dtls_device: tuple[str, dict[str, str]], pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """coap-client-openssl with the provisioned identity and key gets 2.04, and the
    reading is committed by then."""
    await _stored_once(coaps_port, dtls_device, pool, tmp_path)


async def _stored_once(
    coaps_port: int, dtls_device: tuple[str, dict[str, str]], pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """The device posts its first uplink: 2.04, the reading committed by then."""
    address, cred = dtls_device
    frame = cjt188_frame(address, 120_000, hour(50))
    code, out = await _post(coaps_port, cred["psk_identity"], cred["psk"], frame, tmp_path)
    assert "c:2.04" in out, out
    assert code == 0, out
    assert await count(pool, _READINGS, address) == 1


@pytest.mark.parametrize("wrong", ["key", "identity"])
async def test_wrong_key_or_unknown_identity_fails_the_handshake(
    coaps_port: int,
    dtls_device: tuple[str, dict[str, str]],
    pool: asyncpg.Pool,
    tmp_path: Path,
    wrong: str,
) -> None:
    """A wrong key or an identity nobody has: no CoAP answer at all, nothing stored."""
    address, cred = dtls_device
    identity = cred["psk_identity"] if wrong == "key" else "0123456789abcdef"
    key = "0" * 32 if wrong == "key" else cred["psk"]
    frame = cjt188_frame(address, 130_000, hour(51))
    _, out = await _post(coaps_port, identity, key, frame, tmp_path)
    assert "c:2." not in out, out
    assert "c:4." not in out, out
    assert await count(pool, _READINGS, address) == 0
    assert await count(pool, _ARCHIVED, address) == 0


async def test_other_meters_frame_is_quarantined_403(
    coaps_port: int, dtls_device: tuple[str, dict[str, str]], pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """A device using its PSK to send another meter's frame: 4.03, quarantined as
    identity_mismatch under its own meter, nothing stored."""
    address, cred = dtls_device
    frame = cjt188_frame(new_address(), 140_000, hour(52))
    _, out = await _post(coaps_port, cred["psk_identity"], cred["psk"], frame, tmp_path)
    assert "c:4.03" in out, out
    assert await count(pool, _READINGS, address) == 0
    assert await count(pool, _QUARANTINED, address, "identity_mismatch") == 1


async def test_revoked_key_fails_at_once(
    coaps_port: int,
    dtls_device: tuple[str, dict[str, str]],
    pool: asyncpg.Pool,
    db_url: str,
    tmp_path: Path,
) -> None:
    """`device revoke` reaches the collector by NOTIFY (incremental reads only add keys,
    so without it the old key would work forever): within a few seconds even on a loaded
    machine (0.1 s on a quiet one) a handshake with the old key fails, stays failing, and
    nothing sent after that is stored."""
    address, cred = dtls_device
    ok = cjt188_frame(address, 150_000, hour(53))
    _, out = await _post(coaps_port, cred["psk_identity"], cred["psk"], ok, tmp_path)
    assert "c:2.04" in out, out
    slug = await pool.fetchval(
        "SELECT t.slug FROM tenants t JOIN meters m USING (tenant_id) WHERE m.address = $1",
        address,
    )
    revoked = await revoke_device(db_url, slug, address)
    assert revoked.dtls
    revoked_at, accepted, h = time.monotonic(), 0, 54
    while True:  # requests raced with the NOTIFY are stored like any before the revoke
        await asyncio.sleep(0.1)
        later = cjt188_frame(address, 150_000 + 1_000 * (h - 53), hour(h))
        _, out = await _post(coaps_port, cred["psk_identity"], cred["psk"], later, tmp_path)
        h += 1
        if "c:2." not in out:
            break
        accepted += 1
        assert time.monotonic() - revoked_at < 5, "the revoked key still works after 5 s"
    again = cjt188_frame(address, 150_000 + 1_000 * (h - 53), hour(h))
    _, out = await _post(coaps_port, cred["psk_identity"], cred["psk"], again, tmp_path)
    assert "c:2." not in out, out
    assert await count(pool, _READINGS, address) == 1 + accepted


async def test_open_session_of_a_revoked_key_gets_401(
    coaps_port: int, dtls_device: tuple[str, dict[str, str]], pool: asyncpg.Pool, db_url: str
) -> None:
    """A device keeps its DTLS session open (as modules do); once its key is revoked its
    next request on that same session gets 4.01 and stores nothing."""
    from simulator.dtls import DtlsDevices

    address, cred = dtls_device
    devices = DtlsDevices("127.0.0.1", coaps_port, timeout_s=15)
    try:
        ok = await devices.post(
            address, (cred["psk_identity"], cred["psk"]), cjt188_frame(address, 170_000, hour(55))
        )
        assert ok.code == "2.04"
        slug = await pool.fetchval(
            "SELECT t.slug FROM tenants t JOIN meters m USING (tenant_id) WHERE m.address = $1",
            address,
        )
        await revoke_device(db_url, slug, address)
        await asyncio.sleep(0.1)
        after = await devices.post(
            address, (cred["psk_identity"], cred["psk"]), cjt188_frame(address, 180_000, hour(56))
        )
    finally:
        await devices.close()
    assert after.code == "4.01", after
    assert await count(pool, _READINGS, address) == 1


def _dtls_garbage(rng: random.Random) -> bytes:
    """Random bytes, or a DTLS 1.2 record header (handshake, alert, application data,
    change cipher spec) with a random epoch, sequence number, length and body."""
    if rng.random() < 0.3:
        return rng.randbytes(rng.randrange(1, 200))
    body = rng.randbytes(rng.randrange(0, 120))
    if rng.random() < 0.5:  # a ClientHello's handshake header before it
        body = bytes([1]) + rng.randbytes(3) + rng.randbytes(2) + bytes(3) + rng.randbytes(3) + body
    head = bytes([rng.choice([20, 21, 22, 23, 99]), 0xFE, rng.choice([0xFD, 0xFF, 0x00])])
    head += rng.randbytes(2) + rng.randbytes(6)  # epoch, sequence number
    length = len(body) if rng.random() < 0.7 else rng.randrange(65536)
    return head + length.to_bytes(2, "big") + body


async def test_garbage_from_many_peers_leaves_the_listener_serving(
    coaps_port: int, dtls_device: tuple[str, dict[str, str]], pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """2,000 datagrams of random bytes and malformed DTLS records from 50 source ports:
    the coaps listener keeps serving (a real client's uplink is then stored) and the
    collector keeps running."""
    rng = random.Random(16)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]
    try:
        for i in range(2000):
            socks[i % len(socks)].sendto(_dtls_garbage(rng), ("127.0.0.1", coaps_port))
            if i % 100 == 99:
                await asyncio.sleep(0.01)
    finally:
        for sock in socks:
            sock.close()
    await asyncio.sleep(0.5)
    await _stored_once(coaps_port, dtls_device, pool, tmp_path)


@pytest.mark.parametrize(
    ("method", "path", "payload", "want"),
    [
        ("get", "u", b"", "4.05"),
        ("put", "u", b"\x68" * 40, "4.05"),
        ("delete", "u", b"", "4.05"),
        ("post", "x", b"\x00" * 40, "4.04"),
        ("post", "rd?ep=x&lwm2m=1.1", b"</3/0>", "4.04"),
        ("post", "u", b"", "4.00"),
        ("post", "u", bytes(range(256)) * 4, "4.00"),
    ],
)
async def test_odd_requests_of_a_dtls_device_get_4_xx(
    coaps_port: int,
    dtls_device: tuple[str, dict[str, str]],
    pool: asyncpg.Pool,
    tmp_path: Path,
    method: str,
    path: str,
    payload: bytes,
    want: str,
) -> None:
    """Requests of an authenticated DTLS device other than its uplink (another method or
    resource, an empty or undecodable payload, one sent in Block1 blocks) get a 4.xx
    that says so, never 5.xx; nothing is stored as a reading."""
    address, cred = dtls_device
    file = tmp_path / "payload.bin"
    file.write_bytes(payload)
    assert CLIENT is not None
    proc = await asyncio.create_subprocess_exec(
        CLIENT,
        "-m", method, "-f", str(file), "-u", cred["psk_identity"], "-k", cred["psk"],
        "-v", "7", "-B", "8", f"coaps://127.0.0.1:{coaps_port}/{path}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out = (await asyncio.wait_for(proc.communicate(), 30))[0].decode(errors="replace")
    assert f"c:{want}" in out, out
    assert await count(pool, _READINGS, address) == 0
