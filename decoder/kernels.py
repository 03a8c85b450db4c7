"""Shared numpy kernels over `(N, L)` uint8 frame arrays: BCD, sums, CRCs, clocks, stacking.

Every kernel works on all rows at once and returns columns plus boolean "bad" masks; none
raises for a bad row and none loops over rows in Python (a loop over columns or fields is
fine, STYLE §3).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Frames = npt.NDArray[np.uint8]
Int64s = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

# byte -> its two hex digits as two UTF-32 code units in one uint64 (first digit in the low,
# i.e. first, 4 bytes on a little-endian machine): a `(N, W)` gather viewed as `U{2W}`.
_DIGITS = np.frombuffer(b"0123456789ABCDEF", np.uint8).astype(np.uint64)
_HEX_UTF32 = (
    _DIGITS[np.arange(256) >> 4] | (_DIGITS[np.arange(256) & 15] << np.uint64(32))
    if np.little_endian
    else (_DIGITS[np.arange(256) >> 4] << np.uint64(32)) | _DIGITS[np.arange(256) & 15]
)


def as_received(received_at_s: npt.ArrayLike, n: int) -> Int64s:
    """Broadcast a receive time (scalar or per-frame array) to an int64 column of length n."""
    rx = np.asarray(received_at_s, dtype=np.int64)
    return np.full(n, rx, np.int64) if rx.ndim == 0 else rx.astype(np.int64, copy=True)


def stack(frames: Sequence[bytes], width: int | None = None) -> Frames:
    """N frames of one length -> an `(N, L)` uint8 array (one C loop, no per-row copy loop).

    With `width` (the caller has checked every frame is that long) `bytes` frames are
    packed by `np.array(frames, "S<width>")`, twice as fast as `b"".join`; any other
    bytes-like falls back to the join.
    """
    if not frames:
        return np.zeros((0, 0), np.uint8)
    n = len(frames)
    if width:
        try:
            rows = np.array(frames, dtype=f"S{width}")
        except (ValueError, TypeError):  # bytearray/memoryview rows: numpy sees sequences
            rows = None
        if rows is not None and rows.shape == (n,):
            return rows.view(np.uint8).reshape(n, width)
    width = len(frames[0])
    return np.frombuffer(b"".join(frames), np.uint8).reshape(n, width)


def lengths_of(frames: Sequence[bytes]) -> Int64s:
    """Byte length of every frame (the one per-frame step no numpy call can avoid)."""
    return np.fromiter(map(len, frames), np.int64, len(frames))


def group_by_length(
    frames: Sequence[bytes], lengths: Int64s | None = None
) -> list[tuple[Int64s, Frames]]:
    """Split frames into (input indices, stacked array) per distinct length, in length order.

    One `b"".join` for the whole batch; each length's rows are then gathered from the
    joined buffer with one fancy index (no per-frame slicing or re-joining).
    """
    n = len(frames)
    if not n:
        return []
    if lengths is None:
        lengths = lengths_of(frames)
    if (lengths == lengths[0]).all():
        return [(np.arange(n, dtype=np.int64), stack(frames, int(lengths[0])))]
    buf = np.frombuffer(b"".join(frames), np.uint8)
    starts = np.zeros(n, np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    order = np.argsort(lengths, kind="stable")
    widths, first = np.unique(lengths[order], return_index=True)
    groups = []
    for width, idx in zip(widths.tolist(), np.split(order, first[1:]), strict=True):
        groups.append((idx, buf[starts[idx, None] + np.arange(width)]))
    return groups


def text_column(n: int, value: str) -> npt.NDArray[np.object_]:
    """An object column of n references to `value` (`np.full(n, s, object)` is 20x slower)."""
    out = np.empty(n, object)
    out.fill(value)
    return out


def u_le(a: Frames, offset: int, width: int) -> Int64s:
    """Unsigned little-endian integer of `width` bytes at `offset`, per row."""
    out = np.zeros(len(a), np.int64)
    for k in range(width):
        out |= a[:, offset + k].astype(np.int64) << (8 * k)
    return out


# byte -> its two BCD digits as 0..99, or -1 when a nibble is > 9 (one table lookup per byte)
BCD_LUT = np.array(
    [(b >> 4) * 10 + (b & 15) if b >> 4 < 10 and b & 15 < 10 else -1 for b in range(256)], np.int64
)


# byte -> its BCD value 0..99, or 0xFF when a nibble is > 9: a bad byte then fails every
# range check (second < 60, month <= 12...) without a separate digit test.
BCD_U8 = np.where(BCD_LUT >= 0, BCD_LUT, 0xFF).astype(np.uint8)


def bcd_le(a: Frames, offset: int, width: int) -> tuple[Int64s, Bools]:
    """Packed BCD, lowest two digits first -> (value, bad) where bad marks a nibble > 9."""
    if width == 4 and a.strides[-1] == 1:
        return _bcd4(a[:, offset : offset + 4].view("<u2"))
    value = np.zeros(len(a), np.int64)
    bad = np.zeros(len(a), bool)
    for i in range(width):
        digits = BCD_LUT[a[:, offset + i]]
        value += digits * 100**i
        bad |= digits < 0
    return value, bad


# 2 packed-BCD bytes, lowest digits first, read as one little-endian uint16 -> 0..9999, or
# -1 when a nibble is > 9 (a 256 KiB table: one gather per byte pair)
_BCD16 = np.where(
    (BCD_LUT[np.arange(1 << 16) & 0xFF] >= 0) & (BCD_LUT[np.arange(1 << 16) >> 8] >= 0),
    BCD_LUT[np.arange(1 << 16) & 0xFF] + 100 * BCD_LUT[np.arange(1 << 16) >> 8],
    -1,
).astype(np.int32)


def _bcd4(pairs: npt.NDArray[np.uint16]) -> tuple[Int64s, Bools]:
    """`(N, 2)` uint16 words of 4 packed-BCD bytes -> (value, bad): two `_BCD16` gathers."""
    lo, hi = _BCD16[pairs[:, 0]], _BCD16[pairs[:, 1]]
    return lo + hi.astype(np.int64) * 10_000, (lo | hi) < 0


def all_equal(a: Frames, offset: int, width: int, value: int) -> Bools:
    """Rows whose `width` bytes at `offset` all equal `value` (e.g. FF fill, all-zero clock)."""
    if width in (2, 4, 8) and a.strides[-1] == 1:  # one word compare instead of a row reduce
        word: Bools = a[:, offset : offset + width].view(f"<u{width}")[:, 0] == int.from_bytes(
            bytes([value]) * width, "little"
        )
        return word
    rows: Bools = np.all(a[:, offset : offset + width] == value, axis=1)
    return rows


def sum8(a: Frames, start: int, stop: int) -> npt.NDArray[np.uint8]:
    """Low byte of the sum of bytes [start, stop) per row (CJ/T 188 CS, M-Bus CS)."""
    # a uint8 accumulator wraps mod 256; einsum's row sums are 3x faster than .sum(axis=1)
    low: npt.NDArray[np.uint8] = np.einsum("ij->i", a[:, start:stop], dtype=np.uint8)
    return low


def hex_digits(a: Frames, offset: int, width: int, *, reverse: bool) -> npt.NDArray[np.str_]:
    """Bytes as uppercase hex strings per row, a numpy `U{2*width}` array (BCD addresses
    print as their digits). One table gather builds the UTF-32 code units of the strings."""
    raw = a[:, offset : offset + width]
    if reverse:
        raw = raw[:, ::-1]
    text: npt.NDArray[np.str_] = _HEX_UTF32[raw].view(f"U{2 * width}")[:, 0]
    return text


def _crc16_ccitt_table() -> npt.NDArray[np.uint16]:
    """CRC-16/CCITT-FALSE of each byte value shifted into the high byte (the byte-wise table)."""
    crc = np.arange(256, dtype=np.int64) << 8
    for _ in range(8):  # the bit-wise definition, run once per table entry, not per frame
        crc = np.where(crc & 0x8000, (crc << 1) ^ 0x1021, crc << 1) & 0xFFFF
    return crc.astype(np.uint16)


_CRC16_CCITT = _crc16_ccitt_table()
_CRC16_CCITT_LIST: list[int] = _CRC16_CCITT.tolist()


def crc16_ccitt(a: Frames, stop: int) -> Int64s:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF) over bytes [0, stop) of every row."""
    # byte-wise (table-driven): crc = (crc << 8) ^ T[(crc >> 8) ^ byte], one gather per column
    crc = np.full(len(a), 0xFFFF, np.uint16)
    cols = np.ascontiguousarray(a[:, :stop].T)  # one contiguous row per byte column
    for col in cols:
        crc = (crc << 8) ^ _CRC16_CCITT[(crc >> 8) ^ col]
    return crc.astype(np.int64)


def crc16_ccitt_bytes(data: bytes) -> int:
    """Scalar CRC-16/CCITT-FALSE, the encoders' twin of `crc16_ccitt`."""
    table, crc = _CRC16_CCITT_LIST, 0xFFFF
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
    return crc


def days_from_civil(year: Int64s, month: Int64s, day: Int64s | int) -> Int64s:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y = year - (month <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    mp = (month + 9) % 12
    doy = (153 * mp + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    days: Int64s = era * 146097 + doe - 719468
    return days


# (year - 1900) * 16 + month -> days since 1970-01-01 of the 1st / days in that month; the
# tables replace ~20 int64 column operations of `days_from_civil` with two lookups.
_Y0, _NY = 1900, 300
_YM = (np.arange(_NY)[:, None] + _Y0, np.arange(16)[None, :])
_MONTH_OK = (_YM[1] >= 1) & (_YM[1] <= 12)
_FIRST = np.where(_MONTH_OK, days_from_civil(_YM[0], np.clip(_YM[1], 1, 12), 1), 0).ravel()
_NEXT = days_from_civil(_YM[0] + (_YM[1] == 12), np.clip(_YM[1], 1, 12) % 12 + 1, 1)
_MDAYS = np.where(_MONTH_OK, _NEXT - _FIRST.reshape(_NY, 16), 0).ravel()


# CJ/T 188 clocks as 16-bit lookups: the raw bytes (MM, YY) -> the 1st of that month and its
# length, one table block per century byte 19/20/21 (a 4th, all invalid, for any other),
# and the raw bytes (mm, hh) -> seconds of the day. -1 marks a non-BCD or out-of-range key.
_DAY_BIAS = 25567  # 1900-01-01 .. 1970-01-01, so every packed day count is >= 0
_CENTURY = np.full(256, 3, np.int32)
_CENTURY[[0x19, 0x20, 0x21]] = [0, 1, 2]


def _clock_tables() -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    key = np.arange(1 << 16)
    mm_or_mo, yy_or_hh = BCD_LUT[key & 0xFF], BCD_LUT[key >> 8]
    month_ok = (mm_or_mo >= 1) & (mm_or_mo <= 12) & (yy_or_hh >= 0)
    ymd = np.full((4, 1 << 16), -1, np.int64)
    for century in range(3):
        ym = (century * 100 + np.clip(yy_or_hh, 0, 99)) * 16 + np.clip(mm_or_mo, 0, 15)
        packed = (_FIRST[ym] + _DAY_BIAS) * 32 + _MDAYS[ym]
        ymd[century] = np.where(month_ok, packed, -1)
    hm_ok = (mm_or_mo >= 0) & (mm_or_mo < 60) & (yy_or_hh >= 0) & (yy_or_hh < 24)
    hm = np.where(hm_ok, yy_or_hh * 3600 + mm_or_mo * 60, -1)
    return ymd.astype(np.int32).ravel(), hm.astype(np.int32)


_YMD, _HM = _clock_tables()


def bcd_clock(block: Frames, *, big_endian: bool) -> tuple[Int64s, Bools]:
    """`(N, 7)` packed-BCD clocks -> (epoch s as if UTC, valid mask); century 19..21.

    Byte order `ss mm hh DD MM YY CC`, or `CC YY MM DD hh mm ss` when `big_endian`. The
    (MM, YY) and (mm, hh) byte pairs are read as 16-bit words and looked up in `_YMD` /
    `_HM`, so a clock costs five table gathers and a few integer operations.
    """
    if block.strides[-1] != 1:
        block = np.ascontiguousarray(block)
    if big_endian:
        cc, ym, dd, hm, ss = block[:, 0], block[:, 1:3], block[:, 3], block[:, 4:6], block[:, 6]
        order = ">u2"
    else:
        ss, hm, dd, ym, cc = block[:, 0], block[:, 1:3], block[:, 3], block[:, 4:6], block[:, 6]
        order = "<u2"
    packed = _YMD[(_CENTURY[cc] << 16) | ym.view(order)[:, 0]]
    day, sod, sec = BCD_U8[dd], _HM[hm.view(order)[:, 0]], BCD_U8[ss]
    valid = (packed >= 0) & (day >= 1) & (day <= (packed & 31)) & (sod >= 0) & (sec < 60)
    days = (packed >> 5) + day - (1 + _DAY_BIAS)
    return days.astype(np.int64) * 86400 + (sod + sec), valid
