"""One batch of uplinks → decoded, checked, stored and archived in one transaction.

`BatchStore.commit(batch)` returns one `Outcome` per uplink, in order, after the
transaction has committed; it raises `StorageUnavailableError` when the database cannot
be reached (the pipeline retries the batch), never a raw asyncpg error. Per uplink:

- decoded by `decoder.decode_batch`, with the AES keys of the batch's meters (OMS/wM-Bus,
  `collector.keys`); an undecodable payload is quarantined (a wrong or missing key too:
  `undecodable` with the decoder's decrypt_failed / no_key message);
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
  the batch.

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
escaped by `storage.archive.pg_text`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal

import numpy as np
import structlog

from collector import metrics
from collector.keys import KeyRing, MeterKeys, Pair
from collector.pipeline import Device, Outcome, Uplink
from decoder import decode_batch as _decode_batch
from decoder.columns import Decoded, ErrorCode, Flag, concat
from storage import credentials
from storage.archive import ArchiveWriter, QuarantineRow, RawUplink, is_pg_text, pg_text
from storage.errors import StorageUnavailableError
from storage.events import EventRow, write_events
from storage.health import HealthRow, write_health
from storage.ingest import ReadingBatch, ReadingWriter
from storage.meters import MeterDirectory
from storage.pool import Connection, Pool, connection

log = structlog.get_logger("collector.store")

Decode = Callable[[list[bytes], np.ndarray, Mapping[str, bytes]], Decoded]

_EVENT_FLAGS = (
    (Flag.LEAK, "leak"),
    (Flag.BURST, "burst"),
    (Flag.REVERSE_FLOW, "reverse_flow"),
    (Flag.TAMPER, "tamper"),
    (Flag.LOW_BATTERY, "low_battery"),
    (Flag.VALVE_CLOSED, "valve_closed"),
    (Flag.VALVE_ABNORMAL, "valve_abnormal"),
    (Flag.DRY, "dry"),
    (Flag.METER_ERROR, "meter_error"),
)
_EVENT_MASK = int(sum(int(f) for f, _ in _EVENT_FLAGS))
_MAX_ERROR = 500  # characters of an exception kept in a quarantine detail
_MAX_LISTED = 24  # rejected readings listed one by one in a quarantine detail (a day)
READINGS_REJECTED = "readings_rejected"  # quarantine reason: some readings of a stored uplink


class DecodeFailed(Exception):
    """The decode callable raised (a decoder bug): the frames' uplinks are `decode_failed`."""


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR else text[:_MAX_ERROR] + "..."


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def _iso(epoch_s: int) -> str:
    try:
        return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):  # past datetime's years 1..9999
        return f"epoch {epoch_s}"


def default_decode(
    frames: list[bytes], received_at_s: np.ndarray, keys: Mapping[str, bytes]
) -> Decoded:
    """Decode with the project's decoder dispatcher; `keys`: meter id -> AES key."""
    return _decode_batch(frames, received_at_s, keys=keys)


class _Round:
    """Frames decoded together: one key ring, consistent (an address maps to one key)."""

    def __init__(self, keys: dict[str, bytes], plain_tenant: int | None) -> None:
        self.rows: list[int] = []
        self.keys = keys
        self.plain_tenant = plain_tenant  # plain CoAP: the one tenant of this round

    def admits(self, keys: dict[str, bytes]) -> bool:
        return self.plain_tenant is None and all(self.keys.get(a, k) == k for a, k in keys.items())


_HEALTH_NAMES = ("battery_mv", "battery_v", "rsrp_cdbm", "rsrp_dbm", "sinr_cdb", "sinr_db", "ecl")


def _health_fields(dec: Decoded, j: int) -> dict[str, object]:
    """Frame j's modem-health fields (only those, when the decoder can build just those)."""
    extra_of = getattr(dec, "extra_of", None)  # columnar Decoded: build only what we read
    if extra_of is not None:
        return extra_of(j, _HEALTH_NAMES)  # type: ignore[no-any-return]
    return dec.extra[j]


def _may_have_health(dec: Decoded) -> bool:
    """False when no frame of `dec` can carry a health field (columnar Decoded only)."""
    fields = getattr(dec, "fields", None)
    if fields is None or getattr(dec, "sparse", None):
        return True
    return any(name in fields for name in _HEALTH_NAMES)


def _reading_batch(
    cols: tuple[list[int], list[int], list[int], list[int], list[int], list[float]],
) -> ReadingBatch:
    return ReadingBatch(
        meter_id=np.array(cols[0], np.int64),
        read_at_s=np.array(cols[1], np.int64),
        register_ml=np.array(cols[2], np.int64),
        flags=np.array(cols[3], np.uint32),
        transport=np.array(cols[4], np.int16),
        received_at_us=(np.array(cols[5], np.float64) * 1e6).astype(np.int64),
    )


def _scaled(extra: dict[str, object], names: tuple[tuple[str, int], ...]) -> int | None:
    for name, factor in names:
        value = extra.get(name)
        if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
            return int(Decimal(str(value)) * factor)
    return None


def _within(value: int | None, low: int, high: int) -> int | None:
    return value if value is not None and low <= value <= high else None


_INT4 = (-(2**31), 2**31 - 1)


def health_of(extra: dict[str, object]) -> tuple[int | None, int | None, int | None, int | None]:
    """(battery_mv, rsrp_cdbm, sinr_cdb, ecl) from a frame's extra fields, None if absent
    or outside what the device_health column holds (an implausible figure is no figure)."""
    return (
        _within(_scaled(extra, (("battery_mv", 1), ("battery_v", 1000))), *_INT4),
        _within(_scaled(extra, (("rsrp_cdbm", 1), ("rsrp_dbm", 100))), *_INT4),
        _within(_scaled(extra, (("sinr_cdb", 1), ("sinr_db", 100))), *_INT4),
        _within(_scaled(extra, (("ecl", 1),)), 0, 2),  # 3GPP TS 36.331: CE level 0..2
    )


def _rejections(
    rows: list[int],
    rejected: dict[int, str],
    cols: tuple[list[int], list[int], list[int], list[int], list[int], list[float]],
    total: int,
    labels: Counter[str],
) -> str:
    """`3 of 24 readings rejected (clock_future 3): 2027-01-01T00:00:00Z 1234000 mL
    clock_future; ...`: which readings of an uplink were not stored, and why."""
    why = ", ".join(f"{label} {count}" for label, count in labels.most_common())
    listed = "; ".join(
        f"{_iso(cols[1][row])} {cols[2][row]} mL {rejected[row]}" for row in rows[:_MAX_LISTED]
    )
    more = f"; and {len(rows) - _MAX_LISTED} more" if len(rows) > _MAX_LISTED else ""
    return f"{len(rows)} of {total} readings rejected ({why}): {listed}{more}"


class BatchStore:
    """Commits batches of uplinks to the database through `pool`."""

    def __init__(
        self,
        pool: Pool,
        keys: MeterKeys,
        decode: Decode = default_decode,
        acquire_timeout_s: float = 5.0,
    ) -> None:
        """Store through `pool`, decoding with `decode` and the AES keys from `keys`."""
        self._pool = pool
        self._writer = ReadingWriter(pool)
        self._archive_writer = ArchiveWriter(pool)
        # plain CoAP (lab tenants): reported address -> meter id; a meter exchange that
        # reuses an address is seen within ttl_s
        self._meters = MeterDirectory(pool, ttl_s=60.0)
        self._keys = keys
        self._decode = decode
        self._acquire_timeout_s = acquire_timeout_s

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
            reason, detail = (
                "decode_failed",
                f"the decoder failed on it: {_short(exc.__cause__ or exc)}",
            )
        else:
            reason, detail = "store_failed", f"the database refused it: {_short(exc)}"
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

    async def _last_resort(self, uplink: Uplink, reason: str, detail: str) -> Outcome:
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
        self, conn: Connection, uplinks: list[Uplink], received_at_s: int
    ) -> Decoded:
        """Decode `uplinks` with their meters' AES keys (see the module docstring).

        An authenticated device reports its own meter, so its key is known before decoding
        (cache, else one bulk query). A plain CoAP frame names its meter only inside the
        frame: its tenant's frames are decoded on their own, and if a key was missing they
        are decoded again with the keys of the meter ids the decoder asked for. Frames of
        tenants whose keys disagree on an address (two tenants, one OMS id) never share a
        decode call.
        """
        wanted = {(u.device.tenant_id, u.device.address) for u in uplinks if u.device}
        known = await self._keys.get(conn, wanted) if wanted else {}
        per_tenant: dict[int, dict[str, bytes]] = {}
        for (tenant, address), aes in known.items():
            if aes is not None:
                per_tenant.setdefault(tenant, {})[address] = aes
        rounds: list[_Round] = []
        by_device_tenant: dict[int, _Round] = {}
        by_plain_tenant: dict[int, _Round] = {}
        for n, uplink in enumerate(uplinks):
            if uplink.device is None:  # plain CoAP (tenant_id is set): a round per tenant
                scope = uplink.tenant_id if uplink.tenant_id is not None else -1
                rnd = by_plain_tenant.get(scope)
                if rnd is None:
                    rnd = by_plain_tenant[scope] = _Round({}, scope)
                    rounds.append(rnd)
            else:
                tenant = uplink.device.tenant_id
                rnd = by_device_tenant.get(tenant)
                if rnd is None:
                    mine = per_tenant.get(tenant, {})
                    rnd = next((r for r in rounds if r.admits(mine)), None)
                    if rnd is None:
                        rnd = _Round({}, None)
                        rounds.append(rnd)
                    rnd.keys.update(mine)
                    by_device_tenant[tenant] = rnd
            rnd.rows.append(n)
        if len(rounds) == 1:
            return await self._decode_round(conn, uplinks, rounds[0], received_at_s)
        parts = [
            (
                np.asarray(r.rows, np.int64),
                await self._decode_round(conn, uplinks, r, received_at_s),
            )
            for r in rounds
        ]
        return concat(parts, len(uplinks))

    async def _decode_round(
        self, conn: Connection, uplinks: list[Uplink], rnd: _Round, received_at_s: int
    ) -> Decoded:
        frames = [uplinks[n].payload for n in rnd.rows]
        # each frame's own receive time (a re-decoded frame keeps its original one): frames
        # without a clock, or with relative times, are dated by it
        rx = np.array([int(uplinks[n].received_at) for n in rnd.rows], np.int64)
        ring = KeyRing(rnd.keys)
        dec = self._decoded(frames, rx, ring)
        if not ring.missed or not (dec.error_code == ErrorCode.NO_KEY).any():
            return dec
        # a key was missing: load the asked-for keys fresh (one provisioned since the
        # cache said "none"), and decode the round again if that found any
        if rnd.plain_tenant is not None:
            pairs: set[Pair] = {(rnd.plain_tenant, m) for m in ring.missed}
        else:
            devices = (uplinks[n].device for n in rnd.rows)
            pairs = {(d.tenant_id, d.address) for d in devices if d and d.address in ring.missed}
        pairs = {p for p in pairs if is_pg_text(p[1])}  # a NUL "meter id" is no meter
        found = await self._keys.get(conn, pairs, fresh=True) if pairs else {}
        more = {a: k for (_, a), k in found.items() if k is not None and a not in rnd.keys}
        if not more:
            return dec
        return self._decoded(frames, rx, KeyRing({**rnd.keys, **more}))

    def _decoded(self, frames: list[bytes], rx: np.ndarray, ring: KeyRing) -> Decoded:
        """`self._decode`, its exception (a decoder bug) raised as DecodeFailed."""
        try:
            return self._decode(frames, rx, ring)
        except Exception as exc:
            raise DecodeFailed(_short(exc)) from exc

    async def _commit(self, batch: list[Uplink]) -> list[Outcome]:
        now = time.time()
        timeout_s = self._acquire_timeout_s
        async with connection(self._pool, "storing a batch", timeout_s=timeout_s) as conn:
            await self._resolve_topics(conn, batch)
            todo = [i for i, u in enumerate(batch) if u.reject is None]
            dec = await self._decode_keyed(conn, [batch[i] for i in todo], int(now))
            async with conn.transaction():
                outcomes = await self._store(conn, batch, todo, dec)
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

    async def _store(
        self, conn: Connection, batch: list[Uplink], todo: list[int], dec: Decoded
    ) -> list[Outcome]:
        """Check, write and archive one decoded batch on `conn` (inside its transaction)."""
        frame_of = np.full(len(batch), -1, np.int64)
        frame_of[todo] = np.arange(len(todo))
        fi = dec.frame_index
        starts = np.searchsorted(fi, np.arange(len(todo)), "left").tolist()
        ends = np.searchsorted(fi, np.arange(len(todo)), "right").tolist()
        r_meter: list[str] = dec.meter_id.tolist()
        r_at: list[int] = dec.read_at_s.tolist()
        r_ml: list[int] = dec.register_ml.tolist()
        r_flags: list[int] = dec.flags.tolist()
        codes: list[int] = dec.error_code.tolist()
        known = await self._plain_meters(conn, batch, todo, starts, ends, r_meter)
        decided: list[tuple[str, str] | None] = []
        meter_of: list[int | None] = []
        cols: tuple[list[int], list[int], list[int], list[int], list[int], list[float]]
        cols = ([], [], [], [], [], [])
        owner: list[int] = []  # uplink index of each reading row
        for i, uplink in enumerate(batch):
            j = int(frame_of[i])
            verdict, meter_ids = self._check(uplink, j, dec, codes, starts, ends, r_meter, known)
            decided.append(verdict)
            meter_of.append(
                meter_ids[0] if meter_ids else (uplink.device.meter_id if uplink.device else None)
            )
            if verdict is not None:
                continue
            for k, meter_id in zip(range(starts[j], ends[j]), meter_ids, strict=True):
                cols[0].append(meter_id)
                cols[1].append(r_at[k])
                cols[2].append(r_ml[k])
                cols[3].append(r_flags[k])
                cols[4].append(int(uplink.transport))
                cols[5].append(uplink.received_at)
                owner.append(i)
        result = await self._writer.write(_reading_batch(cols), conn=conn)
        new_rows: list[bool] = result.new_mask.tolist()
        rejected = {r.index: r.reason.label for r in result.rejected}
        n_new = [0] * len(batch)
        n_read = [0] * len(batch)
        bad: dict[int, list[int]] = {}  # uplink -> its rejected reading rows
        for row, i in enumerate(owner):
            n_read[i] += 1
            n_new[i] += new_rows[row]
            if row in rejected:
                bad.setdefault(i, []).append(row)
        partial: dict[int, str] = {}  # uplink with good readings -> what was rejected, why
        for i, rows in bad.items():
            labels = Counter(rejected[row] for row in rows)
            detail = _rejections(rows, rejected, cols, n_read[i], labels)
            if len(rows) == n_read[i]:  # nothing usable: the whole uplink is quarantined
                decided[i] = (labels.most_common(1)[0][0], detail)
            else:
                partial[i] = detail
        outcomes = self._outcomes(batch, decided, n_read, n_new, partial)
        await self._archive(
            conn, batch, dec, frame_of, meter_of, outcomes, cols, owner, set(rejected)
        )
        await credentials.save_replay_windows(
            conn,
            [
                (*u.replay_window, o.status, o.reason, o.detail)
                for u, o in zip(batch, outcomes, strict=True)
                if u.replay_window is not None
            ],
        )
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
                    uplink.reject = ("unknown_meter", f"no meter for topic {uplink.topic}")
                continue
            uplink.device = Device(ref.meter_id, ref.tenant_id, ref.address)

    @staticmethod
    def _check(
        uplink: Uplink,
        j: int,
        dec: Decoded,
        codes: list[int],
        starts: list[int],
        ends: list[int],
        r_meter: list[str],
        known: dict[tuple[int, str], int],
    ) -> tuple[tuple[str, str] | None, list[int]]:
        """(quarantine verdict or None, meter id of each of the frame's readings)."""
        if uplink.reject is not None:
            return uplink.reject, []
        if codes[j] != ErrorCode.OK:
            code = ErrorCode._value2member_map_.get(codes[j])
            name = code.name.lower() if isinstance(code, ErrorCode) else f"code {codes[j]}"
            # INTERNAL: the decoder raised on this frame (a bug); kept to decode again
            reason = "decode_failed" if code == ErrorCode.INTERNAL else "undecodable"
            return (reason, f"{name}: {dec.error_message[j]}"), []
        addresses = r_meter[starts[j] : ends[j]]
        if uplink.device is not None:
            claimed = {a for a in addresses} | {dec.meter_of_frame[j]} - {""}
            foreign = sorted(a for a in claimed if a != uplink.device.address)
            if foreign:
                detail = (
                    f"frame reports meter {', '.join(foreign)}; the device is "
                    f"authenticated as meter {uplink.device.address}"
                )
                return ("identity_mismatch", detail), []
            return None, [uplink.device.meter_id] * len(addresses)
        tenant = uplink.tenant_id
        ids = [known.get((tenant, a)) for a in addresses] if tenant is not None else [None]
        missing = sorted({a for a, m in zip(addresses, ids, strict=False) if m is None})
        if missing or tenant is None:
            return ("unknown_meter", f"no meter {', '.join(missing)} in this tenant"), []
        return None, [m for m in ids if m is not None]

    @staticmethod
    def _outcomes(
        batch: list[Uplink],
        decided: list[tuple[str, str] | None],
        n_read: list[int],
        n_new: list[int],
        partial: dict[int, str],
    ) -> list[Outcome]:
        out = []
        for i in range(len(batch)):
            verdict = decided[i]
            note = partial.get(i, "")
            if verdict is not None:  # a detail may quote a reported address: NUL, surrogates
                out.append(Outcome("quarantined", verdict[0], pg_text(verdict[1]) or ""))
            elif n_read[i] and not n_new[i]:
                out.append(Outcome("duplicate", detail=note, n_readings=n_read[i]))
            else:
                out.append(Outcome("stored", "", note, n_read[i], n_new[i]))
        return out

    async def _plain_meters(
        self,
        conn: Connection,
        batch: list[Uplink],
        todo: list[int],
        starts: list[int],
        ends: list[int],
        r_meter: list[str],
    ) -> dict[tuple[int, str], int]:
        """Plain CoAP: (tenant, reported address) -> meter id, from the cached directory."""
        wanted: dict[int, set[str]] = {}
        for j, i in enumerate(todo):
            tenant = batch[i].tenant_id
            if batch[i].device is None and tenant is not None:
                # text PostgreSQL cannot hold (NUL...) names no meter: never looked up
                reported = (a for a in r_meter[starts[j] : ends[j]] if is_pg_text(a))
                wanted.setdefault(tenant, set()).update(reported)
        known: dict[tuple[int, str], int] = {}
        for tenant, addresses in wanted.items():
            ordered = sorted(addresses)
            ids = await self._meters.resolve(tenant, ordered, conn=conn)
            known.update(
                ((tenant, a), m) for a, m in zip(ordered, ids.tolist(), strict=True) if m >= 0
            )
        return known

    async def _archive(
        self,
        conn: Connection,
        batch: list[Uplink],
        dec: Decoded,
        frame_of: np.ndarray,
        meter_of: list[int | None],
        outcomes: list[Outcome],
        cols: tuple[list[int], list[int], list[int], list[int], list[int], list[float]],
        owner: list[int],
        rejected: set[int],
    ) -> None:
        """Archive every uplink, quarantine the refused ones (and the rejected readings of
        stored ones), record alarms of readings that were not rejected and modem health."""
        raw: list[RawUplink] = []
        quarantine: list[QuarantineRow] = []
        health: list[HealthRow] = []
        formats: list[str] = dec.format.tolist()
        codes: list[int] = dec.error_code.tolist()
        health_possible = _may_have_health(dec)
        for i, (uplink, outcome) in enumerate(zip(batch, outcomes, strict=True)):
            j = int(frame_of[i])
            received_at = datetime.fromtimestamp(uplink.received_at, UTC)
            tenant = uplink.device.tenant_id if uplink.device else uplink.tenant_id
            raw.append(
                RawUplink(
                    received_at,
                    tenant,
                    meter_of[i],
                    int(uplink.transport),
                    uplink.peer,
                    uplink.payload,
                    (formats[j] or None) if j >= 0 else None,
                    outcome.status,  # type: ignore[arg-type]
                    outcome.n_readings,
                    outcome.n_new,
                    (codes[j] or None) if j >= 0 else None,
                    outcome.detail or None,
                )
            )
            quarantined = outcome.status == "quarantined"
            # a stored uplink's detail lists its rejected readings: they are quarantined
            if quarantined or (outcome.status == "stored" and outcome.detail):
                quarantine.append(
                    QuarantineRow(
                        received_at,
                        tenant,
                        meter_of[i],
                        int(uplink.transport),
                        uplink.peer,
                        outcome.reason or READINGS_REJECTED,
                        outcome.detail,
                        uplink.payload,
                    )
                )
            meter = meter_of[i]
            if not quarantined and health_possible and j >= 0 and meter is not None:
                figures = health_of(_health_fields(dec, j))
                if any(v is not None for v in figures):
                    measured_at = _utc(int(uplink.received_at))
                    health.append(HealthRow(meter, measured_at, *figures, received_at))
        events = [
            EventRow(cols[0][row], _utc(cols[1][row]), kind, _utc(cols[5][row]))
            for row in range(len(owner))
            if cols[3][row] & _EVENT_MASK and row not in rejected
            for flag, kind in _EVENT_FLAGS
            if cols[3][row] & flag
        ]
        await self._archive_writer.write_uplinks(raw, conn=conn)
        await self._archive_writer.write_quarantine(quarantine, conn=conn)
        await write_events(conn, events)
        await write_health(conn, health)
