"""The uplink lane: the common CoAP uplink taken beside aiocoap's message layer.

Nearly every datagram a collector gets is one meter's daily uplink: a POST to /u in one
datagram (OSCORE, or plain for a lab tenant), answered once durable: in its ACK (CON) or
as a NON of ours (NON, RFC 7252 §5.2.3).
aiocoap gives each the whole general machinery (a `Message` and its options, the
message and token layers, a pipe, a rendering task, the site, the answer's `Message`),
which cost more CPU per uplink than our decoding, storing and OSCORE together
(`bench/cityday.py`: bare aiocoap alone ~290 µs per request on a 2-core machine).

The lane reads the socket aiocoap opened (up to `_BATCH` datagrams per wakeup instead
of one, with one error-queue read, as aiocoap's own reader does per datagram) and takes
a datagram only when it is:

- a CON or NON POST whose options are only OSCORE (then, inside, POST /u with at most a
  Content-Format) or Uri-Path "u" and one Uri-Query "t=<lab tenant>" (plain);
- from a device whose context (OSCORE) or lab tenant (plain) is known: an OSCORE key id
  not cached is loaded in the same batched lookup aiocoap's path uses, then taken;
- fresh in its context's replay window, decrypting, and at most `max_payload_bytes`;
- from a meter with no pending command (`Downlinks.nothing_pending`): commands ride on
  the answer, which aiocoap's path builds.

A request of a known context that does not decrypt gets aiocoap's path's answer here
(4.00 "decryption failed" for a CON, nothing for a NON): a forged datagram costs one
decryption, not aiocoap's machinery and a second one. Everything else (block-wise, other
resources, LwM2M, /c, unknown key ids, replays, pending commands, a full pipeline's 5.03
for an unknown device) goes to aiocoap unchanged, which decides and answers as before: a
datagram the lane hands on was never admitted (its replay window is untouched, its
deduplication entry dropped). What the lane takes is answered as aiocoap's path would:
the uplink goes to the same pipeline, its answer (`collector.coap.response`: 2.04, the
quarantine 4.xx, 5.03 + Max-Age, 5.00) is piggybacked in the ACK once durable, protected
with the request's nonce (`collector.oscore_lean`), and recorded in the deduplication
table both share (`coap_patches.DedupTable`), so a retransmission gets the same bytes.
An answer not ready within `empty_ack_delay_s` gets an empty ACK first, then goes as a
separate CON through aiocoap's message layer (its retransmissions included). An uplink
another process admitted first (`Outcome.replayed`) is handed to aiocoap after its
commit, which answers it from the recorded answer (if an empty ACK went already, the
device has to retry: the uplink itself is stored). A fault in the lane itself (a bug) is
noted (`coap_rejected{kind="coap_lane.failed"}`, rate-limited logs) and costs no uplink:
before the lane answers, the datagram goes to aiocoap's path; after its commit, the
deduplication entry is dropped, so the device's retransmission is answered from the
recorded answer.
"""
# aiocoap is untyped (as in collector.coap): the lane reads its transport's socket and
# hands datagrams to its protocol object.

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Callable
from typing import Any

import aiocoap
from aiocoap import error, oscore
from aiocoap.transports import udp6
from aiocoap.util import socknumbers

from collector import metrics, oscore_lean
from collector.coap_guard import EventLimiter
from collector.coap_oscore import (
    DECRYPTION_FAILED,
    Busy,
    ContextsUnavailable,
    DeviceContext,
    DeviceContexts,
)
from collector.coap_patches import DedupTable, is_multicast_pktinfo
from collector.downlink import Downlinks
from collector.pipeline import Pipeline, PipelineClosed, PipelineFull
from collector.settings import CoapSettings
from collector.uplink import NOT_YET_DURABLE, Outcome, Transport, Uplink

Respond = Callable[[Outcome], aiocoap.Message]

_BATCH = 64  # datagrams read per socket wakeup
_RECV_BYTES = 4096  # as aiocoap's reader
_OSCORE, _URI_PATH, _CONTENT_FORMAT, _URI_QUERY = 9, 11, 12, 15
_POST = 2  # 0.02
_CHANGED = 0x44  # 2.04: the outer code of every OSCORE answer to a POST
_CHANGED_PLAINTEXT = bytes((_CHANGED,))  # an empty 2.04 inside OSCORE
_EMPTY_OSCORE = b"\x90"  # option 9, length 0 (the first option of an answer)
_SWEEP_S = 0.1  # how often answers taking long are checked for their empty ACK


def options(data: bytes, pos: int) -> tuple[list[tuple[int, bytes]], int] | None:
    """The CoAP options from `data[pos:]` as (number, value), and where the payload
    starts (len(data): none); None for a format error (RFC 7252 §3.1: a payload marker
    with no payload, a reserved nibble, an option running past the end)."""
    found: list[tuple[int, bytes]] = []
    number = 0
    end = len(data)
    try:
        while pos < end:
            byte = data[pos]
            if byte == 0xFF:
                return (found, pos + 1) if pos + 1 < end else None
            delta, pos = _extended(byte >> 4, data, pos + 1)
            length, pos = _extended(byte & 15, data, pos)
            if delta < 0 or length < 0 or pos + length > end:
                return None
            number += delta
            found.append((number, data[pos : pos + length]))
            pos += length
    except IndexError:  # an extended delta or length past the end
        return None
    return found, end


def _extended(nibble: int, data: bytes, pos: int) -> tuple[int, int]:
    """(an option delta's or length's value, where the next field starts): 13 and 14 take
    one and two bytes more (RFC 7252 §3.1); 15 is reserved (-1)."""
    if nibble < 13:
        return nibble, pos
    if nibble == 13:
        return data[pos] + 13, pos + 1
    if nibble == 14:
        return (data[pos] << 8 | data[pos + 1]) + 269, pos + 2
    return -1, pos


def _inner_uplink(plaintext: bytes) -> bytes | None:
    """The payload of an OSCORE plaintext that is POST /u (a Content-Format at most)."""
    if not plaintext or plaintext[0] != _POST:
        return None
    parsed = options(plaintext, 1)
    if parsed is None:
        return None
    found, start = parsed
    path = [value for number, value in found if number == _URI_PATH]
    if path != [b"u"] or any(n not in (_URI_PATH, _CONTENT_FORMAT) for n, _ in found):
        return None
    return plaintext[start:]


class _Request:
    """One taken datagram while its uplink is on its way."""

    __slots__ = (
        "address",
        "ancdata",
        "con",
        "ctx",
        "data",
        "flags",
        "key",
        "lean",
        "pktinfo",
        "separate",
        "started",
    )

    def __init__(
        self, data: bytes, ancdata: Any, flags: int, address: Any, key: Any, pktinfo: bytes | None
    ) -> None:
        self.data, self.ancdata, self.flags, self.address = data, ancdata, flags, address
        self.key, self.pktinfo = key, pktinfo
        self.ctx: DeviceContext | None = None
        self.lean: oscore_lean.LeanRequest | None = None
        self.started = 0.0
        self.separate = False  # an empty ACK went: the answer is a separate CON
        self.con = not data[0] & 0x10  # NON: answered NON, under a message id of ours

    @property
    def token(self) -> bytes:
        return self.data[4 : 4 + (self.data[0] & 15)]

    @property
    def peer(self) -> str:
        return f"[{self.address[0]}]:{self.address[1]}"


class UplinkLane:
    """Takes the common uplinks off aiocoap's UDP socket (see the module docstring)."""

    def __init__(
        self,
        settings: CoapSettings,
        pipeline: Pipeline,
        contexts: DeviceContexts,
        tenants: Any,  # collector.coap.TenantDirectory (its `peek`)
        downlinks: Downlinks | None,
        dedup: DedupTable,
        respond: Respond,
        events: EventLimiter,
    ) -> None:
        self._settings = settings
        self._events = events
        self._respond = respond  # collector.coap.response
        self._pipeline = pipeline
        self._contexts = contexts
        self._tenants = tenants
        self._downlinks = downlinks
        self._dedup = dedup
        self._loop = asyncio.get_running_loop()
        self._interface: Any = None
        self._mman: Any = None
        self._transport: Any = None
        self._protocol: Any = None
        self._sock: socket.socket | None = None
        self._waiting: dict[Any, _Request] = {}  # answers not sent yet, oldest first
        self._sweeper: asyncio.TimerHandle | None = None
        self._counted: dict[tuple[str, str], Any] = {}  # UPLINKS children, looked up once
        self._answered = metrics.COAP_LANE.labels("answered")
        self._handed_on = metrics.COAP_LANE.labels("handed_on")

    def install(self, mman: Any) -> None:
        """Read aiocoap's UDP socket of message manager `mman` through the lane."""
        interface = mman.message_interface
        if not isinstance(interface, udp6.MessageInterfaceUDP6):
            return
        self._mman, self._interface = mman, interface
        self._transport = interface.transport
        self._protocol = interface
        self._sock = self._transport.get_extra_info("socket")
        # aiocoap's reader callback looks `_read_ready` up on the transport each time
        self._transport._read_ready = self._read_ready

    def close(self) -> None:
        """Stop taking datagrams (aiocoap's own reader again) and sending (the socket
        is closing)."""
        if self._transport is not None:
            self._transport.__dict__.pop("_read_ready", None)
        self._sock = None
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._waiting.clear()

    # -- reading ----------------------------------------------------------------------

    def _read_ready(self) -> None:
        sock = self._sock
        if sock is None:
            return
        protocol = self._protocol
        if socknumbers.HAS_RECVERR:
            try:
                data, ancdata, flags, address = sock.recvmsg(
                    _RECV_BYTES, 1024, socknumbers.MSG_ERRQUEUE
                )
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                protocol.error_received(exc)
            else:
                protocol.datagram_errqueue_received(data, ancdata, flags, address)
        for _ in range(_BATCH):
            if self._sock is None:
                return
            try:
                data, ancdata, flags, address = sock.recvmsg(_RECV_BYTES, 1024)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                protocol.error_received(exc)
                return
            try:
                taken = self._take(data, ancdata, flags, address)
            except Exception as exc:  # a bug: aiocoap's path answers this one
                self._failed(exc, data, address)
                taken = False
            if not taken:
                protocol.datagram_msg_received(data, ancdata, flags, address)

    def _take(self, data: bytes, ancdata: Any, flags: int, address: Any) -> bool:
        """True when the lane took `data` (to answer, as a duplicate, or to hand on itself
        once it looked inside); False: aiocoap's, untouched."""
        if len(data) < 4 or data[0] & 0xE0 != 0x40 or data[1] != _POST:  # v1 CON/NON, POST
            return False
        tkl = data[0] & 15
        if tkl > 8:
            return False
        parsed = options(data, 4 + tkl)
        if parsed is None:
            return False
        found, start = parsed
        key = (address[0], address[1], data[2] << 8 | data[3])
        now = self._loop.time()
        pktinfo = _pktinfo(ancdata)
        entry = self._dedup.recent(key, now)
        if entry is not None:  # as aiocoap's deduplication: a CON's answer again, if any
            if entry[1] is not None and not data[0] & 0x10:
                self._send(entry[1], pktinfo, address)
            return True
        if pktinfo is not None and is_multicast_pktinfo(pktinfo):
            return False
        req = _Request(data, ancdata, flags, address, key, pktinfo)
        option = None
        path: list[bytes] = []
        query: list[bytes] = []
        for number, value in found:
            if number == _OSCORE:
                option = value
            elif number == _URI_PATH:
                path.append(value)
            elif number == _URI_QUERY:
                query.append(value)
            elif number != _CONTENT_FORMAT:
                return False
        payload = data[start:]
        if option is not None:
            if path or query:
                return False
            return self._oscore(req, option, payload, now)
        if path != [b"u"] or len(query) != 1 or not query[0].startswith(b"t="):
            return False
        return self._plain(req, query[0][2:], payload, now)

    # -- the two kinds of uplink --------------------------------------------------------

    def _plain(self, req: _Request, slug: bytes, payload: bytes, now: float) -> bool:
        try:
            tenant = self._tenants.peek(slug.decode())
        except UnicodeDecodeError:
            return False
        if tenant is None or len(payload) > self._settings.max_payload_bytes:
            return False  # aiocoap's path looks the tenant up, or refuses
        self._dedup.add(req.key, now)
        self._offer(req, Uplink(payload, Transport.COAP, req.peer, tenant_id=tenant))
        return True

    def _oscore(self, req: _Request, option: bytes, payload: bytes, now: float) -> bool:
        try:
            _, protected, unprotected, ciphertext = oscore.CanUnprotect._uncompress(option, payload)
        except Exception:  # aiocoap's path answers 4.02
            return False
        kid = unprotected.get(oscore.COSE_KID)
        piv = unprotected.get(oscore.COSE_PIV)
        if protected or kid is None or piv is None or len(unprotected) != 2:
            return False
        ctx = self._contexts.peek(kid)
        if ctx is None:
            loaded = functools.partial(self._loaded, req, kid, piv, ciphertext)
            try:
                if not self._contexts.when_loaded(kid, loaded):
                    return False  # a key id known unknown: aiocoap's path answers 4.01
            except ContextsUnavailable:
                return False  # aiocoap's path answers 5.03
            self._dedup.add(req.key, now)  # a retransmission meanwhile is a duplicate
            return True
        self._dedup.add(req.key, now)
        if not self._open(req, ctx, kid, piv, ciphertext):
            self._hand_on(req)
        return True

    def _loaded(self, req: _Request, kid: bytes, piv: bytes, ciphertext: bytes) -> None:
        """`kid`'s loading ended (called by the loader): a failed or empty one is aiocoap's
        path's to answer."""
        try:
            self._continue(req, kid, piv, ciphertext)
        except Exception as exc:  # a bug: aiocoap's path answers this one
            self._failed(exc, req.data, req.address)
            self._hand_on(req)

    def _continue(self, req: _Request, kid: bytes, piv: bytes, ciphertext: bytes) -> None:
        ctx = self._contexts.peek(kid)
        if self._sock is None:
            return
        if ctx is None or not self._open(req, ctx, kid, piv, ciphertext):
            self._hand_on(req)

    def _open(
        self, req: _Request, ctx: DeviceContext, kid: bytes, piv: bytes, ciphertext: bytes
    ) -> bool:
        if self._downlinks is not None and not self._downlinks.nothing_pending(ctx.device.meter_id):
            return False  # commands ride on this answer: aiocoap's path claims them
        try:
            opened = oscore_lean.open_request(ctx, kid, piv, ciphertext, aiocoap.POST)
        except (oscore.ProtectionInvalid, ValueError):
            self._undecryptable(req)
            return True
        if opened is None:
            return False
        plaintext, lean = opened
        payload = _inner_uplink(plaintext)
        if payload is None or len(payload) > self._settings.max_payload_bytes:
            return False
        oscore_lean.admit(ctx, piv)
        meter_id, index, bits = ctx.replay_state()
        req.ctx, req.lean = ctx, lean
        uplink = Uplink(
            payload,
            Transport.COAP_OSCORE,
            req.peer,
            device=ctx.device,
            replay_window=(meter_id, index, bits, int.from_bytes(piv, "big"), kid),
            new_context=ctx.pending,
        )
        self._offer(req, uplink)
        return True

    def _undecryptable(self, req: _Request) -> None:
        """A request that does not decrypt (forged, or a partial IV no nonce takes), answered
        here as aiocoap's path answers it (`collector.coap_oscore`): noted, a CON's ACK
        carries 4.00 "decryption failed", a NON gets nothing; its replay window is
        untouched. Handed on, it cost aiocoap's whole machinery and a second decryption."""
        self._events.note("oscore_decrypt.failed", peer=str(req.address[0]))
        if req.con:  # (a NON's duplicate, its deduplication entry kept, gets nothing either)
            self._answer(req, error.BadRequest(DECRYPTION_FAILED).to_message())

    def _count(self, kind: str, outcome: str) -> None:
        """uplinks_total{transport=kind, outcome} + 1."""
        child = self._counted.get((kind, outcome))
        if child is None:
            child = self._counted[kind, outcome] = metrics.UPLINKS.labels(kind, outcome)
        child.inc()

    def _failed(self, exc: Exception, data: bytes, address: Any) -> None:
        """A bug met in the lane: noted (rate-limited), the datagram's deduplication entry
        dropped, so it (or the device's retransmission) is taken afresh elsewhere."""
        self._events.note("coap_lane.failed", exc_info=exc, peer=str(address[0]))
        if len(data) >= 4:
            self._dedup.forget((address[0], address[1], data[2] << 8 | data[3]))

    def _hand_on(self, req: _Request) -> None:
        """Give a datagram the lane does not answer to aiocoap, as if just received."""
        self._dedup.forget(req.key)
        self._handed_on.inc()
        self._protocol.datagram_msg_received(req.data, req.ancdata, req.flags, req.address)

    # -- answering ------------------------------------------------------------------------

    def _offer(self, req: _Request, uplink: Uplink) -> None:
        kind = metrics.TRANSPORT_NAMES[int(uplink.transport)]
        req.started = time.monotonic()
        try:
            future = self._pipeline.offer(uplink, answer_within_s=self._settings.ack_wait_s)
        except (PipelineFull, PipelineClosed):
            self._count(kind, "busy")
            self._answer(req, Busy(self._settings.busy_max_age_s).to_message())
            return
        if not req.con:  # no ACK to send: the answer is a NON whenever it is ready
            future.add_done_callback(functools.partial(self._outcome, req, kind))
            return
        self._waiting[req.key] = req
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(_SWEEP_S, self._sweep)
        future.add_done_callback(functools.partial(self._outcome, req, kind))

    def _outcome(self, req: _Request, kind: str, future: asyncio.Future[Outcome]) -> None:
        try:
            self._answer_outcome(req, kind, future)
        except Exception as exc:  # a bug: the uplink is durable; its retransmission is
            self._failed(exc, req.data, req.address)  # then a duplicate, answered 2.04

    def _answer_outcome(self, req: _Request, kind: str, future: asyncio.Future[Outcome]) -> None:
        self._waiting.pop(req.key, None)
        if self._sock is None:
            return
        outcome = None if future.cancelled() or future.exception() else future.result()
        if outcome is None:
            self._count(kind, "failed")
            answer = error.InternalServerError("could not store the uplink").to_message()
        elif outcome is NOT_YET_DURABLE:
            # still queued: it will be stored; the device's retry is then a duplicate
            self._count(kind, "busy")
            answer = Busy(self._settings.busy_max_age_s, "not yet durable").to_message()
        elif outcome.replayed:
            # admitted before by another process: its context is reloaded, and aiocoap's
            # path answers the datagram from the recorded answer (collector.coap_oscore)
            self._count(kind, "replayed")
            if req.ctx is not None:
                self._contexts.forget(req.ctx)
            self._hand_on(req)
            return
        else:
            self._count(kind, outcome.status)
            # stored or duplicate: 2.04 with nothing in it (`_CHANGED_PLAINTEXT`), no Message
            answer = self._respond(outcome) if outcome.status == "quarantined" else None
        metrics.ACK_SECONDS.observe(time.monotonic() - req.started)
        self._answer(req, answer)

    def _answer(self, req: _Request, answer: aiocoap.Message | None) -> None:
        """Send `answer` (None: an empty 2.04) piggybacked, or separately if late."""
        self._answered.inc()
        if req.lean is not None and req.ctx is not None:
            text = _CHANGED_PLAINTEXT if answer is None else oscore_lean.plaintext(answer)
            code, opts = _CHANGED, _EMPTY_OSCORE
            body = oscore_lean.seal(req.ctx, text, req.lean)
        elif answer is None:
            code, opts, body = _CHANGED, b"", b""
        else:
            code, opts, body = int(answer.code), answer.opt.encode(), bytes(answer.payload)
        if req.separate:
            self._separate(req, code, body, answer)
            return
        data = req.data
        if req.con:  # piggybacked: an ACK with the request's message id
            head = bytes((0x60 | (data[0] & 15), code, data[2], data[3]))
        else:  # RFC 7252 §5.2.3: a NON, message id ours (aiocoap's counter, no clash)
            mid = self._mman._next_message_id()
            head = bytes((0x50 | (data[0] & 15), code, mid >> 8, mid & 0xFF))
        out = head + req.token + opts
        if body:
            out += b"\xff" + body
        if req.con:  # a NON's duplicate gets no answer (as aiocoap's deduplication)
            entry = self._dedup.recent(req.key, self._loop.time())
            if entry is not None:
                entry[1] = out
        self._send(out, req.pktinfo, req.address)

    def _separate(
        self, req: _Request, code: int, body: bytes, answer: aiocoap.Message | None
    ) -> None:
        """The answer as a CON of ours, after the empty ACK: aiocoap retransmits it."""
        if req.lean is not None or answer is None:
            message = aiocoap.Message(_mtype=aiocoap.CON, code=code, payload=body)
            if req.lean is not None:
                message.opt.oscore = b""
        else:
            message = answer
            message.mtype = aiocoap.CON
        message.token = req.token
        message.remote = udp6.UDP6EndpointAddress(req.address, self._interface, pktinfo=req.pktinfo)
        try:
            self._mman.send_message(message, _no_monitor)
        except Exception:  # the message layer is shutting down: the device retries
            return

    def _sweep(self) -> None:
        """Send an empty ACK for each answer not ready within `empty_ack_delay_s`."""
        self._sweeper = None
        if self._sock is None:
            return
        due = time.monotonic() - self._settings.empty_ack_delay_s
        late = []
        for key, req in self._waiting.items():
            if req.started > due:
                break
            late.append(key)
        now = self._loop.time()
        for key in late:
            req = self._waiting.pop(key)
            req.separate = True
            ack = bytes((0x60, 0, req.data[2], req.data[3]))  # empty ACK, the request's MID
            entry = self._dedup.recent(key, now)
            if entry is not None:
                entry[1] = ack
            self._send(ack, req.pktinfo, req.address)
        if self._waiting:
            self._sweeper = self._loop.call_later(_SWEEP_S, self._sweep)

    def _send(self, data: bytes, pktinfo: bytes | None, address: Any) -> None:
        sock = self._sock
        if sock is None or sock.fileno() == -1:
            return
        ancdata = [] if pktinfo is None else [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)]
        try:
            sock.sendmsg((data,), ancdata, 0, address)
        except (BlockingIOError, InterruptedError):
            return  # the send buffer is full: the device retransmits, the entry answers
        except OSError as exc:
            self._protocol.error_received(exc)


def _pktinfo(ancdata: Any) -> bytes | None:
    for level, kind, value in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            return bytes(value)
    return None


def _no_monitor() -> None:
    """A separate answer's RST: nothing to do (the uplink is stored)."""
