"""The verdict on one decoded batch: which readings to write, what becomes of each uplink.

Pure: no I/O, no asyncio (it builds `storage.rows` dataclasses, it never writes them). The
store shell (`collector.store`) decodes, resolves addresses and writes; this module
decides, in three steps over numpy columns, with Python loops over uplinks only (their
details are text), never over readings:

- `layout(n, todo, dec)`: which frame and readings of `dec` belong to which uplink;
- `plain_lookups(batch, lay, dec)`: the addresses of plain CoAP uplinks the shell resolves
  (text PostgreSQL cannot hold, NUL or an unpaired surrogate, names no meter: never asked);
- `check(batch, lay, dec, plain_meter)` → `Checked`: per uplink its quarantine verdict or
  None, and its meter; the `ReadingBatch` of the uplinks that passed, by array masks.
  Identity: every meter an authenticated device's frame reports (each reading's address,
  and the frame's own meter if it names one) must be the device's, else
  `identity_mismatch`; a plain CoAP reading must name a meter of the uplink's tenant,
  else `unknown_meter`; a frame the decoder refused is `undecodable` (`decode_failed`
  for the decoder's INTERNAL code, it raised on that frame), except an authenticated
  device's frame with no register that reports health (an LwM2M Send of objects 3/4
  alone): it passes with no reading and its health is stored;
- `settle(batch, dec, checked, written)` → `Verdict`: with the writer's result, one
  `Outcome` per uplink and the rows to archive (raw uplinks, quarantine, meter events,
  modem health). If every reading of an uplink was rejected by the writer, the uplink is
  quarantined with the commonest reason; else it is stored and one `readings_rejected`
  row lists the rejected readings and why. Alarms of readings not rejected become events.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import numpy as np
import numpy.typing as npt

from collector.health import HealthColumns
from collector.uplink import Outcome, Uplink
from decoder.columns import Decoded, ErrorCode, Flag
from storage.reasons import Reason
from storage.rows import (
    EventRow,
    HealthRow,
    IngestResult,
    QuarantineRow,
    RawUplink,
    ReadingBatch,
    is_pg_text,
    pg_text,
)

Int64s = npt.NDArray[np.int64]
Verdicts = list[tuple[Reason, str] | None]

EVENT_FLAGS: Final = (
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
_EVENT_MASK: Final = np.uint32(sum(int(f) for f, _ in EVENT_FLAGS))
_MAX_LISTED = 24  # rejected readings listed one by one in a quarantine detail (a day)


@dataclass(frozen=True)
class Layout:
    """Where each uplink's frame and readings are in a Decoded of the batch's `todo` frames.

    `frame_of[i]`: uplink i's frame (-1: not decoded, decided before); `owner[k]`: the
    uplink of reading k; `starts[j]:ends[j]`: frame j's readings (frame_index is sorted).
    """

    frame_of: Int64s
    owner: Int64s
    starts: Int64s
    ends: Int64s


def layout(n_uplinks: int, todo: list[int], dec: Decoded) -> Layout:
    """The Layout of `dec`, the decode of the uplinks `todo` (in that order) of a batch."""
    frames = np.asarray(todo, np.int64)
    frame_of = np.full(n_uplinks, -1, np.int64)
    frame_of[frames] = np.arange(len(frames))
    fi = dec.frame_index
    js = np.arange(len(frames))
    return Layout(
        frame_of=frame_of,
        owner=frames[fi],
        starts=np.searchsorted(fi, js, "left").astype(np.int64),
        ends=np.searchsorted(fi, js, "right").astype(np.int64),
    )


@dataclass(frozen=True)
class Lookup:
    """Addresses one tenant's plain CoAP readings report: `rows[k]` reports
    `addresses[index[k]]` (sorted, distinct, storable text)."""

    tenant_id: int
    addresses: list[str]
    rows: Int64s
    index: Int64s


def _plain_tenant(uplink: Uplink) -> int:
    return uplink.tenant_id if uplink.device is None and uplink.tenant_id is not None else -1


def _factorize(values: np.ndarray) -> tuple[np.ndarray, npt.NDArray[np.intp]]:
    """(sorted distinct values, index of each value in them). A frame's readings mostly
    repeat one address: only the first of each run is sorted (a sort of Python strings
    costs per comparison), the runs take their head's index."""
    if not len(values):
        return np.zeros(0, object), np.zeros(0, np.intp)
    starts = np.ones(len(values), bool)
    starts[1:] = values[1:] != values[:-1]
    distinct, head_index = np.unique(values[starts].astype(object), return_inverse=True)
    return distinct, head_index.reshape(-1)[np.cumsum(starts) - 1]


def plain_lookups(batch: list[Uplink], lay: Layout, dec: Decoded) -> list[Lookup]:
    """The plain CoAP addresses to resolve, one Lookup per tenant."""
    tenant_u = np.fromiter((_plain_tenant(u) for u in batch), np.int64, len(batch))
    row_tenant = tenant_u[lay.owner]
    out = []
    for tenant in np.unique(row_tenant[row_tenant >= 0]).tolist():
        rows = np.flatnonzero(row_tenant == tenant)
        distinct, index = _factorize(dec.address[rows])
        storable = np.fromiter((is_pg_text(a) for a in distinct), bool, len(distinct))
        keep = storable[index]
        renumber = np.cumsum(storable) - 1
        out.append(
            Lookup(
                tenant,
                distinct[storable].tolist(),
                rows[keep],
                renumber[index[keep]].astype(np.int64),
            )
        )
    return out


def place(n_readings: int, lookups: list[Lookup], found: list[Int64s]) -> Int64s:
    """The meter id of each reading (-1: not a plain reading, or no such meter) from the
    ids `found[n]` of `lookups[n].addresses`."""
    meter = np.full(n_readings, -1, np.int64)
    for lookup, ids in zip(lookups, found, strict=True):
        meter[lookup.rows] = ids[lookup.index]
    return meter


@dataclass(frozen=True)
class Checked:
    """The identity verdicts and the readings to write (see `check`)."""

    verdicts: Verdicts  # per uplink: (reason, detail) or None (passed)
    meter_of: list[int | None]  # per uplink: the meter it concerns, if known
    readings: ReadingBatch  # the readings of the uplinks that passed
    owner: Int64s  # per row of `readings`: its uplink
    layout: Layout
    health_only: set[int]  # passed uplinks whose frame has no register, only health


def _undecodable(code: int, message: str) -> tuple[Reason, str]:
    known = ErrorCode._value2member_map_.get(code)
    name = known.name.lower() if isinstance(known, ErrorCode) else f"code {code}"
    # INTERNAL: the decoder raised on this frame (a bug); kept to decode again
    reason = Reason.DECODE_FAILED if known == ErrorCode.INTERNAL else Reason.UNDECODABLE
    return reason, f"{name}: {message}"


def _per_uplink(lay: Layout, column: np.ndarray, absent: object) -> np.ndarray:
    """`column` (one value per decoded frame) per uplink, `absent` where not decoded."""
    out = np.full(len(lay.frame_of), absent, column.dtype)
    decoded = lay.frame_of >= 0
    out[decoded] = column[lay.frame_of[decoded]]
    return out


def _verdict(
    uplink: Uplink, code: int, message: str, claim: str, addresses: np.ndarray, unknown: list[str]
) -> tuple[Reason, str]:
    """The verdict on an uplink `check` found wanting: decided before, a decoder code, an
    identity mismatch, or an unknown meter (`unknown`: its addresses that resolved to none)."""
    if uplink.reject is not None:
        return uplink.reject
    if code != 0:
        return _undecodable(code, message)
    if uplink.device is not None:
        claimed = set(addresses.tolist()) | ({claim} - {""})
        foreign = sorted(a for a in claimed if a != uplink.device.address)
        detail = (
            f"frame reports meter {', '.join(foreign)}; the device is "
            f"authenticated as meter {uplink.device.address}"
        )
        return Reason.IDENTITY_MISMATCH, detail
    missing = ", ".join(sorted(set(unknown)))
    return Reason.UNKNOWN_METER, f"no meter {missing} in this tenant"


def check(batch: list[Uplink], lay: Layout, dec: Decoded, plain_meter: Int64s) -> Checked:
    """Verdicts and readings of a decoded batch; `plain_meter` from `place` (see module).

    Array work over uplinks and readings; a Python step only for an uplink that fails.
    """
    n = len(batch)
    is_device = np.fromiter((u.device is not None for u in batch), bool, n)
    dev_meter = np.fromiter((u.device.meter_id if u.device else -1 for u in batch), np.int64, n)
    dev_address = np.array([u.device.address if u.device else "" for u in batch], object)
    owner = lay.owner
    address = dec.address.astype(object, copy=False)
    row_device = is_device[owner]
    row_meter = np.where(row_device, dev_meter[owner], plain_meter)
    bad_row = np.where(row_device, address != dev_address[owner], plain_meter < 0)
    code = _per_uplink(lay, dec.error_code, 0)
    health_only = _health_only(is_device & (code == ErrorCode.NO_REGISTER), lay, dec)
    code[list(health_only)] = 0
    claim = _per_uplink(lay, dec.address_of_frame.astype(object, copy=False), "")
    failed = np.bincount(owner[bad_row], minlength=n) > 0
    failed |= code != 0
    failed |= is_device & (claim != "") & (claim != dev_address)
    failed |= np.fromiter(
        (u.reject is not None or (u.device is None and u.tenant_id is None) for u in batch),
        bool,
        n,
    )
    verdicts: Verdicts = [None] * n
    for i in np.flatnonzero(failed).tolist():  # the few that fail: their details are text
        j = int(lay.frame_of[i])
        rows = slice(int(lay.starts[j]), int(lay.ends[j])) if j >= 0 else slice(0, 0)
        unknown = address[rows][plain_meter[rows] < 0].tolist()
        message = str(dec.error_message[j]) if j >= 0 else ""
        verdicts[i] = _verdict(
            batch[i], int(code[i]), message, str(claim[i]), address[rows], unknown
        )
    passed = ~failed
    # the meter of each uplink: the device's; for plain CoAP that of its first reading
    first = _per_uplink(lay, lay.starts, 0)
    has_rows = passed & (first < _per_uplink(lay, lay.ends, 0))
    plain_first = np.full(n, -1, np.int64)
    plain_first[has_rows] = row_meter[first[has_rows]]
    meter_of = np.where(is_device, dev_meter, plain_first).tolist()
    keep = passed[owner]
    # the receive time as float seconds (time.time()) to µs, once per uplink
    received_s = np.fromiter((u.received_at for u in batch), np.float64, n)
    received_us = (received_s * 1e6).astype(np.int64)
    kept_owner = owner[keep]
    readings = ReadingBatch(
        meter_id=row_meter[keep],
        read_at_s=dec.read_at_s[keep],
        register_ml=dec.register_ml[keep],
        flags=dec.flags[keep],
        received_at_us=received_us[kept_owner],
    )
    meters = [m if m >= 0 else None for m in meter_of]
    health_only -= set(np.flatnonzero(failed).tolist())
    return Checked(verdicts, meters, readings, kept_owner, lay, health_only)


def _health_only(candidates: npt.NDArray[np.bool_], lay: Layout, dec: Decoded) -> set[int]:
    """The uplinks among `candidates` (authenticated, frame NO_REGISTER) whose frame
    reports health figures: stored for those, with no reading (a modem's health is its
    own; a plain CoAP frame without a reading names no meter we could trust for it)."""
    if not candidates.any():
        return set()
    figures = HealthColumns(dec)
    return {
        i
        for i in np.flatnonzero(candidates).tolist()
        if figures.figures(int(lay.frame_of[i])) is not None
    }


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def _iso(epoch_s: int) -> str:
    try:
        return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):  # past datetime's years 1..9999
        return f"epoch {epoch_s}"


def _rejections(readings: ReadingBatch, rows: list[int], labels: list[str], total: int) -> str:
    """`3 of 24 readings rejected (clock_future 3): 2027-01-01T00:00:00Z 1234000 mL
    clock_future; ...`: which readings of an uplink were not stored, and why."""
    why = ", ".join(f"{label} {count}" for label, count in Counter(labels).most_common())
    listed = "; ".join(
        f"{_iso(int(readings.read_at_s[row]))} {int(readings.register_ml[row])} mL {label}"
        for row, label in zip(rows[:_MAX_LISTED], labels, strict=False)
    )
    more = f"; and {len(rows) - _MAX_LISTED} more" if len(rows) > _MAX_LISTED else ""
    return f"{len(rows)} of {total} readings rejected ({why}): {listed}{more}"


@dataclass(frozen=True)
class Verdict:
    """One outcome per uplink and the rows that record them."""

    outcomes: list[Outcome]
    raw: list[RawUplink]  # one per uplink, in batch order
    quarantine: list[QuarantineRow]
    events: list[EventRow]
    health: list[HealthRow]
    n_new: int
    quarantine_of: list[int]  # the uplink (batch index) of each quarantine row
    health_of: list[int]  # the uplink of each health row

    def without(self, skip: set[int]) -> Verdict:
        """The same verdict minus the archive rows of uplinks `skip` (batch indices):
        OSCORE replays, which were received before and leave no second trace."""
        return Verdict(
            self.outcomes,
            [r for i, r in enumerate(self.raw) if i not in skip],
            [q for q, i in zip(self.quarantine, self.quarantine_of, strict=True) if i not in skip],
            self.events,  # alarms of readings already stored: none new (see settle)
            [h for h, i in zip(self.health, self.health_of, strict=True) if i not in skip],
            self.n_new,
            [i for i in self.quarantine_of if i not in skip],
            [i for i in self.health_of if i not in skip],
        )


def _rejected_per_uplink(
    checked: Checked, written: IngestResult
) -> dict[int, tuple[list[int], list[str]]]:
    """uplink -> (its rejected reading rows, their reasons), rows in order."""
    rows = np.fromiter((r.index for r in written.rejected), np.int64, len(written.rejected))
    order = np.lexsort((rows, checked.owner[rows]))
    out: dict[int, tuple[list[int], list[str]]] = {}
    for k in order.tolist():
        mine = out.setdefault(int(checked.owner[rows[k]]), ([], []))
        mine[0].append(int(rows[k]))
        mine[1].append(written.rejected[k].reason.label)
    return out


def settle(batch: list[Uplink], dec: Decoded, checked: Checked, written: IngestResult) -> Verdict:
    """Outcomes and archive rows of a checked batch whose readings `written` reports on."""
    n = len(batch)
    owner = checked.owner
    n_read = np.bincount(owner, minlength=n).tolist()
    n_new = np.bincount(owner[written.new_mask], minlength=n).tolist()
    verdicts = list(checked.verdicts)
    partial: dict[int, str] = {}  # uplink with good readings -> what was rejected, why
    for i, (rows, labels) in _rejected_per_uplink(checked, written).items():
        detail = _rejections(checked.readings, rows, labels, n_read[i])
        if len(rows) == n_read[i]:  # nothing usable: the whole uplink is quarantined
            verdicts[i] = (Reason(Counter(labels).most_common(1)[0][0]), detail)
        else:
            partial[i] = detail
    outcomes = []
    for i, verdict in enumerate(verdicts):
        note = partial.get(i, "")
        if verdict is not None:  # a detail may quote a reported address: NUL, surrogates
            outcomes.append(Outcome("quarantined", verdict[0], pg_text(verdict[1]) or ""))
        elif n_read[i] and not n_new[i]:
            outcomes.append(Outcome("duplicate", detail=note, n_readings=n_read[i]))
        else:
            outcomes.append(Outcome("stored", "", note, n_read[i], n_new[i]))
    raw, (quarantine, quarantine_of), (health, health_of), received = _archive(
        batch, dec, checked, outcomes
    )
    return Verdict(
        outcomes,
        raw,
        quarantine,
        _events(checked.readings, owner, written, received),
        health,
        int(written.new_mask.sum()),
        quarantine_of,
        health_of,
    )


def _archive(
    batch: list[Uplink], dec: Decoded, checked: Checked, outcomes: list[Outcome]
) -> tuple[
    list[RawUplink],
    tuple[list[QuarantineRow], list[int]],
    tuple[list[HealthRow], list[int]],
    list[datetime],
]:
    """Every uplink's raw row, the quarantine rows (refused uplinks, and the rejected
    readings of stored ones), modem health of the not quarantined, the latter two with
    their uplinks' indices; receive times."""
    raw: list[RawUplink] = []
    quarantine: list[QuarantineRow] = []
    quarantine_of: list[int] = []
    health: list[HealthRow] = []
    health_of: list[int] = []
    received: list[datetime] = []
    lay = checked.layout
    # per uplink, as Python values once (the loop below builds one row object each)
    fmt = _per_uplink(lay, dec.format.astype(object, copy=False), "").tolist()
    code = _per_uplink(lay, dec.error_code, 0).tolist()
    for i in checked.health_only:
        code[i] = 0  # decoded: its health is stored, it has no reading to store
    notes = _per_uplink(lay, dec.frame_flags_or_zero.astype(np.int64), -1).tolist()  # FrameFlag
    health_of_frame = HealthColumns(dec)  # collector.health: arrays, built once
    frame_of = lay.frame_of.tolist()
    for i, (uplink, outcome) in enumerate(zip(batch, outcomes, strict=True)):
        meter = checked.meter_of[i]
        received_at = _utc(uplink.received_at)
        received.append(received_at)
        tenant = uplink.device.tenant_id if uplink.device else uplink.tenant_id
        transport = int(uplink.transport)
        raw.append(
            RawUplink(
                received_at,
                tenant,
                meter,
                transport,
                uplink.peer,
                uplink.payload,
                fmt[i] or None,
                outcome.status,  # type: ignore[arg-type]  # stored/duplicate/quarantined here
                outcome.n_readings,
                outcome.n_new,
                code[i] or None,
                outcome.detail or None,
                notes[i] if notes[i] >= 0 else None,  # -1: not decoded
            )
        )
        quarantined = outcome.status == "quarantined"
        # a stored uplink's detail lists its rejected readings: they are quarantined
        if quarantined or (outcome.status == "stored" and outcome.detail):
            reason = outcome.reason or Reason.READINGS_REJECTED
            quarantine.append(
                QuarantineRow(
                    received_at,
                    tenant,
                    meter,
                    transport,
                    uplink.peer,
                    reason,
                    outcome.detail,
                    uplink.payload,
                )
            )
            quarantine_of.append(i)
        j = frame_of[i]
        figures = health_of_frame.figures(j) if not quarantined and j >= 0 else None
        if figures is not None and meter is not None:
            measured_at = _utc(int(uplink.received_at))
            health.append(HealthRow(meter, measured_at, received_at=received_at, **figures))
            health_of.append(i)
    return raw, (quarantine, quarantine_of), (health, health_of), received


def _events(
    readings: ReadingBatch, owner: Int64s, written: IngestResult, received: list[datetime]
) -> list[EventRow]:
    """The alarms (flag bits) of the written readings that were not rejected."""
    alarmed = (readings.flags & _EVENT_MASK) != 0
    for rejection in written.rejected:
        alarmed[rejection.index] = False
    events: list[EventRow] = []
    for row in np.flatnonzero(alarmed).tolist():  # alarms are rare: a loop over those only
        meter, flags = int(readings.meter_id[row]), int(readings.flags[row])
        occurred_at, received_at = _utc(int(readings.read_at_s[row])), received[int(owner[row])]
        events.extend(
            EventRow(meter, occurred_at, kind, received_at)
            for flag, kind in EVENT_FLAGS
            if flags & flag
        )
    return events
