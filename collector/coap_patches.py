"""aiocoap patches of the collector: bounded deduplication, cheaper per-request paths.

Each patch keeps aiocoap's behaviour and removes a cost that profiling or an attack
found: `bound_dedup` (memory of the RFC 7252 deduplication table), `piggyback_within`
(separate answers under load), `acyclic_requests` (garbage only the cyclic collector could
free, per request), `Site` and `Context`
(per-request work our resources never use), `patch_udp6_addresses` (per-message address
parsing), `patch_message_decode` (a datagram that fails to decode in an unexpected way,
e.g. an invalid UTF-8 Uri-Path, is "unparsable" like any other instead of a traceback in
the transport's callback). aiocoap is untyped; this module and `collector.coap*` are
the places that touch it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections import OrderedDict
from typing import Any

import aiocoap
from aiocoap import error, resource
from aiocoap.message import Direction
from aiocoap.numbers import TransportTuning
from aiocoap.pipe import Pipe, error_to_message, run_driving_pipe
from aiocoap.transports import udp6


def _dedup_key(remote: Any, mid: int) -> tuple[Any, ...]:
    # (host, port, mid): not the remote object, which holds the whole endpoint (~1 KB)
    sockaddr = getattr(remote, "sockaddr", None)
    return (sockaddr[0], sockaddr[1], mid) if sockaddr is not None else (remote, mid)


class DedupTable:
    """RFC 7252 deduplication: (host, port, MID) -> [expires_at, encoded answer | None],
    insertion-ordered and trimmed on insert (no timer per message). aiocoap's message
    layer (`bound_dedup`) and the uplink lane (`collector.coap_lane`) share one table, so
    a retransmission finds its request's entry whichever of them took it."""

    def __init__(self, lifetime_s: float, max_entries: int) -> None:
        self.entries: OrderedDict[Any, list[Any]] = OrderedDict()
        self._lifetime_s = lifetime_s
        self._max_entries = max_entries

    def recent(self, key: Any, now: float) -> list[Any] | None:
        """The live entry of `key` ([expires_at, answer bytes or None]), or None."""
        entry = self.entries.get(key)
        return entry if entry is not None and entry[0] > now else None

    def add(self, key: Any, now: float) -> None:
        """A new entry for `key`, with no answer yet; the oldest expired ones go."""
        entries = self.entries
        while entries:
            oldest = next(iter(entries.values()))
            if oldest[0] > now and len(entries) < self._max_entries:
                break
            entries.popitem(last=False)
        entries[key] = [now + self._lifetime_s, None]

    def forget(self, key: Any) -> None:
        """Drop `key`'s entry (a request handed on to be taken again elsewhere)."""
        self.entries.pop(key, None)


def bound_dedup(mman: Any, table: DedupTable) -> None:
    """Replace aiocoap's deduplication (a dict plus one timer per message, ~247 s) by
    `table`: same answers, bounded memory, no timers.

    An entry is ~0.3 KB rather than the answer `Message` and its endpoint (~2 KB), so
    `max_entries` (200,000) stay under ~60 MB; a duplicate CON decodes the stored bytes
    and sends them again."""
    mman._recent_messages = _ResponseView(table.entries)
    loop = asyncio.get_running_loop()

    def deduplicate(message: aiocoap.Message) -> bool:
        key = _dedup_key(message.remote, message.mid)
        now = loop.time()
        entry = table.recent(key, now)
        if entry is not None:
            if message.mtype is aiocoap.CON and entry[1] is not None:
                # the stored answer, same MID and token, to the same peer
                answer = aiocoap.Message.decode(entry[1], message.remote)
                answer.direction = Direction.OUTGOING  # decode() marks it as received
                mman._send_initially(answer)
            return True
        table.add(key, now)
        return False

    mman._deduplicate_message = deduplicate


class _Tuning(TransportTuning):  # type: ignore[misc]  # aiocoap: untyped base
    """aiocoap's transport tuning with our EMPTY_ACK_DELAY (set per server)."""

    def __init__(self, empty_ack_delay_s: float) -> None:
        self.EMPTY_ACK_DELAY = empty_ack_delay_s


def piggyback_within(mman: Any, delay_s: float) -> None:
    """Answer a CON in its ACK (piggybacked) when the answer is ready within `delay_s`,
    and send an empty ACK first only after that (RFC 7252 §5.2.2 leaves the wait to us).

    aiocoap waits 0.1 s; an uplink is answered after its batch commits, often later
    than that under load, and each separate answer then costs an empty ACK, a CON of
    ours, the device's ACK and aiocoap's per-peer exchange bookkeeping (NSTART = 1: a
    scan of the active exchanges for each). `delay_s` stays below the device's first
    retransmission (ACK_TIMEOUT, 2 s), so a slow answer still stops its retransmissions.
    """
    tuning = _Tuning(delay_s)
    process = mman._process_request

    def process_request(request: aiocoap.Message) -> None:
        # read once, by the piggyback timer; the answer is a new message with its own
        request.transport_tuning = tuning
        process(request)

    mman._process_request = process_request


def acyclic_requests(tman: Any) -> None:
    """aiocoap's `TokenManager.process_request` (0.4.17), without the reference cycle it
    leaves behind every request.

    Upstream's `on_event` closure holds `stop`, the pipe's unregister partial, which holds
    `on_event`: so each answered request (its pipe, the request message, its options
    and remote: ~15 objects) outlives its last reference until the cyclic garbage
    collector finds it. In the city day (`bench/cityday.py`) that was 2.9 M objects
    freed by young and full collections, and those collections took ~20% of the
    collector's CPU. Here the end of the pipe's interest drops `on_event`'s reference to
    `stop`, so reference counting frees a request when it is done.
    """
    incoming = tman.incoming_requests

    def process_request(request: aiocoap.Message) -> None:
        key = (request.token, request.remote)
        if key in incoming:  # a new request on a token in use: the old one ends
            _, previous = incoming.pop(key)
            previous()
        pipe = Pipe(request, tman.log)
        stop: Any = None  # set below, before any event; dropped when the interest ends

        def on_event(ev: Any) -> bool | None:
            if ev.message is not None:
                m = ev.message
                m.token = request.token
                m.remote = request.remote.as_response_address()
                m.request = request
                tman.token_interface.send_message(m, stop)
            else:
                tman.log.error("Requests shouldn't receive errors at this level: %s", ev)
            return True if not ev.is_last else None

        def on_end() -> None:
            nonlocal stop
            incoming.pop(key, None)
            stop = None  # on_event -> stop -> on_event: broken here

        stop = pipe.on_event(on_event)
        pipe.on_interest_end(on_end)
        incoming[key] = (pipe, stop)
        tman.context.render_to_pipe(pipe)

    tman.process_request = process_request


class _ResponseView:
    """What aiocoap's `_store_response_for_duplicates` sees as `_recent_messages`."""

    def __init__(self, table: OrderedDict[Any, list[Any]]) -> None:
        self._table = table

    def __contains__(self, key: tuple[Any, int]) -> bool:
        remote, mid = key
        return _dedup_key(remote, mid) in self._table

    def __setitem__(self, key: tuple[Any, int], response: aiocoap.Message) -> None:
        # only an ACK (or RST) carries the request's MID: a separate CON or NON answer has
        # a MID of ours, which may equal another request's of the same peer, and resending
        # a CON outside aiocoap's exchange bookkeeping fails
        if response.mtype not in (aiocoap.ACK, aiocoap.RST):
            return
        remote, mid = key
        self._table[_dedup_key(remote, mid)][1] = response.encode()

    def __len__(self) -> int:
        return len(self._table)


class Site(resource.Site):  # type: ignore[misc]  # aiocoap is untyped: Any base
    """aiocoap's Site, minus per-request work our resources never use.

    Upstream builds the full request URI (eagerly: it is the default of a getattr) and
    deep-copies the request to strip its path, for every request; profiling put that at
    ~0.3 ms per uplink. Our resources read neither, so an exact-path hit hands the
    request over as it is.
    """

    def _find_child_and_pathstripped_message(self, request: aiocoap.Message) -> Any:
        child = self._resources.get(request.opt.uri_path)
        if child is not None:
            return child, request
        return super()._find_child_and_pathstripped_message(request)


class _RenderLog:
    """The logger `error_to_message` gets: an error answer (4.01, 4.02, 5.03 ...) is a
    normal answer, so its INFO line, and the `repr` of the exception computed for it
    even when INFO is off, are skipped; anything worse goes to aiocoap's logger."""

    def __init__(self, log: Any) -> None:
        self._log = log

    def info(self, *args: Any, **kwargs: Any) -> None:
        """Skipped."""

    debug = info

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


class Context(aiocoap.Context):  # type: ignore[misc]  # aiocoap is untyped: Any base
    """aiocoap's Context, minus per-request formatting nobody reads.

    Upstream names each rendering task "Rendering for %r" % request, formatting the
    message and its remote (ipaddress parsing included) for every request; profiling put
    that at ~8% of the collector's CPU. Nothing reads task names, so ours is constant.
    Each error answer also logged its exception's repr at INFO (computed even when INFO
    is off): under a flood of refused requests, a cost per datagram for nothing.
    """

    def render_to_pipe(self, pipe: Any) -> None:
        """Run the site for `pipe` (upstream's, with a constant task name)."""
        run_driving_pipe(
            error_to_message(pipe, _RenderLog(self.log)),
            self._render_to_pipe(pipe),
            name="coap-render",
        )


@functools.lru_cache(maxsize=4096)
def _is_multicast_host(host: str) -> bool:
    return ipaddress.ip_address(host.split("%", 1)[0]).is_multicast


@functools.lru_cache(maxsize=256)
def is_multicast_pktinfo(pktinfo: bytes) -> bool:
    # struct in6_pktinfo: 16-byte address first; v4-mapped ::ffff:a.b.c.d keeps a in byte 12
    addr = pktinfo[:16]
    if addr[:12] == b"\0" * 10 + b"\xff\xff":
        return 224 <= addr[12] <= 239  # 224.0.0.0/4
    return addr[0] == 0xFF  # ff00::/8


def patch_udp6_addresses() -> None:
    """Answer aiocoap's per-message multicast checks from caches.

    `UDP6EndpointAddress.is_multicast` / `is_multicast_locally` parse the peer's and the
    local address with `ipaddress` for every request and response (RFC 7252 §8: no
    piggybacked answers to multicast); peers and our own addresses repeat, so the answer
    is cached per address. Same results, no per-message parsing.
    """
    cls = udp6.UDP6EndpointAddress
    cls.is_multicast = property(lambda self: _is_multicast_host(str(self.sockaddr[0])))
    cls.is_multicast_locally = property(
        lambda self: self.pktinfo is not None and is_multicast_pktinfo(bytes(self.pktinfo))
    )


def patch_message_decode() -> None:
    """Make every failure to decode a datagram an `UnparsableMessage` (idempotent).

    aiocoap's UDP transport catches only `UnparsableMessage` and ignores the datagram
    (RFC 7252 §4.2: silently ignore a message format error); an undecodable option value
    (a string option that is not UTF-8, say) raised `UnicodeDecodeError` instead, which
    escaped into asyncio's callback handler and logged a traceback per datagram.
    """
    message_cls = aiocoap.message.Message
    if getattr(message_cls.decode, "nbm_patched", False):
        return
    original = message_cls.decode.__func__

    def decode(cls: Any, rawdata: bytes, remote: Any = None) -> Any:
        try:
            return original(cls, rawdata, remote)
        except error.UnparsableMessage:
            raise
        except Exception as exc:  # any other decoding failure is a format error too
            msg = f"undecodable message: {type(exc).__name__}"
            raise error.UnparsableMessage(msg) from None

    decode.nbm_patched = True  # type: ignore[attr-defined]  # a mark: patch only once
    message_cls.decode = classmethod(decode)
