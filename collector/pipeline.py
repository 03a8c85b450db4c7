"""Group commit: uplinks from every transport in, one durable outcome per uplink out.

A transport handler calls `Pipeline.offer(uplink)`, which never blocks: it returns a
future, or raises `PipelineFull` (answer "busy, retry later": CoAP 5.03 + Max-Age, MQTT
stops reading) or `PipelineClosed` (shutting down). With `answer_within_s` the future
resolves to `NOT_YET_DURABLE` once that time has passed (the uplink stays queued and
will be stored; one sweep serves every uplink, no timer per request). Up to `workers`
batches commit at once (double buffering: the next batch fills while one commits). A
free worker takes what is queued at once when no other commit is in flight (low load:
no added latency); while one is, it waits for `batch_max` uplinks or `batch_wait_ms`,
whichever comes first, so batches grow with the load. Each batch goes to the `commit`
callable, which decodes, stores and archives the whole batch in one
transaction. Only when it returns are the futures resolved, so an answer to a device
always means "durable". While the database is away, `commit` raises
`StorageUnavailableError` and the batch is retried with backoff, never dropped; the
queue fills, and new offers are refused, which is the backpressure. Nothing else is
retried: `commit` isolates a poison uplink itself (`collector.store` commits the batch
again in halves down to that uplink, which is quarantined: an answer like any other). An
outcome `failed` (not even its quarantine row could be written) resolves that uplink's
future with `UplinkFailed`; any other exception of `commit` (a bug in that isolation)
resolves every future of the batch with it, and the next batch goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

import structlog

from collector import metrics
from collector.settings import PipelineSettings
from collector.uplink import NOT_YET_DURABLE, Outcome, Uplink
from storage.errors import StorageUnavailableError

log = structlog.get_logger("collector.pipeline")


class PipelineFull(Exception):
    """The pipeline holds `max_pending` uplinks; the sender must retry later."""


class PipelineClosed(Exception):
    """The collector is shutting down and accepts nothing new."""


class UplinkFailed(Exception):
    """This uplink could not be made durable, not even as a quarantine row (CoAP 5.00, MQTT
    no ack: the broker redelivers it after a reconnect)."""


Commit = Callable[[list[Uplink]], Awaitable[list[Outcome]]]


class Pipeline:
    """A bounded queue of uplinks drained by workers that group-commit them."""

    def __init__(self, settings: PipelineSettings, commit: Commit) -> None:
        """Hold at most `settings.max_pending` uplinks; commit batches with `commit`."""
        self._settings = settings
        self._commit = commit
        self._queue: deque[Uplink] = deque()
        self._pending = 0  # queued + being committed
        self._wakeup = asyncio.Event()
        self._closed = False
        self._in_flight = 0  # batches being committed
        self._deadlines: deque[tuple[float, asyncio.Future[Outcome]]] = deque()

    @property
    def pending(self) -> int:
        """Uplinks offered and not yet answered."""
        return self._pending

    @property
    def closed(self) -> bool:
        """True once `close()` was called."""
        return self._closed

    def offer(
        self, uplink: Uplink, *, force: bool = False, answer_within_s: float | None = None
    ) -> asyncio.Future[Outcome]:
        """Queue `uplink`; return the future of its outcome. Raise PipelineFull/Closed.

        `force` skips the `max_pending` bound, for a transport bounded by other means
        (MQTT: the broker's Receive Maximum). With `answer_within_s`, the future resolves
        to `NOT_YET_DURABLE` if the uplink is not durable by then (give or take the
        sweep period, 0.1 s).
        """
        if self._closed:
            raise PipelineClosed
        if not force and self._pending >= self._settings.max_pending:
            raise PipelineFull
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        uplink.future = future
        if answer_within_s is not None:  # same delay for a transport: deadlines stay sorted
            self._deadlines.append((loop.time() + answer_within_s, future))
        self._queue.append(uplink)
        self._pending += 1
        metrics.QUEUE_DEPTH.set(self._pending)
        self._wakeup.set()
        return future

    def close(self) -> None:
        """Refuse new uplinks; `run()` returns once everything queued is committed."""
        self._closed = True
        self._wakeup.set()

    async def run(self) -> None:
        """Run the workers until `close()` and the queue is drained."""
        async with asyncio.TaskGroup() as group:
            workers = [
                group.create_task(self._worker(), name=f"pipeline-worker-{n}")
                for n in range(self._settings.workers)
            ]
            group.create_task(self._sweep(workers), name="pipeline-deadlines")

    async def _sweep(self, workers: list[asyncio.Task[None]]) -> None:
        """Resolve to NOT_YET_DURABLE the futures whose `answer_within_s` has passed."""
        loop = asyncio.get_running_loop()
        while not all(w.done() for w in workers):
            now = loop.time()
            while self._deadlines and (
                self._deadlines[0][0] <= now or self._deadlines[0][1].done()
            ):
                _, future = self._deadlines.popleft()
                if not future.done():
                    future.set_result(NOT_YET_DURABLE)
            await asyncio.sleep(0.1)

    async def _next_batch(self) -> list[Uplink] | None:
        while not self._queue:
            if self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        limit = self._settings.batch_max
        if (
            len(self._queue) < limit
            and self._in_flight  # nothing committing: take what is there, no added latency
            and not self._closed
            and self._settings.batch_wait_ms > 0
        ):
            # whichever comes first: a full batch, or batch_wait_ms from now
            deadline = time.monotonic() + self._settings.batch_wait_ms / 1000
            while len(self._queue) < limit and (left := deadline - time.monotonic()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
                if self._closed:
                    break
        if not self._queue:  # another worker took them meanwhile
            return []
        count = min(limit, len(self._queue))
        return [self._queue.popleft() for _ in range(count)]

    async def _worker(self) -> None:
        while (batch := await self._next_batch()) is not None:
            if batch:
                self._in_flight += 1
                try:
                    await self._commit_with_retry(batch)
                finally:
                    self._in_flight -= 1

    async def _commit_with_retry(self, batch: list[Uplink]) -> None:
        delay = self._settings.retry_initial_s
        started = time.monotonic()
        while True:
            try:
                outcomes = await self._commit(batch)
            except StorageUnavailableError as exc:
                metrics.DB_FAILURES.inc()
                log.warning("batch.retried", uplinks=len(batch), error=str(exc), wait_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.retry_max_s)
                continue
            except Exception as exc:  # a bug in commit's own isolation: this batch fails
                log.exception("batch.failed", uplinks=len(batch))
                self._finish(batch, UplinkFailed(f"{type(exc).__name__}: {exc}"))
                return
            break
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.BATCH_SECONDS.observe(time.monotonic() - started)
        for uplink, outcome in zip(batch, outcomes, strict=True):
            if uplink.future is None or uplink.future.done():
                continue
            if outcome.status == "failed":
                uplink.future.set_exception(UplinkFailed(f"{outcome.reason}: {outcome.detail}"))
            else:
                uplink.future.set_result(outcome)
        self._finish(batch, None)

    def _finish(self, batch: list[Uplink], exc: Exception | None) -> None:
        self._pending -= len(batch)
        metrics.QUEUE_DEPTH.set(self._pending)
        if exc is None:
            return
        for uplink in batch:
            if uplink.future is not None and not uplink.future.done():
                uplink.future.set_exception(exc)
