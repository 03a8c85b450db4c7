"""TEMPORARY stand-in for `decoder.decode_batch` (CJ/T 188 901F only): delete when it lands.

Frames in, `decoder.columns.Decoded` out, with the same contract as the real dispatcher.
"""

from __future__ import annotations

import calendar

import numpy as np

from decoder.columns import Decoded, ErrorCode, Flag, empty


def _bcd(data: bytes) -> int | None:
    value = 0
    for byte in reversed(data):
        hi, lo = byte >> 4, byte & 0x0F
        if hi > 9 or lo > 9:
            return None
        value = value * 100 + hi * 10 + lo
    return value


def _one(frame: bytes, received_at_s: int) -> tuple[str, int, int, int] | tuple[ErrorCode, str]:
    start = frame.find(b"\x68")
    body = frame[start:] if start >= 0 else b""
    if not frame:
        return ErrorCode.EMPTY, "empty payload"
    if len(body) < 35 or body[9] != 0x81 or body[10] != 0x16:
        return ErrorCode.UNKNOWN_FORMAT, "not a CJ/T 188 901F read-data reply"
    if sum(body[:33]) & 0xFF != body[33] or body[34] != 0x16:
        return ErrorCode.BAD_CHECKSUM, "CJ/T 188 checksum mismatch"
    address = "".join(f"{b:02X}" for b in reversed(body[2:9]))
    total = _bcd(body[14:18])
    if total is None:
        return ErrorCode.BAD_BCD, "register is not BCD"
    clock = body[24:31]
    flags = 0
    if any(clock):
        ss, mi, hh, dd, mo, yy, cc = (_bcd(bytes([b])) or 0 for b in clock)
        read_at = calendar.timegm((cc * 100 + yy, mo, dd, hh, mi, ss))
    else:
        read_at, flags = received_at_s, int(Flag.CLOCK_MISSING)
    status = body[31]
    if status & 0x03 == 0x01:
        flags |= Flag.VALVE_CLOSED
    if status & 0x04:
        flags |= Flag.LOW_BATTERY
    return address, read_at, total * 10_000, flags  # 2 decimals of m3 -> mL


def decode_batch(frames: list[bytes], received_at_s: int, **_: object) -> Decoded:
    """Decode CJ/T 188 901F frames; every other frame is UNKNOWN_FORMAT."""
    out = empty(len(frames))
    rows: list[tuple[int, str, int, int, int]] = []
    for i, frame in enumerate(frames):
        got = _one(frame, received_at_s)
        if isinstance(got[0], ErrorCode):
            out.error_code[i], out.error_message[i] = got[0], got[1]
            continue
        address, read_at, register_ml, flags = got  # type: ignore[misc]
        out.format[i], out.meter_of_frame[i] = "cjt188/901f", address
        rows.append((i, address, read_at, register_ml, flags))
    return Decoded(
        frame_index=np.array([r[0] for r in rows], np.int32),
        meter_id=np.array([r[1] for r in rows], object),
        read_at_s=np.array([r[2] for r in rows], np.int64),
        register_ml=np.array([r[3] for r in rows], np.int64),
        flags=np.array([r[4] for r in rows], np.uint32),
        format=out.format,
        meter_of_frame=out.meter_of_frame,
        error_code=out.error_code,
        error_message=out.error_message,
        extra=out.extra,
    )
