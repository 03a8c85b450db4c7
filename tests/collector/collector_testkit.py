"""Test helpers for the collector: CJ/T 188 frames, a raw-UDP CoAP client, an OSCORE
client context, a collector subprocess. Shared by tests/collector, tests/e2e and bench/."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import itertools
import os
import random
import secrets
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass

import aiocoap
import pytest
from aiocoap import oscore
from brokerkit import free_port


def _bcd(value: int, width: int) -> bytes:
    digits = f"{value:0{width * 2}d}"
    pairs = [int(digits[i : i + 2], 16) for i in range(0, len(digits), 2)]
    return bytes(reversed(pairs))  # low byte first


def cjt188_frame(address: str, total_ml: int, read_at_s: int, status: int = 0) -> bytes:
    """A CJ/T 188 901F read-data reply (FORMATS.md §1.2) for meter `address` (14 digits).

    `total_ml` must be a multiple of 10,000 mL (the register has 2 decimals of m3).
    """
    tm = time.gmtime(read_at_s + 8 * 3600)  # CJ/T 188 meters keep Beijing time (UTC+8)
    clock = bytes(
        int(f"{v:02d}", 16)
        for v in (
            tm.tm_sec,
            tm.tm_min,
            tm.tm_hour,
            tm.tm_mday,
            tm.tm_mon,
            tm.tm_year % 100,
            tm.tm_year // 100,
        )
    )
    addr = bytes(reversed([int(address[i : i + 2], 16) for i in range(0, 14, 2)]))
    total = _bcd(total_ml // 10_000, 4)
    data = b"\x90\x1f\x00" + total + b"\x2c" + total + b"\x2c" + clock + bytes([status, 0])
    body = b"\x68\x10" + addr + b"\x81" + bytes([len(data)]) + data
    return body + bytes([sum(body) & 0xFF, 0x16])


def hour(n: int) -> int:
    """A whole-hour UTC epoch second, n hours after 2025-01-01."""
    return calendar.timegm((2025, 1, 1, 0, 0, 0)) + 3600 * n


# --- raw CoAP over UDP (RFC 7252 §3): enough for POST /u and its answer ------------------

CON, NON, ACK, RST = 0, 1, 2, 3


def _nibble(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes([value - 13])
    return 14, struct.pack("!H", value - 269)


def _option_head(delta: int, length: int) -> bytes:
    d, d_ext = _nibble(delta)
    n, n_ext = _nibble(length)
    return bytes([(d << 4) | n]) + d_ext + n_ext


def coap_post(
    mid: int,
    token: bytes,
    payload: bytes,
    *,
    confirmable: bool = True,
    query: str | None = None,
    block1: int | None = None,
) -> bytes:
    """Encode POST /u[?query] with `mid` and `token` (and a Block1 option value)."""
    head = bytes([0x40 | ((CON if confirmable else NON) << 4) | len(token), 0x02])
    out = head + struct.pack("!H", mid) + token
    options = [(11, b"u")]
    if query:
        options.append((15, query.encode()))
    if block1 is not None:
        options.append((27, block1.to_bytes((block1.bit_length() + 7) // 8 or 1, "big")))
    last = 0
    for number, value in options:
        delta, last = number - last, number
        out += _option_head(delta, len(value)) + value
    return out + (b"\xff" + payload if payload else b"")


@dataclass(frozen=True)
class CoapReply:
    """A parsed CoAP answer: type, code (e.g. 0x44 = 2.04), mid, token, payload."""

    mtype: int
    code: int
    mid: int
    token: bytes
    payload: bytes
    raw: bytes  # the whole datagram (to decode it with aiocoap: OSCORE answers)

    @property
    def code_str(self) -> str:
        """The code in dotted form, e.g. '2.04'."""
        return f"{self.code >> 5}.{self.code & 0x1F:02d}"


def parse_reply(data: bytes) -> CoapReply:
    """Decode a CoAP message header, token and payload (options are skipped)."""
    tkl = data[0] & 0x0F
    mtype = (data[0] >> 4) & 0x03
    mid = struct.unpack("!H", data[2:4])[0]
    token = data[4 : 4 + tkl]
    marker = data.find(b"\xff", 4 + tkl)
    payload = data[marker + 1 :] if marker >= 0 else b""
    return CoapReply(mtype, data[1], mid, token, payload, data)


def coap_ack(mid: int) -> bytes:
    """An empty ACK for `mid` (to acknowledge a separate CON response)."""
    return bytes([0x60, 0x00]) + struct.pack("!H", mid)


class RawCoap(asyncio.DatagramProtocol):
    """A raw-UDP CoAP client: send datagrams, collect answers by token."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[bytes, asyncio.Future[CoapReply]] = {}
        self.replies: list[CoapReply] = []
        # message IDs in sequence from a random start, as RFC 7252 §4.4 asks: random ones
        # collide within EXCHANGE_LIFETIME after a few hundred posts, and the collector
        # then (rightly) answers the older exchange again
        self._mid = secrets.randbelow(65536)

    @classmethod
    async def open(cls, port: int) -> RawCoap:
        """A client connected to 127.0.0.1:`port`."""
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(cls, remote_addr=("127.0.0.1", port))
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        reply = parse_reply(data)
        if reply.mtype == CON and self.transport is not None:
            self.transport.sendto(coap_ack(reply.mid))
        if reply.code == 0:  # empty ACK: the answer comes separately
            return
        self.replies.append(reply)
        future = self.waiting.pop(reply.token, None)
        if future is not None and not future.done():
            future.set_result(reply)

    def next_mid(self) -> int:
        """The next message ID of this endpoint."""
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def send(self, datagram: bytes) -> None:
        """Send one datagram."""
        assert self.transport is not None
        self.transport.sendto(datagram)

    async def post(
        self,
        payload: bytes,
        *,
        mid: int | None = None,
        confirmable: bool = True,
        query: str | None = None,
        token: bytes | None = None,
        timeout_s: float = 15,
    ) -> CoapReply:
        """POST /u and wait for the answer (retransmitting a CON every 2 s meanwhile)."""
        mid = self.next_mid() if mid is None else mid
        token = secrets.token_bytes(4) if token is None else token
        future: asyncio.Future[CoapReply] = asyncio.get_running_loop().create_future()
        self.waiting[token] = future
        datagram = coap_post(mid, token, payload, confirmable=confirmable, query=query)
        deadline = time.monotonic() + timeout_s
        while True:
            self.send(datagram)
            try:
                return await asyncio.wait_for(asyncio.shield(future), 2.0)
            except TimeoutError:
                if time.monotonic() > deadline or not confirmable:
                    raise

    async def post_until_stored(
        self, payload: bytes, *, query: str | None = None, tries: int = 10
    ) -> CoapReply:
        """POST /u as a meter does: a 5.03 (busy, or not yet durable on a loaded machine)
        is sent again, as a new request, after a pause; the first other answer."""
        for _ in range(tries - 1):
            reply = await self.post(payload, query=query)
            if reply.code_str != "5.03":
                return reply
            await asyncio.sleep(1.0)
        return await self.post(payload, query=query)

    async def settled(self, quiet_s: float = 1.0, limit_s: float = 20.0) -> list[CoapReply]:
        """The replies once none came for `quiet_s` (at most `limit_s`): the answers to a
        burst, on a loaded machine too."""
        deadline = time.monotonic() + limit_s
        seen = -1
        while len(self.replies) != seen and time.monotonic() < deadline:
            seen = len(self.replies)
            await asyncio.sleep(quiet_s)
        return self.replies

    async def exchange(self, datagram: bytes, token: bytes, timeout_s: float = 10) -> bytes:
        """Send a datagram built elsewhere (an OSCORE request: `token` is its token) every
        2 s until its answer arrives; the answer's whole datagram."""
        future: asyncio.Future[CoapReply] = asyncio.get_running_loop().create_future()
        self.waiting[token] = future
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                self.send(datagram)
                with contextlib.suppress(TimeoutError):
                    return (await asyncio.wait_for(asyncio.shield(future), 2.0)).raw
                if time.monotonic() > deadline:
                    raise TimeoutError
        finally:
            self.waiting.pop(token, None)

    async def post_blockwise(self, payload: bytes, query: str, szx: int = 0) -> CoapReply:
        """POST /u in Block1 blocks of 2**(szx+4) bytes; return the final answer."""
        size = 2 ** (szx + 4)
        blocks = [payload[i : i + size] for i in range(0, len(payload), size)]
        reply: CoapReply | None = None
        for num, chunk in enumerate(blocks):
            more = int(num < len(blocks) - 1)
            token = secrets.token_bytes(4)
            future: asyncio.Future[CoapReply] = asyncio.get_running_loop().create_future()
            self.waiting[token] = future
            mid = self.next_mid()
            self.send(
                coap_post(mid, token, chunk, query=query, block1=(num << 4) | (more << 3) | szx)
            )
            reply = await asyncio.wait_for(future, 15)
        assert reply is not None
        return reply

    def close(self) -> None:
        """Close the socket."""
        if self.transport is not None:
            self.transport.close()


# --- OSCORE, the device's side --------------------------------------------------------


class DeviceOscore(oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils):
    """A meter's OSCORE context from the hex values `provision_device` returned."""

    def __init__(self, values: dict[str, str]) -> None:
        self.alg_aead = oscore.algorithms[values["algorithm"]]
        self.hashfun = oscore.hashfunctions["sha256"]
        self.sender_id = bytes.fromhex(values["sender_id"])
        self.recipient_id = bytes.fromhex(values["recipient_id"])
        self.id_context = None
        self.derive_keys(
            bytes.fromhex(values["master_salt"]), bytes.fromhex(values["master_secret"])
        )
        self.sender_sequence_number = 0
        self.recipient_replay_window = oscore.ReplayWindow(32, lambda: None)
        self.recipient_replay_window.initialize_empty()

    def post_seqnoincrease(self) -> None:
        pass


@dataclass(frozen=True)
class OscoreAnswer:
    """A raw answer: outer code, the inner (decrypted) code when it was protected,
    whether it carried a Partial IV of its own (RFC 8613 §7.5.1: a second answer to a
    request already answered, never the first), and the payload (decrypted when
    protected: a downlink envelope rides there)."""

    outer: int
    inner: int | None
    own_piv: bool = False
    payload: bytes = b""

    @property
    def code(self) -> str:
        """The code the device acts on, dotted (inner when protected)."""
        code = self.inner if self.inner is not None else self.outer
        return f"{code >> 5}.{code & 0x1F:02d}"


MIDS = itertools.count(secrets.randbelow(65536))  # distinct message ids (no dedup hits)


class OscoreMeter:
    """A meter's side of OSCORE over raw UDP: protect, send, decrypt the answer."""

    def __init__(self, values: dict[str, str]) -> None:
        self.ctx = DeviceOscore(values)

    def request(self, payload: bytes, path: str = "u") -> tuple[bytes, bytes, object]:
        """(datagram, token, request id) of a protected CON POST /`path` (uplinks to /u,
        command answers to /c) with a new sequence number."""
        msg = aiocoap.Message(code=aiocoap.POST, uri_path=(path,), payload=payload)
        protected, request_id = self.ctx.protect(msg)
        protected.mtype = aiocoap.CON
        protected.mid = next(MIDS) % 65536
        protected.token = secrets.token_bytes(4)
        return protected.encode(), protected.token, request_id

    def answer(self, data: bytes, request_id: object) -> OscoreAnswer:
        """The answer's codes, decrypting it when it is protected."""
        msg = aiocoap.Message.decode(data)
        if msg.opt.oscore is None:
            return OscoreAnswer(int(msg.code), None, payload=bytes(msg.payload))
        inner, _ = self.ctx.unprotect(msg, request_id)
        # the OSCORE option's flags byte: the low 3 bits are the Partial IV's length
        own_piv = bool(msg.opt.oscore) and msg.opt.oscore[0] & 0x07 > 0
        return OscoreAnswer(int(msg.code), int(inner.code), own_piv, bytes(inner.payload))

    async def post(self, udp: RawCoap, payload: bytes, path: str = "u") -> OscoreAnswer:
        """Send one protected POST /`path` and return its answer."""
        datagram, token, request_id = self.request(payload, path)
        return self.answer(await udp.exchange(datagram, token), request_id)


async def oscore_client(port: int, values: dict[str, str]) -> aiocoap.Context:
    """An aiocoap client context that protects requests to 127.0.0.1:`port` with OSCORE."""
    ctx = await aiocoap.Context.create_client_context()
    ctx.client_credentials[f"coap://127.0.0.1:{port}/*"] = DeviceOscore(values)
    return ctx


def mutated(datagram: bytes, rng: random.Random) -> bytes:
    """`datagram` under a new message id and token, with 1-4 random byte changes,
    insertions, deletions or a truncation past its message id, and now and then a random
    first byte (version, type, token length): for the attack tests."""
    b = bytearray(datagram)
    b[2:4] = struct.pack("!H", next(MIDS) % 65536)
    tkl = b[0] & 15
    b[4 : 4 + tkl] = secrets.token_bytes(min(tkl, 8))  # concurrent requests: own tokens
    for _ in range(rng.randint(1, 4)):
        op, at = rng.random(), rng.randrange(4, len(b) + 1)
        if op < 0.5 and at < len(b):
            b[at] = rng.randrange(256)
        elif op < 0.7:
            b[at:at] = bytes([rng.randrange(256)])
        elif op < 0.9 and at < len(b):
            del b[at]
        else:
            del b[at:]
    if len(b) <= 4 or rng.random() < 0.1:
        b[0:1] = bytes([rng.randrange(256)])
    return bytes(b)


def free_udp_port() -> int:
    """A free loopback UDP port (see brokerkit.free_port)."""
    return free_port(socket.SOCK_DGRAM)


class CollectorProcess:
    """`python -m collector.main` on its own CoAP port: for kill -9, SIGTERM, outages.

    `env` adds NBMETER_* settings to the process's environment (no MQTT: CoAP only).
    """

    def __init__(self, db_url: str, port: int | None = None, **env: str) -> None:
        self.db_url = db_url
        self.port = free_udp_port() if port is None else port
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None

    def environ(self) -> dict[str, str]:
        """The process's environment."""
        env = dict(
            os.environ,
            NBMETER_DATABASE_URL=self.db_url,
            NBMETER_METRICS_PORT="0",
            NBMETER_COAP__HOST="127.0.0.1",
            NBMETER_COAP__PORT=str(self.port),
            NBMETER_LOG_JSON="true",
            **self.env,
        )
        env.pop("NBMETER_MQTT_URL", None)
        return env

    async def start(self) -> None:
        """Start the process and wait until it answers CoAP (any answer: it is up)."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "collector.main",
            env=self.environ(),
            stderr=asyncio.subprocess.DEVNULL,
        )
        client = await RawCoap.open(self.port)
        try:
            for _ in range(150):
                with contextlib.suppress(TimeoutError):
                    await client.post(b"ping", query="t=-", confirmable=False, timeout_s=0.2)
                    return
                if self.proc.returncode is not None:
                    break
        finally:
            client.close()
        pytest.fail("the collector did not start")

    async def run_to_exit(self, timeout_s: float = 60) -> tuple[int | None, bytes]:
        """Run the process until it exits by itself (a refused start); (exit code, stderr)."""
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "collector.main",
            env=self.environ(),
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(child.communicate(), timeout_s)
        return child.returncode, err

    def signal(self, sig: int) -> None:
        """Send `sig` to the process."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """kill -9, if it still runs."""
        if self.proc is not None and self.proc.returncode is None:
            self.signal(signal.SIGKILL)

    async def wait(self, timeout_s: float = 60) -> int:
        """Wait for exit; return the exit code."""
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout_s)
