"""One batch of uplinks → decoded, checked, stored and archived in one transaction (I/O shell).

`BatchStore.commit(batch)` returns one `Outcome` per uplink, in order, after the
transaction has committed; it raises `StorageUnavailableError` when the database cannot
be reached (the pipeline retries the batch), never a raw asyncpg error. Per uplink:

- decoded by `decoder.decode_batch`, one decode call per tenant (the devices whose
  registered format needs neither keys nor compact formats: one call for all), with the
  AES keys of the batch's meters (OMS/wM-Bus, `collector.keys`), the compact-frame
  formats the tenant's stored full frames taught (`collector.compact`), and a tenant's
  own driver files (`collector.drivers`) within its `decoder.drivers.scope`; an
  undecodable payload is quarantined (a wrong or missing key too: `undecodable` with the
  decoder's decrypt_failed / no_key message; a compact frame whose format no full frame
  taught yet: unknown_compact, re-decoded once one does, storage.compact_formats);
- a full frame teaches its model's compact format only if its uplink is stored (in the
  batch's transaction, only when the format is new to the process); no frame of the
  batch is decoded with a format the batch itself taught;
- identity: every meter a frame reports must be the authenticated device's meter
  (OSCORE context or MQTT account), else quarantine `identity_mismatch`; plain CoAP
  frames must name a meter of the tenant given in the query, else `unknown_meter`;
- readings go in idempotently: a replayed uplink stores nothing twice (`duplicate`);
- a reading the writer rejects (clock_future, clock_past, before_installation,
  negative_register, unknown_meter) is not stored; if every reading of an uplink is
  rejected the uplink is quarantined with that reason, else its good readings are stored
  (2.04) and one quarantine row `readings_rejected` lists which readings were not, and why
  (not again for a repeat of the uplink that stores nothing new: a `duplicate`);
- every uplink is archived in raw_uplinks; alarms from stored or duplicate readings go to
  meter_events, modem figures to device_health; OSCORE replay windows are persisted with
  the batch, and an OSCORE uplink whose (kid, sequence number) is recorded already (a
  replay another process admitted, its cached window being behind) is archived nowhere
  and comes back `replayed`, to be answered from the record.

The decisions (identity, which readings, outcomes, archive rows) are `collector.verdict`'s,
a pure module; this shell loads keys and meters, decodes and writes.

Isolation: only a transient database condition (`StorageUnavailableError`) makes the
pipeline retry a batch. Any other exception fails nothing but its own uplink: the batch
is committed again in halves, down to the one uplink that fails, which is quarantined as
`decode_failed` (the decoder raised) or `store_failed` (the database refused it), with a
detail saying what; it is answered like any quarantined uplink (CoAP 4.00, MQTT acked)
once that row is durable. If even that quarantine fails, a minimal row (ids, reason,
raw bytes; then without the bytes) is written on its own; only if that fails too is the
outcome `failed` (not durable, not acknowledged). Text that PostgreSQL cannot hold (NUL,
unpaired surrogates) in a reported address is never looked up: for an authenticated
device it is an identity mismatch, for plain CoAP an unknown meter; archived text is
escaped by `storage.rows.pg_text`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import numpy as np
import structlog

from collector import metrics, verdict
from collector.compact import CompactFormats
from collector.keys import KeyRing, MeterKeys, Pair
from collector.uplink import Device, Outcome, Uplink
from decoder import decode_batch as _decode_batch
from decoder import drivers
from decoder.columns import Decoded, ErrorCode, concat
from decoder.mbus_compact import DeferredCache, Key, SignatureCache
from storage import credentials, oscore_rollover
from storage.archive import ArchiveWriter
from storage.errors import StorageError, StorageUnavailableError
from storage.events import write_events
from storage.health import write_health
from storage.ingest import ReadingWriter
from storage.meters import MeterDirectory
from storage.pool import Connection, Pool, connection
from storage.reasons import Reason
from storage.rows import QuarantineRow, is_pg_text, pg_text

log = structlog.get_logger("collector.store")

Decode = Callable[[list[bytes], np.ndarray, Mapping[str, bytes], SignatureCache], Decoded]

_MAX_ERROR = 500  # characters of an exception kept in a quarantine detail
_SCOPES_TTL_S = 60.0  # a tenant created after start gets its drivers within this
# meter formats that carry no OMS AES key and no compact frame: their devices' keys are
# not looked up before decoding (a frame of another format that asks for one still gets
# it: the NO_KEY retry), and their frames share one decode call across tenants
_NO_AES_KEYS = frozenset({"cjt188", "senml", "interval"})
_TEACHING = frozenset({"stored", "duplicate"})  # outcomes whose full frames teach formats


class DecodeFailed(Exception):
    """The decode callable raised (a decoder bug): the frames' uplinks are `decode_failed`."""


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR else text[:_MAX_ERROR] + "..."


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def default_decode(
    frames: list[bytes],
    received_at_s: np.ndarray,
    keys: Mapping[str, bytes],
    compact: SignatureCache,
) -> Decoded:
    """Decode with the project's decoder dispatcher; `keys`: meter id -> AES key,
    `compact`: the compact-frame formats to read with (it learns from full frames)."""
    return _decode_batch(frames, received_at_s, keys=keys, compact_cache=compact)


class _Round:
    """Frames decoded together: one tenant's, with its key ring and compact formats (or
    keyless formats' devices of any tenant, with neither)."""

    def __init__(
        self,
        tenant: int | None,
        keys: dict[str, bytes],
        plain_tenant: int | None,
        scope: str | None = None,
    ) -> None:
        self.rows: list[int] = []
        # None: plain CoAP naming no tenant (refused anyway), or the devices of every
        # tenant whose format needs no key and no compact format (one decode call)
        self.tenant = tenant
        self.keys = keys
        self.plain_tenant = plain_tenant  # plain CoAP: the one tenant of this round
        self.scope = scope  # the one tenant (slug) whose own drivers decode this round
        self.compact = DeferredCache()  # the decode calls' view of the tenant's formats


class BatchStore:
    """Commits batches of uplinks to the database through `pool`."""

    def __init__(
        self,
        pool: Pool,
        keys: MeterKeys,
        decode: Decode = default_decode,
        acquire_timeout_s: float = 5.0,
        driver_tenants: frozenset[str] = frozenset(),
        compact: CompactFormats | None = None,
    ) -> None:
        """Store through `pool`, decoding with `decode` and the AES keys from `keys`;
        `driver_tenants`: slugs of the tenants with drivers of their own; `compact`: the
        process's compact-frame formats (default: a `CompactFormats` of its own)."""
        self._pool = pool
        self._writer = ReadingWriter(pool)
        self._archive_writer = ArchiveWriter(pool)
        # plain CoAP (lab tenants): reported address -> meter id; a meter exchange that
        # reuses an address is seen within ttl_s
        self._meters = MeterDirectory(pool, ttl_s=60.0)
        self._keys = keys
        self._decode = decode
        self._acquire_timeout_s = acquire_timeout_s
        self._driver_tenants = driver_tenants
        self._scopes: dict[int, str] = {}  # tenant_id -> slug, of `driver_tenants`
        self._scopes_at = -_SCOPES_TTL_S
        self._compact = compact if compact is not None else CompactFormats()

    async def commit(self, batch: list[Uplink]) -> list[Outcome]:
        """Store `batch` in one transaction; return its outcomes (see the module docstring).

        Raises only StorageUnavailableError (the pipeline retries the batch)."""
        try:
            return await self._commit(batch)
        except StorageUnavailableError:
            raise
        except Exception as exc:
            if len(batch) == 1:
                return [await self._quarantine_failed(batch[0], exc)]
            log.warning("batch.split", uplinks=len(batch), error=_short(exc))
        half = len(batch) // 2  # the poison is in one half (or both): O(log n) commits
        return [*await self.commit(batch[:half]), *await self.commit(batch[half:])]

    async def _quarantine_failed(self, uplink: Uplink, exc: Exception) -> Outcome:
        """Quarantine the one uplink whose commit raised `exc` (not transient)."""
        if isinstance(exc, DecodeFailed):
            reason = Reason.DECODE_FAILED
            detail = f"the decoder failed on it: {_short(exc.__cause__ or exc)}"
        else:
            reason, detail = Reason.STORE_FAILED, f"the database refused it: {_short(exc)}"
        log.error("uplink.isolated", reason=reason, error=_short(exc), peer=uplink.peer)
        detail = pg_text(detail) or ""
        uplink.reject = (reason, detail)
        try:
            return (await self._commit([uplink]))[0]
        except StorageUnavailableError:
            raise
        except Exception as again:
            same = _short(again) == _short(exc)
            also = "; archiving it failed again" if same else f"; then {_short(again)}"
            also = pg_text(also) or ""
            return await self._last_resort(uplink, reason, detail + also)

    async def _last_resort(self, uplink: Uplink, reason: Reason, detail: str) -> Outcome:
        """A minimal quarantine row on its own (ids, reason, raw bytes; then without them)."""
        tenant = uplink.device.tenant_id if uplink.device else uplink.tenant_id
        meter = uplink.device.meter_id if uplink.device else None
        at = _utc(uplink.received_at)
        digest = hashlib.sha256(uplink.payload).hexdigest()
        row = QuarantineRow(
            at, tenant, meter, int(uplink.transport), None, reason, detail, uplink.payload
        )
        error: Exception | None = None
        for attempt in range(2):
            if attempt:  # the row with the bytes was refused: keep their hash instead
                gone = f"; payload not kept ({len(uplink.payload)} bytes, sha256 {digest})"
                why = pg_text(f" because: {_short(error or Exception())}") or ""
                row = dataclasses.replace(row, detail=detail + gone + why, payload=None)
            try:
                await self._archive_writer.write_quarantine([row])
            except StorageUnavailableError:
                raise
            except Exception as exc:
                error = exc
                continue
            metrics.QUARANTINED.labels(reason).inc()
            log.warning(
                "uplink.quarantined",
                reason=reason,
                detail=row.detail,
                minimal=True,
                transport=int(uplink.transport),
                peer=uplink.peer,
            )
            return Outcome("quarantined", reason, row.detail)
        log.error(
            "uplink.unstorable", reason=reason, error=_short(error or Exception()), peer=uplink.peer
        )
        return Outcome("failed", reason, f"{detail}; not even a quarantine row could be written")

    async def _decode_keyed(
        self, conn: Connection, uplinks: list[Uplink]
    ) -> tuple[Decoded, list[_Round]]:
        """Decode `uplinks` with their meters' AES keys (see the module docstring); the
        result and the rounds (decode calls) it took.

        An authenticated device reports its own meter, so its key is known before decoding
        (cache, else one bulk query). A plain CoAP frame names its meter only inside the
        frame: its tenant's frames are decoded on their own, and if a key was missing they
        are decoded again with the keys of the meter ids the decoder asked for. Frames of
        two tenants share a decode call only when their devices are registered with a
        format that needs neither (CJ/T 188, SenML, interval; no drivers of their own):
        otherwise their keys may disagree on an address (two tenants, one OMS id), and a
        tenant's compact formats are its own. Such a shared call teaches no compact
        format, and a key it turns out to need after all is loaded unless two tenants'
        meters of that address disagree on it.
        """
        scopes = await self._driver_scopes(conn)
        wanted = {
            (d.tenant_id, d.address)
            for u in uplinks
            if (d := u.device) is not None and d.format not in _NO_AES_KEYS
        }
        known = await self._keys.get(conn, wanted) if wanted else {}
        per_tenant: dict[int, dict[str, bytes]] = {}
        for (tenant, address), aes in known.items():
            if aes is not None:
                per_tenant.setdefault(tenant, {})[address] = aes
        rounds: list[_Round] = []
        by_device_tenant: dict[int, _Round] = {}
        by_plain_tenant: dict[int, _Round] = {}
        shared: _Round | None = None  # devices of every tenant whose format needs no keys
        for n, uplink in enumerate(uplinks):
            if uplink.device is None:  # plain CoAP (tenant_id is set): a round per tenant
                scope = uplink.tenant_id if uplink.tenant_id is not None else -1
                rnd = by_plain_tenant.get(scope)
                if rnd is None:
                    rnd = _Round(uplink.tenant_id, {}, scope, scopes.get(scope))
                    by_plain_tenant[scope] = rnd
                    rounds.append(rnd)
            elif uplink.device.format in _NO_AES_KEYS and uplink.device.tenant_id not in scopes:
                # no AES key, no compact format: their frames read alike for any tenant, so
                # one decode call serves them all (per-tenant calls of a few frames each
                # cost 2-4x the decoding of one call)
                if shared is None:
                    shared = _Round(None, {}, None)
                    rounds.append(shared)
                rnd = shared
            else:
                tenant = uplink.device.tenant_id
                rnd = by_device_tenant.get(tenant)
                if rnd is None:
                    mine = dict(per_tenant.get(tenant, {}))
                    rnd = by_device_tenant[tenant] = _Round(tenant, mine, None, scopes.get(tenant))
                    rounds.append(rnd)
            rnd.rows.append(n)
        if len(rounds) == 1:
            return await self._decode_round(conn, uplinks, rounds[0]), rounds
        parts = [
            (
                np.asarray(r.rows, np.int64),
                await self._decode_round(conn, uplinks, r),
            )
            for r in rounds
        ]
        return concat(parts, len(uplinks)), rounds

    async def _driver_scopes(self, conn: Connection) -> dict[int, str]:
        """tenant_id -> slug of the tenants with drivers of their own (looked up again
        after `_SCOPES_TTL_S` while a slug names no tenant yet)."""
        if not self._driver_tenants or len(self._scopes) == len(self._driver_tenants):
            return self._scopes
        now = time.monotonic()
        if now - self._scopes_at >= _SCOPES_TTL_S:
            self._scopes_at = now
            found = await credentials.tenants_by_slug(conn, sorted(self._driver_tenants))
            self._scopes = {tenant: slug for slug, tenant in found.items()}
            if missing := sorted(self._driver_tenants - found.keys()):
                log.warning("drivers.tenant_unknown", slugs=missing)
        return self._scopes

    async def _decode_round(self, conn: Connection, uplinks: list[Uplink], rnd: _Round) -> Decoded:
        """One round through `_decode_once`; if a compact frame found no format and the
        tenant's formats, read again, bring one another process learned, once more."""
        rnd.compact = await self._compact.view(conn, rnd.tenant)
        dec = await self._decode_once(conn, uplinks, rnd)
        missed = (dec.error_code == ErrorCode.UNKNOWN_COMPACT).any()
        if missed and await self._compact.refresh(conn, rnd.tenant):
            rnd.compact = await self._compact.view(conn, rnd.tenant)
            dec = await self._decode_once(conn, uplinks, rnd)
        return dec

    async def _decode_once(self, conn: Connection, uplinks: list[Uplink], rnd: _Round) -> Decoded:
        frames = [uplinks[n].payload for n in rnd.rows]
        # each frame's own receive time (a re-decoded frame keeps its original one): frames
        # without a clock, or with relative times, are dated by it
        rx = np.fromiter((int(uplinks[n].received_at) for n in rnd.rows), np.int64, len(rnd.rows))
        ring = KeyRing(rnd.keys)
        dec = self._decoded(frames, rx, ring, rnd)
        if not ring.missed or not (dec.error_code == ErrorCode.NO_KEY).any():
            return await self._with_pending_keys(conn, uplinks, rnd, frames, rx, dec, ring)
        # a key was missing: load the asked-for keys fresh (one provisioned since the
        # cache said "none"), and decode the round again if that found any
        if rnd.plain_tenant is not None:
            pairs: set[Pair] = {(rnd.plain_tenant, m) for m in ring.missed}
        else:
            devices = (uplinks[n].device for n in rnd.rows)
            pairs = {(d.tenant_id, d.address) for d in devices if d and d.address in ring.missed}
        pairs = {p for p in pairs if is_pg_text(p[1])}  # a NUL "meter id" is no meter
        found = await self._keys.get(conn, pairs, fresh=True) if pairs else {}
        more: dict[str, bytes] = {}
        clash: set[str] = set()  # two tenants' meters, one address, two keys: neither
        for (_, a), k in found.items():
            if k is not None and a not in rnd.keys:
                if more.get(a, k) != k:
                    clash.add(a)
                more[a] = k
        for a in clash:
            del more[a]
        if not more:
            return dec
        ring = KeyRing({**rnd.keys, **more})
        dec = self._decoded(frames, rx, ring, rnd)
        return await self._with_pending_keys(conn, uplinks, rnd, frames, rx, dec, ring)

    async def _with_pending_keys(
        self, conn: Connection, uplinks: list[Uplink], rnd: _Round, frames: list[bytes],
        rx: np.ndarray, dec: Decoded, ring: KeyRing,
    ) -> Decoded:  # fmt: skip
        """Key rollover (migration 0047): the frames the current key did not decrypt, of
        meters with a key staged beside it, decoded again with that key; those that now
        decode confirm it (it becomes the current key) and replace their failed rows.

        An authenticated device's frame is its own meter's; a plain CoAP frame names its
        meter only inside (a failed frame's meter id is not reported), so the pending keys
        of every meter id the round looked up are tried."""
        failed = np.flatnonzero(dec.error_code == ErrorCode.DECRYPT_FAILED).tolist()
        if not failed:
            return dec
        device_pair: dict[int, Pair] = {}
        for i in failed:
            device = uplinks[rnd.rows[i]].device
            if device is not None:
                device_pair[i] = (device.tenant_id, device.address)
        wanted = set(device_pair.values())
        if rnd.plain_tenant is not None and len(device_pair) < len(failed):
            tenant = rnd.plain_tenant
            wanted |= {(tenant, a) for a in ring.asked if is_pg_text(a)}
        pending = await self._keys.pending(conn, wanted) if wanted else {}
        # a key promoted meanwhile (by the rotate_key answer, or another collector) is
        # newer than this process's cache: tried too, and the cache refreshed
        current = await self._keys.get(conn, wanted, fresh=True) if wanted else {}
        newer = {
            pair: (0, aes) for pair, aes in current.items()
            if aes is not None and dict.get(ring, pair[1]) != aes
        }  # fmt: skip
        candidates = {**newer, **pending}
        if not candidates:
            return dec
        # a device's frame: only if its own meter has a pending key; a plain frame: always
        retried = [i for i in failed if i not in device_pair or device_pair[i] in candidates]
        idx = np.asarray(retried, np.int64)
        keys = {**ring, **{a: k for (_, a), (_, k) in candidates.items()}}
        retry = self._decoded([frames[i] for i in idx], rx[idx], KeyRing(keys), rnd)
        confirmed: dict[Pair, tuple[int, bytes]] = {}
        for local in np.flatnonzero(retry.error_code == ErrorCode.OK).tolist():
            row = int(idx[local])
            pair = device_pair.get(row) or (
                rnd.plain_tenant or -1,
                str(retry.address_of_frame[local]),
            )
            if pair in pending:
                confirmed[pair] = pending[pair]
        if not confirmed and not (retry.error_code == ErrorCode.OK).any():
            return dec
        if confirmed:
            await self._keys.promote(conn, confirmed)
        rest = np.setdiff1d(np.arange(len(frames), dtype=np.int64), idx)
        again = self._decoded([frames[i] for i in rest], rx[rest], KeyRing(dict(ring)), rnd)
        return concat([(rest, again), (idx, retry)], len(frames))

    def _decoded(self, frames: list[bytes], rx: np.ndarray, ring: KeyRing, rnd: _Round) -> Decoded:
        """`self._decode` in the round's drivers (its tenant's scope) with its compact
        formats, its exception (a decoder bug) raised as DecodeFailed."""
        try:
            with drivers.scope(rnd.scope):
                return self._decode(frames, rx, ring, rnd.compact)
        except Exception as exc:
            raise DecodeFailed(_short(exc)) from exc

    async def _commit(self, batch: list[Uplink]) -> list[Outcome]:
        timeout_s = self._acquire_timeout_s
        async with connection(self._pool, "storing a batch", timeout_s=timeout_s) as conn:
            await self._resolve_topics(conn, batch)
            todo = [i for i, u in enumerate(batch) if u.reject is None]
            dec, rounds = await self._decode_keyed(conn, [batch[i] for i in todo])
            async with conn.transaction():
                outcomes = await self._store(conn, batch, todo, dec)
                learned = await self._learn(conn, todo, dec, rounds, outcomes)
        for tenant, stored in learned:  # committed: every later round reads with them
            self._compact.adopt(tenant, stored)
        n_new = 0
        for uplink, outcome in zip(batch, outcomes, strict=True):
            n_new += outcome.n_new
            if outcome.status == "quarantined":
                metrics.QUARANTINED.labels(outcome.reason).inc()
                log.info(
                    "uplink.quarantined",
                    reason=outcome.reason,
                    detail=outcome.detail,
                    transport=int(uplink.transport),
                    peer=uplink.peer,
                )
        metrics.READINGS_NEW.inc(n_new)
        return outcomes

    async def _learn(
        self,
        conn: Connection,
        todo: list[int],
        dec: Decoded,
        rounds: list[_Round],
        outcomes: list[Outcome],
    ) -> list[tuple[int, dict[Key, bytes]]]:
        """Store the compact formats new to this process that a round's full frames taught,
        if a meter that taught one had its uplink stored (inside the batch's transaction);
        (tenant, formats now stored under their keys) to adopt once it committed."""
        out: list[tuple[int, dict[Key, bytes]]] = []
        for rnd in rounds:
            new = self._compact.unheld(rnd.tenant, rnd.compact)
            if rnd.tenant is None or not new:
                continue
            stored = [n for n in rnd.rows if outcomes[todo[n]].status in _TEACHING]
            trusted = {str(a) for a in dec.address_of_frame[stored].tolist()}
            teachers = rnd.compact.teachers
            new = {key: fmt for key, fmt in new.items() if teachers.get(key, set()) & trusted}
            if not new:
                continue
            try:
                async with conn.transaction():  # a savepoint: a refused format costs no uplink
                    out.append((rnd.tenant, await self._compact.persist(conn, rnd.tenant, new)))
            except StorageUnavailableError:
                raise
            except StorageError as exc:
                log.error("compact_format.unstorable", tenant_id=rnd.tenant, error=_short(exc))
        return out

    async def _store(
        self, conn: Connection, batch: list[Uplink], todo: list[int], dec: Decoded
    ) -> list[Outcome]:
        """Check, write and archive one decoded batch on `conn` (inside its transaction)."""
        lay = verdict.layout(len(batch), todo, dec)
        lookups = verdict.plain_lookups(batch, lay, dec)
        # plain CoAP (lab tenants): reported address -> meter id, from the cached directory
        found = [await self._meters.resolve(k.tenant_id, k.addresses, conn=conn) for k in lookups]
        checked = verdict.check(batch, lay, dec, verdict.place(dec.n_readings, lookups, found))
        # meters whose authentication read their installation time: no lookup of the writer's
        known = {
            d.meter_id: d.installed_s
            for u in batch
            if (d := u.device) and d.installed_s is not None
        }
        if known:
            self._writer.learn(list(known), list(known.values()))
        written = await self._writer.write(checked.readings, conn=conn)
        settled = verdict.settle(batch, dec, checked, written)
        # a request verified under a staged OSCORE context confirms it (migration 0048):
        # promoted first, so its replay window lands on the now current context
        confirming = [u.replay_window[4] for u in batch if u.new_context and u.replay_window]
        if confirming:
            for meter_id in await oscore_rollover.promote(conn, confirming):
                log.info("oscore_context.promoted", meter_id=meter_id, by="request")
        # the OSCORE answers first: a sequence number recorded already is a replay
        replayed = await credentials.save_replay_windows(
            conn,
            [
                (*u.replay_window, o.status, o.reason, o.detail)
                for u, o in zip(batch, settled.outcomes, strict=True)
                if u.replay_window is not None
            ],
        )
        outcomes = settled.outcomes
        if replayed:
            # admitted before, by a process whose window this one's cached copy had not
            # seen: its payload is the one stored then (its readings were duplicates),
            # it leaves no archive row, and its answer is the recorded one
            # (`collector.coap_oscore`), never a second first answer
            again = {
                i
                for i, u in enumerate(batch)
                if u.replay_window is not None
                and (u.replay_window[4], u.replay_window[3]) in replayed
            }
            settled = settled.without(again)
            outcomes = [
                dataclasses.replace(o, replayed=True) if i in again else o
                for i, o in enumerate(outcomes)
            ]
        await self._archive_writer.write_uplinks(settled.raw, conn=conn)
        await self._archive_writer.write_quarantine(settled.quarantine, conn=conn)
        await write_events(conn, settled.events)
        await write_health(conn, settled.health)
        return outcomes

    @staticmethod
    async def _resolve_topics(conn: Connection, batch: list[Uplink]) -> None:
        """MQTT: the topic names the broker-authenticated device; find its meter."""
        topics = [u.topic for u in batch if u.topic is not None and u.device is None]
        if not topics:
            return
        topics = [t for t in topics if is_pg_text(t[0]) and is_pg_text(t[1])]
        found = await credentials.meters_by_topic(conn, topics) if topics else {}
        for uplink in batch:
            if uplink.topic is None or uplink.device is not None:
                continue
            ref = found.get(uplink.topic)
            if ref is None:
                if uplink.reject is None:
                    uplink.reject = (Reason.UNKNOWN_METER, f"no meter for topic {uplink.topic}")
                continue
            uplink.device = Device(ref.meter_id, ref.tenant_id, ref.address, ref.format)
