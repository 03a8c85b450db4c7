"""A driver compiled to numpy kernels: `(N, L)` equal-length frames -> `Decoded`.

One pass per field over the whole batch (a loop over fields, never over frames):
checksum, transform, fixed-offset reads, expected constants, register arithmetic in
exact integer mL, alarm bits, clocks. Rows that fail a check get an `ErrorCode` and
the reason; the rest of the batch is unaffected. A volume whose unit is not a whole
number of mL per count (Apator's 1/3 L, Zenner's 1/256 L) is rounded half up to the
nearest mL: the meter's own resolution is coarser than that by orders of magnitude.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from decoder import kernels as k
from decoder.columns import Column, Decoded, ErrorCode, Flag
from decoder.drivers.spec import Checksum, Driver, FieldSpec
from decoder.mbus_link import _CRC_TABLE

Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]
Frames = npt.NDArray[np.uint8]
INT64_MAX = np.iinfo(np.int64).max
EPOCH_2000 = 946_684_800
EARLIEST_CLOCK = 1_262_304_000  # 2010-01-01: a meter clock before this is not set
CLOCK_SLACK_S = 31 * 86_400  # a meter clock may run ahead of the receiver by this much

_EN13757 = np.array(_CRC_TABLE, np.uint16)


def _modbus_table() -> npt.NDArray[np.uint16]:
    """CRC-16/MODBUS (reflected poly 0xA001) byte table."""
    out = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        out.append(crc)
    return np.array(out, np.uint16)


_MODBUS = _modbus_table()


def _modbus_table16() -> npt.NDArray[np.uint16]:
    """CRC-16/MODBUS over two bytes at once: for a reflected CRC, xoring a little-endian
    byte pair into the register and running 16 bit steps consumes it entirely, so one
    65,536-entry table maps (crc ^ pair) to the next crc."""
    v = np.arange(1 << 16, dtype=np.uint32)
    for _ in range(2):
        v = (v >> 8) ^ _MODBUS[v & 0xFF].astype(np.uint32)
    return v.astype(np.uint16)


_MODBUS16 = _modbus_table16()


def checksum_ok(a: Frames, c: Checksum) -> Bools:
    """Whether each row's stored checksum matches the one computed over its span."""
    n, width = a.shape
    start = c.start % width if c.start < 0 else c.start
    stop = c.stop % width if c.stop < 0 else c.stop
    at = c.at % width if c.at < 0 else c.at
    span = a[:, start:stop]
    if c.kind == "sum8":
        same: Bools = k.sum8(a, start, stop) == a[:, at]
        return same
    if c.kind == "xor8":
        xor: Bools = np.bitwise_xor.reduce(span, axis=1) == a[:, at]
        return xor
    if c.kind == "crc16_modbus":
        crc = np.full(n, 0xFFFF, np.uint16)
        even = (stop - start) // 2 * 2
        if even and a.strides[-1] == 1 and start % 2 == 0:  # two bytes per table gather
            words = a[:, start : start + even].view("<u2")
            for j in range(even // 2):
                crc = _MODBUS16[crc ^ words[:, j]]
        else:
            even = 0
        for j in range(start + even, stop):
            crc = (crc >> 8) ^ _MODBUS[(crc ^ a[:, j]) & 0xFF]
    else:  # crc16_en13757: poly 0x3D65, init 0, inverted
        crc = np.zeros(n, np.uint16)
        for col in np.ascontiguousarray(span.T):
            crc = (crc << 8) ^ _EN13757[(crc >> 8) ^ col]
        crc = crc ^ np.uint16(0xFFFF)
    stored = _uint(a, at, 2, c.order)
    match: Bools = crc.astype(np.int64) == stored
    return match


def _uint(a: Frames, at: int, width: int, order: str) -> Ints:
    """Unsigned integer of `width` bytes at `at`, per row."""
    if order == "le":
        if width in (2, 4, 8) and a.strides[-1] == 1:
            return a[:, at : at + width].view(f"<u{width}")[:, 0].astype(np.int64)
        return k.u_le(a, at, width)
    out = np.zeros(len(a), np.int64)
    for i in range(width):
        out = (out << 8) | a[:, at + i].astype(np.int64)
    return out


def read(a: Frames, f: FieldSpec) -> tuple[Ints, Bools]:
    """A field as int64 per row and a validity mask (BCD digits, real dates)."""
    n = len(a)
    ok = np.ones(n, bool)
    if f.kind == "bcd":
        if f.order == "le":
            value, bad = k.bcd_le(a, f.at, f.width)
        else:
            value, bad = k.bcd_le(a[:, f.at : f.at + f.width][:, ::-1], 0, f.width)
        return value, ~bad
    if f.kind == "int":
        raw = _uint(a, f.at, f.width, f.order)
        bits = 8 * f.width
        return (raw ^ (1 << (bits - 1))) - (1 << (bits - 1)) if bits < 64 else raw, ok
    if f.kind == "packed_na1":  # 24-bit mantissa (bits 8-31 high, 0-3 low) x 10**(bits 4-5)
        raw = _uint(a, f.at, 4, "le")
        mantissa = ((raw >> 8) << 4) | (raw & 0x0F)
        return mantissa * np.array([1, 10, 100, 1000], np.int64)[(raw >> 4) & 3], ok
    if f.kind == "date_g":
        b0, b1 = a[:, f.at].astype(np.int64), a[:, f.at + 1].astype(np.int64)
        return _civil(2000 + (((b0 & 0xE0) >> 5) | ((b1 & 0xF0) >> 1)), b1 & 0x0F, b0 & 0x1F)
    if f.kind == "date_dmy16":
        raw = _uint(a, f.at, 2, "le")
        return _civil(2000 + (raw >> 9), (raw >> 5) & 0x0F, raw & 0x1F)
    if f.kind == "epoch2000":
        return _uint(a, f.at, 4, "le") + EPOCH_2000, ok
    if f.kind == "unix32":
        return _uint(a, f.at, 4, f.order), ok
    return _uint(a, f.at, f.width, f.order), ok  # uint (hex / float32 are read elsewhere)


def _civil(year: Ints, month: Ints, day: Ints) -> tuple[Ints, Bools]:
    """Epoch seconds of a date at 00:00 and whether it is a real date (FFFF is not)."""
    ok = (month >= 1) & (month <= 12) & (day >= 1) & (day <= 31)
    days = k.days_from_civil(year, np.where(ok, month, 1), np.where(ok, day, 1))
    return days * 86_400, ok


def to_ml(count: Ints, ml_per_count: Fraction) -> tuple[Ints, Bools]:
    """Counts -> int64 mL (rounded half up when the unit is not whole mL) and a fit mask."""
    num, den = ml_per_count.numerator, ml_per_count.denominator
    fits = np.abs(count) <= INT64_MAX // (2 * num + den)
    safe = np.where(fits, count, 0)
    if den == 1:
        return safe * num, fits
    return (safe * (2 * num) + den) // (2 * den), fits


def m3_scale(ml_per_count: Fraction) -> int:
    """Decimal places of m3 that show a register of this unit exactly (mL: 6, L: 3...)."""
    if ml_per_count.denominator != 1:
        return 6
    num, places = ml_per_count.numerator, 6
    while places and num % 10 == 0:
        num //= 10
        places -= 1
    return places


class _Out:
    """Per-row outcome while a batch runs through a driver."""

    def __init__(self, n: int) -> None:
        self.code = np.zeros(n, np.uint16)
        self.msg = k.text_column(n, "")

    def fail(self, mask: Bools, code: ErrorCode, message: str) -> None:
        """Reject the rows of `mask` still OK."""
        sel = mask & (self.code == 0)
        if sel.any():
            self.code[sel] = code
            self.msg[sel] = message


def decode_rows(
    driver: Driver,
    frames: Frames,
    received_at_s: Ints,
    addresses: npt.NDArray[np.object_] | None = None,
    keys: Mapping[str, bytes] | None = None,
    utc_offset_s: int | Ints = 0,
) -> Decoded:
    """`(N, L)` frames of one length through `driver` -> Decoded (one reading per register)."""
    from decoder.vendors import TRANSFORMS

    n = len(frames)
    out = _Out(n)
    rx = np.asarray(received_at_s, np.int64)
    if driver.checksum is not None:
        out.fail(~checksum_ok(frames, driver.checksum), ErrorCode.BAD_CHECKSUM,
                 f"{driver.checksum.kind} checksum mismatch")  # fmt: skip
    ids = addresses if addresses is not None else k.text_column(n, "")
    if driver.transform is not None:
        payload, code, why = TRANSFORMS[driver.transform](frames, ids, keys or {})
        for c in np.unique(code[code != 0]).tolist():
            out.fail(code == c, ErrorCode(c), why)
    else:
        payload = frames[:, 11:] if driver.match.transport == "wmbus" else frames
    size = payload.shape[1]
    values: dict[str, tuple[Ints, Bools]] = {}
    fields: dict[str, Column] = {}
    for f in driver.fields:
        if f.at + f.width > size:
            if not f.optional:
                out.fail(np.ones(n, bool), ErrorCode.TRUNCATED,
                         f"payload of {size} bytes ends before field {f.name!r}")  # fmt: skip
            continue
        if f.kind == "hex":
            fields[f.name] = Column(k.hex_digits(payload, f.at, f.width, reverse=f.order == "le"))
            continue
        if f.kind == "float32":
            raw = np.ascontiguousarray(payload[:, f.at : f.at + 4])
            fields[f.name] = Column(raw.view("<f4" if f.order == "le" else ">f4")[:, 0].copy())
            continue
        value, ok = read(payload, f)
        values[f.name] = (value, ok)
        if f.expect is not None:
            refuse = ErrorCode.DECRYPT_FAILED if driver.transform else ErrorCode.BAD_RECORD
            why = f"field {f.name!r} is not {f.expect:#x} as the {driver.name} layout requires"
            out.fail(value != f.expect, refuse, why + " (another model, or still encrypted)")
    flags = _alarm_flags(driver, values, n)
    current, cur_ok, cur_scale = _register(driver, driver.current, values, out, billing=False)
    billing = driver.billing if driver.billing in values else None
    if billing is not None:
        bill, bill_ok, bill_scale = _register(driver, (billing,), values, out, billing=True)
        if driver.billing_not_above_current:
            out.fail(bill_ok & cur_ok & (bill > current), ErrorCode.BAD_RECORD,
                     "billing register above the current one (wrong key or corrupt)")  # fmt: skip
    at, at_ok = _clock(driver.current_time, values, rx, utc_offset_s)
    if driver.current_time is not None and driver.transform is not None:
        out.fail(~at_ok, ErrorCode.DECRYPT_FAILED, "meter clock implausible after decryption")
    good = out.code == 0
    if driver.match.transport == "raw":
        ids = _raw_ids(driver, payload, fields, values)
    used = {*driver.current, driver.billing, driver.current_time, driver.billing_time}
    for f in driver.fields:
        if f.name in used or f.name not in values or f.expect is not None:
            continue
        value, ok = values[f.name]
        present = ok & good
        mask = None if present.all() else present
        if f.ml_per_count is not None:
            ml, fits = to_ml(value, f.ml_per_count)
            scale = m3_scale(f.ml_per_count)
            name = f.name if f.name.endswith("_m3") else f"{f.name}_m3"
            present &= fits
            fields[name] = Column(ml // 10 ** (6 - scale), None if present.all() else present,
                                  "decimal", scale)  # fmt: skip
        elif f.decimals:
            fields[f.name] = Column(value, mask, "decimal", f.decimals)
        else:
            fields[f.name] = Column(value, mask)
    fields["driver"] = Column(np.zeros(n, np.uint8), render="label", labels=(driver.name,))
    fields["total_m3"] = Column(current // 10 ** (6 - cur_scale), None if good.all() else good,
                                "decimal", cur_scale)  # fmt: skip
    reads = [(np.flatnonzero(good & cur_ok), current, at,
              flags | np.where(at_ok, 0, int(Flag.CLOCK_MISSING)))]  # fmt: skip
    if billing is not None:
        b_at, b_at_ok = _clock(driver.billing_time, values, rx, utc_offset_s)
        has = good & bill_ok & (b_at_ok if driver.billing_time else True)
        fields["target_m3"] = Column(bill // 10 ** (6 - bill_scale), None if has.all() else has,
                                     "decimal", bill_scale)  # fmt: skip
        b_flags = flags | int(Flag.BILLING_DATE) | np.where(b_at_ok, 0, int(Flag.CLOCK_MISSING))
        reads.append((np.flatnonzero(has), bill, b_at, b_flags))
    return _result(driver, out, ids, fields, reads)


def _alarm_flags(driver: Driver, values: dict[str, tuple[Ints, Bools]], n: int) -> Ints:
    """Reading flags from the alarm bits: one table gather per field of 1-2 bytes."""
    flags = np.zeros(n, np.int64)
    for name in dict.fromkeys(a.field for a in driver.alarms):
        if name not in values:
            continue
        value = values[name][0]
        alarms = [a for a in driver.alarms if a.field == name]
        width = driver.field(name).width
        if width <= 2 and driver.field(name).kind == "uint":
            flags |= _alarm_table(driver, name, width)[value]
            continue
        for alarm in alarms:
            flags |= np.where(value & alarm.mask, int(alarm.flag), 0)
    return flags


_TABLES: dict[tuple[Driver, str], Ints] = {}  # keyed by the driver itself, never by id()


def _alarm_table(driver: Driver, name: str, width: int) -> Ints:
    """Raw value -> flags of one alarm field (built once per driver and field)."""
    key = (driver, name)
    if (table := _TABLES.get(key)) is None:
        raw = np.arange(1 << (8 * width), dtype=np.int64)
        table = np.zeros(len(raw), np.int64)
        for alarm in driver.alarms:
            if alarm.field == name:
                table |= np.where(raw & alarm.mask, int(alarm.flag), 0)
        _TABLES[key] = table
    return table


def _register(
    driver: Driver, names: tuple[str, ...], values: dict[str, tuple[Ints, Bools]],
    out: _Out, *, billing: bool,
) -> tuple[Ints, Bools, int]:  # fmt: skip
    """Sum of volume fields in mL, its usable mask and display scale; a bad current
    register refuses the frame, a bad billing one only loses that reading."""
    n = len(out.code)
    total, ok, scale = np.zeros(n, np.int64), np.ones(n, bool), 0
    for name in names:
        f = driver.field(name)
        if name not in values or f.ml_per_count is None:
            return total, np.zeros(n, bool), 6
        value, digits = values[name]
        ml, fits = to_ml(value, f.ml_per_count)
        scale = max(scale, m3_scale(f.ml_per_count))
        if not billing:
            out.fail(~digits, ErrorCode.BAD_BCD, f"register field {name!r} is not BCD")
            out.fail(~fits, ErrorCode.BAD_UNIT, f"register field {name!r} overflows int64 mL")
        ok &= digits & fits
        total += np.where(ok, ml, 0)
    return total, ok, scale


def _clock(
    name: str | None, values: dict[str, tuple[Ints, Bools]], rx: Ints, utc_offset_s: int | Ints
) -> tuple[Ints, Bools]:
    """Read time per row: the meter's clock (local -> UTC) when plausible, else receive."""
    if name is None or name not in values:
        return rx, np.zeros(len(rx), bool)
    stamp, ok = values[name]
    stamp = stamp - utc_offset_s
    ok = ok & (stamp >= EARLIEST_CLOCK) & (stamp <= rx + CLOCK_SLACK_S)
    return np.where(ok, stamp, rx), ok


def _raw_ids(
    driver: Driver, payload: Frames, fields: dict[str, Column],
    values: dict[str, tuple[Ints, Bools]],
) -> np.ndarray:  # fmt: skip
    """Meter ids of a raw driver: its address field as text."""
    name = driver.address_field or ""
    if name in fields and driver.field(name).kind == "hex":
        return fields.pop(name).values
    f = driver.field(name)
    value = values[name][0]
    if f.kind == "bcd":
        digits = 2 * f.width
        return np.char.zfill(value.astype(f"U{digits}"), digits)
    return value.astype("U20")


def _interleave(columns: list[np.ndarray], dtype: npt.DTypeLike) -> np.ndarray:
    """Columns of n values -> one of n*m: frame 0's m values, then frame 1's..."""
    m = len(columns)
    out = np.empty(len(columns[0]) * m, dtype)
    for j, col in enumerate(columns):
        out[j::m] = col
    return out


def _result(
    driver: Driver, out: _Out, ids: np.ndarray, fields: dict[str, Column],
    reads: list[tuple[Ints, Ints, Ints, Ints]],
) -> Decoded:  # fmt: skip
    """Assemble the Decoded: readings ordered by frame, current before billing."""
    n = len(out.code)
    m = len(reads)
    if all(len(r) == n for r, _, _, _ in reads):  # every frame every reading: interleave
        rows = np.arange(n * m) // m
        reg = _interleave([v for _, v, _, _ in reads], np.int64)
        read_at = _interleave([at for _, _, at, _ in reads], np.int64)
        fl = _interleave([f for _, _, _, f in reads], np.uint32)
        meter = _interleave([ids] * m, ids.dtype) if m > 1 else ids
    else:
        rows = np.concatenate([r for r, _, _, _ in reads])
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        read_at = np.concatenate([at[r] for r, _, at, _ in reads])[order]
        reg = np.concatenate([v[r] for r, v, _, _ in reads])[order]
        fl = np.concatenate([f[r] for r, _, _, f in reads])[order].astype(np.uint32)
        meter = ids[rows]
    return Decoded(
        frame_index=rows.astype(np.int32),
        address=meter,
        read_at_s=read_at,
        register_ml=reg,
        flags=fl,
        format=k.text_column(len(out.code), driver.format_key),
        address_of_frame=ids,
        error_code=out.code,
        error_message=out.msg,
        fields=fields,
    )
