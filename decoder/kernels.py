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

_HEX_ASCII = np.frombuffer(b"0123456789ABCDEF", np.uint8)


def as_received(received_at_s: npt.ArrayLike, n: int) -> Int64s:
    """Broadcast a receive time (scalar or per-frame array) to an int64 column of length n."""
    rx = np.asarray(received_at_s, dtype=np.int64)
    return np.broadcast_to(rx, (n,)).copy() if rx.ndim == 0 else rx.astype(np.int64).copy()


def stack(frames: Sequence[bytes]) -> Frames:
    """N frames of one length -> an `(N, L)` uint8 array (one join, no per-row copy loop)."""
    if not frames:
        return np.zeros((0, 0), np.uint8)
    width = len(frames[0])
    return np.frombuffer(b"".join(frames), np.uint8).reshape(len(frames), width)


def group_by_length(frames: Sequence[bytes]) -> list[tuple[Int64s, Frames]]:
    """Split frames into (input indices, stacked array) per distinct length, in length order."""
    lengths = np.fromiter(map(len, frames), np.int64, len(frames))
    if len(frames) and (lengths == lengths[0]).all():
        return [(np.arange(len(frames), dtype=np.int64), stack(frames))]
    groups = []
    for width in np.unique(lengths):
        idx = np.flatnonzero(lengths == width)
        groups.append((idx, stack([frames[i] for i in idx])))
    return groups


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


def bcd_le(a: Frames, offset: int, width: int) -> tuple[Int64s, Bools]:
    """Packed BCD, lowest two digits first -> (value, bad) where bad marks a nibble > 9."""
    value = np.zeros(len(a), np.int64)
    bad = np.zeros(len(a), bool)
    for i in range(width):
        digits = BCD_LUT[a[:, offset + i]]
        value += digits * 100**i
        bad |= digits < 0
    return value, bad


def bcd_bytes(raw: Frames) -> tuple[Int64s, Bools]:
    """Element-wise value of single packed-BCD bytes -> (0..99 values, bad mask)."""
    values = BCD_LUT[raw]
    return values, values < 0


def all_equal(a: Frames, offset: int, width: int, value: int) -> Bools:
    """Rows whose `width` bytes at `offset` all equal `value` (e.g. FF fill, all-zero clock)."""
    return np.all(a[:, offset : offset + width] == value, axis=1)


def sum8(a: Frames, start: int, stop: int) -> npt.NDArray[np.uint8]:
    """Low byte of the sum of bytes [start, stop) per row (CJ/T 188 CS, M-Bus CS)."""
    return (a[:, start:stop].sum(axis=1, dtype=np.uint32) & 0xFF).astype(np.uint8)


def hex_digits(a: Frames, offset: int, width: int, *, reverse: bool) -> npt.NDArray[np.object_]:
    """Bytes as uppercase hex strings per row (BCD addresses print as their digits)."""
    raw = a[:, offset : offset + width]
    if reverse:
        raw = raw[:, ::-1]
    chars = np.empty((len(a), 2 * width), np.uint8)
    chars[:, 0::2] = _HEX_ASCII[raw >> 4]
    chars[:, 1::2] = _HEX_ASCII[raw & 0x0F]
    text = chars.tobytes().decode("ascii")  # one decode, then cheap slices -> str objects
    step = 2 * width
    out = np.empty(len(a), object)
    out[:] = [text[i : i + step] for i in range(0, len(text), step)]
    return out


def crc16_ccitt(a: Frames, stop: int) -> Int64s:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF) over bytes [0, stop) of every row."""
    crc = np.full(len(a), 0xFFFF, np.int64)
    for col in range(stop):
        crc ^= a[:, col].astype(np.int64) << 8
        for _ in range(8):
            crc = np.where(crc & 0x8000, (crc << 1) ^ 0x1021, crc << 1) & 0xFFFF
    return crc


def crc16_ccitt_bytes(data: bytes) -> int:
    """Scalar CRC-16/CCITT-FALSE, the encoders' twin of `crc16_ccitt`."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc


def days_from_civil(year: Int64s, month: Int64s, day: Int64s) -> Int64s:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y = year - (month <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    mp = (month + 9) % 12
    doy = (153 * mp + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


# (year - 1900) * 16 + month -> days since 1970-01-01 of the 1st / days in that month; the
# tables replace ~20 int64 column operations of `days_from_civil` with two lookups.
_Y0, _NY = 1900, 300
_YM = (np.arange(_NY)[:, None] + _Y0, np.arange(16)[None, :])
_MONTH_OK = (_YM[1] >= 1) & (_YM[1] <= 12)
_FIRST = np.where(_MONTH_OK, days_from_civil(_YM[0], np.clip(_YM[1], 1, 12), 1), 0).ravel()
_NEXT = days_from_civil(_YM[0] + (_YM[1] == 12), np.clip(_YM[1], 1, 12) % 12 + 1, 1)
_MDAYS = np.where(_MONTH_OK, _NEXT - _FIRST.reshape(_NY, 16), 0).ravel()


def civil_to_epoch(
    year: Int64s, month: Int64s, day: Int64s, hour: Int64s, minute: Int64s, second: Int64s
) -> tuple[Int64s, Bools]:
    """Civil date-time columns (years 1900..2199) -> (epoch s as if UTC, valid mask)."""
    ym = np.clip(year - _Y0, 0, _NY - 1) * 16 + np.clip(month, 0, 15)
    mdays = _MDAYS[ym]
    valid = (year >= _Y0) & (year < _Y0 + _NY) & (month <= 15) & (day >= 1) & (day <= mdays)
    valid &= (hour < 24) & (minute < 60) & (second < 60)
    return (_FIRST[ym] + day - 1) * 86400 + hour * 3600 + minute * 60 + second, valid
