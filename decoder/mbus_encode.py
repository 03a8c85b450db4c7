"""Encoders for OMS / M-Bus frames: the pure inverse of `decoder.mbus.decode` (simulator use).

Frames carry a volume register (litres as int32 when exact, else mL as int64), an
optional type I meter clock (to the second, UTC) and an optional billing-date register
(storage 1) with its type G date. Wireless frames are CRC-stripped, as the decoder expects.
`encode_oms_plain(..., compact=True)` sends the same records as an EN 13757-3 compact frame (CI 7B):
the format signature of their DIF/VIF headers, the data CRC and the values alone.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from decoder import oms_crypto
from decoder.mbus_link import crc16_en13757

SND_NR = 0x44  # EN 13757-4 C field: send/no reply (periodic meter telegram)
RSP_UD = 0x08  # EN 13757-2 C field: respond user data


def manufacturer_field(code: str) -> bytes:
    """Three letters A-Z -> the 2-byte EN 13757-4 M field (little-endian)."""
    if len(code) != 3 or not code.isalpha() or not code.isupper():
        raise ValueError(f"manufacturer code must be 3 letters A-Z, got {code!r}")
    m = sum((ord(c) - 64) << s for c, s in zip(code, (10, 5, 0), strict=True))
    return m.to_bytes(2, "little")


def id_field(ident: str) -> bytes:
    """An 8-digit id -> 4 BCD bytes, low byte first."""
    if len(ident) != 8 or not ident.isdigit():
        raise ValueError(f"an M-Bus id must be 8 decimal digits, got {ident!r}")
    return bytes.fromhex(ident)[::-1]


def _volume_record(total_ml: int, storage: int) -> tuple[bytes, bytes]:
    """(DIF/VIF, value) of a volume register: litres int32 if exact, else mL int64."""
    st = 0x40 if storage else 0x00  # DIF bit 6 = storage number LSB (EN 13757-3)
    if total_ml % 1000 == 0 and -(2**31) <= total_ml // 1000 < 2**31:
        return bytes([0x04 | st, 0x13]), (total_ml // 1000).to_bytes(4, "little", signed=True)
    if not -(2**63) <= total_ml < 2**63:
        raise ValueError("total_ml does not fit int64")
    return bytes([0x07 | st, 0x10]), total_ml.to_bytes(8, "little", signed=True)


def _type_i(when: datetime) -> bytes:
    """EN 13757-3 type I date+time (second resolution, 6 bytes), years 2000-2080."""
    if when.tzinfo is not None:  # the decoder reads meter time as UTC
        when = when.astimezone(UTC)
    y = when.year - 2000
    if not 0 <= y <= 80:
        raise ValueError("type I dates cover 2000-2080")
    day = ((y & 0x07) << 5) | when.day
    return bytes([when.second, when.minute, when.hour, day, ((y & 0x78) << 1) | when.month, 0])


def _type_g(day: date) -> bytes:
    """EN 13757-3 type G date, years 2000-2080."""
    y = day.year - 2000
    if not 0 <= y <= 80:
        raise ValueError("type G dates cover 2000-2080")
    return bytes([((y & 0x07) << 5) | day.day, ((y & 0x78) << 1) | day.month])


def record_parts(
    total_ml: int, when: datetime | None, target_ml: int | None, target_date: date | None
) -> list[tuple[bytes, bytes]]:
    """The data records as (DIF/VIF header, value) pairs: register, meter clock, billing
    register and its date."""
    out = [_volume_record(total_ml, 0)]
    if when is not None:
        out.append((b"\x06\x6d", _type_i(when)))  # meter clock, to the second
    if target_ml is not None:
        out.append(_volume_record(target_ml, 1))
        if target_date is not None:
            out.append((b"\x42\x6c", _type_g(target_date)))
    return out


def records(
    total_ml: int, when: datetime | None, target_ml: int | None, target_date: date | None
) -> bytes:
    """The data records: register, meter clock, billing register and its date."""
    return b"".join(h + v for h, v in record_parts(total_ml, when, target_ml, target_date))


def compact_records(parts: list[tuple[bytes, bytes]]) -> bytes:
    """EN 13757-3 compact form of `parts`: format signature (CRC-16/EN 13757 of the
    headers, LE), data CRC (of the full records, headers and values, LE), the values."""
    signature = crc16_en13757(b"".join(h for h, _ in parts))
    data_crc = crc16_en13757(b"".join(h + v for h, v in parts))
    values = b"".join(v for _, v in parts)
    return signature.to_bytes(2, "little") + data_crc.to_bytes(2, "little") + values


def encode_oms_plain(
    ident: str,
    manufacturer: str,
    version: int,
    device_type: int,
    access_no: int,
    total_ml: int,
    when: datetime | None = None,
    *,
    target_ml: int | None = None,
    target_date: date | None = None,
    status: int = 0,
    compact: bool = False,
) -> bytes:
    """An unencrypted wM-Bus SND_NR frame (short TPL, security mode 0), CRCs stripped: CI 7A
    with its DIF/VIF headers, or with `compact` the same records as a compact frame (CI 7B:
    signature, data CRC, values), which decodes only through the format a full frame of
    the same model taught (or a known one)."""
    tpl = bytes([0x7B if compact else 0x7A, access_no & 0xFF, status & 0xFF, 0x00, 0x00])
    body = (
        compact_records(record_parts(total_ml, when, target_ml, target_date))
        if compact
        else records(total_ml, when, target_ml, target_date)
    )
    return _wireless(ident, manufacturer, version, device_type, tpl + body)


def encode_oms_mode5(
    ident: str,
    manufacturer: str,
    version: int,
    device_type: int,
    access_no: int,
    total_ml: int,
    key: bytes,
    when: datetime | None = None,
    *,
    target_ml: int | None = None,
    target_date: date | None = None,
    status: int = 0,
) -> bytes:
    """An OMS security mode 5 (AES-128-CBC) wM-Bus frame; raises ValueError on bad input."""
    if len(key) != oms_crypto.BLOCK:
        raise ValueError("AES-128 key must be 16 bytes")
    plain = oms_crypto.pad_blocks(b"\x2f\x2f" + records(total_ml, when, target_ml, target_date))
    blocks = len(plain) // oms_crypto.BLOCK
    if blocks > 15:
        raise ValueError("mode 5 payload exceeds 15 AES blocks")
    a_field = id_field(ident) + bytes([version & 0xFF, device_type & 0xFF])
    iv = oms_crypto.mode5_iv(manufacturer_field(manufacturer), a_field, access_no)
    cw = (5 << 8) | (blocks << 4)  # OMS CW: mode in bits 8-12, encrypted blocks in 4-7
    tpl = bytes([0x7A, access_no & 0xFF, status & 0xFF]) + cw.to_bytes(2, "little")
    return _wireless(
        ident, manufacturer, version, device_type, tpl + oms_crypto.cbc_encrypt(key, iv, plain)
    )


def encode_wired(
    ident: str,
    manufacturer: str,
    version: int,
    device_type: int,
    access_no: int,
    total_ml: int,
    when: datetime | None = None,
    *,
    target_ml: int | None = None,
    target_date: date | None = None,
    status: int = 0,
    address: int = 0,
) -> bytes:
    """A wired RSP_UD long frame (68 L L 68 08 A 72 …) with a long TPL header, CS and 16."""
    body = bytes([RSP_UD, address & 0xFF, 0x72]) + id_field(ident)
    body += manufacturer_field(manufacturer) + bytes(
        [version & 0xFF, device_type & 0xFF, access_no & 0xFF, status & 0xFF, 0, 0]
    )
    body += records(total_ml, when, target_ml, target_date)
    if len(body) > 255:
        raise ValueError("wired frame longer than 255 bytes")
    return bytes([0x68, len(body), len(body), 0x68]) + body + bytes([sum(body) & 0xFF, 0x16])


def _wireless(ident: str, manufacturer: str, version: int, device_type: int, rest: bytes) -> bytes:
    """L C M A(ID V T) + `rest` (CI onwards)."""
    head = bytes([SND_NR]) + manufacturer_field(manufacturer) + id_field(ident)
    frame = head + bytes([version & 0xFF, device_type & 0xFF]) + rest
    if len(frame) > 255:
        raise ValueError("wireless frame longer than 255 bytes")
    return bytes([len(frame)]) + frame
