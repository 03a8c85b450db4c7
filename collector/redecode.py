"""Re-decode requests from the billing office: quarantined frames through the live store path.

`Redecoder.run(stop)` drains the queue of storage.redecode_queue in batches of `batch_max`
items, claimed FOR UPDATE SKIP LOCKED (several collectors share the work), woken by
NOTIFY on a connection of its own (storage.notify's loop: heartbeat, reconnect; each
reconnect wakes it too, since a request may have been notified while the connection was
down) and, as a last resort, by a poll every `poll_s`. Each claimed frame is offered to the
pipeline as the uplink it was: its payload, transport, peer and original receive time,
with the device the row recorded (meter and tenant; MQTT and OSCORE) or, for plain CoAP,
its tenant. The pipeline's store path (collector.store.BatchStore) applies the same
identity, dedup and quarantine checks as to a live uplink: readings are never stored
twice, and a frame that fails again is quarantined again with its new reason. Outcomes
are recorded in the claim's transaction; a crash before that re-queues the batch, whose
frames then come out as duplicates.

Live traffic goes first: no batch is claimed while the pipeline holds `yield_pending`
uplinks or more.

Before it claims, each round queues the work newly learned compact-frame formats make
(storage.compact_formats.sweep): the tenant's frames quarantined as `unknown_compact`
for that model and signature, requested by `collector:compact-format`. A store that
learns a format wakes this loop (NOTIFY) when it commits.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from collector.compact import SWEEP_AGAIN_S, key_name
from collector.pipeline import Pipeline, PipelineClosed
from collector.settings import RedecodeSettings
from collector.uplink import Device, Outcome, Transport, Uplink
from storage import compact_formats
from storage import redecode_queue as queue
from storage.errors import StorageError
from storage.notify import STOPPED
from storage.pool import connection
from storage.reasons import Reason

log = structlog.get_logger("collector.redecode")


def uplink_of(item: queue.Claimed) -> Uplink | tuple[str, str]:
    """The uplink a claimed row's frame was, or (reason, detail) why it cannot be re-decoded."""
    if not item.found:
        return ("row_gone", "the quarantine row no longer exists (retention)")
    if item.resolved:
        return ("already_resolved", "the row was resolved by another re-decode meanwhile")
    if item.payload is None:
        return ("no_payload", "the row kept no payload")
    if item.tenant_id != item.job_tenant_id:  # request_* never queues such a row
        return ("foreign_row", "the row is not of the job's tenant")
    try:
        transport = None if item.transport is None else Transport(item.transport)
    except ValueError:
        transport = None
    if transport is None:
        return ("not_a_device_frame", f"transport {item.transport} is no device transport")
    received_at = item.received_at.timestamp()
    peer = item.peer or ""
    if transport is Transport.COAP:  # plain CoAP: the tenant only, the frame names its meter
        return Uplink(
            item.payload, transport, peer, tenant_id=item.tenant_id, received_at=received_at
        )
    if item.meter_id is None or item.address is None or item.tenant_id is None:
        return ("no_device", "the row names no authenticated meter to re-decode it as")
    device = Device(item.meter_id, item.tenant_id, item.address)
    return Uplink(item.payload, transport, peer, device=device, received_at=received_at)


def result_of(item: queue.Claimed, outcome: Outcome | BaseException) -> queue.Result:
    """The item's recorded result from the pipeline's outcome (or its exception)."""
    if isinstance(outcome, BaseException):
        detail = f"{type(outcome).__name__}: {outcome}"
        return queue.Result(item, "failed", Reason.STORE_FAILED, detail)
    if outcome.status == "quarantined":
        return queue.Result(item, "quarantined", outcome.reason, outcome.detail)
    if outcome.status in ("stored", "duplicate"):
        note = outcome.detail or None
        return queue.Result(item, outcome.status, None, note, outcome.n_readings, outcome.n_new)
    return queue.Result(item, "failed", "no_outcome", f"pipeline answered {outcome.status}")


class Redecoder:
    """The collector task that carries out re-decode requests."""

    def __init__(
        self,
        pool: queue.Pool,
        pipeline: Pipeline,
        settings: RedecodeSettings,
        database_url: str,
    ) -> None:
        """Claim through `pool`, feed `pipeline`, listen for requests on `database_url`."""
        self._pool = pool
        self._pipeline = pipeline
        self._settings = settings
        self._database_url = database_url
        self._wakeup = asyncio.Event()
        self.listening = False  # True while requests arrive by NOTIFY (else: the poll only)

    async def run(self, stop: asyncio.Event) -> None:
        """Carry out requests until `stop` is set (the batch under way is finished first)."""
        if not self._settings.enabled:
            return
        listener = asyncio.create_task(
            queue.listen(self._database_url, self._wakeup.set, self._listener_state),
            name="redecode-listener",
        )
        delay = self._settings.poll_s
        try:
            while not stop.is_set():
                try:
                    self._wakeup.clear()  # a request notified from now on wakes the sleep
                    done = await self.drain(stop)
                    delay = self._settings.poll_s
                except PipelineClosed:
                    return
                except StorageError as exc:
                    log.warning("redecode.retried", error=str(exc), wait_s=delay)
                    done = 0
                    delay = min(delay * 2, 60.0)
                except Exception:  # a bug: log it and keep the collector running
                    log.exception("redecode.crashed")
                    done = 0
                if not done:
                    await self._sleep(stop, delay)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    def _listener_state(self, up: bool, why: str | None) -> None:
        if up and not self.listening:
            log.info("redecode_listener.connected", channel=queue.CHANNEL)
        elif not up and self.listening and why != STOPPED:
            log.warning("redecode_listener.lost", reason=why)
        self.listening = up

    async def drain(self, stop: asyncio.Event | None = None) -> int:
        """Queue what learned compact formats decode, then carry out queued items batch by
        batch until none is left; how many were done."""
        await self.sweep()
        total = 0
        while stop is None or not stop.is_set():
            if self._pipeline.pending >= self._settings.yield_pending:
                await asyncio.sleep(0.2)  # live uplinks first
                continue
            n = await self._one_batch()
            if not n:
                break
            total += n
        return total

    async def sweep(self) -> int:
        """Queue the quarantined frames newly learned compact formats decode; how many."""
        async with connection(self._pool, "queueing what learned compact formats decode") as conn:
            swept = await compact_formats.sweep(conn, again_after_s=SWEEP_AGAIN_S)
        for s in swept:
            log.info(
                "compact_format.swept",
                tenant_id=s.tenant_id,
                key=key_name(s.key),
                items=s.n_items,
                job_ids=list(s.job_ids),
            )
        return sum(s.n_items for s in swept)

    async def _one_batch(self) -> int:
        async with queue.claimed(self._pool, self._settings.batch_max) as batch:
            if not batch.items:
                return 0
            uplinks = [uplink_of(item) for item in batch.items]
            # offered all at once (no await between): a stopping pipeline takes all or none
            futures = [
                self._pipeline.offer(u, force=True) if isinstance(u, Uplink) else None
                for u in uplinks
            ]
            waiting = [f for f in futures if f is not None]
            outcomes = iter(await asyncio.gather(*waiting, return_exceptions=True))
            for item, uplink, future in zip(batch.items, uplinks, futures, strict=True):
                if future is None:
                    assert isinstance(uplink, tuple)
                    batch.results.append(queue.Result(item, "skipped", *uplink))
                else:
                    batch.results.append(result_of(item, next(outcomes)))
        counts: dict[str, int] = {}
        for res in batch.results:
            counts[res.state] = counts.get(res.state, 0) + 1
        log.info("redecode_batch.committed", items=len(batch.items), **counts)
        for job_id, state in batch.closed.items():
            log.info("redecode_job.finished", job_id=job_id, state=state)
        return len(batch.items)

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        """Until a request is notified, `stop` is set, or `seconds` pass."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self._wakeup, stop)]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await w
