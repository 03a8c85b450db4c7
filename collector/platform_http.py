"""Operator-platform push endpoint (HTTP): a push → uplinks in the pipeline → 200 once durable.

Why in the collector and not the API process: the pipeline (group commit, identity
check, quarantine, dedup, backpressure, answer only when durable) lives here, and the
API may not import the collector. So this is one more thin transport shell beside CoAP
and MQTT: a Starlette app served by uvicorn inside the collector's event loop
(`PlatformServer`), bound only when `NBMETER_PLATFORM__PORT` is set.

    POST /p/<tenant-slug>/onenet                 OneNET (signed body)
    GET  /p/<tenant-slug>/onenet?msg&nonce&signature   OneNET's URL check: echoes msg
    POST /p/<tenant-slug>/oceanconnect/<secret>  OceanConnect (secret in the callback URL)

Per push, in order: the tenant's sealed endpoint secret is opened (cached `secret_ttl_s`;
none: 404); the envelope is read and authenticated (`devices.platforms`: 400 malformed,
401 bad signature/token, 401 stale); nothing before this point is stored. Then each
message's platform identity is mapped to its provisioned meter (migration 0038) and the
payload goes into the pipeline as an uplink of that authenticated device (transport 6):
the store decodes it, checks that the frame names that meter, dedups and archives it
exactly as for `/u`. The answer comes when the whole push is durable:

- 200 `{"stored": n, "duplicate": n, "ignored": n}`: every message stored (or already
  stored: a platform's retry stores nothing twice);
- 404 `unknown_device`, 403 `identity_mismatch`, 422 `undecodable` (and the store's
  other reasons): a message was quarantined (with its bytes and the reason); the others of
  the push are stored;
- 503 with Retry-After: the pipeline is full, the collector is stopping, or the database
  has been away longer than `ack_wait_s`. What was queued is still stored; the platform's
  retry is then a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from collector import answers, metrics
from collector.pipeline import Pipeline, PipelineClosed, PipelineFull
from collector.settings import PlatformSettings
from collector.uplink import NOT_YET_DURABLE, Device, Outcome, Transport, Uplink
from devices import platforms
from storage import platforms as platform_store
from storage.credentials import CredentialsError, MeterRef
from storage.errors import StorageError
from storage.pool import Pool, connection
from storage.reasons import Reason

log = structlog.get_logger("collector.platform_http")

# the reason's CoAP answer (collector.answers, the one table) as HTTP; every other
# quarantine reason (4.00: undecodable, clock...) is 422, the payload is unusable
_HTTP = {answers.FORBIDDEN: 403, answers.NOT_FOUND: 404, answers.REQUEST_ENTITY_TOO_LARGE: 413}
_KIND = "platform"


class Unavailable(Exception):
    """Answer 503 with Retry-After: nothing was refused, the platform must push again."""


T = TypeVar("T")


@dataclass
class _Cached(Generic[T]):
    value: T
    until: float


class Directory:
    """The tenants' opened endpoint secrets and the platform identities' meters, cached.

    A secret is kept `secret_ttl_s` (a rotation takes effect within it); a known identity
    `device_ttl_s`; an unknown one is looked up again on its next push.
    """

    def __init__(self, pool: Pool, key: bytes | None, settings: PlatformSettings) -> None:
        self._pool = pool
        self._key = key
        self._settings = settings
        self._secrets: dict[tuple[str, str], _Cached[tuple[int, bytes] | None]] = {}
        self._devices: dict[tuple[int, str, str], _Cached[MeterRef]] = {}

    async def secret(self, slug: str, platform: str) -> tuple[int, bytes] | None:
        """(tenant id, secret) of `slug`'s endpoint for `platform`; None when it has none."""
        now = time.monotonic()
        hit = self._secrets.get((slug, platform))
        if hit is not None and hit.until > now:
            return hit.value
        if self._key is None:
            return None  # no credentials key: no secret opens
        try:
            async with connection(self._pool, "loading a platform secret", timeout_s=5.0) as c:
                found = await platform_store.load_secret(c, self._key, slug, platform)
        except CredentialsError:
            log.error("platform_secret.unopenable", tenant=slug, platform=platform)
            found = None
        if len(self._secrets) > 10_000:
            self._secrets.clear()
        self._secrets[(slug, platform)] = _Cached(found, now + self._settings.secret_ttl_s)
        return found

    async def meters(self, tenant_id: int, platform: str, ids: set[str]) -> dict[str, MeterRef]:
        """The meters of the identities `ids` that are provisioned (absent: unknown)."""
        now = time.monotonic()
        out: dict[str, MeterRef] = {}
        for device_id in ids:
            hit = self._devices.get((tenant_id, platform, device_id))
            if hit is not None and hit.until > now:
                out[device_id] = hit.value
        missing = ids - out.keys()
        if missing:
            async with connection(self._pool, "resolving platform devices", timeout_s=5.0) as c:
                found = await platform_store.devices_by_identity(c, tenant_id, platform, missing)
            if len(self._devices) > 100_000:
                self._devices.clear()
            until = now + self._settings.device_ttl_s
            for device_id, meter in found.items():
                self._devices[(tenant_id, platform, device_id)] = _Cached(meter, until)
            out |= found
        return out


def _problem(status: int, code: str, detail: str, **extra: object) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail, **extra}, status_code=status)


class PushHandler:
    """Turns one authenticated push into uplinks and the pipeline's verdict into HTTP."""

    def __init__(
        self, settings: PlatformSettings, pipeline: Pipeline, directory: Directory
    ) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._directory = directory
        self._window = platforms.Window(settings.max_age_s, settings.max_ahead_s)

    async def push(self, request: Request) -> Response:
        """POST /p/{tenant}/{platform}[/{token}]."""
        slug = request.path_params["tenant"]
        platform = request.path_params["platform"]
        try:
            body = await self._body(request)
            return await self._push(slug, platform, body, request.path_params.get("token"))
        except platforms.PushRejected as exc:
            metrics.PLATFORM_REFUSED.labels(exc.code).inc()
            log.info("push.refused", tenant=slug, platform=platform, code=exc.code)
            return _problem(exc.status, exc.code, exc.detail)
        except (Unavailable, StorageError) as exc:
            return self._unavailable(str(exc))

    def _unavailable(self, why: str) -> Response:
        metrics.UPLINKS.labels(_KIND, "busy").inc()
        response = _problem(503, "unavailable", why)
        response.headers["Retry-After"] = str(self._settings.retry_after_s)
        return response

    async def _body(self, request: Request) -> bytes:
        limit = self._settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise platforms.PushRejected(413, "too_large", f"bodies are at most {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    msg = f"bodies are at most {limit} bytes"
                    raise platforms.PushRejected(413, "too_large", msg)
                chunks.append(chunk)
        except ClientDisconnect as exc:
            raise platforms.PushRejected(400, "malformed", "the body was cut off") from exc
        return b"".join(chunks)

    async def _push(self, slug: str, platform: str, body: bytes, token: str | None) -> Response:
        if platform not in platforms.PLATFORMS:
            msg = f"supported: {', '.join(platforms.PLATFORMS)}"
            raise platforms.PushRejected(404, "unknown_platform", msg)
        tenant = await self._directory.secret(slug, platform)
        if tenant is None:
            msg = f"tenant {slug!r} has no {platform} endpoint (nbmeter tenant platform-secret)"
            raise platforms.PushRejected(404, "no_endpoint", msg)
        tenant_id, secret = tenant
        envelope = platforms.read(platform, body)
        platforms.verify(envelope, secret, time.time(), self._window, token)
        meters = await self._directory.meters(
            tenant_id, platform, {m.device_id for m in envelope.messages}
        )
        uplinks = [self._uplink(tenant_id, platform, m, meters) for m in envelope.messages]
        outcomes = await self._durable(uplinks)
        return self._answer(envelope, outcomes)

    @staticmethod
    def _uplink(
        tenant_id: int, platform: str, message: platforms.Message, meters: dict[str, MeterRef]
    ) -> Uplink:
        peer = f"{platform}:{message.device_id}"
        meter = meters.get(message.device_id)
        if meter is None:  # quarantined with the tenant: the frame is kept for a look
            reject = (
                Reason.UNKNOWN_DEVICE,
                f"no meter is provisioned as {platform} {message.device_id}",
            )
            return Uplink(
                message.payload, Transport.PLATFORM, peer, tenant_id=tenant_id, reject=reject
            )
        device = Device(meter.meter_id, meter.tenant_id, meter.address, meter.format)
        return Uplink(message.payload, Transport.PLATFORM, peer, device=device)

    async def _durable(self, uplinks: list[Uplink]) -> list[Outcome]:
        if self._pipeline.pending + len(uplinks) > self._settings.max_pending:
            raise Unavailable("the collector is busy")
        futures: list[asyncio.Future[Outcome]] = []
        try:
            for uplink in uplinks:
                futures.append(
                    self._pipeline.offer(uplink, answer_within_s=self._settings.ack_wait_s)
                )
        except (PipelineFull, PipelineClosed) as exc:
            # those offered are stored all the same; the platform's retry is a duplicate
            raise Unavailable("the collector is busy or stopping") from exc
        results = await asyncio.gather(*futures, return_exceptions=True)
        outcomes: list[Outcome] = []
        for result in results:
            if isinstance(result, BaseException):
                metrics.UPLINKS.labels(_KIND, "failed").inc()
                raise Unavailable("an uplink could not be stored") from result
            if result is NOT_YET_DURABLE:
                raise Unavailable("not yet durable (the database is away); push again later")
            outcomes.append(result)
        return outcomes

    @staticmethod
    def _answer(envelope: platforms.Envelope, outcomes: list[Outcome]) -> Response:
        counts = {"stored": 0, "duplicate": 0, "quarantined": 0, "ignored": envelope.ignored}
        refused: list[dict[str, object]] = []
        status = 0
        for message, outcome in zip(envelope.messages, outcomes, strict=True):
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
            metrics.UPLINKS.labels(_KIND, outcome.status).inc()
            if outcome.status == "quarantined":
                status = max(status, _HTTP.get(answers.coap_code(outcome), 422))
                refused.append(
                    {
                        "device_id": message.device_id,
                        "reason": outcome.reason,
                        "detail": outcome.detail,
                    }
                )
        if not refused:
            return JSONResponse(counts)
        first = refused[0]
        return _problem(
            status, str(first["reason"]), str(first["detail"]), refused=refused, **counts
        )

    async def url_check(self, request: Request) -> Response:
        """GET /p/{tenant}/onenet: OneNET's URL check, answered with `msg` if signed right."""
        slug = request.path_params["tenant"]
        q = request.query_params
        msg, nonce, signature = q.get("msg"), q.get("nonce"), q.get("signature")
        if msg is None or nonce is None or signature is None:
            return _problem(400, "malformed", "msg, nonce and signature are required")
        try:
            tenant = await self._directory.secret(slug, "onenet")
        except StorageError as exc:
            return self._unavailable(str(exc))
        if tenant is None:
            return _problem(404, "no_endpoint", f"tenant {slug!r} has no onenet endpoint")
        want = platforms.onenet_signature(tenant[1], nonce, msg)
        if want != signature:
            return _problem(401, "bad_signature", "signature does not match the token")
        return PlainTextResponse(msg)


def build_app(
    settings: PlatformSettings, pipeline: Pipeline, pool: Pool, key: bytes | None
) -> Starlette:
    """The push endpoint's ASGI app (routes in the module docstring)."""
    handler = PushHandler(settings, pipeline, Directory(pool, key, settings))
    endpoint: Callable[[Request], Awaitable[Response]] = handler.push
    return Starlette(
        routes=[
            Route("/p/{tenant}/onenet", handler.url_check, methods=["GET"]),
            Route("/p/{tenant}/{platform}", endpoint, methods=["POST"]),
            Route("/p/{tenant}/{platform}/{token}", endpoint, methods=["POST"]),
        ]
    )


class PlatformServer:
    """uvicorn serving `build_app` inside the running event loop (no signal handlers of
    its own: the collector's shutdown order stops it, after the pipeline has drained)."""

    def __init__(self, settings: PlatformSettings, app: Starlette) -> None:
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
            ssl_certfile=settings.tls_certfile,
            ssl_keyfile=settings.tls_keyfile,
        )
        config.load()
        self._server = uvicorn.Server(config)
        # what uvicorn's own serve() sets up before startup(); lifespan "off": a no-op
        self._server.lifespan = config.lifespan_class(config)

    async def start(self) -> None:
        """Bind and serve."""
        try:
            await self._server.startup()
        except SystemExit as exc:  # uvicorn exits on a bind error: not in our process
            msg = "the platform push endpoint could not bind (is its port free?)"
            raise OSError(msg) from exc
        if not self._server.started:
            msg = "the platform push endpoint did not start (is its port free?)"
            raise OSError(msg)

    async def shutdown(self) -> None:
        """Stop accepting, let answers in flight go out, close."""
        with contextlib.suppress(Exception):
            await self._server.shutdown()
