"""Downlinks in the reachability window: the mailbox's pending commands for a meter that
has just been heard from, and the device's answers.

`Downlinks.for_meter(meter_id)` (CoAP) and `Downlinks.for_topic(slug, address)` (MQTT)
run after the uplink is durable: they claim the meter's pending commands
(`storage.mailbox.claim`, which marks them sent) and return the envelope to send
(`decoder.commands.downlink`, encoded now: a clock set carries this collector's clock at
the moment of sending). Claims arriving together (a committed batch answers many uplinks
at once) go to the database in one query. A failed or slow claim gives an empty envelope
(the uplink's answer is never held back): the commands go out in a later window.
With a `collector.pending.PendingView`, a meter it says has nothing pending gets b""
without a claim: the MQTT window names its meter id (`meter_id`, resolved from the topic
when its uplink was stored) for that; without one, it claims by topic as before.

`Downlinks.answer(meter_id, address, payload)` records a device's answers
(`decoder.commands.parse_results`): per command id `recorded`, `repeated` or `unknown`.
Raises ValueError for a message that is not a result; StorageError from storage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict
from typing import Final, TypeAlias

import structlog

from collector import metrics
from collector.pending import PendingView
from decoder.commands import downlink, parse_results, rotate_target
from devices import provision
from storage import credentials, mailbox, oscore_rollover
from storage.errors import StorageError
from storage.pool import Connection, Pool, connection

log = structlog.get_logger("collector.downlink")

Key: TypeAlias = int | tuple[str, str]  # meter id (CoAP) or (tenant slug, address) (MQTT)
# the device listens 10-20 s after it transmits (and aiocoap's empty ACK stops its CON
# retransmissions meanwhile): a busy pool may hold the answer this long, not longer
CLAIM_TIMEOUT_S: Final = 5.0
EXPIRE_EVERY_S: Final = 10.0


class Downlinks:
    """Claims pending commands in batches and records answers, on one pool."""

    def __init__(
        self,
        pool: Pool,
        credentials_key: bytes | None = None,
        pending: PendingView | None = None,
    ) -> None:
        self._pool = pool
        self._key = credentials_key  # opens/seals the AES keys a rotate_key carries
        self._pending = pending  # None: every window claims
        self._waiting: dict[Key, list[asyncio.Future[bytes]]] = defaultdict(list)
        self._flushing: set[asyncio.Task[None]] = set()
        self._expired_at = 0.0

    async def for_meter(self, meter_id: int) -> bytes:
        """The envelope of meter `meter_id`'s pending commands (b"" when none)."""
        if self.nothing_pending(meter_id):
            return b""
        return await self._claim(meter_id)

    async def for_topic(self, slug: str, address: str, meter_id: int | None = None) -> bytes:
        """The envelope for the meter of MQTT topic (tenant slug, address) (b"" when none);
        `meter_id`, the topic's meter when known, lets the pending view skip the claim."""
        if meter_id is not None and self.nothing_pending(meter_id):
            return b""
        return await self._claim((slug, address))

    def nothing_pending(self, meter_id: int) -> bool:
        """True when the pending view says the meter has no command: no claim to run (an
        LwM2M window asks too, `collector.lwm2m`)."""
        if self._pending is None or self._pending.may_have(meter_id):
            return False
        metrics.COMMAND_CLAIMS_SKIPPED.inc()
        return True

    async def _claim(self, key: Key) -> bytes:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        if not self._waiting:
            task = loop.create_task(self._flush(), name="downlink-claim")
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)
        self._waiting[key].append(future)
        # `_flush` answers every future of its batch within CLAIM_TIMEOUT_S (b"" when slow
        # or failed): one timeout per batch, not a timer and a shield per uplink (those
        # cost each OSCORE uplink ~20 µs of CPU, as bench/oscore_path.py measures)
        return await future

    async def _flush(self) -> None:
        batch: dict[Key, list[asyncio.Future[bytes]]] = {}
        envelopes: dict[Key, bytes] = {}
        try:
            await asyncio.sleep(0)  # the rest of this loop pass's answers join the batch
            batch, self._waiting = self._waiting, defaultdict(list)
            ids = [k for k in batch if isinstance(k, int)]
            topics = [k for k in batch if isinstance(k, tuple)]
            now_s = int(time.time())
            # past the timeout the claim is cancelled (its transaction rolls back): the
            # commands stay pending and go out in a later window
            async with (
                asyncio.timeout(CLAIM_TIMEOUT_S),
                connection(self._pool, "claiming commands", timeout_s=4.0) as conn,
            ):
                claimed = await mailbox.claim(conn, meter_ids=ids) if ids else []
                by_topic = await mailbox.claim(conn, topics=topics) if topics else []
                claimed = await self._with_keys(conn, claimed, oscore=True)
                by_topic = await self._with_keys(conn, by_topic, oscore=False)
            per_key: dict[Key, list[mailbox.Claimed]] = defaultdict(list)
            for c in claimed:
                per_key[c.meter_id].append(c)
            for c in by_topic:
                per_key[(c.tenant_slug, c.pending.address)].append(c)
            envelopes = {k: downlink([c.pending for c in cs], now_s) for k, cs in per_key.items()}
            # counted, not logged: one line per batch would be the busiest log of a collector
            metrics.COMMANDS.labels("sent").inc(len(claimed) + len(by_topic))
        except TimeoutError:
            log.warning("downlink.claim_slow", timeout_s=CLAIM_TIMEOUT_S, meters=len(batch))
        except StorageError as exc:
            log.warning("downlink.claim_failed", error=str(exc), meters=len(batch))
        finally:
            if not batch:  # cancelled before it took its batch: answer those waiting
                batch, self._waiting = self._waiting, defaultdict(list)
            for key, futures in batch.items():
                for future in futures:
                    if not future.done():
                        future.set_result(envelopes.get(key, b""))

    async def _with_keys(
        self, conn: Connection, claimed: list[mailbox.Claimed], *, oscore: bool
    ) -> list[mailbox.Claimed]:
        """A rotate_key command carries the new key, staged on first send (the same one
        when resent): an OMS meter's pending AES key (`args.aes_key`), or a new OSCORE
        context (`args.oscore`, only in an OSCORE-protected answer: `oscore`, the CoAP
        claims; an MQTT device has no context to roll). Without a credentials key, or
        nothing to roll over from, it goes out without one and the device refuses it.

        Staged outside the claim's transaction (whose commit skips the WAL flush): each
        staging commits durably before the envelope leaves, so no device ever holds a key
        the database lost in a crash."""
        out = []
        for c in claimed:
            cmd = c.pending
            if cmd.kind == "rotate_key" and self._key is not None:
                target = rotate_target(cmd.meter_format, cmd.args)
                extra: dict[str, object] = {}
                if target == "aes":
                    aes = await credentials.pending_aes_key(
                        conn, self._key, c.meter_id, cmd.command_id
                    )
                    extra = {} if aes is None else {"aes_key": aes.hex()}
                elif oscore:
                    context = await provision.rotation_oscore(
                        conn, self._key, c.meter_id, cmd.command_id
                    )
                    extra = {} if context is None else {"oscore": context}
                if extra:
                    args = {**cmd.args, **extra}
                    c = dataclasses.replace(c, pending=dataclasses.replace(cmd, args=args))
            out.append(c)
        return out

    async def answer(self, meter_id: int, address: str, payload: bytes) -> dict[int, str]:
        """Record the device's answers to its own commands (see the module docstring); an
        acknowledged rotate_key makes the meter's pending AES key or OSCORE context its
        current one."""
        results = parse_results(payload, address)
        async with connection(self._pool, "recording command results") as conn:
            outcome = await mailbox.record_results(conn, meter_id, results)
            ids = [cid for cid, what in outcome.items() if what != "unknown"]
            if ids and await credentials.promote_acknowledged_rotation(conn, meter_id, ids):
                log.info("aes_key.promoted", meter_id=meter_id, by="answer")
            if ids and await oscore_rollover.promote_acknowledged(conn, meter_id, ids):
                log.info("oscore_context.promoted", meter_id=meter_id, by="answer")
        metrics.COMMANDS.labels("answered").inc(sum(v == "recorded" for v in outcome.values()))
        log.info("downlink.answered", meter_id=meter_id, outcome=outcome)
        return outcome

    async def meter_of_topic(self, slug: str, address: str) -> int | None:
        """The active meter of MQTT topic (tenant slug, address), or None."""
        async with connection(self._pool, "looking up a meter") as conn:
            return await mailbox.meter_of(conn, slug, address)

    async def expire_forever(self) -> None:
        """Move commands past their TTL to expired every EXPIRE_EVERY_S (a task's body)."""
        while True:
            await asyncio.sleep(EXPIRE_EVERY_S)
            try:
                async with connection(self._pool, "expiring commands") as conn:
                    moved = await mailbox.expire_due(conn)
                if moved:
                    log.info("downlink.expired", commands=moved)
            except StorageError as exc:
                log.warning("downlink.expire_failed", error=str(exc))
