"""CoAP over DTLS 1.2 with pre-shared keys (coaps://, udp/5684) → the same pipeline as /u.

Most NB-IoT modules (e.g. the BC-series) secure CoAP with DTLS 1.2 PSK rather than OSCORE.
The record layer is not ours: aiocoap's `tinydtls_server` transport over tinydtls (the
DTLSSocket package, optional extra `dtls`). What is ours is thin:

- `PskTable`: PSK identity → (key, device), in memory. tinydtls asks for the key
  synchronously inside the handshake, so no query can run there: the table is loaded
  whole at start, then what was stored or rotated since is read every `reload_s` (a new
  or rotated key takes effect within it); a revocation or a removed meter arrives by
  NOTIFY and takes effect at once. An unknown identity or a wrong key fails the
  handshake: the device's request never reaches a resource and nothing is stored.
- `DtlsUplinkResource`: `/u` of the DTLS site. The session's authenticated claim is the
  device (its meter), so the uplink enters the pipeline like an OSCORE one: the store
  checks that the frame names that meter (else quarantined, 4.03), dedups, and the
  answer (2.04) comes only once it is committed; 5.03 + Max-Age when busy.

Limits of the transport (aiocoap 0.4.17, "experimental" upstream): it binds one
address (not the any-address), keeps at most `max_sessions` DTLS sessions (least recently
used dropped: that device re-handshakes), and has no DTLS Connection ID (RFC 9146): a NAT
rebinding (new source port) is a new, unknown peer, so the device must handshake again.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime
from typing import Any

import aiocoap
import structlog
from aiocoap import error
from aiocoap.resource import Site

from collector import metrics
from collector.coap import TenantDirectory, UplinkResource
from collector.coap_guard import EventLimiter
from collector.pipeline import Pipeline
from collector.settings import CoapSettings, DtlsSettings
from collector.uplink import Device, Transport, Uplink
from storage import dtls, notify
from storage.errors import StorageError
from storage.notify import CredentialChange
from storage.pool import Pool, connection

log = structlog.get_logger("collector.coap_dtls")


class PskTable:
    """The DTLS-PSK credentials of every device, opened, held in memory (see module doc).

    aiocoap's DTLS server asks `find_dtls_psk(identity)` and records the claims returned
    with the session; ours is the `Device`. Kept fresh by incremental reads (keys stored
    or rotated since the last read, every `reload_s`) and by the credentials NOTIFY
    channel, which drops a revoked key or a removed meter's key at once; while that
    channel is down, every read is a full one (nothing deleted is kept longer).
    """

    def __init__(self, pool: Pool, key: bytes | None) -> None:
        self._pool = pool
        self._key = key
        self._table: dict[bytes, tuple[bytes, Device]] = {}
        self._identity_of: dict[int, bytes] = {}  # meter id -> its identity
        self._since: datetime | None = None  # None: the next read is a full one
        self.listening = False

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, Device]:
        """(key, device) of `identity`; KeyError (the handshake fails) when unknown."""
        entry = self._table.get(bytes(identity))
        if entry is None:
            metrics.COAP_REJECTED.labels("dtls_unknown_identity").inc()
            raise KeyError(identity)
        return entry

    def holds(self, device: Device) -> bool:
        """True while `device`'s key is in the table (not revoked since its handshake)."""
        identity = self._identity_of.get(device.meter_id)
        return identity is not None and self._table[identity][1] == device

    def forget(self, meter_id: int) -> None:
        """Drop `meter_id`'s key (revoked, or its meter removed)."""
        identity = self._identity_of.pop(meter_id, None)
        if identity is not None:
            self._table.pop(identity, None)

    def on_change(self, change: CredentialChange | None) -> None:
        """A NOTIFY from the credentials channel (None: unreadable, so read all again)."""
        if change is None:
            self._since = None
        else:
            self.forget(change.meter_id)

    def set_listening(self, listening: bool) -> None:
        """The NOTIFY channel is up (or lost: full reads until it is back)."""
        self.listening = listening
        self._since = None  # anything may have changed meanwhile

    async def reload(self) -> int:
        """Read what changed (everything, the first time); return the table's size.

        StorageError when the database is away (the table stays as it is)."""
        if self._key is None:
            return 0
        full = self._since is None or not self.listening
        async with connection(self._pool, "loading DTLS credentials", timeout_s=5.0) as conn:
            psks, broken, now = await dtls.load_psks(conn, self._key, None if full else self._since)
        if broken:
            log.error("dtls_credentials.unopenable", meters=broken[:20], count=len(broken))
        if full:
            self._table, self._identity_of = {}, {}
        for p in psks:
            self.forget(p.meter.meter_id)  # a rotation may change the identity
            device = Device(p.meter.meter_id, p.meter.tenant_id, p.meter.address, p.meter.format)
            self._table[p.identity] = (p.key, device)
            self._identity_of[p.meter.meter_id] = p.identity
        self._since = now
        return len(self._table)

    async def run(self, every_s: float) -> None:
        """Read changes every `every_s` until cancelled (the database may come and go)."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.reload()
            except StorageError as exc:  # keep the last table: sessions go on
                log.warning("dtls_credentials.reload_failed", error=str(exc))


def _claimed(request: aiocoap.Message) -> Device | None:
    claims = list(getattr(request.remote, "authenticated_claims", None) or [])
    return claims[0] if claims and isinstance(claims[0], Device) else None


class DtlsUplinkResource(UplinkResource):
    """POST /u over DTLS-PSK: the session's device is the authenticated sender.

    A session outlives nothing: once its key is revoked (or rotated, or its meter
    removed) its requests get 4.01, and the device must handshake with its new key."""

    table: PskTable  # set by DtlsServer

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        """Assemble Block1 uploads of DTLS sessions (authenticated), refusing (4.13) any
        that would exceed the limit."""
        block1 = request.opt.block1
        if block1 is None:
            return True
        if _claimed(request) is None:
            raise error.Unauthorized("no DTLS-PSK session")
        limit = self._settings.max_payload_bytes
        if (block1.block_number + 1) * block1.size > limit:
            await self.render_post(request, too_large=True)
        return True

    async def _uplink(self, request: aiocoap.Message) -> Uplink:
        device = _claimed(request)
        if device is None:  # the transport only delivers requests of a finished handshake
            raise error.Unauthorized("no DTLS-PSK session")
        if not self.table.holds(device):
            metrics.COAP_REJECTED.labels("dtls_revoked").inc()
            raise error.Unauthorized("this DTLS-PSK key was revoked: handshake again")
        peer = str(getattr(request.remote, "hostinfo", "?"))
        return Uplink(bytes(request.payload), Transport.COAP_DTLS, peer, device=device)


class DtlsServer:
    """The coaps:// listener with its credential table's reload task."""

    def __init__(
        self,
        settings: DtlsSettings,
        coap: CoapSettings,
        pipeline: Pipeline,
        pool: Pool,
        key: bytes | None,
        database_url: str | None = None,
    ) -> None:
        self._settings = settings
        self._database_url = database_url
        self.table = PskTable(pool, key)
        events = EventLimiter(coap.log_window_s, coap.log_per_window)
        self.site = Site()
        resource = DtlsUplinkResource(coap, pipeline, TenantDirectory(pool), events)
        resource.table = self.table
        self.site.add_resource(["u"], resource)
        self._ctx: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Load the credentials (later if the database is away), bind, serve."""
        if self._database_url is not None:
            ready = asyncio.Event()

            def on_ready() -> None:
                self.table.set_listening(True)
                ready.set()

            listen = notify.listen_credentials(
                self._database_url,
                self.table.on_change,
                lambda _why: self.table.set_listening(False),
                on_ready,
            )
            self._tasks.append(asyncio.create_task(listen, name="dtls-credentials-listen"))
            with contextlib.suppress(TimeoutError):  # a database that is away delays us this
                await asyncio.wait_for(ready.wait(), 2.0)
        try:
            count = await self.table.reload()
            log.info("dtls_credentials.loaded", devices=count)
        except StorageError as exc:
            log.warning("dtls_credentials.unreached", error=str(exc))
        self._tasks.append(
            asyncio.create_task(self.table.run(self._settings.reload_s), name="dtls-credentials")
        )
        _sessions(self._settings.max_sessions)
        # the transport binds the given port + 1 (its default-port offset 5684 - 5683)
        bind = (self._settings.host, self._settings.port - 1)
        self._ctx = await aiocoap.Context.create_server_context(
            self.site, bind=bind, transports=["tinydtls_server"], server_credentials=self.table
        )
        log.info("coaps.started", host=self._settings.host, port=self._settings.port)

    async def shutdown(self) -> None:
        """Stop reloading, close the sessions and the socket."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._ctx is not None:
            await self._ctx.shutdown()


def _sessions(max_sessions: int) -> None:
    """aiocoap keeps 64 DTLS sessions per server; raise it to what we were told."""
    from aiocoap.transports import tinydtls_server

    tinydtls_server._DatagramServerSocketSimpleDTLS.max_sockets = max_sessions
