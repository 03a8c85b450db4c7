"""The billing API application: `create_app(settings)` builds it; its lifespan owns the pool.

Routes: /v1 meters, reads, cycles, admin; /console (the operations console); /healthz
(database reachable); /metrics (Prometheus text). Every error is RFC 9457 problem+json (api.errors).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import (
    errors,
    routes_admin,
    routes_alarms,
    routes_analytics,
    routes_commands,
    routes_console,
    routes_cycles,
    routes_health,
    routes_manual,
    routes_meters,
    routes_quarantine,
    routes_reads,
    routes_tenant,
)
from api.auth import KeyCache, listening
from api.bodies import BodyLimits, known_query
from api.deps import PROBLEM_RESPONSE, Pool
from api.schemas import Health
from api.settings import ApiSettings
from storage.billing import SESSION_SETTINGS
from storage.errors import StorageError, StorageUnavailableError
from storage.pool import create_pool, keep_session, ping

DESCRIPTION = """Billing API of nbmeter: meter registry, interval reads in local time,
billing-cycle reads with VEE and ESPI quality codes, and bulk export for billing runs.
Quantities are exact decimal strings of m3. Authenticate with `Authorization: Bearer <key>`."""


class Metrics:
    """Per-app Prometheus registry: request counts and latency by route, method, status."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "nbmeter_api_requests",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "nbmeter_api_request_seconds",
            "time to response start",
            ["method", "route"],
            registry=self.registry,
        )
        self.key_listener_up = Gauge(
            "nbmeter_api_key_listener_up",
            "1 while key revocations arrive by NOTIFY; 0: keys re-checked every fallback TTL",
            registry=self.registry,
        )


class MetricsMiddleware:
    """Pure ASGI middleware (no body buffering, streams pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count and time one HTTP request."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def tap(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                route = scope.get("route")
                name = getattr(route, "path", "unmatched")
                self.metrics.latency.labels(scope["method"], name).observe(
                    time.perf_counter() - started
                )
                self.metrics.requests.labels(scope["method"], name, str(status[0])).inc()
            await send(message)

        await self.app(scope, receive, tap)


def create_app(settings: ApiSettings) -> FastAPI:
    """Build the API for `settings`; the pool is opened and closed by the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            pool = await create_pool(
                settings.database_url,
                min_size=settings.api_pool_min,
                max_size=settings.api_pool_max,
                server_settings=SESSION_SETTINGS,  # what the cycle queries are planned for
                reset=keep_session,
            )
        except StorageError as exc:
            msg = f"cannot connect to the database: {exc}"
            raise StorageUnavailableError(msg) from exc
        app.state.pool = pool
        try:
            async with listening(app.state.key_cache, settings):
                yield
        finally:
            await pool.close()

    app = FastAPI(
        title="nbmeter billing API",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(known_query)],
    )
    app.state.settings = settings
    app.state.key_cache = KeyCache(settings.key_cache_ttl_s, settings.key_cache_fallback_ttl_s)
    metrics = Metrics()
    app.state.metrics = metrics
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes)
    errors.install(app)
    for module in (routes_meters, routes_reads, routes_cycles, routes_admin):
        app.include_router(module.router)
    app.include_router(routes_quarantine.router)
    app.include_router(routes_tenant.router)
    app.include_router(routes_manual.router)
    app.include_router(routes_alarms.router)
    app.include_router(routes_health.router)
    app.include_router(routes_commands.router)
    app.include_router(routes_console.router)
    app.include_router(routes_console.pages)
    app.include_router(routes_analytics.router)

    unavailable: dict[int | str, dict[str, Any]] = {
        503: {**PROBLEM_RESPONSE, "description": "database down"}
    }

    @app.get("/healthz", tags=["ops"], responses=unavailable, summary="Liveness")
    async def healthz(pool: Pool) -> Health:
        """200 when the database answers a query, else 503 problem+json."""
        await ping(pool, timeout_s=2.0)
        return Health(status="ok")

    @app.get(
        "/metrics",
        tags=["ops"],
        summary="Prometheus metrics",
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus(request: Request) -> Response:
        """Request counters and latency histograms in Prometheus text format."""
        metrics.key_listener_up.set(int(app.state.key_cache.listening))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
