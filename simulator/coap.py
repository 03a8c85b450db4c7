"""CoAP device side: POST /u over UDP, CON or NON, optionally OSCORE.

With `simulator.dtls_sessions` (the DTLS meters' client, in a process of its own), the
only module of the simulator that imports aiocoap.

aiocoap is used for what is pure in it (the message codec, OSCORE protect/unprotect); the
exchange itself is driven here so the emulator controls every transmission: a lost
transmission is simply not sent, a lost ACK is received and ignored, and a retransmission
is the same bytes with the same Message ID (RFC 7252 §4.2), after the (scaled) backoff.

`CoapEndpoint` is one UDP socket (one device "address"); it matches replies by Message
ID (ACK) and token (separate or NON responses) and ACKs separate CON responses.
"""
# aiocoap is untyped; this module is the one place that subclasses its bases (and says so).

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Any

import aiocoap
from aiocoap import oscore

from simulator.network import MAX_RETRANSMIT, Delivery, backoff_s, initial_timeout_s

# How long a NON sender waits for the NON response before giving up: an NB-IoT device
# listens until its RRC inactivity timer releases the connection (typically 10-20 s). The
# collector answers only after the commit, which a loaded machine can stretch past 4 s.
NON_TIMEOUT_S = 20.0
SEPARATE_TIMEOUT_S = 60.0  # how long to wait for a separate response after an empty ACK


@dataclass(frozen=True)
class OscoreCredentials:
    """A device's OSCORE context (RFC 8613): its Sender ID, the server's, and the secrets."""

    sender_id: bytes
    recipient_id: bytes
    master_secret: bytes
    master_salt: bytes

    @classmethod
    def from_hex(cls, context: dict[str, str]) -> OscoreCredentials:
        """From a context as provisioning (or a rotate_key) gives it to the device: hex
        `sender_id`, `recipient_id`, `master_secret`, `master_salt`."""
        return cls(
            sender_id=bytes.fromhex(context["sender_id"]),
            recipient_id=bytes.fromhex(context["recipient_id"]),
            master_secret=bytes.fromhex(context["master_secret"]),
            master_salt=bytes.fromhex(context["master_salt"]),
        )


_ContextBases = (oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils)


class DeviceContext(*_ContextBases):  # type: ignore[misc]  # aiocoap is untyped: Any bases
    """Client side of one device's OSCORE context; sequence numbers live in memory."""

    def __init__(self, creds: OscoreCredentials, first_seqno: int = 0) -> None:
        self.alg_aead = oscore.algorithms[oscore.DEFAULT_ALGORITHM]
        self.hashfun = oscore.hashfunctions[oscore.DEFAULT_HASHFUNCTION]
        self.sender_id = creds.sender_id
        self.recipient_id = creds.recipient_id
        self.id_context = None
        self.derive_keys(creds.master_salt, creds.master_secret)
        self.sender_sequence_number = first_seqno
        self.echo_recovery = None
        self.recipient_replay_window = oscore.ReplayWindow(oscore.DEFAULT_WINDOWSIZE, _noop)
        self.recipient_replay_window.initialize_empty()

    def post_seqnoincrease(self) -> None:
        """Nothing to persist: a simulated device lives as long as the run."""


def _noop() -> None:
    return None


@dataclass(frozen=True)
class CoapResult:
    """The end of one exchange: response code ("2.04", "" when none came), its payload,
    transmissions actually put on the wire, and whether any reply arrived."""

    code: str
    payload: bytes
    transmissions: int
    answered: bool
    max_age_s: int | None = None


def _code(msg: Any) -> str:
    return f"{int(msg.code) >> 5}.{int(msg.code) & 0x1F:02d}"


class CoapEndpoint(asyncio.DatagramProtocol):
    """One UDP socket towards the collector, with its own Message ID counter."""

    def __init__(self) -> None:
        self._transport: asyncio.DatagramTransport | None = None
        self._mid = secrets.randbelow(0x10000)
        self._by_mid: dict[int, asyncio.Queue[Any]] = {}
        self._by_token: dict[bytes, asyncio.Queue[Any]] = {}

    @classmethod
    async def open(cls, host: str, port: int) -> CoapEndpoint:
        """A connected endpoint towards host:port."""
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(cls, remote_addr=(host, port))
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the socket."""
        self._transport = transport  # type: ignore[assignment]  # a datagram endpoint's

    def close(self) -> None:
        """Close the socket."""
        if self._transport is not None:
            self._transport.close()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """Route a reply to its exchange; ACK a separate CON response."""
        try:
            msg = aiocoap.Message.decode(data)
        except Exception:
            return
        if msg.mtype == aiocoap.CON and self._transport is not None:
            ack = aiocoap.Message(_mtype=aiocoap.ACK, code=aiocoap.EMPTY, _mid=msg.mid)
            self._transport.sendto(ack.encode())
        if msg.mtype in (aiocoap.ACK, aiocoap.RST) and msg.mid in self._by_mid:
            self._by_mid[msg.mid].put_nowait(msg)
        elif msg.token in self._by_token:
            self._by_token[msg.token].put_nowait(msg)

    def _next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    async def post(
        self,
        payload: bytes,
        *,
        confirmable: bool,
        query: tuple[str, ...] = (),
        context: DeviceContext | None = None,
        delivery: Delivery | None = None,
        extra_copies: int = 0,
        time_scale: float = 1.0,
        path: str = "u",
    ) -> CoapResult:
        """POST `payload` to /`path` (/u: uplinks, /c: command answers) and return the
        response, acting out `delivery`.

        `extra_copies` ACKs are ignored (as if lost), each causing one retransmission.
        """
        assert self._transport is not None, "endpoint not open"
        delivery = delivery or Delivery()
        mtype = aiocoap.CON if confirmable else aiocoap.NON
        # the underscore arguments: this module drives the exchange itself (type, Message
        # ID, token), which aiocoap's public arguments deprecate for applications
        msg = aiocoap.Message(
            _mtype=mtype,
            code=aiocoap.POST,
            payload=payload,
            uri_path=(path,),
            uri_query=query,
        )
        request_id = None
        if context is not None:
            msg, request_id = context.protect(msg)
            msg.mtype = mtype  # the outer message leaves the type to the sender
        msg.mid, msg.token = self._next_mid(), secrets.token_bytes(4)
        wire = msg.encode()
        replies: asyncio.Queue[Any] = asyncio.Queue()
        self._by_mid[msg.mid] = self._by_token[msg.token] = replies
        try:
            if delivery.latency_ms:
                await asyncio.sleep(delivery.latency_ms / 1000 * time_scale)
            if not confirmable:
                return await self._non(wire, replies, delivery, context, request_id, time_scale)
            return await self._con(
                wire, replies, delivery, extra_copies, context, request_id, time_scale
            )
        finally:
            self._by_mid.pop(msg.mid, None)
            self._by_token.pop(msg.token, None)

    async def _non(
        self, wire: bytes, replies: asyncio.Queue[Any], delivery: Delivery,
        context: DeviceContext | None, request_id: Any, time_scale: float,
    ) -> CoapResult:  # fmt: skip
        if delivery.lost:
            return CoapResult("", b"", 0, answered=False)
        assert self._transport is not None
        self._transport.sendto(wire)
        try:
            reply = await asyncio.wait_for(replies.get(), NON_TIMEOUT_S * max(time_scale, 0.25))
        except TimeoutError:
            return CoapResult("", b"", 1, answered=False)
        return self._result(reply, 1, context, request_id)

    async def _con(
        self, wire: bytes, replies: asyncio.Queue[Any], delivery: Delivery, extra_copies: int,
        context: DeviceContext | None, request_id: Any, time_scale: float,
    ) -> CoapResult:  # fmt: skip
        assert self._transport is not None
        first = initial_timeout_s(_RNG, time_scale)
        ignore_acks = extra_copies + (1 if delivery.reply_lost else 0)
        sent = 0
        for attempt in range(MAX_RETRANSMIT + 1):
            timeout = backoff_s(first, attempt) if attempt else first
            if attempt >= delivery.lost_transmissions:
                self._transport.sendto(wire)
                sent += 1
            try:
                reply = await asyncio.wait_for(replies.get(), timeout)
            except TimeoutError:
                continue
            if ignore_acks > 0:
                ignore_acks -= 1
                await asyncio.sleep(timeout)  # the device never saw it: wait, then repeat
                continue
            while reply.mtype == aiocoap.ACK and reply.code == aiocoap.EMPTY:
                # separate response follows (RFC 7252 §5.2.2); stop retransmitting (an
                # earlier retransmission may have drawn a second empty ACK: skip it too)
                try:
                    reply = await asyncio.wait_for(replies.get(), SEPARATE_TIMEOUT_S)
                except TimeoutError:
                    return CoapResult("", b"", sent, answered=False)
            return self._result(reply, sent, context, request_id)
        return CoapResult("", b"", sent, answered=False)

    @staticmethod
    def _result(
        reply: Any, sent: int, context: DeviceContext | None, request_id: Any
    ) -> CoapResult:
        if reply.mtype == aiocoap.RST:
            return CoapResult("RST", b"", sent, answered=True)
        if context is not None and reply.opt.oscore is not None:
            try:
                reply, _ = context.unprotect(reply, request_id)
            except oscore.ProtectionInvalid as exc:
                return CoapResult(_code(reply), str(exc).encode(), sent, answered=True)
        return CoapResult(
            _code(reply), bytes(reply.payload), sent, answered=True, max_age_s=reply.opt.max_age
        )


class _Jitter:
    """The random part of the first CON timeout (a stand-in for numpy's Generator)."""

    @staticmethod
    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * secrets.randbelow(1_000_000) / 1_000_000


_RNG: Any = _Jitter()
