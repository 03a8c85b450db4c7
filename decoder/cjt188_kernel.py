"""Numpy kernels for CJ/T 188: locate frames in `(N, W)` rows, decode `(N, 13+L)` frames.

`decode_array` groups rows by (start offset, L) so every group is one fixed layout, then
`decode_frames` decodes a group with column operations only: no Python loop over rows
except to build the per-frame `extra` dicts at the very end. Offsets below are from the
0x68 start byte (FORMATS §1.1/§1.2): DATA starts at 11; in a 901F reply DI 11-12, SER 13,
total 14-17, unit 18, settlement 19-22, unit 23, clock 24-30, ST 31-32, CS 33, 16 at 34.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from decoder import kernels as k
from decoder.columns import Decoded, ErrorCode, Flag, concat, empty

if TYPE_CHECKING:
    from decoder.cjt188 import Model

Int64s = k.Int64s
MIN_FRAME = 13
MAX_FRAME = 512
SEARCH_WINDOW = 96  # FE preamble + an ASCII DTU prefix (`CTRL:&2017...` is 22 bytes)
L_901F = 0x16  # 22 data bytes (water/gas)
L_HISTORY = 8  # DI SER BCD(4) unit
DI_901F = 0x901F
KNOWN_DI = np.zeros(1 << 16, bool)
KNOWN_DI[[0x901F, 0x907F, 0x810A, *range(0xD120, 0xD12C), *range(0xA010, 0xA01A)]] = True
KNOWN_DI[[*range(0x8102, 0x8107), *range(0xA101, 0xA108)]] = True
FIELDS_901F = {  # name -> (offset from 0x68, width); the declarative table of §1.2
    "total": (14, 4), "total_unit": (18, 1), "settlement": (19, 4), "settlement_unit": (23, 1),
    "clock": (24, 7), "status": (31, 2),
}  # fmt: skip


def locate(a: k.Frames, t_ok: np.ndarray) -> tuple[Int64s, k.Bools]:
    """Start of the frame (a 0x68 then a known T whose L puts a 0x16 inside the row) per row.

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
    cols = np.arange(window)
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
    """Fast path: every row's first 0x68 sits at the same offset (one preamble length)."""
    width = a.shape[1]
    hits = np.flatnonzero(a[0, :window] == 0x68)
    if not hits.size:
        return None
    s = int(hits[0])
    if not (a[:, s] == 0x68).all() or (s and (a[:, :s] == 0x68).any()):
        return None
    stop = s + 12 + a[:, s + 10].astype(np.int64)
    inside = stop < width
    ok = t_ok[a[:, s + 1]] & inside
    if ok.all() and (stop == stop[0]).all():
        ok &= a[:, int(stop[0])] == 0x16
    else:
        ok &= a[np.arange(len(a)), np.minimum(stop, width - 1)] == 0x16
    if not ok.all():
        return None  # some rows need the general search
    return np.full(len(a), s, np.int64), ok


def decode_array(a: k.Frames, rx: Int64s, model: Model, t_ok: np.ndarray) -> Decoded:
    """Equal-length raw rows (prefix, frame, trailing bytes) -> Decoded, in row order."""
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
            f = a[:, s : s + 13 + length] if len(rows) == n else a[rows, s : s + 13 + length]
            parts.append((rows, decode_frames(f, rx[rows], model)))
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
    out.format[:] = "cjt188"
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


def _clock(f: k.Frames, off: int, order: str) -> tuple[Int64s, np.ndarray]:
    """7-byte BCD clock in either byte order -> (local epoch s, state 0 le/1 be/2..4 none).

    `ss mm hh DD MM YY CC` (standard, ng-gateway) is tried first; `CC YY MM DD hh mm ss`
    (NB-IoT field devices) only for rows where that fails. Century 19..21 is required.
    """
    v = k.BCD_LUT[f[:, off : off + 7]]
    ok_digits = (v >= 0).all(axis=1)
    epoch = np.zeros(len(f), np.int64)
    state = np.full(len(f), 4, np.int64)
    if order != "be":
        le, le_ok = k.civil_to_epoch(v[:, 6] * 100 + v[:, 5], *v[:, 4::-1].T)
        le_ok &= ok_digits & (v[:, 6] >= 19) & (v[:, 6] <= 21)
        epoch[le_ok], state[le_ok] = le[le_ok], 0
    if order != "le" and (rest := np.flatnonzero(state == 4)).size:
        w = v[rest]
        be, be_ok = k.civil_to_epoch(w[:, 0] * 100 + w[:, 1], *w[:, 2:7].T)
        be_ok &= ok_digits[rest] & (w[:, 0] >= 19) & (w[:, 0] <= 21)
        epoch[rest[be_ok]], state[rest[be_ok]] = be[be_ok], 1
    if (rest := np.flatnonzero(state == 4)).size:
        state[rest[k.all_equal(f[rest], off, 7, 0)]] = 2
        state[rest[k.all_equal(f[rest], off, 7, 0xFF)]] = 3
    return epoch, state


def read_901f(f: k.Frames, rx: Int64s, model: Model) -> Columns:
    """The hot kernel: `(N, 35)` 901F replies -> codes, mL registers, times, flags."""
    n = len(f)
    code = np.zeros(n, np.uint16)
    total, total_bad = k.bcd_le(f, 14, 4)
    table = model.ml_per_count()
    ml = table[f[:, 18]]
    settlement, s_bad = k.bcd_le(f, 19, 4)
    s_ff = k.all_equal(f, 19, 4, 0xFF)
    for mask, c in (
        (total_bad, ErrorCode.BAD_BCD),
        (ml == 0, ErrorCode.BAD_UNIT),
        (s_bad & ~s_ff, ErrorCode.BAD_BCD),
        (~s_ff & (table[f[:, 23]] == 0), ErrorCode.BAD_UNIT),
    ):
        code[mask & (code == 0)] = c
    local, state = _clock(f, 24, model.clock_order)
    flag_table, valve_table = model.status_map.tables()
    st = f[:, 31 + model.status_map.byte]
    missing = state >= 2
    flags = flag_table[st] | np.where(missing, np.uint32(Flag.CLOCK_MISSING), np.uint32(0))
    read_at = np.where(missing, rx, local - model.clock_utc_offset_s)
    return Columns(
        code, code == 0, total * ml, read_at, flags, total, settlement, ~s_ff, state,
        valve_table[st],
    )  # fmt: skip


_DI_MSG = "read-data reply with a DI this decoder does not know (only 901F and D120..D12B)"


def decode_frames(f: k.Frames, rx: Int64s, model: Model) -> Decoded:
    """`(N, 13+L)` located frames of one L -> Decoded (header for all, reading for 901F)."""
    n, width = f.shape
    length = width - 13
    out = _blank(n)
    code, msg = out.error_code, out.error_message

    def fail(mask: k.Bools, c: ErrorCode, text: str) -> None:
        sel = mask & (code == 0)
        code[sel], msg[sel] = c, text

    span = (0, 11 + length) if model.checksum == "frame" else (11, 11 + length)
    fail(k.sum8(f, *span) != f[:, 11 + length], ErrorCode.BAD_CHECKSUM, _cs_msg(model))
    t, c = f[:, 1].astype(np.int64), f[:, 9].astype(np.int64)
    fail((c & 0x80) == 0, ErrorCode.NO_REGISTER, "master->meter request: carries no register")
    fail((c & 0x40) != 0, ErrorCode.NO_REGISTER, "meter abnormal reply (C bit D6): no register")
    fail((c & 0x1F) == 3, ErrorCode.NO_REGISTER, "read-address reply: carries no register")
    fail((c & 0x1F) != 1, ErrorCode.NO_REGISTER, "not a read-data reply (C function != 01)")
    di = np.zeros(n, np.int64)
    if length >= 2:
        be = f[:, 11].astype(np.int64) << 8 | f[:, 12]
        le = f[:, 12].astype(np.int64) << 8 | f[:, 11]
        di = np.where(KNOWN_DI[be] | ~KNOWN_DI[le], be, le)  # 0x1F90 is not a valid DI
    water_gas = np.isin(t >> 4, (1, 3))
    if length == L_901F:
        fail((di == DI_901F) & (t >> 4 == 2), ErrorCode.UNSUPPORTED, "heat meter 901F: not decoded")
        fail((di == DI_901F) & ~water_gas, ErrorCode.UNSUPPORTED, "custom/wildcard meter type")
        fail(di != DI_901F, ErrorCode.UNSUPPORTED, _DI_MSG)
    elif length == L_HISTORY:
        fail((di < 0xD120) | (di > 0xD12B), ErrorCode.UNSUPPORTED, _DI_MSG)
    else:
        bad_len = (di == DI_901F) | ((di >= 0xD120) & (di <= 0xD12B))
        fail(bad_len, ErrorCode.BAD_LENGTH, f"L={length} does not fit the DI's layout")
        fail(np.ones(n, bool), ErrorCode.UNSUPPORTED, _DI_MSG)
    meter = k.hex_digits(f, 2, 7, reverse=True)
    out.meter_of_frame[:] = meter
    extras = _header_extras(t, c, di, f[:, 13] if length >= 3 else np.zeros(n, np.uint8))
    if length == L_901F:
        cols = read_901f(f, rx, model)
        fail(cols.code == ErrorCode.BAD_BCD, ErrorCode.BAD_BCD, _BCD_MSG)
        fail(cols.code == ErrorCode.BAD_UNIT, ErrorCode.BAD_UNIT, _UNIT_MSG)
        return _with_readings(out, cols, f, meter, extras, model)
    if length == L_HISTORY:
        value, bad = k.bcd_le(f, 14, 4)
        unit_ok = model.ml_per_count()[f[:, 18]] > 0
        fail(bad, ErrorCode.BAD_BCD, "history total is not BCD")
        fail(~unit_ok, ErrorCode.BAD_UNIT, "history unit code is not a volume")
        for i in np.flatnonzero(code == 0).tolist():
            extras[i]["settlement_m3"] = model.m3(int(value[i]), int(f[i, 18]))
            extras[i]["history_months_back"] = int(di[i]) - 0xD11F
    out.extra[:] = extras
    return out


_BCD_MSG = "total or settlement register is not packed BCD (and not FF fill)"
_UNIT_MSG = "unit code is not a volume (L/m3 x1/x10/x100) exact in mL for this model"


def _cs_msg(model: Model) -> str:
    if model.checksum == "frame":
        return "checksum mismatch (CJ/T 188: sum of bytes from 0x68 to last data byte, mod 256)"
    return f"checksum mismatch (model {model.name}: sum of the DATA bytes only, mod 256)"


HEX2 = np.array([f"{i:02X}" for i in range(256)], object)  # byte -> "2C" without f-strings
_HEX4: list[np.ndarray] = []


def _hex4(words: Int64s) -> list[str]:
    """16-bit values -> 4-digit uppercase hex strings via a lazily built 65536-entry table."""
    if not _HEX4:
        _HEX4.append(np.array([f"{i:04X}" for i in range(1 << 16)], object))
    return _HEX4[0][words].tolist()


def _header_extras(t: Int64s, c: Int64s, di: Int64s, ser: np.ndarray) -> list[dict[str, object]]:
    cols = (HEX2[t].tolist(), HEX2[c].tolist(), _hex4(di), ser.tolist())
    return [
        {"meter_type": ti, "control": ci, "di": d, "ser": s}
        for ti, ci, d, s in zip(*cols, strict=True)
    ]


VALVE_STATES = ("open", "closed", "abnormal")
_CLOCK = ("meter (ss..CC)", "meter (CC..ss)", "none (all zero)", "unsupported (FF)", "invalid")


def _with_readings(
    out: Decoded, cols: Columns, f: k.Frames, meter: np.ndarray, extras: list, model: Model
) -> Decoded:
    ok = out.error_code == 0
    rows = np.flatnonzero(ok)
    g = f[rows]
    units, s_units = g[:, 18].tolist(), g[:, 23].tolist()
    m3 = model.m3
    st = (g[:, 31].astype(np.int64) << 8) | g[:, 32]
    medium = np.where(g[:, 1] >> 4 == 3, "gas", "water").tolist()
    valve = np.array(VALVE_STATES, object)[cols.valve[rows]].tolist()
    clock = np.array(_CLOCK, object)[cols.clock_state[rows]].tolist()
    full = zip(
        rows.tolist(), medium, cols.total[rows].tolist(), units, cols.settlement[rows].tolist(),
        s_units, cols.settlement_ok[rows].tolist(), _hex4(st), valve, clock, strict=True,
    )  # fmt: skip
    for i, med, total, unit, settle, s_unit, s_ok, sth, vs, ck in full:
        e = extras[i]
        e["medium"] = med
        e["total_m3"] = m3(total, unit)
        if s_ok:
            e["settlement_m3"] = m3(settle, s_unit)
        e["status_hex"] = sth
        e["valve"] = vs
        e["clock"] = ck
    out.extra[:] = extras
    return Decoded(
        frame_index=rows.astype(np.int32),
        meter_id=meter[rows],
        read_at_s=cols.read_at_s[rows],
        register_ml=cols.register_ml[rows],
        flags=cols.flags[rows],
        format=out.format,
        meter_of_frame=out.meter_of_frame,
        error_code=out.error_code,
        error_message=out.error_message,
        extra=out.extra,
    )
