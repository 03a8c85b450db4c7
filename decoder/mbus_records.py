"""EN 13757-3 data records: DIF/VIF tables, the record walker and compiled layouts.

`walk(data, start)` turns one plaintext application payload into a `Skeleton` (the
record headers and where each value sits); `compile_layout(skeleton)` turns a skeleton
into a `Layout` (names, units, scales, the byte positions a frame must match to share
it). Compilation is cached per skeleton, so a meter model's layout is built once and
every later frame of that model is decoded at fixed offsets by `mbus_kernels`.
Walk failures are `(ErrorCode, message)` pairs, never exceptions.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from decoder.columns import ErrorCode


class Kind(enum.IntEnum):
    """How a record's value bytes are read."""

    NONE = 0
    INT = 1  # EN 13757-3 type B, signed little-endian
    BCD = 2  # type A, low byte first, top nibble F = negative
    REAL = 3  # type H, IEEE 754 float32 (never a billing quantity)
    DATE_G = 4  # type G date, 2 bytes
    DATETIME_F = 5  # type F date+time to the minute, 4 bytes
    DATETIME_I = 6  # type I date+time to the second, 6 bytes
    TEXT = 7  # variable-length ASCII, sent last character first
    BYTES = 8  # variable-length binary (compact profiles), kept as hex


# EN 13757-3 table 4: DIF bits 0-3 -> (kind, width); 0xD (variable) is resolved per record.
DATA_FIELD: dict[int, tuple[Kind, int]] = {
    0x0: (Kind.NONE, 0), 0x1: (Kind.INT, 1), 0x2: (Kind.INT, 2), 0x3: (Kind.INT, 3),
    0x4: (Kind.INT, 4), 0x5: (Kind.REAL, 4), 0x6: (Kind.INT, 6), 0x7: (Kind.INT, 8),
    0x8: (Kind.NONE, 0), 0x9: (Kind.BCD, 1), 0xA: (Kind.BCD, 2), 0xB: (Kind.BCD, 3),
    0xC: (Kind.BCD, 4), 0xE: (Kind.BCD, 6),
}  # fmt: skip

TIME_UNITS = (1, 60, 3600, 86400)  # VIF bits 0-1: seconds, minutes, hours, days
# (first, last, name, exponent of the first code; None = a time unit in bits 0-1)
_Row = tuple[int, int, str, "int | None"]
PRIMARY_VIF: tuple[_Row, ...] = (  # EN 13757-3 table 10 (primary VIF, bit 7 masked)
    (0x00, 0x07, "energy_kwh", -6), (0x08, 0x0F, "energy_mj", -6),
    (0x10, 0x17, "volume_m3", -6), (0x18, 0x1F, "mass_kg", -3),
    (0x20, 0x23, "on_time_s", None), (0x24, 0x27, "operating_time_s", None),
    (0x28, 0x2F, "power_kw", -6), (0x30, 0x37, "power_mj_h", -6),
    (0x38, 0x3F, "flow_m3h", -6), (0x40, 0x47, "flow_m3min", -7),
    (0x48, 0x4F, "flow_m3s", -9), (0x50, 0x57, "mass_flow_kgh", -3),
    (0x58, 0x5B, "flow_temperature_c", -3), (0x5C, 0x5F, "return_temperature_c", -3),
    (0x60, 0x63, "temperature_difference_k", -3), (0x64, 0x67, "external_temperature_c", -3),
    (0x68, 0x6B, "pressure_bar", -3), (0x6C, 0x6C, "date", 0), (0x6D, 0x6D, "datetime", 0),
    (0x6E, 0x6E, "hca_units", 0), (0x70, 0x73, "averaging_duration_s", None),
    (0x74, 0x77, "actuality_duration_s", None), (0x78, 0x78, "fabrication_no", 0),
    (0x79, 0x79, "enhanced_id", 0), (0x7A, 0x7A, "bus_address", 0),
    (0x7E, 0x7E, "any_vif", 0),
)  # fmt: skip
FD_VIF: tuple[_Row, ...] = (  # EN 13757-3 table 12 (first extension, after VIF FD)
    (0x08, 0x08, "access_number", 0), (0x09, 0x09, "medium", 0),
    (0x0A, 0x0A, "manufacturer", 0), (0x0B, 0x0B, "parameter_set_id", 0),
    (0x0C, 0x0C, "model_version", 0), (0x0D, 0x0D, "hardware_version", 0),
    (0x0E, 0x0E, "firmware_version", 0), (0x0F, 0x0F, "software_version", 0),
    (0x10, 0x10, "customer_location", 0), (0x11, 0x11, "customer", 0),
    (0x16, 0x16, "password", 0), (0x17, 0x17, "error_flags", 0),
    (0x18, 0x18, "error_mask", 0), (0x1A, 0x1A, "digital_output", 0),
    (0x1B, 0x1B, "digital_input", 0), (0x1C, 0x1C, "baud_rate", 0),
    (0x3A, 0x3A, "dimensionless", 0), (0x40, 0x4F, "voltage_v", -9),
    (0x50, 0x5F, "current_a", -12), (0x60, 0x60, "reset_counter", 0),
    (0x61, 0x61, "cumulation_counter", 0), (0x67, 0x67, "special_supplier_info", 0),
    (0x6C, 0x6F, "battery_operating_time_s", None), (0x70, 0x70, "battery_change_datetime", 0),
    (0x71, 0x71, "rf_level_dbm", 0), (0x74, 0x74, "remaining_battery_days", 0),
)  # fmt: skip
FB_VIF: tuple[_Row, ...] = (  # EN 13757-3 table 14 (second extension, after VIF FB)
    (0x00, 0x01, "energy_kwh", 2), (0x08, 0x09, "energy_mj", 2),
    (0x10, 0x11, "volume_m3", 2), (0x18, 0x19, "mass_kg", 5),
    (0x1A, 0x1B, "relative_humidity_pct", -1),
)  # fmt: skip
# Combinable (orthogonal) VIFEs, EN 13757-3 table 15, that rename a value (bit 7 masked).
VIFE_SUFFIX: dict[int, str] = {
    0x12: "average", 0x13: "inverse_compact_profile", 0x14: "relative_deviation",
    0x1E: "compact_profile_register", 0x1F: "compact_profile", 0x3A: "uncorrected", 0x3B: "forward",
    0x3C: "backward", 0x3E: "base_conditions", 0x3F: "obis", 0x40: "lower_limit",
    0x48: "upper_limit", 0x7E: "future", 0x7F: "mfct",
}  # fmt: skip
RECORD_ERROR_VIFES = range(0x15, 0x1D)  # record error codes, meter -> controller
# Type B records that are identifiers, counters or bit fields: read without a sign
# (`01FD08 80` is access number 128, not -128).
UNSIGNED_NAMES = frozenset({
    "access_number", "medium", "manufacturer", "parameter_set_id", "model_version",
    "hardware_version", "firmware_version", "software_version", "customer_location",
    "customer", "password", "error_flags", "error_mask", "digital_output", "digital_input",
    "baud_rate", "reset_counter", "cumulation_counter", "special_supplier_info",
    "fabrication_no", "enhanced_id", "bus_address",
})  # fmt: skip
# A register total may carry only these qualifiers (gas at base conditions, forward flow).
REGISTER_QUALIFIERS = frozenset({"base_conditions", "forward"})
FUNCTION_SUFFIX = ("", "_max", "_min", "_at_error")  # DIF bits 4-5
MAX_EXTENSIONS = 10  # EN 13757-3 allows at most 10 DIFEs and 10 VIFEs


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record as walked: header bytes and where its value sits."""

    dif_at: int  # offset of the DIF (or -1 for a compact-frame record)
    dib: bytes  # DIF + DIFEs
    vib: bytes  # VIF + VIFEs (+ plain-text unit for VIF 7C)
    lvar: int  # the LVAR byte of a variable-length record, or -1
    data_at: int
    width: int


@dataclass(frozen=True, slots=True)
class Skeleton:
    """The record structure of one payload: hashable, the key of the layout cache."""

    records: tuple[RawRecord, ...]
    fillers: tuple[int, ...]  # offsets of 2F idle fillers
    mfct_at: int  # offset of manufacturer data after 0F/1F, or -1
    end: int
    mfct_dif: int = -1  # the 0F/1F DIF that closed the records
    stop: int = -1  # offset where a malformed record ended the walk (junk to `end`), or -1
    stop_code: int = 0  # the ErrorCode of what was wrong at `stop`
    stop_message: str = ""
    junk: bytes = b""  # the bytes from `stop` on (frames share a layout only if equal)


@dataclass(frozen=True, slots=True)
class Field:
    """A compiled record: its value kernel, extra-dict name and scale."""

    name: str
    kind: Kind
    data_at: int
    width: int
    exponent: int  # value = raw * multiplier * 10**exponent (in the unit of `name`)
    multiplier: int
    storage: int
    tariff: int
    subunit: int
    function: int
    qualifiers: tuple[str, ...]
    record_error: bool  # a record-error VIFE is present
    volume: bool
    is_date: bool
    unsigned: bool = False  # an identifier or bit field: type B read without sign


@dataclass(frozen=True)
class Layout:
    """A compiled skeleton: fields plus the header bytes every frame of it must share."""

    fields: tuple[Field, ...]
    header_at: npt.NDArray[np.intp]
    header_bytes: npt.NDArray[np.uint8]
    format_bytes: bytes  # DIF/VIF bytes without fillers: the compact-frame signature input
    mfct_at: int
    end: int
    stop: int = -1  # where the records ended early (junk or a cut-short record), or -1
    stop_code: int = 0  # the ErrorCode of what was wrong there
    stop_message: str = ""


def walk(data: bytes, start: int) -> Skeleton | tuple[ErrorCode, str]:
    """Walk the records of `data[start:]`; a malformed record ends the walk there.

    Records before a malformed or cut-short one are kept and the rest of the payload is
    noted as junk (`Skeleton.stop`, with the code and message of what was wrong there):
    real meters append FED0 / FFFF, stray bytes after the encryption padding, or cut the
    last record short, and the records before it are sound. Bytes after the closing 2F
    fillers are junk too (OMS pads the last block with 2F; nothing follows but noise).
    Returns (code, message) only when `start` is past the end of `data`.
    """
    if start > len(data):
        return ErrorCode.TRUNCATED, f"records start at offset {start}, past the payload"
    records: list[RawRecord] = []
    fillers: list[int] = []
    pos, end = start, len(data)
    while pos < end:
        dif = data[pos]
        if dif == 0x2F:  # EN 13757-3: idle filler
            fillers.append(pos)
            pos += 1
            continue
        if records and fillers and fillers[-1] == pos - 1 and fillers[-1] > records[-1].dif_at:
            failure = ErrorCode.BAD_RECORD, f"bytes after the closing 2F fillers at offset {pos}"
            return _stopped(records, fillers, data, pos, failure)
        if dif in (0x0F, 0x1F):  # manufacturer-specific data to the end
            return Skeleton(tuple(records), tuple(fillers), pos + 1, end, dif)
        rec = _record(data, pos, end)
        if not isinstance(rec, RawRecord):
            return _stopped(records, fillers, data, pos, rec)
        records.append(rec)
        pos = rec.data_at + rec.width
    return Skeleton(tuple(records), tuple(fillers), -1, end)


def _stopped(
    records: list[RawRecord],
    fillers: list[int],
    data: bytes,
    pos: int,
    failure: tuple[ErrorCode, str],
) -> Skeleton:
    """A skeleton whose records end at `pos`: the bytes from there on are junk."""
    return Skeleton(
        tuple(records), tuple(fillers), -1, len(data), stop=pos, stop_code=failure[0],
        stop_message=failure[1], junk=data[pos:],
    )  # fmt: skip


def _record(data: bytes, pos: int, end: int) -> RawRecord | tuple[ErrorCode, str]:
    """The record whose DIF is at `pos`, or (code, message) if it is malformed."""
    dif = data[pos]
    if dif & 0x0F == 0x0F:
        return ErrorCode.BAD_RECORD, f"special DIF 0x{dif:02X} at offset {pos}"
    head = _extensions(data, pos)
    if head is None or head >= end:
        return ErrorCode.BAD_RECORD, f"record at offset {pos} ends inside its DIB/VIF"
    vif_at = head
    if data[vif_at] & 0x7F == 0x7C:  # plain-text unit: length then ASCII (libmbus order)
        if vif_at + 1 >= end:
            return ErrorCode.BAD_RECORD, f"plain-text VIF at offset {vif_at} is cut off"
        head = vif_at + 2 + data[vif_at + 1]
        more = bool(data[vif_at] & 0x80)
        while more:  # VIFEs follow the text
            if head >= end:
                return ErrorCode.BAD_RECORD, f"VIFE chain at offset {vif_at} is cut off"
            more = bool(data[head] & 0x80)
            head += 1
    else:
        head = _extensions(data, vif_at)
        if head is None:
            return ErrorCode.BAD_RECORD, f"VIFE chain at offset {vif_at} is cut off"
    nibble, lvar = dif & 0x0F, -1
    if nibble == 0xD:  # EN 13757-3 LVAR: the length byte comes with the data
        if head >= end:
            return ErrorCode.TRUNCATED, f"variable record at offset {pos} has no length"
        lvar = data[head]
        width = _lvar_width(lvar)
        if width < 0:
            return ErrorCode.BAD_RECORD, f"LVAR 0x{lvar:02X} at offset {head}"
        head += 1
    else:
        width = DATA_FIELD[nibble][1]
    if head + width > end:
        return ErrorCode.TRUNCATED, f"record at offset {pos} needs {width} data bytes"
    vib = data[vif_at : head - (lvar >= 0)]
    return RawRecord(pos, data[pos:vif_at], vib, lvar, head, width)


def walk_format(fmt: bytes) -> Skeleton | tuple[ErrorCode, str]:
    """Walk header-only format bytes (a compact frame's signature) into a value-stream skeleton."""
    records: list[RawRecord] = []
    pos, data_at = 0, 0
    while pos < len(fmt):
        head = _extensions(fmt, pos)
        if head is None or head >= len(fmt) or fmt[pos] & 0x0F in (0x0D, 0x0F):
            return ErrorCode.UNSUPPORTED, "compact format with variable or special records"
        vif_head = _extensions(fmt, head)
        if vif_head is None or fmt[head] & 0x7F == 0x7C:
            return ErrorCode.UNSUPPORTED, "compact format with a plain-text VIF"
        width = DATA_FIELD[fmt[pos] & 0x0F][1]
        records.append(RawRecord(-1, fmt[pos:head], fmt[head:vif_head], -1, data_at, width))
        pos, data_at = vif_head, data_at + width
    return Skeleton(tuple(records), (), -1, data_at)


def _extensions(data: bytes, pos: int) -> int | None:
    """Offset after the byte at `pos` and its extension chain (bit 7), or None if cut off."""
    count = 0
    while data[pos] & 0x80:
        pos += 1
        count += 1
        if pos >= len(data) or count > MAX_EXTENSIONS:
            return None
    return pos + 1


def _lvar_width(lvar: int) -> int:
    """EN 13757-3 table 5: data bytes after an LVAR byte, or -1 when reserved."""
    if lvar <= 0xBF:
        return lvar  # ASCII text
    if 0xC0 <= lvar <= 0xC9 or 0xD0 <= lvar <= 0xD9:
        return lvar & 0x0F  # positive / negative BCD
    if 0xE0 <= lvar <= 0xEF:
        return lvar - 0xE0  # binary number
    if 0xF0 <= lvar <= 0xF4:
        return 4 * (lvar - 0xEC)
    return -1


@functools.lru_cache(maxsize=4096)
def compile_layout(skeleton: Skeleton) -> Layout:
    """Name, scale and type every record of `skeleton` and list its fixed header bytes."""
    fields: list[Field] = []
    seen: dict[str, int] = {}
    header_at: list[int] = list(skeleton.fillers)
    header_bytes: list[int] = [0x2F] * len(skeleton.fillers)
    if skeleton.mfct_at > 0:  # the closing 0F/1F DIF must match too
        header_at.append(skeleton.mfct_at - 1)
        header_bytes.append(skeleton.mfct_dif)
    if skeleton.stop >= 0:  # the junk too: a frame with other bytes there may have records
        header_at.extend(range(skeleton.stop, skeleton.end))
        header_bytes.extend(skeleton.junk)
    fmt = bytearray()
    for rec in skeleton.records:
        head = rec.dib + rec.vib
        fmt += head
        if rec.dif_at >= 0:
            header_at.extend(range(rec.dif_at, rec.dif_at + len(head)))
            header_bytes.extend(head)
            if rec.lvar >= 0:
                header_at.append(rec.data_at - 1)
                header_bytes.append(rec.lvar)
        field = _compile_record(rec)
        if field is None:
            continue
        count = seen.get(field.name, 0) + 1
        seen[field.name] = count
        if count > 1:  # identical DIF/VIF twice (some meters do): keep both, number them
            field = dataclasses.replace(field, name=f"{field.name}_{count}")
        fields.append(field)
    order = np.argsort(np.asarray(header_at, np.intp), kind="stable")
    return Layout(
        fields=tuple(fields),
        header_at=np.asarray(header_at, np.intp)[order],
        header_bytes=np.asarray(header_bytes, np.uint8)[order],
        format_bytes=bytes(fmt),
        mfct_at=skeleton.mfct_at,
        end=skeleton.end,
        stop=skeleton.stop,
        stop_code=skeleton.stop_code,
        stop_message=skeleton.stop_message,
    )


def _compile_record(rec: RawRecord) -> Field | None:
    """One record's Field, or None for records we leave aside (manufacturer VIF, no data)."""
    dif, difes = rec.dib[0], rec.dib[1:]
    storage, tariff, subunit = (dif >> 6) & 1, 0, 0
    for i, dife in enumerate(difes):  # EN 13757-3 6.3.5: each DIFE adds more significant bits
        storage |= (dife & 0x0F) << (1 + 4 * i)
        tariff |= ((dife >> 4) & 0x03) << (2 * i)
        subunit |= ((dife >> 6) & 0x01) << i
    vif = rec.vib[0] & 0x7F
    vifes = list(rec.vib[1:]) if rec.vib[0] & 0x80 else []
    if vif == 0x7C:  # plain-text unit: skip the text, keep the VIFEs after it
        text = rec.vib[2 : 2 + rec.vib[1]][::-1].decode("ascii", "replace")
        name, exponent, multiplier = "text_" + _slug(text), 0, 1
        vifes = list(rec.vib[2 + rec.vib[1] :])
    elif vif == 0x7F or rec.width == 0:  # manufacturer VIF or no data: left aside
        return None
    elif vif in (0x7D, 0x7B):  # FD / FB extension tables
        if not vifes:
            return None
        ext = vifes.pop(0) & 0x7F
        table, prefix = (FD_VIF, "fd") if vif == 0x7D else (FB_VIF, "fb")
        name, exponent, multiplier = _lookup(table, ext, f"{prefix}_{ext:02x}")
    else:
        name, exponent, multiplier = _lookup(PRIMARY_VIF, vif, f"vif_{vif:02x}")
    qualifiers: list[str] = []
    record_error = False
    codes = iter(v & 0x7F for v in vifes)
    for code in codes:
        if code in RECORD_ERROR_VIFES:
            record_error = True
        elif 0x70 <= code <= 0x77:  # multiplicative correction 10^(nnn-6)
            exponent += code - 0x76
        elif code == 0x7D:  # multiplicative correction 10^3
            exponent += 3
        elif code == 0x7C:  # EN 13757-3: the next VIFE is a code of the extension table
            qualifiers.append(f"vife_7c{next(codes, 0):02x}")  # (not a correction, table 15)
        elif code == 0x7F:  # manufacturer-specific: so are all the VIFEs after it
            qualifiers.append(VIFE_SUFFIX[code])
            break
        else:
            qualifiers.append(VIFE_SUFFIX.get(code, f"vife_{code:02x}"))
    kind, _ = DATA_FIELD.get(dif & 0x0F, (Kind.INT, rec.width))
    if rec.lvar >= 0:
        kind = Kind.TEXT if rec.lvar <= 0xBF else (Kind.BCD if rec.lvar < 0xE0 else Kind.INT)
        if 0xD0 <= rec.lvar <= 0xD9:  # EN 13757-3 table 5: LVAR Dx = negative BCD
            multiplier = -multiplier
        if kind == Kind.TEXT and any("compact_profile" in q for q in qualifiers):
            kind = Kind.BYTES  # EN 13757-3 annex F: a binary profile, not text
        elif kind != Kind.TEXT and rec.width > 8:
            kind = Kind.BYTES
    is_date = name in ("date", "datetime", "battery_change_datetime")
    if is_date:
        kind = {2: Kind.DATE_G, 4: Kind.DATETIME_F, 6: Kind.DATETIME_I}.get(rec.width, kind)
    full = name
    for q in qualifiers:
        full += "_" + q
    full += FUNCTION_SUFFIX[(dif >> 4) & 0x03]
    for label, number in (("storage", storage), ("tariff", tariff), ("subunit", subunit)):
        if number:
            full += f"_{label}{number}"
    return Field(
        full, kind, rec.data_at, rec.width, exponent, multiplier, storage, tariff, subunit,
        (dif >> 4) & 0x03, tuple(qualifiers), record_error, name == "volume_m3", is_date,
        name in UNSIGNED_NAMES and kind == Kind.INT,
    )  # fmt: skip


def _lookup(table: tuple[_Row, ...], code: int, fallback: str) -> tuple[str, int, int]:
    """(name, exponent, multiplier) of a VIF code in a range table."""
    for first, last, name, base in table:
        if first <= code <= last:
            if base is None:
                return name, 0, TIME_UNITS[code & 0x03]
            return name, base + (code - first), 1
    return fallback, 0, 1


def _slug(text: str) -> str:
    """A plain-text unit as an identifier-like suffix."""
    return "".join(c if c.isalnum() else "_" for c in text.strip().lower()).strip("_") or "unit"
