"""The collector process: CoAP and MQTT into one group-commit pipeline, until SIGTERM.

`run(settings)` starts the pipeline workers, the CoAP server, the MQTT subscriber, the
alert dispatcher (`collector.webhooks`) and the /metrics endpoint, and on SIGTERM/SIGINT
(or when `stop` is set) shuts down in order:
leave the MQTT share group (taking in what the broker still holds for this collector),
refuse new uplinks (CoAP 5.03), commit everything already accepted, answer and PUBACK
it, end the MQTT session, then close the sockets. The database
may be down at start or at any time: batches wait and retry, nothing accepted is lost.
`main` runs it on uvloop's event loop (`CollectorSettings.event_loop`: asyncio's own on
request), as uvicorn runs the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from typing import Final

import structlog
import uvloop

from collector import analytics, metrics, retention
from collector.alerts_mqtt import AlertPublisher
from collector.coap import start_server
from collector.downlink import Downlinks
from collector.downlink_mqtt import MqttDownlink
from collector.drivers import install_directory
from collector.keys import MeterKeys
from collector.logs import configure_logging
from collector.mqtt import MqttSubscriber
from collector.pending import PendingView
from collector.pipeline import Pipeline
from collector.platform_http import PlatformServer, build_app
from collector.redecode import Redecoder
from collector.settings import CollectorSettings
from collector.store import BatchStore
from collector.webhooks import Dispatcher
from decoder.drivers import DriverError
from storage.coap_peers import PeerMismatchError
from storage.credentials import parse_key
from storage.pool import Pool, create_pool, keep_session

log = structlog.get_logger("collector.main")


async def _create_pool(settings: CollectorSettings) -> Pool:
    # min_size 0: the collector starts (and keeps running) while the database is away
    return await create_pool(
        settings.database_url,
        min_size=0,
        max_size=settings.pipeline.pool_size + 2,
        connect_timeout_s=5.0,
        command_timeout_s=30.0,
        max_inactive_connection_lifetime_s=60.0,
        reset=keep_session,
    )


async def run(
    settings: CollectorSettings,
    *,
    stop: asyncio.Event | None = None,
    started: asyncio.Event | None = None,
) -> None:
    """Run the collector until `stop` is set (default: until SIGTERM or SIGINT)."""
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    driver_tenants: frozenset[str] = frozenset()
    if settings.drivers_dir is not None:  # a bad driver file stops the start (DriverError)
        for tenant, mine in install_directory(settings.drivers_dir).items():
            for driver in mine:
                log.info(
                    "driver.installed", driver=driver.name, tenant=tenant, source=driver.source
                )
            if tenant is not None and mine:
                driver_tenants |= {tenant}
    key = None
    if settings.credentials_key is not None:
        key = parse_key(settings.credentials_key.get_secret_value())
    pool = await _create_pool(settings)
    store = BatchStore(pool, MeterKeys(key), driver_tenants=driver_tenants)
    pipeline = Pipeline(settings.pipeline, store.commit)
    hooks_pool = None  # the alert dispatcher's own small pool: never the pipeline's
    if settings.webhooks.enabled:
        hooks_pool = await create_pool(
            settings.database_url, min_size=0, max_size=settings.webhooks.pool_size,
            connect_timeout_s=5.0, command_timeout_s=30.0, reset=keep_session,
        )  # fmt: skip
    http = metrics.serve(settings.metrics_host, settings.metrics_port)
    # the mailbox's commands, in each device's window; claimed only for meters that may
    # have one (the view's LISTEN connection is its own, not the pool's)
    pending = PendingView(pool, settings.database_url)
    downlinks = Downlinks(pool, key, pending)
    down = MqttDownlink(settings.mqtt_url, settings.mqtt, downlinks) if settings.mqtt_url else None
    mqtt = (
        MqttSubscriber(
            settings.mqtt_url,
            settings.mqtt,
            pipeline,
            on_durable=down.uplink_stored if down is not None else None,
        )
        if settings.mqtt_url
        else None
    )
    try:
        async with asyncio.TaskGroup() as group:
            drained = group.create_task(pipeline.run(), name="pipeline")
            redecoder = Redecoder(pool, pipeline, settings.redecode, settings.database_url)
            redecode = group.create_task(redecoder.run(stop), name="redecode")
            if hooks_pool is not None:
                alerts = (
                    AlertPublisher(settings.mqtt_url, hooks_pool) if settings.mqtt_url else None
                )
                hooks = Dispatcher(
                    hooks_pool, settings.webhooks, settings.database_url, publisher=alerts,
                    credentials_key=key,
                )  # fmt: skip
                group.create_task(hooks.run(stop), name="webhooks")
            expiry = group.create_task(downlinks.expire_forever(), name="downlink-expiry")
            pending_view = group.create_task(pending.run(), name="pending-commands")
            chunk_expiry = group.create_task(
                retention.run(pool, settings.retention, settings.database_url), name="retention"
            )
            if settings.analytics.enabled:
                group.create_task(
                    analytics.run(settings.database_url, settings.analytics, stop),
                    name="analytics",
                )
            coap = await start_server(
                settings.coap,
                pipeline,
                pool,
                key,
                database_url=settings.database_url,
                downlinks=downlinks,
            )
            if down is not None:
                down.start()
            if mqtt is not None:
                await mqtt.start()
            coaps = None
            if settings.dtls.port:
                from collector.coap_dtls import DtlsServer  # needs the `dtls` extra

                coaps = DtlsServer(
                    settings.dtls, settings.coap, pipeline, pool, key, settings.database_url
                )
                await coaps.start()
            platform = None
            if settings.platform.port:
                app = build_app(settings.platform, pipeline, pool, key)
                platform = PlatformServer(settings.platform, app)
                await platform.start()
            log.info(
                "collector.started",
                coap_port=settings.coap.port,
                mqtt=mqtt is not None,
                platform_port=settings.platform.port or None,
                coaps_port=settings.dtls.port or None,
            )
            if started is not None:
                started.set()
            await stop.wait()
            log.info("collector.stopping", pending=pipeline.pending)
            if mqtt is not None:
                await mqtt.leave()  # leave the share group while the pipeline still takes
            pipeline.close()
            try:
                await asyncio.wait_for(asyncio.shield(drained), settings.shutdown_grace_s)
            except TimeoutError:
                # the database stayed away: what is left was never acknowledged
                log.warning("collector.drain_timed_out", pending=pipeline.pending)
                drained.cancel()
            # the re-decode batch under way records its outcomes, else it is re-queued
            await asyncio.wait({redecode}, timeout=5.0)
            redecode.cancel()
            chunk_expiry.cancel()
            if mqtt is not None:
                await mqtt.drain_and_stop()
            expiry.cancel()
            pending_view.cancel()
            if down is not None:
                await down.stop()
            await asyncio.sleep(0.05)  # let CoAP handlers send the answers just resolved
            await coap.shutdown()
            if platform is not None:
                await platform.shutdown()
            if coaps is not None:
                await coaps.shutdown()
    finally:
        if http is not None:
            with contextlib.suppress(Exception):
                http.shutdown()
        await pool.close()
        if hooks_pool is not None:
            await hooks_pool.close()
    log.info("collector.stopped")


# Objects allocated (net) before a young collection runs (CPython's default: 700). Each
# uplink allocates a few hundred short-lived containers (messages, options, futures,
# rows) that reference counting frees; a young collection walks whatever is alive then,
# mostly the batches in flight. At 700 that was every few uplinks (bench/cityday.py:
# ~120-150 µs of collection per OSCORE uplink); at 5,000 the city day's collector still
# spent 7.2 s of its 87 s CPU in young and middle collections; at 50,000, 2.0 s of 79 s.
GC_YOUNG_OBJECTS: Final = 50_000
# Young-to-middle collections before a full one (CPython's default: 10). Requests leave
# no cyclic garbage (coap_patches.acyclic_requests), so a full collection finds next to
# nothing, yet each walks every long-lived object, the ~100,000 cached OSCORE contexts
# first: in bench/cityday.py's city day 23 of them found 0 objects to free in 8.1 s, 9%
# of the collector's CPU. They still run, ten times less often.
GC_FULL_EVERY: Final = 100


def tune_gc() -> None:
    """Freeze the heap built so far (modules, settings: live for the whole process, so
    never worth scanning again) and collect less often."""
    gc.collect()
    gc.freeze()
    _, older, _ = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_OBJECTS, older, GC_FULL_EVERY)


def main() -> int:
    """Process entry point: settings, logging, then `run` until SIGTERM."""
    settings = CollectorSettings()
    configure_logging(settings.log_json)
    tune_gc()
    try:
        if settings.event_loop == "uvloop":
            uvloop.run(run(settings))
        else:
            asyncio.run(run(settings))
    except KeyboardInterrupt:
        return 130
    except DriverError as exc:
        log.error("collector.refused", error=str(exc))
        return 2
    except (PeerMismatchError, BaseExceptionGroup) as exc:
        refused = _refusal(exc)
        if refused is None:
            raise
        # another process on the CoAP port runs other settings: say which, no traceback
        log.error("collector.refused", error=str(refused))
        return 2
    return 0


def _refusal(exc: BaseException) -> PeerMismatchError | None:
    """The PeerMismatchError inside `exc` (the TaskGroup wraps it), if there is one."""
    if isinstance(exc, PeerMismatchError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _refusal(inner)) is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
