"""The alert dispatcher: the webhook outbox to HTTP, alarm events to MQTT, the alarm sweep.

It runs in the collector process (`collector.main` starts it as a named task of its task
group; `python -m collector.webhooks` runs it alone). The collector is the long-running
daemon that already survives database outages and owns the broker connection; the API may
run as many workers, restarted for each deploy. Several dispatchers are still safe: rows
are leased with FOR UPDATE SKIP LOCKED (`storage.webhooks.claim`). It has its own small
pool, so a slow receiver never takes a connection from the ingest pipeline.

With a broker URL it also publishes every alarm event on the tenant's MQTT alert topic
(`collector.alerts_mqtt`).

Wake-up: LISTEN nbmeter_alarms (sent by `nbm_alarm_event` at commit), plus a poll every
`poll_s` for retries whose time has come and notifications missed while disconnected.

A request: POST the event's JSON (the same bytes on every attempt) with headers
`Nbmeter-Event-Id` (stable: receivers de-duplicate on it; delivery is at least once),
`Nbmeter-Timestamp` (unix seconds of this attempt) and `Nbmeter-Signature`
`v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>` (`sign`, `verify`). A 2xx answer
is delivered; anything else, or no answer within `timeout_s`, is retried after
`backoff(attempt)`: exponential, capped, with full jitter in its upper half.

The signing secrets are stored sealed (migration 0045) and opened with the collector's
credentials key; a secret that does not open is a failed attempt with that reason (so the
endpoint is disabled with it in the end), never an unsigned request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import structlog

from collector import metrics
from collector.alerts_mqtt import AlertPublisher
from collector.logs import configure_logging
from collector.settings import CollectorSettings, WebhookSettings
from storage import alarms as alarm_store
from storage import webhooks as store
from storage.credentials import parse_key
from storage.errors import StorageError
from storage.pool import Pool, create_pool, keep_session

log = structlog.get_logger("collector.webhooks")

SIGNATURE_HEADER = "Nbmeter-Signature"
TIMESTAMP_HEADER = "Nbmeter-Timestamp"
EVENT_HEADER = "Nbmeter-Event-Id"
_MAX_ERROR = 300
_MAX_ANSWER = 64 * 1024  # bytes of a receiver's answer read at most
NO_SECRET = (
    "the endpoint's signing secret does not open with this dispatcher's credentials key"
    " (NBMETER_CREDENTIALS_KEY): not sent unsigned"
)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value: `v1=` + hex HMAC-SHA256 over `"<timestamp>." + body`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    now: float,
    tolerance_s: float = 300,
) -> bool:
    """A receiver's check: the signature matches and the timestamp is within tolerance."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs(now - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def backoff(
    attempt: int, base_s: float, max_s: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds before attempt `attempt + 1`: base * 2**(attempt-1), capped at `max_s`, then
    a uniform draw in its upper half (jitter, so failed receivers are not hit in step)."""
    ceiling = min(max_s, base_s * 2.0 ** min(attempt - 1, 62))
    return float(ceiling / 2 + rand() * ceiling / 2)


class Dispatcher:
    """Delivers the outbox until stopped; see the module docstring."""

    def __init__(
        self,
        pool: Pool,
        settings: WebhookSettings,
        database_url: str,
        client: httpx.AsyncClient | None = None,
        publisher: AlertPublisher | None = None,
        *,
        credentials_key: bytes | None = None,
    ) -> None:
        self._pool = pool
        self._key = credentials_key  # opens the sealed signing secrets (migration 0045)
        self._publisher = publisher
        self._settings = settings
        self._dsn = database_url
        self._client = client
        self._wake = asyncio.Event()
        self.delivered = 0  # attempts answered 2xx (tests and the bench read it)

    def wake(self) -> None:
        """Look at the outbox now (a NOTIFY arrived)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set; database outages are waited out."""
        client = self._client or httpx.AsyncClient(timeout=self._settings.timeout_s)
        listener = asyncio.create_task(
            store.listen_alarms(self._dsn, self.wake), name="webhooks-listen"
        )
        if self._publisher is not None:
            self._publisher.start()
        next_sweep = 0.0
        try:
            if self._key is not None:
                await self._seal_clear_secrets(self._key)
            while not stop.is_set():
                self._wake.clear()
                try:
                    busy = await self.step(client)
                    if self._publisher is not None:
                        busy |= await self._publisher.step() >= self._settings.batch_max
                    if time.monotonic() >= next_sweep:
                        next_sweep = time.monotonic() + self._settings.sweep_every_s
                        await alarm_store.sweep(self._pool)
                except StorageError as exc:
                    log.warning("webhooks.storage_failed", error=str(exc))
                    busy = False
                if busy:
                    continue
                waits = {asyncio.ensure_future(self._wake.wait()),
                         asyncio.ensure_future(stop.wait())}  # fmt: skip
                _, pending = await asyncio.wait(
                    waits, timeout=self._settings.poll_s, return_when=asyncio.FIRST_COMPLETED
                )
                for w in pending:
                    w.cancel()
        finally:
            if self._publisher is not None:
                self._publisher.stop()
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            if self._client is None:
                await client.aclose()

    async def _seal_clear_secrets(self, key: bytes) -> None:
        """Seal secrets left in clear from before migration 0045 (once, at start)."""
        try:
            n = await store.seal_clear_secrets(self._pool, key)
        except StorageError as exc:
            log.warning("webhooks.sealing_failed", error=str(exc))
            return
        if n:
            log.info("webhook_secrets.sealed", endpoints=n)

    async def step(self, client: httpx.AsyncClient) -> bool:
        """Claim one batch and deliver it; True when a full batch was claimed (more due)."""
        s = self._settings
        claimed = await store.claim(self._pool, s.batch_max, s.lease_s, self._key)
        if not claimed:
            return False
        attempts = await asyncio.gather(*(self._send(client, c) for c in claimed))
        self.delivered += sum(a.ok for a in attempts)
        for c, a in zip(claimed, attempts, strict=True):
            metrics.WEBHOOK_ATTEMPTS.labels("ok" if a.ok else "failed").inc()
            if a.ok and c.attempt == 1:
                metrics.WEBHOOK_LATENCY.observe((a.attempted_at - c.created_at).total_seconds())
        off = await store.record(
            self._pool,
            attempts,
            max_attempts=s.max_attempts,
            disable_after_failures=s.disable_after_failures,
            disable_after_s=s.disable_after_s,
        )
        for endpoint_id in off:
            metrics.WEBHOOK_DISABLED.inc()
            log.warning("webhook.endpoint_disabled", endpoint_id=endpoint_id)
        return len(claimed) >= s.batch_max

    async def _send(self, client: httpx.AsyncClient, c: store.Claimed) -> store.Attempt:
        at = datetime.now(UTC)
        ts = int(at.timestamp())
        if c.secret is None:  # never send unsigned: a failed attempt, with the reason
            return self._attempt(c, at, None, NO_SECRET, 0)
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: c.event_id,
            TIMESTAMP_HEADER: str(ts),
            SIGNATURE_HEADER: sign(c.secret, ts, c.body),
            "User-Agent": "nbmeter-webhooks/1",
        }
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        try:
            # at most _MAX_ANSWER bytes of the answer are read (a short one fully, so the
            # connection is kept alive): a receiver cannot make us buffer a large body
            async with client.stream("POST", c.url, content=c.body, headers=headers) as response:
                status = response.status_code
                seen = 0
                async for chunk in response.aiter_raw():
                    seen += len(chunk)
                    if seen > _MAX_ANSWER:
                        break
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR]
        return self._attempt(c, at, status, error, int((time.perf_counter() - started) * 1000))

    def _attempt(
        self, c: store.Claimed, at: datetime, status: int | None, error: str | None, ms: int
    ) -> store.Attempt:
        ok = error is None
        retry_at = None
        if not ok:
            delay = backoff(c.attempt, self._settings.backoff_base_s, self._settings.backoff_max_s)
            retry_at = at + timedelta(seconds=delay)
            log.info("webhook.failed", event_id=c.event_id, endpoint_id=c.endpoint_id,
                     attempt=c.attempt, error=error)  # fmt: skip
        return store.Attempt(c.event_id, c.endpoint_id, c.attempt, at, ok, status, error, ms,
                             retry_at)  # fmt: skip


async def run_alone(
    database_url: str,
    settings: WebhookSettings,
    mqtt_url: str | None = None,
    credentials_key: bytes | None = None,
) -> None:
    """Run only the dispatcher (its own pool) until cancelled or SIGTERM."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool = await create_pool(
        database_url, min_size=0, max_size=settings.pool_size, reset=keep_session
    )
    try:
        publisher = AlertPublisher(mqtt_url, pool) if mqtt_url else None
        await Dispatcher(
            pool, settings, database_url, publisher=publisher, credentials_key=credentials_key
        ).run(stop)
    finally:
        await pool.close()


def main() -> int:
    """`python -m collector.webhooks`: the collector's settings, only the dispatcher."""
    settings = CollectorSettings()
    configure_logging(settings.log_json)
    key = settings.credentials_key
    opened = parse_key(key.get_secret_value()) if key is not None else None
    asyncio.run(run_alone(settings.database_url, settings.webhooks, settings.mqtt_url, opened))
    return 0


if __name__ == "__main__":
    sys.exit(main())
