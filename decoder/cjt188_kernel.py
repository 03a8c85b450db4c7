"""Numpy kernels for CJ/T 188: locate frames in `(N, W)` rows, decode `(N, 13+L)` frames.

`decode_array` groups rows by (start offset, L) so every group is one fixed layout, then
`decode_frames` decodes a group with column operations only: no Python loop over rows,
not even for the extra fields (they are `Column`s: raw integers, a per-frame decimal
scale from the unit code, label indices; dicts are built only by `Decoded.extra_of`).
Meter clocks are local time; `utc_offset_s` (int or per-row array) converts them to UTC.
Offsets below are from the 0x68 start byte (FORMATS §1.1/§1.2): DATA starts at 11; in a
901F reply DI 11-12, SER 13, total 14-17, unit 18, settlement 19-22, unit 23, clock 24-30,
ST 31-32, CS 33, 16 at 34.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from decoder import kernels as k
from decoder.columns import Column, Decoded, ErrorCode, Flag, FrameFlag, concat, empty

if TYPE_CHECKING:
    from decoder.cjt188 import Model

Int64s = k.Int64s
Offset = int | Int64s  # meter clock UTC offset in s: one for all rows, or one per row
MIN_FRAME = 13
MAX_FRAME = 512
SEARCH_WINDOW = 96  # FE preamble + an ASCII DTU prefix (`CTRL:&2017...` is 22 bytes)
# What may come before the 0x68 (FORMATS §1.4): the FE wake-up preamble, a DTU's ASCII
# prefix (printable, tab, CR, LF) and a buffer's zero padding (python_cjt188's
# find_frame_in_buff fixture). A 0x68 after any other byte is inside something else:
# an `nbm1` batch whose deltas happened to read 68 <type> ... 16 was taken for a CJ/T
# 188 frame with a bad checksum, and quarantined instead of decoded (bench/cityday.py,
# 1 uplink in 200,000).
PREFIX_OK = np.zeros(256, bool)
PREFIX_OK[[0x00, 0xFE, 0x09, 0x0A, 0x0D, *range(0x20, 0x7F)]] = True
L_901F = 0x16  # 22 data bytes (water/gas)
L_HISTORY = 8  # DI SER BCD(4) unit
L_HEAT_901F = 0x2E  # heat meter 901F: 5 values + unit, 2 temperatures, hours, clock, ST
DI_901F = 0x901F
KNOWN_DI = np.zeros(1 << 16, bool)
KNOWN_DI[[0x901F, 0x907F, 0x810A, *range(0xD120, 0xD12C), *range(0xA010, 0xA01A)]] = True
KNOWN_DI[[*range(0x8102, 0x8107), *range(0xA101, 0xA108)]] = True


def locate(a: k.Frames, t_ok: np.ndarray) -> tuple[Int64s, k.Bools]:
    """Start of the frame (a 0x68 then a known T whose L puts a 0x16 inside the row, after
    nothing but FE and ASCII: `PREFIX_OK`) per row.

    The first 0x68 is tried for all rows at once; only rows where it fails (a 0x68 inside
    an ASCII prefix or address) are searched again from the next position.
    """
    n, width = a.shape
    start = np.full(n, -1, np.int64)
    if width < MIN_FRAME:
        return start, np.zeros(n, bool)
    window = min(width - MIN_FRAME + 1, SEARCH_WINDOW)
    if n and (fast := _uniform_start(a, t_ok, window)) is not None:
        return fast
    is68 = a[:, :window] == 0x68
    # a 0x68 counts only before the first byte no prefix has
    foreign = ~PREFIX_OK[a[:, :window]]
    last = np.where(foreign.any(axis=1), foreign.argmax(axis=1), window)
    cols = np.arange(window)
    is68 &= cols < last[:, None]
    pending = np.arange(n)
    first = np.zeros(n, np.int64)
    while len(pending):
        cand = is68[pending] & (cols >= first[pending, None])
        has = cand.any(axis=1)
        pending, s = pending[has], cand.argmax(axis=1)[has]
        stop = s + 12 + a[pending, s + 10].astype(np.int64)
        ok = t_ok[a[pending, s + 1]] & (stop < width)
        ok &= a[pending, np.minimum(stop, width - 1)] == 0x16
        start[pending[ok]] = s[ok]
        first[pending[~ok]] = s[~ok] + 1
        pending = pending[~ok]
    return start, start >= 0


def _uniform_start(a: k.Frames, t_ok: np.ndarray, window: int) -> tuple[Int64s, k.Bools] | None:
    """Fast path: every row's first 0x68 sits at the same offset (one preamble length) and
    every row has the same L (one layout): a handful of column compares, no search."""
    width = a.shape[1]
    hits = np.flatnonzero(a[0, :window] == 0x68)
    if not hits.size:
        return None
    s = int(hits[0])
    stop = s + 12 + int(a[0, s + 10])
    if stop >= width or not (a[:, s] == 0x68).all() or not (a[:, s + 10] == a[0, s + 10]).all():
        return None  # some rows need the general search
    if not t_ok[a[:, s + 1]].all() or not (a[:, stop] == 0x16).all():
        return None
    if s and ((a[:, :s] == 0x68).any() or not PREFIX_OK[a[:, :s]].all()):
        return None
    return np.full(len(a), s, np.int64), np.ones(len(a), bool)


def decode_array(
    a: k.Frames, rx: Int64s, model: Model, t_ok: np.ndarray, utc_offset_s: Offset | None = None
) -> Decoded:
    """Equal-length raw rows (prefix, frame, trailing bytes) -> Decoded, in row order.

    `utc_offset_s` (default: the model's, China Standard Time) is added to UTC to get the
    meter's clock, per call or per row."""
    offset = model.clock_utc_offset_s if utc_offset_s is None else utc_offset_s
    n = len(a)
    start, found = locate(a, t_ok)
    parts: list[tuple[Int64s, Decoded]] = []
    if (lost := np.flatnonzero(~found)).size:
        parts.append((lost, _not_found(a[lost])))
    if (good := np.flatnonzero(found)).size:
        key = start[good] * 256 + a[good, start[good] + 10]
        for u in np.unique(key) if (key != key[0]).any() else key[:1]:
            rows = good if len(parts) == 0 and (key == u).all() else good[key == u]
            s, length = divmod(int(u), 256)
            every = len(rows) == n
            f = a[:, s : s + 13 + length] if every else a[rows, s : s + 13 + length]
            off = offset if isinstance(offset, int) or every else offset[rows]
            parts.append((rows, decode_frames(f, rx if every else rx[rows], model, off)))
    if len(parts) == 1 and len(parts[0][0]) == n:
        return parts[0][1]
    return concat(parts, n)


def _not_found(a: k.Frames) -> Decoded:
    """Why rows without a locatable frame fail: too short/long, no 0x68, truncated, no 0x16."""
    n, width = a.shape
    out = _blank(n)
    if width < MIN_FRAME:
        out.error_code[:], out.error_message[:] = ErrorCode.TRUNCATED, "shorter than 13 bytes"
        return out
    if width > MAX_FRAME:
        out.error_code[:], out.error_message[:] = ErrorCode.TOO_LARGE, "longer than 512 bytes"
        return out
    window = min(width - MIN_FRAME + 1, SEARCH_WINDOW)
    is68 = a[:, :window] == 0x68
    s = is68.argmax(axis=1)
    stop = s + 12 + a[np.arange(n), s + 10].astype(np.int64)
    truncated = is68.any(axis=1) & (stop >= width)
    out.error_code[:] = np.where(truncated, ErrorCode.TRUNCATED, ErrorCode.BAD_START_STOP)
    out.error_message[:] = np.where(
        truncated,
        "CJ/T 188 frame shorter than its L field says",
        "no CJ/T 188 frame: no 0x68 + known meter type + 0x16 stop where L says",
    )
    return out


def _blank(n: int) -> Decoded:
    out = empty(n)
    out.format.fill("cjt188")
    return out


class Columns(NamedTuple):
    """What the 901F kernel computes per row (all numpy; the benchmark's unit of work)."""

    code: np.ndarray  # uint16 ErrorCode
    reading: k.Bools  # row yields one reading
    register_ml: Int64s
    read_at_s: Int64s
    flags: np.ndarray  # uint32
    total: Int64s  # raw BCD counts
    settlement: Int64s
    settlement_ok: k.Bools
    clock_state: np.ndarray  # 0 le, 1 be, 2 all-zero, 3 FF, 4 invalid
    valve: np.ndarray
    settlement_dropped: k.Bools  # a settlement total that is not one (bad digits or unit)


# A BE clock reads as a valid LE one when its seconds byte is a century (19..21) and its
# hour a month: 2024-05-28 10:30:20 sent `20 24 05 28 10 30 20` is LE 2030-10-28 05:24:20.
# Only rows whose first clock byte is a century can be read both ways.
_CENTURY_FIRST = np.zeros(256, bool)
_CENTURY_FIRST[[0x19, 0x20, 0x21]] = True


def _clock(f: k.Frames, off: int, order: str, near: Int64s) -> tuple[Int64s, np.ndarray]:
    """7-byte BCD clock in either byte order -> (local epoch s, state 0 le/1 be/2..4 none).

    `ss mm hh DD MM YY CC` (standard, ng-gateway) is tried first; `CC YY MM DD hh mm ss`
    (NB-IoT field devices) for rows where that fails, and (order "auto") for rows that
    read validly both ways: there the reading nearer `near` (the receive time on the
    meter's local clock) wins. Century 19..21 is required.
    """
    n = len(f)
    epoch = np.zeros(n, np.int64)
    state = np.full(n, 4, np.int8)
    both = _CENTURY_FIRST[f[:, off]] if order == "auto" else np.zeros(n, bool)
    if order != "be":
        le, le_ok = k.bcd_clock(f[:, off : off + 7], big_endian=False)
        if le_ok.all() and not both.any():
            return le, np.zeros(n, np.int8)
        epoch[le_ok], state[le_ok] = le[le_ok], 0
    if order != "le" and (rest := np.flatnonzero((state == 4) | both)).size:
        be, be_ok = k.bcd_clock(f[rest, off : off + 7], big_endian=True)
        nearer = np.abs(be - near[rest]) < np.abs(epoch[rest] - near[rest])
        take = be_ok & ((state[rest] == 4) | nearer)
        epoch[rest[take]], state[rest[take]] = be[take], 1
    if (rest := np.flatnonzero(state == 4)).size:
        state[rest[k.all_equal(f[rest], off, 7, 0)]] = 2
        state[rest[k.all_equal(f[rest], off, 7, 0xFF)]] = 3
    return epoch, state


def read_901f(f: k.Frames, rx: Int64s, model: Model, utc_offset_s: Offset | None = None) -> Columns:
    """The hot kernel: `(N, 35)` 901F replies -> codes, mL registers, times, flags."""
    n = len(f)
    code = np.zeros(n, np.uint16)
    total, total_bad = k.bcd_le(f, 14, 4)
    table = model.ml_per_count()
    ml = table[f[:, 18]]
    settlement, s_bad = k.bcd_le(f, 19, 4)
    s_ff = k.all_equal(f, 19, 4, 0xFF)
    # the settlement total is secondary: bad digits or a unit that is no volume (meters
    # that keep no settlement send 00 or AA fill) drop it, never the current register
    s_kept = ~s_ff & ~s_bad & (table[f[:, 23]] != 0)
    checks = (
        (total_bad, ErrorCode.BAD_BCD),
        (ml == 0, ErrorCode.BAD_UNIT),
    )
    if any(mask.any() for mask, _ in checks):
        for mask, c in checks:
            code[mask & (code == 0)] = c
    offset = model.clock_utc_offset_s if utc_offset_s is None else utc_offset_s
    local, state = _clock(f, 24, model.clock_order, rx + offset)
    flag_table, valve_table = model.status_map.tables()
    st = f[:, 31 + model.status_map.byte]
    flags = flag_table[st]
    read_at = local - offset
    if (missing := state >= 2).any():
        flags = flags | np.where(missing, np.uint32(Flag.CLOCK_MISSING), np.uint32(0))
        read_at = np.where(missing, rx, read_at)
    return Columns(
        code, code == 0, total * ml, read_at, flags, total, settlement, s_kept, state,
        valve_table[st], ~s_ff & ~s_kept,
    )  # fmt: skip


_WILDCARD_MSG = "reply with a wildcard (AA) address byte: the reading names no meter"
_DI_MSG = "read-data reply with a DI this decoder does not know (only 901F and D120..D12B)"


def decode_frames(
    f: k.Frames, rx: Int64s, model: Model, utc_offset_s: Offset | None = None
) -> Decoded:
    """`(N, 13+L)` located frames of one L -> Decoded (header for all, reading for 901F)."""
    n, width = f.shape
    length = width - 13
    code = np.zeros(n, np.uint16)
    msg = k.text_column(n, "")
    checks: list[tuple[k.Bools, ErrorCode, str]] = []

    def fail(mask: k.Bools, c: ErrorCode, text: str) -> None:
        checks.append((mask, c, text))

    span = (0, 11 + length) if model.checksum == "frame" else (11, 11 + length)
    fail(k.sum8(f, *span) != f[:, 11 + length], ErrorCode.BAD_CHECKSUM, _cs_msg(model))
    t, c = f[:, 1], f[:, 9]
    fail((c & 0x80) == 0, ErrorCode.NO_REGISTER, "master->meter request: carries no register")
    fail((c & 0x40) != 0, ErrorCode.NO_REGISTER, "meter abnormal reply (C bit D6): no register")
    fail((c & 0x1F) == 3, ErrorCode.NO_REGISTER, "read-address reply: carries no register")
    fail((c & 0x1F) != 1, ErrorCode.NO_REGISTER, "not a read-data reply (C function != 01)")
    # AA is the wildcard address byte (FORMATS §1.1): a reply carrying one names no meter
    fail((f[:, 2:9] == 0xAA).any(axis=1), ErrorCode.UNSUPPORTED, _WILDCARD_MSG)
    di = np.zeros(n, np.uint16)
    if length >= 2:  # the DI as sent (big-endian), unless only the byte-swapped one is known
        be = f[:, 11:13].view(">u2")[:, 0].astype(np.uint16)
        known = KNOWN_DI[be]
        di = be
        if not known.all():
            le = f[:, 11:13].view("<u2")[:, 0].astype(np.uint16)
            di = np.where(known | ~KNOWN_DI[le], be, le)  # 0x1F90 is not a valid DI
    family = t >> 4
    if length == L_901F:
        is_901f = di == DI_901F
        fail(is_901f & (family == 2), ErrorCode.UNSUPPORTED, "heat meter 901F: not decoded")
        other = is_901f & (family != 1) & (family != 3)
        fail(other, ErrorCode.UNSUPPORTED, "custom/wildcard meter type")
        fail(~is_901f, ErrorCode.UNSUPPORTED, _DI_MSG)
        cols = read_901f(f, rx, model, utc_offset_s)
        fail(cols.code == ErrorCode.BAD_BCD, ErrorCode.BAD_BCD, _BCD_MSG)
        fail(cols.code == ErrorCode.BAD_UNIT, ErrorCode.BAD_UNIT, _UNIT_MSG)
    elif length == L_HISTORY:
        fail((di < 0xD120) | (di > 0xD12B), ErrorCode.UNSUPPORTED, _DI_MSG)
        value, bad = k.bcd_le(f, 14, 4)
        fail(bad, ErrorCode.BAD_BCD, "history total is not BCD")
        no_volume = model.ml_per_count()[f[:, 18]] == 0
        fail(no_volume, ErrorCode.BAD_UNIT, "history unit code is not a volume")
    else:
        heat = (di == DI_901F) & (family == 2) & (length == L_HEAT_901F)
        fail(heat, ErrorCode.UNSUPPORTED, "heat meter 901F: not decoded")
        bad_len = (di == DI_901F) | ((di >= 0xD120) & (di <= 0xD12B))
        fail(bad_len, ErrorCode.BAD_LENGTH, f"L={length} does not fit the DI's layout")
        fail(np.ones(n, bool), ErrorCode.UNSUPPORTED, _DI_MSG)
    if any(mask.any() for mask, _, _ in checks):  # else every row is OK: nothing to set
        for mask, c_, text in checks:
            sel = mask & (code == 0)
            code[sel], msg[sel] = c_, text
    meter = k.hex_digits(f, 2, 7, reverse=True)
    fields = {
        "meter_type": Column(t.copy(), render="hex2"),
        "control": Column(c.copy(), render="hex2"),
        "di": Column(di, render="hex4"),
        "ser": Column(f[:, 13].copy() if length >= 3 else np.zeros(n, np.uint8)),
    }
    out = Decoded(
        frame_index=np.zeros(0, np.int32),
        address=meter[:0],
        read_at_s=np.zeros(0, np.int64),
        register_ml=np.zeros(0, np.int64),
        flags=np.zeros(0, np.uint32),
        format=k.text_column(n, "cjt188"),
        address_of_frame=meter,
        error_code=code,
        error_message=msg,
        fields=fields,
    )
    if length == L_901F:
        return _with_readings(out, cols, f, meter, model)
    if length == L_HISTORY:
        ok = code == 0
        m3, scale = _m3_column(value, f[:, 18], model, ok)
        fields["settlement_m3"] = Column(m3, _mask(ok), "decimal", scale)
        fields["history_months_back"] = Column(di.astype(np.int64) - 0xD11F, _mask(ok))
    return out


def _mask(ok: k.Bools) -> k.Bools | None:
    """A presence mask, or None when every row has the field."""
    return None if ok.all() else ok


def _m3_column(
    count: Int64s, unit: np.ndarray, model: Model, ok: k.Bools
) -> tuple[Int64s, int | np.ndarray]:
    """BCD counts + unit codes -> (exact integer, decimal scale: one, or per row) of m3.

    `Model.m3` in columns: Decimal(count * multiplier).scaleb(-scale), the scale being the
    model's decimals (+3 for litre units), so the meter's own precision is kept.
    """
    mult, scale = model.unit_tables()
    if len(unit) and (unit == unit[0]).all():  # one unit code for the batch (usual)
        return count * int(mult[unit[0]]), int(scale[unit[0]])
    return count * mult[unit], scale[unit] if ok.all() else np.where(ok, scale[unit], 0)


_BCD_MSG = "total register is not packed BCD"
_UNIT_MSG = (
    "unit code is not a volume this meter model reads exactly: m3 x1/x10/x100, or L"
    " x1/x10/x100 only with a model that says its decimals (vendors read the BCD as"
    " XXXXXX.XX or as whole litres: decode with cjt188:standard-litres or cjt188:bcd-integer)"
)


def _cs_msg(model: Model) -> str:
    if model.checksum == "frame":
        return "checksum mismatch (CJ/T 188: sum of bytes from 0x68 to last data byte, mod 256)"
    return f"checksum mismatch (model {model.name}: sum of the DATA bytes only, mod 256)"


VALVE_STATES = ("open", "closed", "abnormal")
_CLOCK = ("meter (ss..CC)", "meter (CC..ss)", "none (all zero)", "unsupported (FF)", "invalid")
_MEDIUM = tuple("gas" if t >> 4 == 3 else "water" for t in range(256))  # by meter type T


def _with_readings(
    out: Decoded, cols: Columns, f: k.Frames, meter: np.ndarray, model: Model
) -> Decoded:
    """Add the 901F fields (present for OK rows) and one reading per OK row."""
    ok = out.error_code == 0
    every = bool(ok.all())
    present = None if every else ok
    st = f[:, 31:33].view(">u2")[:, 0].copy()  # ST0 ST1 as sent, printed "2184"
    total, total_scale = _m3_column(cols.total, f[:, 18], model, ok)
    settle, settle_scale = _m3_column(cols.settlement, f[:, 23], model, ok & cols.settlement_ok)
    out.fields.update(
        medium=Column(out.fields["meter_type"].values, present, "label", labels=_MEDIUM),
        total_m3=Column(total, present, "decimal", total_scale),
        settlement_m3=Column(settle, _mask(ok & cols.settlement_ok), "decimal", settle_scale),
        status_hex=Column(st, present, "hex4"),
        valve=Column(cols.valve, present, "label", labels=VALVE_STATES),
        clock=Column(cols.clock_state, present, "label", labels=_CLOCK),
    )
    if every:
        rows = np.arange(len(ok), dtype=np.int32)
        address, read_at, reg, flags = meter, cols.read_at_s, cols.register_ml, cols.flags
    else:
        rows = np.flatnonzero(ok).astype(np.int32)
        address, read_at = meter[rows], cols.read_at_s[rows]
        reg, flags = cols.register_ml[rows], cols.flags[rows]
    dropped = ok & cols.settlement_dropped
    notes = np.where(dropped, np.uint32(FrameFlag.RECORD_DROPPED), np.uint32(0))
    return Decoded(
        frame_index=rows,
        address=address,
        read_at_s=read_at,
        register_ml=reg,
        flags=flags,
        format=out.format,
        address_of_frame=out.address_of_frame,
        error_code=out.error_code,
        error_message=out.error_message,
        fields=out.fields,
        frame_flags=notes if dropped.any() else None,
    )
