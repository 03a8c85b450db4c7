"""M-Bus / wM-Bus / OMS (EN 13757-2/-3/-4/-7) decoder: frames in, `Decoded` columns out.

`decode(frames, received_at_s, keys, cache)` parses each frame's link/transport header
(and AES mode 5) in `mbus_link`, then groups frames by their record layout: frames of
one meter model share the DIF/VIF header bytes, so the layout is compiled once
(`mbus_records`) and the whole group is decoded at fixed offsets (`mbus_kernels`).
Compact frames are expanded through a `SignatureCache` learned from full frames.

Per reading: the current volume register (storage 0) read at the meter's own clock
(else the receive time, flagged CLOCK_MISSING) and, when present, the billing-date
register (lowest storage >= 1) read at its own date record, flagged BILLING_DATE.
Meter clocks are read as UTC unless `utc_offset_s` says how far east of UTC they run.
Other fields become per-frame object `Column`s (absent: None), filled group by group.
A bad frame gets an `ErrorCode` and a message; nothing raises for bad input.

Per record, not per frame: a frame whose current register reads is accepted with it.
What else is wrong is a `FrameFlag` of the frame (`Decoded.frame_flags`), never a reason
to drop the register: a secondary record with bad digits or a "no data" marker (0x80..,
all ones, date FFFF) is left out, junk or a cut-short record after the last sound one is
ignored, an L field off by a few bytes or a declared security mode on a payload in clear
(2F2F) is read as received. A data record never overwrites a link-layer field: `01FD08`
becomes `access_number_record`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from decoder import kernels as k
from decoder import mbus_compact, mbus_fixed, mbus_kernels, mbus_link
from decoder.columns import Column, Decoded, ErrorCode, Flag, FrameFlag
from decoder.drivers import route_mbus
from decoder.mbus_compact import DeferredCache, SignatureCache
from decoder.mbus_encode import encode_oms_mode5, encode_oms_plain, encode_wired
from decoder.mbus_link import Envelope, looks_like
from decoder.mbus_records import REGISTER_QUALIFIERS, Field, Kind, Layout, compile_layout, walk

__all__ = [
    "FORMAT_WIRED",
    "FORMAT_WIRELESS",
    "DeferredCache",
    "SignatureCache",
    "decode",
    "encode_oms_mode5",
    "encode_oms_plain",
    "encode_wired",
    "looks_like",
]

FORMAT_WIRED, FORMAT_WIRELESS = "mbus_wired", "wmbus"
LONG_FORMAT_B = 128  # EN 13757-4 format B: a longer frame carries a CRC at bytes 126-127
Ints = npt.NDArray[np.int64]
INT64_MAX = np.iinfo(np.int64).max


class _Batch:
    """Per-frame outcome columns plus the readings collected group by group."""

    def __init__(self, n: int, received_at_s: Ints, utc_offset_s: int | Ints = 0) -> None:
        self.received = np.asarray(received_at_s, np.int64)
        self.utc_offset_s = utc_offset_s
        self.code = np.zeros(n, np.uint16)
        self.message = k.text_column(n, "")
        self.format = k.text_column(n, "")
        self.meter = k.text_column(n, "")
        self.flags = np.zeros(n, np.uint32)
        self.notes = np.zeros(n, np.uint32)  # FrameFlag bits per frame
        self.columns: dict[str, npt.NDArray[np.object_]] = {}  # name -> value or None per frame
        self.readings: list[tuple[Ints, Ints, Ints, npt.NDArray[np.uint32]]] = []

    def column(self, name: str) -> npt.NDArray[np.object_]:
        """The object column `name` (all None until filled)."""
        if (col := self.columns.get(name)) is None:
            col = self.columns[name] = np.full(len(self.code), None, object)
        return col

    def put(self, name: str, rows: Ints, values: list[object] | object) -> None:
        """Set field `name` of `rows` to `values` (one each, or one for all); None skips."""
        arr = np.empty(len(rows), object)
        arr[:] = values
        keep = arr != None  # noqa: E711 (elementwise: numpy compares each cell with None)
        self.column(name)[rows[keep]] = arr[keep]

    def drop(self, name: str, rows: Ints) -> None:
        """Remove field `name` from `rows`."""
        if name in self.columns:
            self.columns[name][rows] = None

    def offset(self, rows: Ints) -> int | Ints:
        """Meter clock UTC offset of `rows`."""
        off = self.utc_offset_s
        return off if isinstance(off, int) else off[rows]

    def fail(self, rows: Ints | list[int], code: ErrorCode, message: str) -> None:
        """Reject `rows` that are still OK with `code` and `message`."""
        rows = np.asarray(rows, np.int64)
        rows = rows[self.code[rows] == 0]
        self.code[rows] = code
        self.message[rows] = message

    def note(self, rows: Ints, flag: int, where: npt.NDArray[np.bool_] | None = None) -> None:
        """Add FrameFlag `flag` to `rows` (those of them `where` is True, if given)."""
        self.notes[rows if where is None else rows[where]] |= np.uint32(flag)

    def read(self, rows: Ints, register_ml: Ints, read_at_s: Ints, flags: Ints) -> None:
        """Add one reading for each of `rows`."""
        self.readings.append((rows, register_ml, read_at_s, flags.astype(np.uint32)))

    def result(self) -> Decoded:
        """The batch as `Decoded`, readings ordered by input frame (current before billing)."""
        if self.readings:
            rows, reg, at, fl = (np.concatenate(c) for c in zip(*self.readings, strict=True))
        else:
            rows, reg, at, fl = (np.zeros(0, np.int64),) * 3 + (np.zeros(0, np.uint32),)
        keep = self.code[rows] == 0
        order = np.argsort(rows[keep], kind="stable")
        rows = rows[keep][order]
        return Decoded(
            frame_index=rows.astype(np.int32),
            address=self.meter[rows],
            read_at_s=at[keep][order],
            register_ml=reg[keep][order],
            flags=fl[keep][order],
            format=self.format,
            address_of_frame=self.meter,
            error_code=self.code,
            error_message=self.message,
            fields={name: Column.of_objects(col) for name, col in self.columns.items()},
            frame_flags=self.notes if self.notes.any() else None,
        )


def decode(
    frames: Sequence[bytes],
    received_at_s: npt.NDArray[np.int64],
    keys: Mapping[str, bytes] | None = None,
    cache: SignatureCache | None = None,
    *,
    utc_offset_s: int | Ints = 0,
) -> Decoded:
    """Decode a batch of wired long / wireless M-Bus frames; bad frames get error codes.

    `keys` maps address -> 16-byte AES key (security mode 5 / ELL CTR), `keys["*"]` is
    the key for a meter with none of its own; `cache` learns the format signatures of full
    frames (and is updated in place) so compact frames of the same model decode.
    `utc_offset_s` (int or one per frame, default 0: UTC) is how far east of UTC the meter
    clocks run. Raises ValueError only when the inputs differ in length.
    """
    if len(frames) != len(received_at_s):
        raise ValueError(f"{len(frames)} frames but {len(received_at_s)} receive times")
    if np.ndim(utc_offset_s) == 0:
        utc_offset_s = int(utc_offset_s)
    else:
        offsets = np.asarray(utc_offset_s, np.int64)
        if len(offsets) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(offsets)} UTC offsets")
        utc_offset_s = offsets
    keys = keys or {}
    cache = cache if cache is not None else SignatureCache()
    frames, crcs_removed = _without_link_crcs(frames)
    # vendor driver files (decoder.drivers): frames a driver claims skip the standard path
    routed = route_mbus(frames, received_at_s, keys, cache, utc_offset_s, decode)
    if routed is not None:
        return _noted(routed, crcs_removed, FrameFlag.LINK_CRCS_REMOVED)
    out = _Batch(len(frames), received_at_s, utc_offset_s)
    out.note(np.asarray(crcs_removed, np.int64), FrameFlag.LINK_CRCS_REMOVED)
    full: dict[tuple[tuple[str, int, int], int], list[int]] = {}
    compact: dict[tuple[tuple[str, int, int], bytes, int], list[int]] = {}
    fixed: list[int] = []
    envs: dict[int, Envelope] = {}
    for i, raw in enumerate(frames):  # per-frame Python: headers and AES only
        frame = bytes(raw)
        out.format[i] = FORMAT_WIRED if mbus_link.is_wired(frame) else FORMAT_WIRELESS
        got = mbus_link.parse(frame, keys)
        if isinstance(got, tuple):
            out.fail([i], *got)
            continue
        envs[i] = got
        out.meter[i] = got.address
        out.flags[i] = got.flags
        out.notes[i] |= got.notes
        for name, value in got.extra.items():  # link/TPL fields (access number, status)
            out.column(name)[i] = value
        if got.fixed:
            fixed.append(i)
        elif got.compact:
            compact.setdefault((got.model, got.app[:2], len(got.app)), []).append(i)
        else:
            full.setdefault((got.model, len(got.app)), []).append(i)
    for (model, _), rows in full.items():
        _decode_full(out, np.asarray(rows, np.int64), [envs[i].app for i in rows], model, cache)
    for (model, sig, _), rows in compact.items():
        _decode_compact(
            out,
            np.asarray(rows, np.int64),
            [envs[i].app for i in rows],
            model,
            int.from_bytes(sig, "little"),
            cache,
        )
    if fixed:
        _decode_fixed(out, np.asarray(fixed, np.int64), [envs[i].app for i in fixed])
    return out.result()


def _without_link_crcs(frames: Sequence[bytes]) -> tuple[Sequence[bytes], list[int]]:
    """`frames` with any wM-Bus data-link CRCs checked and removed, and the rows that had
    them. Per frame only a length test, unless L disagrees with the length or the frame is
    longer than 128 bytes (format B puts a CRC inside it)."""
    removed: list[int] = []
    out: list[bytes] | None = None
    for i, raw in enumerate(frames):
        n = len(raw)
        if n < 12 or (raw[0] == n - 1 and n <= LONG_FORMAT_B) or mbus_link.is_wired(raw):
            continue
        plain = mbus_link.without_link_crcs(bytes(raw))
        if plain is not None:
            out = list(frames) if out is None else out
            out[i] = plain
            removed.append(i)
    return (frames if out is None else out), removed


def _noted(res: Decoded, rows: list[int], flag: int) -> Decoded:
    """`res` with FrameFlag `flag` added to the frames `rows`."""
    if not rows:
        return res
    notes = res.frame_flags_or_zero.copy()
    notes[rows] |= np.uint32(flag)
    return dataclasses.replace(res, frame_flags=notes)


def _stack(apps: list[bytes]) -> npt.NDArray[np.uint8]:
    """Equal-length payloads as one (N, L) uint8 array."""
    return np.frombuffer(b"".join(apps), np.uint8).reshape(len(apps), -1)


def _decode_full(
    out: _Batch, rows: Ints, apps: list[bytes], model: tuple[str, int, int], cache: SignatureCache
) -> None:
    """One (model, length) group: compile a prototype's layout, decode all rows sharing it."""
    a = _stack(apps)
    pending = np.arange(len(rows))
    while pending.size:
        proto = int(pending[0])
        skeleton = walk(apps[proto], 0)
        if isinstance(skeleton, tuple):
            out.fail(rows[[proto]], *skeleton)
            pending = pending[1:]
            continue
        layout = compile_layout(skeleton)
        same = np.all(a[pending][:, layout.header_at] == layout.header_bytes, axis=1)
        members = pending[same]
        if layout.stop < 0:  # a cut-short walk is not the model's format
            cache.learn(model, layout.format_bytes, out.meter[rows[members]])
        _apply(out, rows[members], a[members], layout)
        pending = pending[~same]


def _decode_compact(
    out: _Batch,
    rows: Ints,
    apps: list[bytes],
    model: tuple[str, int, int],
    sig: int,
    cache: SignatureCache,
) -> None:
    """One (model, signature, length) group of compact frames, through the learned format."""
    fmt = cache.lookup(model, sig)
    if fmt is None:
        out.fail(rows, ErrorCode.UNKNOWN_COMPACT, mbus_compact.not_learned(model, sig))
        return
    compiled = mbus_compact.compact_layout(fmt)
    if isinstance(compiled[0], ErrorCode):
        out.fail(rows, *compiled)
        return
    layout, skeleton = compiled
    apps = [mbus_compact.drop_fill(p, 4 + layout.end) for p in apps]  # mode 5 block filler
    if len(apps[0]) - 4 != layout.end:
        out.fail(
            rows,
            ErrorCode.BAD_LENGTH,
            f"compact frame carries {len(apps[0]) - 4} value bytes, format needs {layout.end}",
        )
        return
    crc_ok = np.array(
        [mbus_compact.data_crc_ok(skeleton, p[4:], int.from_bytes(p[2:4], "little")) for p in apps]
    )
    out.fail(rows[~crc_ok], ErrorCode.BAD_CHECKSUM, "compact frame data CRC mismatch")
    _apply(out, rows[crc_ok], _stack([p[4:] for p in apps])[crc_ok], layout)


def _decode_fixed(out: _Batch, rows: Ints, apps: list[bytes]) -> None:
    """Wired fixed data structures (CI 73/77): counter 1 current, counter 2 historic."""
    c = mbus_fixed.counters(_stack(apps))
    ok = c["total_ok"].astype(bool)
    out.fail(rows[~ok], ErrorCode.BAD_UNIT, "fixed-data counter 1 is not a volume (or bad BCD)")
    base = out.flags[rows].astype(np.int64) | Flag.CLOCK_MISSING
    out.read(rows[ok], c["total_ml"][ok], out.received[rows[ok]], base[ok])
    hist = ok & c["historic_ok"].astype(bool)
    out.read(
        rows[hist], c["historic_ml"][hist], out.received[rows[hist]], base[hist] | Flag.BILLING_DATE
    )
    out.put("total_ml", rows[ok], c["total_ml"][ok].tolist())
    out.put("target_ml", rows[hist], c["historic_ml"][hist].tolist())


def _plain(f: Field) -> bool:
    """A plain instantaneous volume of tariff 0, subunit 0 (a register candidate)."""
    return (
        f.volume
        and f.function == 0
        and f.tariff == 0
        and f.subunit == 0
        and set(f.qualifiers) <= REGISTER_QUALIFIERS
    )


def _uncorrected(f: Field) -> bool:
    """An uncorrected (meter-side, EN 13757-3 VIFE 3A) volume of tariff 0, subunit 0: the
    register of a gas meter that sends no volume at base conditions."""
    return (
        f.volume
        and f.function == 0
        and f.tariff == 0
        and f.subunit == 0
        and f.qualifiers == ("uncorrected",)
    )


def _pick(layout: Layout) -> tuple[Field | None, Field | None, Field | None, Field | None]:
    """(current register, billing register, meter clock, billing date) fields of a layout."""
    fields = layout.fields
    # the first register candidate in frame order decides the kind: what follows it may
    # be junk, and junk must never displace a sound register
    first = next((f for f in fields if _plain(f) or _uncorrected(f)), None)
    kind = _uncorrected if first is not None and _uncorrected(first) else _plain
    current = next((f for f in fields if kind(f) and f.storage == 0), None)
    billing_storages = [f.storage for f in fields if kind(f) and f.storage > 0]
    billing = None
    if billing_storages:
        s = min(billing_storages)
        billing = next(f for f in fields if kind(f) and f.storage == s)
    dates = [
        f
        for f in fields
        if f.is_date and f.function == 0 and f.tariff == 0 and f.subunit == 0 and not f.qualifiers
    ]
    clock = next(
        (f for f in sorted(dates, key=lambda f: f.kind == Kind.DATE_G) if f.storage == 0), None
    )
    when = None
    if billing is not None:
        when = next((f for f in dates if f.storage == billing.storage), None)
    return current, billing, clock, when


LINK_FIELDS = frozenset({"access_number", "status", "ell_access_number"})


def _register(
    out: _Batch, rows: Ints, a: npt.NDArray[np.uint8], f: Field, *, billing: bool
) -> tuple[Ints, npt.NDArray[np.bool_]]:
    """A volume field as int64 mL and a usable mask.

    A current register with bad digits, a sub-mL scale or an int64 overflow rejects its
    frame; a "no data" marker leaves the frame without a current reading (rejected only
    if it has no other reading: see `_apply`). A bad billing register only loses that
    reading (noted in `target_m3_error` and RECORD_DROPPED); a billing register holding
    "no data" is absent (NO_DATA).
    """
    ml_exp = f.exponent + 6  # volume_m3 exponent -> mL (EN 13757-3 VIF 10..17 = 1e(n-6) m3)
    gone = mbus_kernels.no_data(a, f) | f.record_error  # a record error: no value (see _values)
    bad: list[tuple[npt.NDArray[np.bool_], ErrorCode, str]] = []
    if f.kind not in (Kind.INT, Kind.BCD) or ml_exp < 0:
        why = "a float" if f.kind == Kind.REAL else f"scale 1e{f.exponent} m3 (finer than 1 mL)"
        raw, ok = np.zeros(len(rows), np.int64), np.zeros(len(rows), bool)
        bad.append((~ok, ErrorCode.BAD_UNIT, f"volume register {f.name} is {why}"))
        factor = 1
    else:
        raw, ok = mbus_kernels.read_field(a, f)
        ok &= ~gone
        digits = f"volume register {f.name} has a non-decimal digit"
        bad.append((~ok & ~gone, ErrorCode.BAD_BCD, digits))
        factor = 10**ml_exp * f.multiplier
        fits = np.abs(raw) <= INT64_MAX // factor
        bad.append((~fits & ok, ErrorCode.BAD_UNIT, f"volume register {f.name} overflows int64 mL"))
        ok &= fits
    out.note(rows, FrameFlag.NO_DATA, gone)
    if billing:
        out.drop("target_m3", rows[~ok])
    for mask, code, message in bad:
        if billing:
            out.put("target_m3_error", rows[mask], message)
            out.note(rows, FrameFlag.RECORD_DROPPED, mask)
        else:
            out.fail(rows[mask], code, message)
    return raw * np.int64(factor), ok


def _values(out: _Batch, rows: Ints, a: npt.NDArray[np.uint8], f: Field) -> list[object]:
    """Field `f` of `rows` as Python values (None: absent), noting absent ones."""
    if f.kind == Kind.TEXT:
        return mbus_kernels.ascii_text(a, f)
    if f.kind == Kind.BYTES:
        return mbus_kernels.hex_bytes(a, f)
    if f.kind == Kind.REAL:
        return mbus_kernels.real32(a, f)
    raw, ok = mbus_kernels.read_field(a, f)
    # EN 13757-3 table 17: a record-error VIFE (no data, overflow, underflow, data error,
    # premature end) says the value bytes are not a value: the record is absent
    gone = mbus_kernels.no_data(a, f) | f.record_error
    if f.volume and f.function:  # a max / min / at-error volume below zero is junk
        ok &= raw >= 0  # (itron `7413 FEFEFEFE`, a "volume_m3_max -0.0053" after the data)
    out.note(rows, FrameFlag.NO_DATA, gone)
    out.note(rows, FrameFlag.RECORD_DROPPED, ~ok & ~gone)
    ok &= ~gone
    if f.is_date:
        return mbus_kernels.as_text(raw, ok, f)
    return mbus_kernels.scaled(raw, ok, f)


def _apply(out: _Batch, rows: Ints, a: npt.NDArray[np.uint8], layout: Layout) -> None:
    """Decode all `rows` (frames of one layout, stacked in `a`) into readings and extras."""
    current, billing, clock, when = _pick(layout)
    if layout.stop >= 0:  # the records ended early: the rest is junk or a cut record
        cut = layout.stop_code == ErrorCode.TRUNCATED
        out.note(rows, FrameFlag.CUT_RECORD if cut else FrameFlag.TRAILING_JUNK)
    if current is None and billing is None:
        if layout.stop >= 0:
            out.fail(rows, ErrorCode(layout.stop_code), layout.stop_message)
        out.fail(rows, ErrorCode.NO_REGISTER, "frame carries no volume register record")
    aliases = {
        id(current): "total_m3",
        id(billing): "target_m3",
        id(clock): "meter_datetime",
        id(when): "target_date" if when and when.kind == Kind.DATE_G else "target_datetime",
    }
    columns: dict[str, list[object]] = {}
    flags = out.flags[rows].astype(np.int64)
    for f in layout.fields:
        name = aliases.get(id(f), f.name)
        if name in LINK_FIELDS:  # a data record never overwrites the link layer's field
            name += "_record"
            out.note(rows, FrameFlag.LINK_FIELD_KEPT)
        if f.kind != Kind.NONE:
            columns[name] = _values(out, rows, a, f)
            if f.name.startswith("error_flags") and f.kind in (Kind.INT, Kind.BCD):
                raw, _ = mbus_kernels.read_field(a, f)  # FD 17: manufacturer error bits
                flags |= np.where(raw != 0, int(Flag.METER_ERROR), 0)
        if f.record_error:
            flags |= int(Flag.METER_ERROR)
    for name, values in columns.items():
        out.put(name, rows, values)
    got: list[tuple[Ints, Ints, Ints, npt.NDArray[np.bool_]]] = []
    for reg, date, extra_flag in ((current, clock, Flag.NONE), (billing, when, Flag.BILLING_DATE)):
        if reg is None:
            continue
        ml, ok = _register(out, rows, a, reg, billing=reg is billing)
        at, at_ok = out.received[rows], np.zeros(len(rows), bool)
        if date is not None:
            stamp, at_ok = mbus_kernels.read_field(a, date)
            at = np.where(at_ok, stamp - out.offset(rows), at)
            if reg is billing:  # a billing value is only a reading at its own date
                out.note(rows, FrameFlag.BILLING_UNDATED, ok & ~at_ok)
                ok &= at_ok
        row_flags = flags | int(extra_flag) | np.where(at_ok, 0, int(Flag.CLOCK_MISSING))
        got.append((ml, at, row_flags, ok))
    usable = np.zeros(len(rows), bool)
    for _, _, _, ok in got:
        usable |= ok
    if current is not None or billing is not None:  # e.g. a current "no data", no billing
        out.fail(rows[~usable], ErrorCode.NO_REGISTER, "no volume register holds a value")
    for ml, at, row_flags, ok in got:
        out.read(rows[ok], ml[ok], at[ok], row_flags[ok])
