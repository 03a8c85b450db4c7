"""CJ/T 188 encoder: the simulator's pure inverse of `decoder.cjt188` (901F read-data reply)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from decoder.cjt188 import BEIJING_UTC_OFFSET_S, VOLUME_UNITS

WATER, HOT_WATER, GAS = 0x10, 0x11, 0x30


def _bcd(value: int, width: int) -> bytes:
    """Non-negative int -> packed BCD, lowest two digits first (CJ/T 188 register order)."""
    if not 0 <= value < 100**width:
        msg = f"{value} does not fit {2 * width} BCD digits"
        raise ValueError(msg)
    return bytes((value // 100**i % 100 // 10) << 4 | (value // 100**i % 10) for i in range(width))


def _counts(ml: int, unit: int, decimals: int) -> int:
    name, mult = VOLUME_UNITS[unit]
    per_count = mult * 10 ** ((6 if name == "m3" else 3) - decimals)
    if ml % per_count:
        msg = f"{ml} mL is not a whole number of {per_count} mL counts (unit {unit:02X})"
        raise ValueError(msg)
    return int(ml // per_count)


def _clock(clock: datetime | None, order: str, utc_offset_s: int) -> bytes:
    if clock is None:
        return bytes(7)  # all zero = meter keeps no clock
    if clock.tzinfo is None:
        msg = "clock must be timezone-aware (the meter's local time is derived from it)"
        raise ValueError(msg)
    local = clock.astimezone(UTC) + timedelta(seconds=utc_offset_s)
    fields = (local.second, local.minute, local.hour, local.day, local.month)
    le = bytes(int(f"{v:02d}", 16) for v in (*fields, local.year % 100, local.year // 100))
    return le if order == "le" else le[::-1]


def encode_cjt188(
    *,
    address: str,
    total_ml: int,
    settlement_ml: int | None = None,
    meter_type: int = WATER,
    unit: int = 0x2C,
    clock: datetime | None = None,
    status: int = 0,
    di_order: str = "be",
    clock_order: str = "le",
    preamble: int = 0,
    ser: int = 0,
    decimals: int = 2,
    utc_offset_s: int = BEIJING_UTC_OFFSET_S,
) -> bytes:
    """Build a DI 901F read-data reply; raises ValueError when a value cannot be encoded.

    `address` is the 14-digit A6..A0 string; `status` is the ST word (byte0 = low byte);
    `settlement_ml=None` writes FF fill (not supported); `di_order` "be" = `90 1F`.
    """
    if len(address) != 14:
        msg = f"address {address!r} must be 14 hex/BCD digits"
        raise ValueError(msg)
    body = bytes([0x68, meter_type]) + bytes.fromhex(address)[::-1] + bytes([0x81, 0x16])
    di = b"\x90\x1f" if di_order == "be" else b"\x1f\x90"
    settle = (
        b"\xff" * 4 + bytes([unit])
        if settlement_ml is None
        else _bcd(_counts(settlement_ml, unit, decimals), 4) + bytes([unit])
    )
    data = (
        di
        + bytes([ser & 0xFF])
        + _bcd(_counts(total_ml, unit, decimals), 4)
        + bytes([unit])
        + settle
        + _clock(clock, clock_order, utc_offset_s)
        + status.to_bytes(2, "little")
    )
    frame = body + data
    return b"\xfe" * preamble + frame + bytes([sum(frame) & 0xFF, 0x16])
