"""Numpy kernels for EN 13757-3 values over N frames of one layout: an (N, L) uint8 array.

Every kernel reads one field at a fixed offset for all rows at once and returns int64
columns plus a per-row validity mask; nothing loops over rows.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

import numpy as np
import numpy.typing as npt

from decoder.mbus_records import Field, Kind

Frames = npt.NDArray[np.uint8]
Int64s = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


def int_le(a: Frames, at: int, width: int) -> Int64s:
    """EN 13757-3 type B: signed little-endian integer of `width` bytes (1..8)."""
    raw = a[:, at : at + width].astype(np.uint64)
    shifts = np.arange(width, dtype=np.uint64) * np.uint64(8)
    value = np.bitwise_or.reduce(raw << shifts, axis=1)
    if width < 8:  # sign-extend from the top bit of the last byte
        sign = np.uint64(1 << (8 * width - 1))
        value = (value ^ sign) - sign
    signed: Int64s = value.view(np.int64)
    return signed


def bcd(a: Frames, at: int, width: int) -> tuple[Int64s, Bools]:
    """EN 13757-3 type A: BCD, low byte first; top nibble F = negative. Returns (value, ok)."""
    raw = a[:, at : at + width].astype(np.int64)
    hi, lo = raw >> 4, raw & 0x0F
    negative = hi[:, -1] == 0x0F
    hi[:, -1] = np.where(negative, 0, hi[:, -1])
    weights = np.int64(100) ** np.arange(width, dtype=np.int64)
    value = (hi * 10 + lo) @ weights
    ok = ~np.any((hi > 9) | (lo > 9), axis=1)
    return np.where(negative, -value, value), ok


def days_from_civil(y: Int64s, m: Int64s, d: Int64s) -> Int64s:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y = y - (m <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    doy = (153 * (m + np.where(m > 2, -3, 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    days: Int64s = era * 146097 + doe - 719468
    return days


_MONTH_DAYS = np.array([0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], np.int64)


def _epoch(
    y: Int64s, mo: Int64s, d: Int64s, h: Int64s, mi: Int64s, s: Int64s
) -> tuple[Int64s, Bools]:
    """Epoch seconds (meter time taken as UTC) and a plausibility mask."""
    year = np.where(y <= 80, 2000 + y, 1900 + y)  # EN 13757-3 type F/G: 2-digit year
    month_ok = (mo >= 1) & (mo <= 12)
    ok = month_ok & (d >= 1) & (d <= _MONTH_DAYS[np.where(month_ok, mo, 0)])
    ok &= (h < 24) & (mi < 60) & (s < 60)
    days = days_from_civil(year, np.where(ok, mo, 1), np.where(ok, d, 1))
    return days * 86400 + h * 3600 + mi * 60 + s, ok


def date_g(a: Frames, at: int) -> tuple[Int64s, Bools]:
    """Type G date (2 bytes): day b0&1F, month b1&0F, year (b1&F0)>>1 | (b0&E0)>>5."""
    b0, b1 = a[:, at].astype(np.int64), a[:, at + 1].astype(np.int64)
    year = ((b1 & 0xF0) >> 1) | ((b0 & 0xE0) >> 5)
    zero = np.zeros_like(b0)
    return _epoch(year, b1 & 0x0F, b0 & 0x1F, zero, zero, zero)


def datetime_f(a: Frames, at: int) -> tuple[Int64s, Bools]:
    """Type F date+time (4 bytes, to the minute); bit 7 of b0 = invalid."""
    b = [a[:, at + i].astype(np.int64) for i in range(4)]
    year = ((b[3] & 0xF0) >> 1) | ((b[2] & 0xE0) >> 5)
    value, ok = _epoch(year, b[3] & 0x0F, b[2] & 0x1F, b[1] & 0x1F, b[0] & 0x3F, b[0] * 0)
    return value, ok & ((b[0] & 0x80) == 0)


def datetime_i(a: Frames, at: int) -> tuple[Int64s, Bools]:
    """Type I date+time (6 bytes, to the second); bit 7 of b1 = invalid."""
    b = [a[:, at + i].astype(np.int64) for i in range(6)]
    year = ((b[4] & 0xF0) >> 1) | ((b[3] & 0xE0) >> 5)
    value, ok = _epoch(year, b[4] & 0x0F, b[3] & 0x1F, b[2] & 0x1F, b[1] & 0x3F, b[0] & 0x3F)
    return value, ok & ((b[1] & 0x80) == 0)


def no_data(a: Frames, f: Field) -> Bools:
    """Rows whose field `f` holds an EN 13757-3 "no value" encoding rather than a value.

    Type B: the sign bit alone (0x80 00.., the most negative number, which no meter
    counts to), and for a volume all ones too (a -1 volume is no volume); an unsigned
    field (an identifier, bit field) has no marker; type A: all ones (every nibble F) and,
    from two bytes up, 0x80 00.. as type B (Zenner minomess: billing `8C04 13 00000080`
    beside a total of 0.057 m3); dates: all ones or all zeros (day 0, month 0).
    """
    raw = a[:, f.data_at : f.data_at + f.width]
    if f.width == 0 or f.kind in (Kind.NONE, Kind.TEXT, Kind.BYTES, Kind.REAL):
        return np.zeros(len(a), bool)
    ones: Bools = np.all(raw == 0xFF, axis=1)
    if f.kind == Kind.INT:
        if f.unsigned:
            return np.zeros(len(a), bool)
        sign_only: Bools = (raw[:, -1] == 0x80) & ~np.any(raw[:, :-1], axis=1)
        return sign_only | ones if f.volume else sign_only
    if f.kind == Kind.BCD:  # Zenner sends 00..0080 for "no value" (its profiles too)
        sign_like: Bools = (raw[:, -1] == 0x80) & ~np.any(raw[:, :-1], axis=1)
        return ones | sign_like if f.width >= 2 else ones
    zeros: Bools = ~np.any(raw, axis=1)
    return ones | zeros  # dates


def read_field(a: Frames, f: Field) -> tuple[Int64s, Bools]:
    """Raw integer (or epoch seconds for dates) of field `f` for all rows, and a valid mask."""
    if f.kind == Kind.INT:
        value = int_le(a, f.data_at, f.width)
        if f.unsigned and f.width < 8:
            value &= np.int64((1 << (8 * f.width)) - 1)
        return value, np.ones(len(a), bool)
    if f.kind == Kind.BCD:
        return bcd(a, f.data_at, f.width)
    if f.kind == Kind.DATE_G:
        return date_g(a, f.data_at)
    if f.kind == Kind.DATETIME_F:
        return datetime_f(a, f.data_at)
    if f.kind == Kind.DATETIME_I:
        return datetime_i(a, f.data_at)
    return np.zeros(len(a), np.int64), np.zeros(len(a), bool)


def scaled(values: Int64s, ok: Bools, f: Field) -> list[object]:
    """Exact Python values of a numeric column: int, or Decimal for negative exponents."""
    ints = (values * f.multiplier).tolist()
    if f.exponent >= 0:
        factor = 10**f.exponent
        return [v * factor if good else None for v, good in zip(ints, ok.tolist(), strict=True)]
    e = f.exponent
    return [
        Decimal(v).scaleb(e) if good else None for v, good in zip(ints, ok.tolist(), strict=True)
    ]


def as_text(values: Int64s, ok: Bools, f: Field) -> list[object]:
    """Date columns as 'YYYY-MM-DD' (type G) or 'YYYY-MM-DD HH:MM[:SS]' strings."""
    unit: Literal["D", "m", "s"] = (
        "D" if f.kind is Kind.DATE_G else "m" if f.kind is Kind.DATETIME_F else "s"
    )
    text = np.datetime_as_string(values.astype("datetime64[s]"), unit=unit)
    return [
        t.replace("T", " ") if good else None for t, good in zip(text, ok.tolist(), strict=True)
    ]


def ascii_text(a: Frames, f: Field) -> list[object]:
    """Variable-length ASCII, sent last character first (EN 13757-3 LVAR text)."""
    block = a[:, f.data_at : f.data_at + f.width][:, ::-1]
    return [bytes(row).decode("ascii", "replace").strip() for row in block]


def hex_bytes(a: Frames, f: Field) -> list[object]:
    """Variable-length binary (compact profiles) as lowercase hex, in wire order."""
    return [bytes(row).hex() for row in a[:, f.data_at : f.data_at + f.width]]


def real32(a: Frames, f: Field) -> list[object]:
    """Type H float32 as an exact Decimal of its shortest repr (never a register)."""
    vals = np.ascontiguousarray(a[:, f.data_at : f.data_at + 4]).view("<f4")[:, 0]
    return [Decimal(str(v)) if np.isfinite(v) else None for v in vals]
