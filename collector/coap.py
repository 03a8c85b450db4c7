"""CoAP shell (aiocoap): POST /u → pipeline → 2.04 once durable.

`start_server(settings, pipeline, pool, credentials_key, database_url=...)` joins the
CoAP port's registry (refusing to start when a live process on the port runs other
settings), binds UDP (SO_REUSEPORT, so several collector processes may share the port)
and serves one site built by `build_site`; it returns a `CoapServer` (`.shutdown()`).
Uplinks are POSTs to `/u`, CON or NON, optionally block-wise (Block1, assembled up to
`max_payload_bytes` within a bounded budget, `collector.coap_guard`). Authentication:

- OSCORE (RFC 8613), verified before anything else (`collector.coap_oscore`): the
  request's kid selects a per-device context, loaded from the database in batches and
  cached; the device's meter comes with the context.
- plain CoAP: only for tenants with `allow_plain_coap`, named by `?t=<tenant-slug>`,
  checked before any Block1 state is kept.

Credential changes take effect at once: the server LISTENs on nbmeter_credentials
(`storage.notify`) and drops the changed contexts as soon as the provisioning, rotation
or revocation commits. If that connection is lost, every cached context is dropped and
contexts live `context_fallback_ttl_s` until it is back; a silent loss is noticed within
the listener's check (1 s + 2 s timeout). So a rotated or revoked credential is refused
within `context_fallback_ttl_s` (5 s) in the worst case, and within the NOTIFY delivery
(milliseconds) normally.

Answers: 2.04 stored or duplicate; 4.00 undecodable, quarantined because decoding or
storing it failed (decode_failed / store_failed), or OSCORE decryption failed; 4.01
unauthenticated; 4.02 OSCORE option that does not decode; 4.03 the frame reports another
meter than the authenticated device; 4.04 unknown meter (plain CoAP); 4.08 a Block1 block
of a transfer not held; 4.13 too large (with Size1); 5.03 + Max-Age when the pipeline is
full, the database is away longer than `ack_wait_s`, or the collector is stopping.
Retransmitted CONs are answered from the deduplication table (`coap_patches.DedupTable`);
after a restart, or in another process, from the answer recorded with the uplink.

The common uplink (a CON or NON POST /u in one datagram, OSCORE or a lab tenant's, from a
meter with no pending command) is taken off the socket by the uplink lane
(`collector.coap_lane`, setting `uplink_lane`), which answers it as this module's
resource would, beside aiocoap's message layer; everything else comes here.
"""
# aiocoap is untyped (mypy sees its names as Any); this module, coap_oscore, coap_guard
# and coap_patches touch it: each place that must subclass or read it says so.

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import socket
import sys
import time
import uuid
from typing import Any

import aiocoap
import structlog
from aiocoap import error, resource

from collector import metrics
from collector.answers import coap_code
from collector.coap_guard import Block1Budget, EventLimiter, LogRateFilter, source_of
from collector.coap_lane import UplinkLane
from collector.coap_oscore import (
    Busy,
    DeviceContext,
    DeviceContexts,
    OscoreSite,
    ReplayedRequest,
)
from collector.coap_patches import (
    Context,
    DedupTable,
    Site,
    acyclic_requests,
    bound_dedup,
    patch_message_decode,
    patch_udp6_addresses,
    piggyback_within,
)
from collector.downlink import Downlinks
from collector.downlink_coap import ResultResource, with_commands
from collector.pipeline import Pipeline, PipelineClosed, PipelineFull
from collector.settings import CoapSettings
from collector.uplink import NOT_YET_DURABLE, Outcome, Transport, Uplink
from storage import coap_peers, credentials, notify
from storage.errors import StorageError
from storage.pool import Pool, connection
from storage.reasons import Reason

log = structlog.get_logger("collector.coap")

__all__ = ["Busy", "CoapServer", "build_site", "fingerprint", "start_server"]


class TenantDirectory:
    """Tenants that allow plain CoAP (a handful of lab tenants), held whole in memory.

    Reloaded every `ttl_s`; a slug not found waits for the next reload that starts after
    it arrived, and misses start at most one reload per `miss_reload_s`: a tenant just
    made a lab tenant is found at once, a flood of made-up slugs costs at most one query
    per `miss_reload_s`.
    """

    def __init__(self, pool: Pool, ttl_s: float = 30.0, miss_reload_s: float = 0.05):
        self._pool = pool
        self._ttl_s = ttl_s
        self._miss_reload_s = miss_reload_s
        self._tenants: dict[str, int] = {}
        self._started_at = -1e9  # when the last reload started
        self._lock = asyncio.Lock()

    def peek(self, slug: str) -> int | None:
        """The tenant id of lab tenant `slug` when the directory holds it and is fresh."""
        if time.monotonic() - self._started_at < self._ttl_s:
            return self._tenants.get(slug)
        return None

    async def lookup(self, slug: str) -> int | None:
        """The tenant id of lab tenant `slug`; None if no such tenant allows plain CoAP."""
        arrived = time.monotonic()
        if slug in self._tenants and arrived - self._started_at < self._ttl_s:
            return self._tenants[slug]
        async with self._lock:
            if self._started_at < arrived:  # no reload began since we arrived
                wait_s = self._started_at + self._miss_reload_s - time.monotonic()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                self._started_at = time.monotonic()
                async with connection(self._pool, "loading lab tenants", timeout_s=5.0) as conn:
                    self._tenants = await credentials.plain_coap_tenants(conn)
        return self._tenants.get(slug)


def _peer(remote: Any) -> str:
    inner = getattr(remote, "underlying_address", remote)
    sockaddr = getattr(inner, "sockaddr", None)
    if sockaddr is not None:
        return f"[{sockaddr[0]}]:{sockaddr[1]}"
    return str(getattr(inner, "hostinfo", "?"))


def _slug(request: aiocoap.Message) -> str:
    query: dict[str, str] = dict(q.partition("=")[::2] for q in request.opt.uri_query)
    return query.get("t", "")


class UplinkResource(resource.Resource):  # type: ignore[misc]  # aiocoap is untyped: Any base
    """POST /u: one uplink payload, answered when its batch is durable."""

    def __init__(
        self,
        settings: CoapSettings,
        pipeline: Pipeline,
        tenants: TenantDirectory,
        events: EventLimiter,
        downlinks: Downlinks | None = None,
    ) -> None:
        super().__init__()
        self._downlinks = downlinks  # issue 13: pending commands ride on the 2.04
        self._settings = settings
        self._pipeline = pipeline
        self._tenants = tenants
        self._events = events
        self._block1 = Block1Budget(
            max_transfers=settings.block1_max_transfers,
            per_source=settings.block1_max_per_source,
            max_bytes=settings.block1_max_bytes,
            lifetime_s=settings.block1_lifetime_s,
        )

    def lane(self, contexts: DeviceContexts, dedup: DedupTable) -> UplinkLane:
        """The uplink lane for this resource's uplinks (`collector.coap_lane`)."""
        return UplinkLane(
            self._settings,
            self._pipeline,
            contexts,
            self._tenants,
            self._downlinks,
            dedup,
            response,
            self._events,
        )

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        """Assemble Block1 uploads of authenticated senders only, refusing (4.13) any
        that would exceed the limit."""
        block1 = request.opt.block1
        if block1 is None:
            return True
        if not isinstance(getattr(request.remote, "security_context", None), DeviceContext):
            await self._plain_tenant(request)  # 4.01 before any state is kept
        limit = self._settings.max_payload_bytes
        if (block1.block_number + 1) * block1.size > limit:
            await self.render_post(request, too_large=True)
        return True

    async def render_to_pipe(self, pipe: Any) -> None:
        """aiocoap's rendering, without its block-wise work for a request that has no
        Block1 or Block2 option (nearly every uplink): only an answer over the peer's
        payload size goes through aiocoap's Block2 cache, which keeps it and sends its
        first block (RFC 7959 §2.2), as aiocoap's own path would."""
        request = pipe.request
        if request.opt.block1 is not None or request.opt.block2 is not None:
            await super().render_to_pipe(pipe)
            return
        answer = await self.render(request)
        if len(answer.payload) > request.remote.maximum_payload_size:
            answer = await self._block2.extract_or_insert(
                request, functools.partial(_ready, answer)
            )
        pipe.add_response(answer, is_last=True)

    async def render_post(self, request: aiocoap.Message, *, too_large: bool = False) -> Any:
        """Offer the uplink to the pipeline; answer from its durable outcome."""
        started = time.monotonic()
        uplink = await self._uplink(request)
        kind = metrics.TRANSPORT_NAMES[int(uplink.transport)]
        if too_large or len(uplink.payload) > self._settings.max_payload_bytes:
            size = len(uplink.payload) if not too_large else request.opt.block1.size
            uplink.payload = uplink.payload[: self._settings.max_payload_bytes]
            uplink.reject = (Reason.TOO_LARGE, f"payload over {self._settings.max_payload_bytes} B")
            await self._durable(uplink, kind)
            msg = aiocoap.Message(code=aiocoap.REQUEST_ENTITY_TOO_LARGE, payload=b"too large")
            msg.opt.size1 = self._settings.max_payload_bytes
            if too_large:  # raised from block-wise assembly: aiocoap renders it
                raise error.RequestEntityTooLarge(f"at most {size} B per block")
            return msg
        outcome = await self._durable(uplink, kind)
        answer = await with_commands(response(outcome), uplink.device, self._downlinks)
        metrics.ACK_SECONDS.observe(time.monotonic() - started)
        return answer

    async def _plain_tenant(self, request: aiocoap.Message) -> int:
        slug = _slug(request)
        try:
            tenant = await self._tenants.lookup(slug) if slug else None
        except StorageError as exc:
            raise Busy(self._settings.busy_max_age_s, "tenant directory unavailable") from exc
        if tenant is None:
            metrics.UPLINKS.labels("coap", "unauthenticated").inc()
            self._events.note("plain_coap.refused", peer=source_of(request.remote))
            raise error.Unauthorized("use OSCORE (plain CoAP only for lab tenants, ?t=<slug>)")
        return tenant

    async def _uplink(self, request: aiocoap.Message) -> Uplink:
        ctx = getattr(request.remote, "security_context", None)
        peer = _peer(request.remote)
        if isinstance(ctx, DeviceContext):
            piv = getattr(request, "nbm_piv", None)
            meter_id, index, bits = ctx.replay_state()
            return Uplink(
                bytes(request.payload),
                Transport.COAP_OSCORE,
                peer,
                device=ctx.device,
                replay_window=None
                if piv is None
                else (meter_id, index, bits, piv, ctx.recipient_id),
                new_context=ctx.pending,
            )
        tenant = await self._plain_tenant(request)
        return Uplink(bytes(request.payload), Transport.COAP, peer, tenant_id=tenant)

    async def _durable(self, uplink: Uplink, kind: str) -> Outcome:
        busy = self._settings.busy_max_age_s
        try:
            # the pipeline answers BUSY itself after ack_wait_s (one sweep for all
            # uplinks, instead of a timer and a shield per request)
            future = self._pipeline.offer(uplink, answer_within_s=self._settings.ack_wait_s)
        except (PipelineFull, PipelineClosed) as exc:
            metrics.UPLINKS.labels(kind, "busy").inc()
            raise Busy(busy) from exc
        try:
            outcome = await future
        except Exception as exc:
            metrics.UPLINKS.labels(kind, "failed").inc()
            raise error.InternalServerError("could not store the uplink") from exc
        if outcome is NOT_YET_DURABLE:
            # still queued: it will be stored; the device's retry is then a duplicate
            metrics.UPLINKS.labels(kind, "busy").inc()
            raise Busy(busy, "not yet durable, retry after Max-Age")
        if outcome.replayed:
            metrics.UPLINKS.labels(kind, "replayed").inc()
            raise ReplayedRequest
        metrics.UPLINKS.labels(kind, outcome.status).inc()
        return outcome


async def _ready(answer: aiocoap.Message) -> aiocoap.Message:
    return answer


def response(outcome: Outcome) -> aiocoap.Message:
    """The CoAP answer to an uplink's outcome (2.04, or the quarantine reason's 4.xx)."""
    code = aiocoap.Code(coap_code(outcome))  # collector.answers: the one answer table
    if outcome.status != "quarantined":
        return aiocoap.Message(code=code)
    return aiocoap.Message(code=code, payload=f"{outcome.reason}: {outcome.detail}".encode())


def _recorded_response(status: str, reason: str, detail: str) -> aiocoap.Message:
    return response(Outcome(status, reason, detail))


def fingerprint(settings: CoapSettings, key: bytes | None) -> tuple[str, dict[str, object]]:
    """(hash, settings) of what must be equal in every process sharing a CoAP port.

    Every CoAP setting, and the credentials key's own hash (another key opens no context).
    """
    shown: dict[str, object] = dict(settings.model_dump(mode="json"))
    shown["credentials_key_sha256"] = (
        hashlib.sha256(key).hexdigest()[:16] if key is not None else None
    )
    text = repr(sorted(shown.items())).encode()
    return hashlib.sha256(text).hexdigest(), shown


def build_site(
    settings: CoapSettings,
    pipeline: Pipeline,
    pool: Pool,
    key: bytes | None,
    events: EventLimiter | None = None,
    downlinks: Downlinks | None = None,
) -> OscoreSite:
    """The collector's one site: /u (and /c, device answers to commands, with
    `downlinks`), LwM2M's /rd and /dp (`collector.lwm2m`), behind the OSCORE verifier."""
    events = events or EventLimiter(settings.log_window_s, settings.log_per_window)
    site = Site()
    tenants = TenantDirectory(pool)
    uplinks = UplinkResource(settings, pipeline, tenants, events, downlinks)
    site.add_resource(["u"], uplinks)
    # LwM2M 1.1 (/rd, /dp): builds on this module's resources, so imported here
    from collector import lwm2m

    lwm2m.mount(site, settings, pipeline, pool, tenants, events, downlinks)
    if downlinks is not None:
        site.add_resource(["c"], ResultResource(downlinks, settings.busy_max_age_s))
    contexts = DeviceContexts(pool, key, settings)
    oscore_site = OscoreSite(site, contexts, settings, events, _recorded_response)
    oscore_site.uplinks = uplinks
    return oscore_site


class CoapServer:
    """A running CoAP server with its background tasks (LISTEN, port registry, pruning)."""

    def __init__(
        self,
        settings: CoapSettings,
        pool: Pool,
        site: OscoreSite,
        key: bytes | None,
        database_url: str | None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self.site = site
        self.contexts: DeviceContexts = site.contexts
        self._database_url = database_url
        self._fingerprint = fingerprint(settings, key)
        self.instance_id = uuid.uuid4().hex
        self._hostname = socket.gethostname()
        self._joined = False
        self._peers: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._ctx: Any = None
        self.lane: UplinkLane | None = None
        self._subscribed = asyncio.Event()
        # every library record (aiocoap, asyncio, paho): ours go through structlog
        self._log_filter = LogRateFilter("", settings.log_window_s, settings.log_per_window)

    async def start(self) -> None:
        """Join the port registry (PeerMismatchError: refused), bind, start the tasks."""
        try:
            await self._join()
        except coap_peers.PeerMismatchError:
            raise
        except StorageError as exc:  # the database may be away at start: join later
            log.warning("coap_registry.unreached", error=str(exc))
        if self._database_url is not None:
            self._tasks.append(asyncio.create_task(self._listen(), name="coap-credentials"))
            # bind once changes arrive (a database that is away delays us only this long;
            # until LISTEN works, contexts live context_fallback_ttl_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), 2.0)
        for handler in logging.getLogger().handlers:
            handler.addFilter(self._log_filter)
        patch_udp6_addresses()
        patch_message_decode()
        try:
            self._ctx = await Context.create_server_context(
                self.site, bind=(self._settings.host, self._settings.port), transports=["udp6"]
            )
        except BaseException:
            await self.shutdown()  # the listener and our registry row go too
            raise
        for tman in self._ctx.request_interfaces:
            acyclic_requests(tman)
            dedup = DedupTable(self._settings.exchange_lifetime_s, self._settings.dedup_max_entries)
            bound_dedup(tman.token_interface, dedup)
            piggyback_within(tman.token_interface, self._settings.empty_ack_delay_s)
            self._receive_buffer(tman.token_interface.message_interface)
            if self._settings.uplink_lane and self.site.uplinks is not None:
                self.lane = self.site.uplinks.lane(self.contexts, dedup)
                self.lane.install(tman.token_interface)
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="coap-registry"))
        log.info("coap.started", host=self._settings.host, port=self._settings.port)

    def _receive_buffer(self, interface: Any) -> None:
        """Ask for the configured socket receive buffer; warn when the kernel caps it."""
        wanted = self._settings.receive_buffer_bytes
        if not wanted:
            return
        sock = interface.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if sys.platform.startswith("linux"):
            granted //= 2  # Linux reports twice what it grants (its bookkeeping share)
        metrics.COAP_RECEIVE_BUFFER.set(granted)
        if granted < wanted:
            log.warning(
                "coap.receive_buffer_capped",
                wanted=wanted,
                granted=granted,
                hint=f"raise net.core.rmem_max to {wanted} (sysctl) for the whole buffer",
            )

    async def _join(self) -> None:
        digest, shown = self._fingerprint
        async with connection(self._pool, "joining the CoAP port registry", timeout_s=5.0) as conn:
            peers = await coap_peers.join(
                conn,
                instance_id=self.instance_id,
                hostname=self._hostname,
                port=self._settings.port,
                fingerprint=digest,
                settings=shown,
                live_s=self._settings.peer_live_s,
            )
        self._joined = True
        self._announce({p.instance_id for p in peers})

    def _announce(self, peers: set[str]) -> None:
        metrics.COAP_PEERS.set(len(peers))
        for joined in sorted(peers - self._peers):
            log.warning(
                "coap.port_shared", port=self._settings.port, peer=joined, processes=len(peers) + 1
            )
        for left in sorted(self._peers - peers):
            log.info("coap.peer_left", port=self._settings.port, peer=left)
        self._peers = peers

    async def _listen(self) -> None:
        assert self._database_url is not None

        def lost(reason: str) -> None:
            if self.contexts.listening:
                log.warning("credentials.listener_lost", error=reason)
            self.contexts.set_listening(False, "listener_lost")

        def ready() -> None:
            log.info("credentials.subscribed", channel=notify.CHANNEL)
            self.contexts.set_listening(True, "listener_ready")
            self._subscribed.set()

        await notify.listen_credentials(self._database_url, self.contexts.invalidate, lost, ready)

    async def _housekeeping(self) -> None:
        """Heartbeat in the port registry (join late if the database was away); prune answers."""
        every_s = self._settings.peer_live_s / 3
        pruned_at = 0.0
        while True:
            await asyncio.sleep(every_s)
            try:
                if not self._joined:
                    await self._join()
                async with connection(self._pool, "CoAP registry heartbeat", timeout_s=5.0) as conn:
                    peers = await coap_peers.heartbeat(
                        conn,
                        instance_id=self.instance_id,
                        hostname=self._hostname,
                        port=self._settings.port,
                        live_s=self._settings.peer_live_s,
                    )
                    if time.monotonic() - pruned_at > 600:
                        await credentials.prune_oscore_answers(conn, self._settings.answers_keep_s)
                        pruned_at = time.monotonic()
                self._announce({p.instance_id for p in peers})
            except coap_peers.PeerMismatchError as exc:
                # joined late (database was away at start): we already serve; say it loudly
                log.error("coap_peer.mismatched", error=str(exc))
                self._joined = True
            except StorageError as exc:
                log.warning("coap_registry.unreached", error=str(exc))

    async def shutdown(self) -> None:
        """Stop the background tasks, leave the registry, close the socket."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.contexts.close()
        if self.lane is not None:
            self.lane.close()
        with contextlib.suppress(StorageError):
            async with connection(self._pool, "leaving the CoAP registry", timeout_s=2.0) as conn:
                await coap_peers.leave(conn, self.instance_id)
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._log_filter)
        if self._ctx is not None:
            await self._ctx.shutdown()


async def start_server(
    settings: CoapSettings,
    pipeline: Pipeline,
    pool: Pool,
    key: bytes | None,
    *,
    database_url: str | None = None,
    downlinks: Downlinks | None = None,
) -> CoapServer:
    """Start the CoAP server (see the module docstring); call `.shutdown()` to stop.

    Raises `storage.coap_peers.PeerMismatchError` when a live process on the same port
    runs with other settings. Without `database_url` nothing LISTENs: contexts then
    live `context_fallback_ttl_s`.
    """
    site = build_site(settings, pipeline, pool, key, downlinks=downlinks)
    server = CoapServer(settings, pool, site, key, database_url)
    await server.start()
    return server
