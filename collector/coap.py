"""CoAP shell (aiocoap): POST /u → pipeline → 2.04 once durable. The only aiocoap module.

`start_server(settings, pipeline, pool, credentials_key)` binds UDP (SO_REUSEPORT, so
several collector processes may share the port) and serves one `Site` built by
`build_site`. Uplinks are POSTs to `/u`, CON or NON, optionally block-wise (Block1,
assembled up to `max_payload_bytes`). Authentication:

- OSCORE (RFC 8613): the request's kid selects a per-device context, loaded from the
  database on first use and cached; the device's meter comes with the context.
- plain CoAP: only for tenants with `allow_plain_coap`, named by `?t=<tenant-slug>`.

Answers: 2.04 stored or duplicate; 4.00 undecodable, or quarantined because decoding or
storing it failed (decode_failed / store_failed); 4.01 unauthenticated; 4.03 the frame
reports another meter than the authenticated device; 4.04 unknown meter (plain CoAP);
4.13 too large (with Size1); 5.03 + Max-Age when the pipeline is full, the database is
away longer than `ack_wait_s`, or the collector is stopping. Retransmitted CONs are
answered from aiocoap's deduplication cache, bounded here to `dedup_max_entries`.
"""
# aiocoap is untyped; this module is the one place that touches it.
# mypy: disable-error-code="no-untyped-call,misc,no-any-return"

from __future__ import annotations

import asyncio
import functools
import ipaddress
import secrets
import time
from collections import OrderedDict
from typing import Any

import aiocoap
import asyncpg
import structlog
from aiocoap import error, oscore, resource
from aiocoap.message import Direction
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper
from aiocoap.pipe import error_to_message, run_driving_pipe
from aiocoap.transports import udp6

from collector import metrics
from collector.pipeline import (
    NOT_YET_DURABLE,
    Device,
    Outcome,
    Pipeline,
    PipelineClosed,
    PipelineFull,
    Transport,
    Uplink,
)
from collector.settings import CoapSettings
from storage import credentials
from storage.errors import StorageError

log = structlog.get_logger("collector.coap")

_CODES = {
    "identity_mismatch": aiocoap.FORBIDDEN,
    "unknown_meter": aiocoap.NOT_FOUND,
    "too_large": aiocoap.REQUEST_ENTITY_TOO_LARGE,
}
_CACHE_TTL_S = 300.0
_CACHE_MAX = 100_000


class Busy(error.ConstructionRenderableError):
    """5.03 Service Unavailable with a Max-Age telling the device when to retry."""

    code = aiocoap.SERVICE_UNAVAILABLE

    def __init__(self, max_age_s: int, message: str = "busy, retry after Max-Age") -> None:
        super().__init__(message)
        self.max_age_s = max_age_s

    def to_message(self) -> aiocoap.Message:
        """The 5.03 response with its Max-Age option."""
        msg = super().to_message()
        msg.opt.max_age = self.max_age_s
        return msg


class DeviceContext(oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils):
    """Server side of one device's OSCORE context, rebuilt from its stored secrets.

    The replay window starts from the one persisted with the last committed uplink.
    Responses reuse the request's nonce (RFC 8613 §8.3), so the server never needs a
    sequence number of its own; asking for one fails rather than risk nonce reuse after a
    restart.
    """

    def __init__(self, secret: credentials.OscoreSecret) -> None:
        self.alg_aead = oscore.algorithms[oscore.DEFAULT_ALGORITHM]
        self.hashfun = oscore.hashfunctions[oscore.DEFAULT_HASHFUNCTION]
        self.sender_id = secret.sender_id
        self.recipient_id = secret.kid
        self.id_context = None
        self.derive_keys(secret.master_salt, secret.master_secret)
        self.sender_sequence_number = 0
        self.echo_recovery = secrets.token_bytes(8)
        self.recipient_replay_window = oscore.ReplayWindow(oscore.DEFAULT_WINDOWSIZE, _noop)
        if secret.replay_index is None:
            self.recipient_replay_window.initialize_empty()
        else:
            self.recipient_replay_window.initialize_from_persisted(
                {"index": secret.replay_index, "bitfield": secret.replay_bits or 0}
            )
        self.device = Device(secret.meter_id, secret.tenant_id, secret.address)
        self.loaded_at = time.monotonic()

    def new_sequence_number(self) -> int:
        """Refuse: the server answers with the request's nonce only."""
        raise oscore.ContextUnavailable("server contexts send no requests or notifications")

    def post_seqnoincrease(self) -> None:
        """Nothing to persist (see `new_sequence_number`)."""

    def replay_state(self) -> tuple[int, int, int]:
        """(meter_id, index, bits) of the replay window, to persist with the uplink."""
        state = self.recipient_replay_window.persist()
        return self.device.meter_id, int(state["index"]), int(state["bitfield"])


def _noop() -> None:
    return None


class DeviceContexts:
    """OSCORE contexts by kid, loaded from the database on demand (an aiocoap credentials map)."""

    def __init__(self, pool: asyncpg.Pool, key: bytes | None) -> None:
        self._pool = pool
        self._key = key
        self._cache: OrderedDict[bytes, DeviceContext | None] = OrderedDict()
        self._expires: dict[bytes, float] = {}

    async def load(self, kid: bytes | None) -> None:
        """Make sure the context of `kid` is cached (or cached as absent)."""
        if kid is None or self._key is None:
            return
        if kid in self._cache and self._expires[kid] > time.monotonic():
            self._cache.move_to_end(kid)
            return
        async with self._pool.acquire(timeout=5.0) as conn:
            secret = await credentials.load_oscore(conn, self._key, kid)
        self._cache[kid] = None if secret is None else DeviceContext(secret)
        # unknown kids are remembered briefly, so a stranger cannot make us query per packet
        self._expires[kid] = time.monotonic() + (_CACHE_TTL_S if secret else 10.0)
        while len(self._cache) > _CACHE_MAX:
            old, _ = self._cache.popitem(last=False)
            self._expires.pop(old, None)

    def find_oscore(self, unprotected: dict[int, Any]) -> DeviceContext:
        """The cached context for the request's kid; KeyError when there is none."""
        ctx = self._cache.get(unprotected.get(oscore.COSE_KID, b""))
        if ctx is None:
            raise KeyError
        return ctx

    def find_all_used_contextless_oscore_kid(self) -> set[bytes]:
        """Key ids in use (asked by aiocoap's EDHOC support, which we do not offer)."""
        return {k for k, v in self._cache.items() if v is not None}

    def get(self, _key: str) -> None:
        """No EDHOC credentials."""
        return


class _OscoreSite(OscoreSiteWrapper):
    """aiocoap's OSCORE server wrapper, with contexts fetched from the database first."""

    def __init__(self, inner: resource.Site, contexts: DeviceContexts, busy_s: int) -> None:
        super().__init__(inner, contexts)
        self._contexts = contexts
        self._busy_s = busy_s

    async def render_to_pipe(self, pipe: Any) -> None:
        try:
            unprotected = oscore.verify_start(pipe.request)
        except oscore.NotAProtectedMessage:
            pass
        else:
            try:
                await self._contexts.load(unprotected.get(oscore.COSE_KID))
            except (OSError, TimeoutError, asyncpg.PostgresError, StorageError) as exc:
                log.warning("oscore_context.unavailable", error=str(exc))
                raise Busy(self._busy_s, "credentials store unavailable") from exc
        await super().render_to_pipe(pipe)


class TenantDirectory:
    """Tenant slug → (tenant_id, allow_plain_coap), cached for a short while."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._cache: dict[str, tuple[float, tuple[int, bool] | None]] = {}

    async def lookup(self, slug: str) -> tuple[int, bool] | None:
        """The tenant named `slug`, or None."""
        hit = self._cache.get(slug)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        async with self._pool.acquire(timeout=5.0) as conn:
            found = await credentials.tenant_by_slug(conn, slug)
        if len(self._cache) > _CACHE_MAX:
            self._cache.clear()
        self._cache[slug] = (time.monotonic() + 30.0, found)
        return found


def _peer(remote: Any) -> str:
    inner = getattr(remote, "underlying_address", remote)
    sockaddr = getattr(inner, "sockaddr", None)
    if sockaddr is not None:
        return f"[{sockaddr[0]}]:{sockaddr[1]}"
    return str(getattr(inner, "hostinfo", "?"))


class UplinkResource(resource.Resource):
    """POST /u: one uplink payload, answered when its batch is durable."""

    def __init__(self, settings: CoapSettings, pipeline: Pipeline, tenants: TenantDirectory):
        super().__init__()
        self._settings = settings
        self._pipeline = pipeline
        self._tenants = tenants

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        """Assemble Block1 uploads, refusing (4.13) any that would exceed the limit."""
        block1 = request.opt.block1
        limit = self._settings.max_payload_bytes
        if block1 is not None and (block1.block_number + 1) * block1.size > limit:
            await self.render_post(request, too_large=True)
        return True

    async def render_post(self, request: aiocoap.Message, *, too_large: bool = False) -> Any:
        """Offer the uplink to the pipeline; answer from its durable outcome."""
        started = time.monotonic()
        uplink = await self._uplink(request)
        kind = metrics.TRANSPORT_NAMES[int(uplink.transport)]
        if too_large or len(uplink.payload) > self._settings.max_payload_bytes:
            size = len(uplink.payload) if not too_large else request.opt.block1.size
            uplink.payload = uplink.payload[: self._settings.max_payload_bytes]
            uplink.reject = ("too_large", f"payload over {self._settings.max_payload_bytes} B")
            outcome = await self._durable(uplink, kind)
            msg = aiocoap.Message(code=aiocoap.REQUEST_ENTITY_TOO_LARGE, payload=b"too large")
            msg.opt.size1 = self._settings.max_payload_bytes
            if too_large:  # raised from block-wise assembly: aiocoap renders it
                raise error.RequestEntityTooLarge(f"at most {size} B per block")
            return msg
        outcome = await self._durable(uplink, kind)
        metrics.ACK_SECONDS.observe(time.monotonic() - started)
        return _response(outcome)

    async def _uplink(self, request: aiocoap.Message) -> Uplink:
        ctx = getattr(request.remote, "security_context", None)
        peer = _peer(request.remote)
        if isinstance(ctx, DeviceContext):
            return Uplink(
                bytes(request.payload),
                Transport.COAP_OSCORE,
                peer,
                device=ctx.device,
                replay_window=ctx.replay_state(),
            )
        query = dict(q.partition("=")[::2] for q in request.opt.uri_query)
        slug = query.get("t", "")
        try:
            tenant = await self._tenants.lookup(slug) if slug else None
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise Busy(self._settings.busy_max_age_s, "tenant directory unavailable") from exc
        if tenant is None or not tenant[1]:
            metrics.UPLINKS.labels("coap", "unauthenticated").inc()
            raise error.Unauthorized("use OSCORE (plain CoAP only for lab tenants, ?t=<slug>)")
        return Uplink(bytes(request.payload), Transport.COAP, peer, tenant_id=tenant[0])

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
        metrics.UPLINKS.labels(kind, outcome.status).inc()
        return outcome


def _response(outcome: Outcome) -> aiocoap.Message:
    if outcome.status != "quarantined":
        return aiocoap.Message(code=aiocoap.CHANGED)
    code = _CODES.get(outcome.reason, aiocoap.BAD_REQUEST)
    return aiocoap.Message(code=code, payload=f"{outcome.reason}: {outcome.detail}".encode())


def _dedup_key(remote: Any, mid: int) -> tuple[Any, ...]:
    # (host, port, mid): not the remote object, which holds the whole endpoint (~1 KB)
    sockaddr = getattr(remote, "sockaddr", None)
    return (sockaddr[0], sockaddr[1], mid) if sockaddr is not None else (remote, mid)


def _bound_dedup(mman: Any, lifetime_s: float, max_entries: int) -> None:
    """Replace aiocoap's deduplication (a dict plus one timer per message, ~247 s) by an
    insertion-ordered table trimmed on insert: same answers, bounded memory, no timers.

    An entry is (host, port, MID) -> [expiry, encoded answer]: ~0.3 KB rather than the
    answer `Message` and its endpoint (~2 KB), so `max_entries` (200,000) stay under
    ~60 MB; a duplicate CON decodes the stored bytes and sends them again."""
    recent: OrderedDict[Any, list[Any]] = OrderedDict()  # key -> [expires_at, bytes|None]
    mman._recent_messages = _ResponseView(recent)
    loop = asyncio.get_running_loop()

    def deduplicate(message: aiocoap.Message) -> bool:
        key = _dedup_key(message.remote, message.mid)
        now = loop.time()
        entry = recent.get(key)
        if entry is not None and entry[0] > now:
            if message.mtype is aiocoap.CON and entry[1] is not None:
                # the stored answer, same MID and token, to the same peer
                answer = aiocoap.Message.decode(entry[1], message.remote)
                answer.direction = Direction.OUTGOING  # decode() marks it as received
                mman._send_initially(answer)
            return True
        while recent:
            oldest = next(iter(recent.values()))
            if oldest[0] > now and len(recent) < max_entries:
                break
            recent.popitem(last=False)
        recent[key] = [now + lifetime_s, None]
        return False

    mman._deduplicate_message = deduplicate


class _ResponseView:
    """What aiocoap's `_store_response_for_duplicates` sees as `_recent_messages`."""

    def __init__(self, table: OrderedDict[Any, list[Any]]) -> None:
        self._table = table

    def __contains__(self, key: object) -> bool:
        remote, mid = key  # type: ignore[misc]
        return _dedup_key(remote, mid) in self._table

    def __setitem__(self, key: object, response: aiocoap.Message) -> None:
        remote, mid = key  # type: ignore[misc]
        self._table[_dedup_key(remote, mid)][1] = response.encode()

    def __len__(self) -> int:
        return len(self._table)


class _Site(resource.Site):
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


class _Context(aiocoap.Context):
    """aiocoap's Context, minus a per-request `repr` of the request.

    Upstream names each rendering task "Rendering for %r" % request, formatting the
    message and its remote (ipaddress parsing included) for every request; profiling put
    that at ~8% of the collector's CPU. Nothing reads task names, so ours is constant.
    """

    def render_to_pipe(self, pipe: Any) -> None:
        """Run the site for `pipe` (upstream's, with a constant task name)."""
        run_driving_pipe(
            error_to_message(pipe, self.log), self._render_to_pipe(pipe), name="coap-render"
        )


@functools.lru_cache(maxsize=4096)
def _is_multicast_host(host: str) -> bool:
    return ipaddress.ip_address(host.split("%", 1)[0]).is_multicast


@functools.lru_cache(maxsize=256)
def _is_multicast_pktinfo(pktinfo: bytes) -> bool:
    # struct in6_pktinfo: 16-byte address first; v4-mapped ::ffff:a.b.c.d keeps a in byte 12
    addr = pktinfo[:16]
    if addr[:12] == b"\0" * 10 + b"\xff\xff":
        return 224 <= addr[12] <= 239  # 224.0.0.0/4
    return addr[0] == 0xFF  # ff00::/8


def _patch_udp6_addresses() -> None:
    """Answer aiocoap's per-message multicast checks from caches.

    `UDP6EndpointAddress.is_multicast` / `is_multicast_locally` parse the peer's and the
    local address with `ipaddress` for every request and response (RFC 7252 §8: no
    piggybacked answers to multicast); peers and our own addresses repeat, so the answer
    is cached per address. Same results, no per-message parsing.
    """
    cls = udp6.UDP6EndpointAddress
    cls.is_multicast = property(lambda self: _is_multicast_host(str(self.sockaddr[0])))
    cls.is_multicast_locally = property(
        lambda self: self.pktinfo is not None and _is_multicast_pktinfo(bytes(self.pktinfo))
    )


def build_site(
    settings: CoapSettings, pipeline: Pipeline, pool: asyncpg.Pool, key: bytes | None
) -> Any:
    """The collector's one `Site`: /u behind the OSCORE wrapper."""
    site = _Site()
    site.add_resource(["u"], UplinkResource(settings, pipeline, TenantDirectory(pool)))
    return _OscoreSite(site, DeviceContexts(pool, key), settings.busy_max_age_s)


async def start_server(
    settings: CoapSettings, pipeline: Pipeline, pool: asyncpg.Pool, key: bytes | None
) -> Any:
    """Bind the CoAP server; return its aiocoap context (call `.shutdown()` to stop)."""
    site = build_site(settings, pipeline, pool, key)
    _patch_udp6_addresses()
    ctx = await _Context.create_server_context(
        site, bind=(settings.host, settings.port), transports=["udp6"]
    )
    for tman in ctx.request_interfaces:
        _bound_dedup(tman.token_interface, settings.exchange_lifetime_s, settings.dedup_max_entries)
    log.info("coap.started", host=settings.host, port=settings.port)
    return ctx
