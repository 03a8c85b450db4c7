"""M-Bus link and transport layers: wired long frames, CRC-stripped wM-Bus frames, ELL, TPL.

`parse(frame, keys)` checks the link layer (EN 13757-2 long frame: start/stop, L, CS;
EN 13757-4 wireless: L), walks the CI chain (ELL 8C/8D, TPL 72/7A/78, compact 79/7B/73),
applies OMS security mode 5 or ELL AES-CTR, and returns an `Envelope` holding the
identity and the plaintext application data. Per-frame failures come back as
`(ErrorCode, message)`; nothing here raises for a bad frame.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from decoder import oms_crypto
from decoder.columns import ErrorCode, Flag, FrameFlag
from decoder.mbus_records import walk

WIRED_START, WIRED_STOP = 0x68, 0x16
ELL_I, ELL_II, AFL = 0x8C, 0x8D, 0x90
TPL_LONG, TPL_SHORT, TPL_NONE = 0x72, 0x7A, 0x78
COMPACT = {0x79: 0, 0x7B: 4, 0x73: 12}  # EN 13757-3 compact frame CI -> TPL header bytes
FULL = {0x78: 0, 0x7A: 4, 0x72: 12}
FIXED_CI = (0x73, 0x77)  # wired EN 1434-3 fixed data structure (LSB / MSB counters)
MFCT_CI = range(0xA0, 0xB8)  # manufacturer-specific application layers
Failure = tuple[ErrorCode, str]


@dataclass(slots=True)
class Envelope:
    """A frame's identity and plaintext application data, ready for the record layer."""

    address: str
    manufacturer: str
    version: int
    device_type: int
    app: bytes  # records (full frame), signature+CRC+values (compact) or fixed data
    compact: bool = False
    fixed: bool = False
    flags: int = 0
    extra: dict[str, object] = field(default_factory=dict)
    notes: int = 0  # FrameFlag bits: what the link/transport layer tolerated

    @property
    def model(self) -> tuple[str, int, int]:
        """(manufacturer, version, device type): the key of a format signature."""
        return self.manufacturer, self.version, self.device_type


@functools.lru_cache(maxsize=4096)
def manufacturer_code(m_field: bytes) -> str:
    """EN 13757-4: three 5-bit letters (c - 64) packed little-endian, e.g. 2D2C -> KAM."""
    m = int.from_bytes(m_field, "little")
    return "".join(chr(((m >> s) & 0x1F) + 64) for s in (10, 5, 0))


def address_of(id_field: bytes) -> str:
    """The 4-byte BCD id printed as wmbusmeters does (last byte first, lowercase hex)."""
    return id_field[::-1].hex()


def status_flags(sts: int) -> int:
    """OMS TPL status byte -> `Flag` bits (application error/alarm, power low, errors)."""
    flags = Flag.LOW_BATTERY if sts & 0x04 else Flag.NONE
    if sts & 0x03 >= 2 or sts & 0x18:
        flags |= Flag.METER_ERROR
    return int(flags)


def _crc_table() -> tuple[int, ...]:
    """Byte-wise table of the EN 13757-4 CRC-16 polynomial 0x3D65."""
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x3D65) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16_en13757(data: bytes) -> int:
    """EN 13757-4 CRC-16: polynomial 0x3D65, init 0, output inverted."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC_TABLE[(crc >> 8) ^ byte]
    return crc ^ 0xFFFF


C_FIELDS = (0x44, 0x46, 0x08, 0x06)  # SND-NR, SND-IR, RSP-UD (EN 13757-4 table 3)
KNOWN_CI = frozenset((ELL_I, ELL_II, AFL, *FULL, *COMPACT, *MFCT_CI))
# EN 13757-4 allows no slack, but receivers append RSSI/CRC bytes or drop a tail; a frame
# whose L is off by at most this much (and whose header is sound) is read as received
L_SLACK = 16


def looks_like(frame: bytes) -> bool:
    """Cheap detection: a wired long frame (68 L L 68 … 16) or a wM-Bus frame (L = len-1,
    an L off by at most `L_SLACK` when the C field and the CI are M-Bus ones, or a frame
    that still carries its format A data-link CRCs, the first of them sound)."""
    n = len(frame)
    if n >= 9 and frame[0] == WIRED_START and frame[3] == WIRED_START:
        return frame[1] == frame[2] and frame[-1] == WIRED_STOP and n == frame[1] + 6
    if n < 12 or frame[1] not in C_FIELDS:
        return False
    if frame[0] == n - 1 or (abs(frame[0] - (n - 1)) <= L_SLACK and frame[10] in KNOWN_CI):
        return True
    return n == _format_a_length(frame[0]) and _crc_at(frame, 0, FIRST_BLOCK)


# EN 13757-4 data-link CRCs (CRC-16 0x3D65, sent big-endian after the bytes they cover).
# Format A: after the first 10 bytes (L C M A), then after every 16 bytes and after the
# last, shorter block; L counts no CRC. Format B: one CRC after the first 126 bytes (L to
# the end of block 2) and, in a longer frame, one at the end; L counts both CRCs.
FIRST_BLOCK, BLOCK, FORMAT_B_FIRST = 10, 16, 126
CRC_SIZE = 2


def _format_a_length(l_field: int) -> int:
    """Bytes a format A frame of this L field takes with its CRCs."""
    rest = max(l_field + 1 - FIRST_BLOCK, 0)
    return l_field + 1 + CRC_SIZE * (1 + -(-rest // BLOCK))


def _crc_at(frame: bytes, start: int, size: int) -> bool:
    """Whether the CRC after frame[start : start + size] matches those bytes."""
    stored = frame[start + size : start + size + CRC_SIZE]
    return crc16_en13757(frame[start : start + size]).to_bytes(2, "big") == stored


def without_link_crcs(frame: bytes) -> bytes | None:
    """A wM-Bus frame received with its data-link CRCs -> the frame without them (and L
    set to match), or None when `frame` does not carry them (every CRC must check).

    Receivers that hand over the raw telegram keep them; left in, they shift the CI and
    fall inside records. Format A is tried when L does not count the frame's bytes, format
    B when a frame longer than 128 bytes has L = length - 1 (a CRC sits at 126-127).
    """
    n = len(frame)
    if n < FIRST_BLOCK + CRC_SIZE + 1 or frame[1] not in C_FIELDS:
        return None
    if frame[0] != n - 1:  # format A
        if n != _format_a_length(frame[0]):
            return None
        starts = [0, *range(FIRST_BLOCK + CRC_SIZE, n, BLOCK + CRC_SIZE)]
        blocks = [(s, min(s + (FIRST_BLOCK if s == 0 else BLOCK), n - CRC_SIZE)) for s in starts]
    elif n > FORMAT_B_FIRST + CRC_SIZE + CRC_SIZE:  # format B with a second CRC
        blocks = [(0, FORMAT_B_FIRST), (FORMAT_B_FIRST + CRC_SIZE, n - CRC_SIZE)]
    else:
        return None
    if not all(_crc_at(frame, s, e - s) for s, e in blocks):
        return None
    data = b"".join(frame[s:e] for s, e in blocks)
    return bytes([len(data) - 1]) + data[1:]


WILDCARD_KEY = "*"  # `keys["*"]`: the key for whichever meter is in the frame


def key_for(keys: Mapping[str, bytes], meter: str) -> bytes | None:
    """The meter's own AES key, else the wildcard `keys["*"]` (a one-frame CLI decode with
    an inline key, before the meter id is known), else None."""
    key = keys.get(meter)
    return keys.get(WILDCARD_KEY) if key is None else key


def is_wired(frame: bytes) -> bool:
    """Whether `frame` is read as a wired long frame: 68 L L 68 (EN 13757-2). A wireless
    frame of 105 bytes starts with L = 0x68 too; its fourth byte is an M field byte."""
    return frame[:1] == bytes([WIRED_START]) and (len(frame) < 12 or frame[3] == WIRED_START)


def parse(frame: bytes, keys: Mapping[str, bytes]) -> Envelope | Failure:
    """Link + transport layers of one frame -> Envelope, or (code, message)."""
    if not frame:
        return ErrorCode.EMPTY, "empty frame"
    if is_wired(frame):
        return _wired(frame, keys)
    return _wireless(frame, keys)


def _wired(frame: bytes, keys: Mapping[str, bytes]) -> Envelope | Failure:
    """EN 13757-2 long frame 68 L L 68 C A CI data CS 16."""
    if len(frame) < 9:
        return ErrorCode.TRUNCATED, f"wired frame of {len(frame)} bytes is shorter than 9"
    if frame[3] != WIRED_START or frame[-1] != WIRED_STOP:
        return ErrorCode.BAD_START_STOP, "wired long frame needs 68 L L 68 … 16"
    if frame[1] != frame[2] or len(frame) != frame[1] + 6:
        return ErrorCode.BAD_LENGTH, f"L fields {frame[1]}/{frame[2]} vs {len(frame)} bytes"
    if sum(frame[4:-2]) & 0xFF != frame[-2]:  # EN 13757-2: CS = sum of C..data mod 256
        return ErrorCode.BAD_CHECKSUM, "wired frame checksum mismatch"
    ci, body = frame[6], frame[7:-2]
    if ci in FIXED_CI:
        if len(body) != 16:
            return ErrorCode.TRUNCATED, "fixed data structure needs 16 bytes"
        medium = (body[6] >> 6) | ((body[7] >> 4) & 0x0C)
        env = Envelope(address_of(body[0:4]), "", 0, medium, body, fixed=True)
        env.flags = status_flags(body[5])
        env.extra.update(access_number=body[4], status=body[5])
        return env
    if ci != TPL_LONG:
        return ErrorCode.UNSUPPORTED, f"wired CI 0x{ci:02X} (only 72 and fixed 73/77 decoded)"
    return _tpl(body, 0, ci, b"", b"", keys)


def _wireless(frame: bytes, keys: Mapping[str, bytes]) -> Envelope | Failure:
    """EN 13757-4 frame with CRCs removed: L C M(2) A(6) CI …."""
    if len(frame) < 12:
        return ErrorCode.TRUNCATED, f"wireless frame of {len(frame)} bytes is shorter than 12"
    notes = 0
    if frame[0] != len(frame) - 1:  # read as received: junk or a cut record is noted later
        if abs(frame[0] - (len(frame) - 1)) > L_SLACK or frame[10] not in KNOWN_CI:
            return ErrorCode.BAD_LENGTH, f"L field {frame[0]} but {len(frame) - 1} bytes follow"
        notes = FrameFlag.LENGTH_MISMATCH
        if frame[0] < len(frame) - 1 and frame[0] >= 11:  # bytes past the meter's L are
            frame = frame[: frame[0] + 1]  # the receiver's (RSSI, LQI, a CRC): never records
            notes |= FrameFlag.TRAILING_JUNK
    m_field, a_field = frame[2:4], frame[4:10]
    pos, ci = 11, frame[10]
    extra: dict[str, object] = {}
    while ci in (ELL_I, ELL_II):  # EN 13757-4 extended link layer, then the next CI
        size = 2 if ci == ELL_I else 8
        if pos + size >= len(frame):
            return ErrorCode.TRUNCATED, f"ELL 0x{ci:02X} is cut off"
        extra["ell_access_number"] = frame[pos + 1]
        if ci == ELL_II:
            got = _ell_ii(frame, pos, m_field, a_field, keys)
            if isinstance(got, tuple):
                return got
            frame = got
        pos += size
        ci = frame[pos]
        pos += 1
    env = _tpl(frame, pos, ci, m_field, a_field, keys)
    if isinstance(env, Envelope):
        env.extra.update(extra)
        env.notes |= notes
    return env


def _ell_ii(
    frame: bytes, pos: int, m: bytes, a: bytes, keys: Mapping[str, bytes]
) -> bytes | Failure:
    """ELL II: CC ACC SN(4) payload-CRC(2); SN bits 29-31 = 1 means AES-128-CTR (Kamstrup)."""
    sn = frame[pos + 2 : pos + 6]
    crc_at = pos + 6
    payload = frame[crc_at + 2 :]
    stored = int.from_bytes(frame[crc_at : crc_at + 2], "little")
    if crc16_en13757(payload) == stored:
        return frame  # plaintext (or decrypted upstream by the receiver)
    encrypted = (int.from_bytes(sn, "little") >> 29) & 0x07
    mid = address_of(a[0:4])
    if encrypted != 1:
        return ErrorCode.BAD_CHECKSUM, "ELL payload CRC mismatch"
    key = key_for(keys, mid)
    if key is None:
        return ErrorCode.NO_KEY, f"no AES key for meter {mid} (ELL AES-CTR payload)"
    plain = oms_crypto.ell_ctr(key, m, a, frame[pos], sn, frame[crc_at:])
    if crc16_en13757(plain[2:]) != int.from_bytes(plain[:2], "little"):
        return ErrorCode.DECRYPT_FAILED, f"wrong AES key for meter {mid} (ELL CRC mismatch)"
    return frame[:crc_at] + plain


def _tpl(
    frame: bytes, pos: int, ci: int, m: bytes, a: bytes, keys: Mapping[str, bytes]
) -> Envelope | Failure:
    """EN 13757-7 transport layer from the CI at frame[pos-1]; applies security mode 5."""
    if ci in MFCT_CI:
        who = manufacturer_code(m) if m else "?"
        return (
            ErrorCode.UNSUPPORTED,
            f"manufacturer-specific CI 0x{ci:02X} ({who}) needs a vendor codec",
        )
    if ci == AFL:  # EN 13757-7 AFL: AFL.L then its fields (FCL, MCL, MCR, MAC…); next CI
        if pos >= len(frame) or pos + frame[pos] + 2 > len(frame):
            return ErrorCode.TRUNCATED, "AFL header is cut off"
        nxt = pos + 1 + frame[pos]
        return _tpl(frame, nxt + 1, frame[nxt], m, a, keys)
    size = FULL.get(ci, COMPACT.get(ci))
    if size is None:
        return ErrorCode.UNSUPPORTED, f"CI 0x{ci:02X} is not an M-Bus data CI we decode"
    if pos + size > len(frame):
        return ErrorCode.TRUNCATED, f"TPL header of CI 0x{ci:02X} is cut off"
    head = frame[pos : pos + size]
    if size == 12:  # long TPL: the identity is the TPL's (repeaters, converters, wired)
        a = head[0:4] + head[6:8]
        m = head[4:6]
    env = Envelope(address_of(a[0:4]), manufacturer_code(m), a[4], a[5], b"", ci in COMPACT)
    body = frame[pos + size :]
    if size:
        acc, sts, cw = head[-4], head[-3], int.from_bytes(head[-2:], "little")
        env.flags = status_flags(sts)
        env.extra.update(access_number=acc, status=sts)
        mode = (cw >> 8) & 0x1F  # OMS: CW bits 8-12 = security mode
        key = key_for(keys, env.address)
        if mode == 5:
            got = _mode5(env.address, m, a, acc, (cw >> 4) & 0x0F, body, key)
            if not isinstance(got, _Plain):
                return got
            body = got.data
            env.notes |= FrameFlag.CLEAR_PAYLOAD if got.clear else 0
        elif mode == 2:  # EN 13757-7 mode 2 (deprecated): DES-CBC, zero IV, check 2F2F
            got2 = _mode2(env.address, body, keys)
            if isinstance(got2, tuple):
                return got2
            body = got2
            env.notes |= FrameFlag.CLEAR_PAYLOAD if key is None else 0  # decrypted upstream
        elif mode == 7:  # OMS 4: a configuration field extension (KDF selection) follows CW
            body = body[1:]
            if key or body[:2] != oms_crypto.MODE5_CHECK:
                return ErrorCode.UNSUPPORTED, (
                    f"security mode 7 (AES-CBC, CMAC KDF) of meter {env.address} is not decrypted"
                )  # only a payload decrypted upstream (2F2F, no key given) is accepted
            env.notes |= FrameFlag.CLEAR_PAYLOAD
        elif mode and mode < 16 and key is None and _in_clear(body):
            env.notes |= FrameFlag.CLEAR_PAYLOAD  # declared, but sent (or delivered) in clear
        elif mode:  # modes 16-31 are manufacturer-specific: a vendor codec's business
            return ErrorCode.UNSUPPORTED, f"security mode {mode} not supported"
        if env.compact and body[:2] == oms_crypto.MODE5_CHECK:
            body = body[2:]  # the decrypt check bytes precede the compact signature
    env.app = body
    return env


def _in_clear(body: bytes) -> bool:
    """Whether a payload that should be encrypted is verifiably in clear: it starts with
    the 2F2F check and its records walk soundly to the end. One ciphertext in 65,536
    starts 2F2F by chance; its bytes then walking as records to the last byte, with a
    register among them, is what a wrong value would take, so both are required."""
    if body[:2] != oms_crypto.MODE5_CHECK:
        return False
    skeleton = walk(body, 0)
    return not isinstance(skeleton, tuple) and skeleton.stop < 0 and bool(skeleton.records)


class _Plain(NamedTuple):
    """A mode 5 payload as plaintext, and whether it came in clear (no decryption)."""

    data: bytes
    clear: bool


def _mode5(
    mid: str, m: bytes, a: bytes, acc: int, blocks: int, body: bytes, key: bytes | None
) -> _Plain | Failure:
    """OMS mode 5: AES-128-CBC over `blocks` 16-byte blocks; plaintext starts 2F 2F."""
    clear = body[:2] == oms_crypto.MODE5_CHECK
    if key is None:
        if clear:
            return _Plain(body, clear=True)  # decrypted upstream (receiver, wmbusmeters simulation)
        return ErrorCode.NO_KEY, f"no AES key for meter {mid} (security mode 5)"
    size = blocks * oms_crypto.BLOCK or len(body) - len(body) % oms_crypto.BLOCK
    if size == 0 or size > len(body):
        if _in_clear(body):
            return _Plain(body, clear=True)
        return ErrorCode.TRUNCATED, f"mode 5 frame of meter {mid} is shorter than {size} bytes"
    if len(key) != oms_crypto.BLOCK:
        return ErrorCode.DECRYPT_FAILED, f"AES key for meter {mid} is not 16 bytes"
    plain = oms_crypto.cbc_decrypt(key, oms_crypto.mode5_iv(m, a, acc), body[:size])
    if plain[:2] != oms_crypto.MODE5_CHECK:
        if _in_clear(body):  # the meter declares mode 5 but sends in clear
            return _Plain(body, clear=True)
        return ErrorCode.DECRYPT_FAILED, f"wrong AES key for meter {mid} (no 2F2F after decrypt)"
    return _Plain(plain + body[size:], clear=False)


def _mode2(mid: str, body: bytes, keys: Mapping[str, bytes]) -> bytes | Failure:
    """EN 13757-7 mode 2: DES-CBC with a zero IV over the whole 8-byte blocks, keyed by the
    first 8 bytes of the meter's key; the plaintext starts 2F 2F (else: wrong key)."""
    key = key_for(keys, mid)
    if key is None:
        if body[:2] == oms_crypto.MODE5_CHECK:
            return body  # decrypted upstream
        return ErrorCode.NO_KEY, f"no DES key for meter {mid} (security mode 2)"
    size = len(body) - len(body) % 8
    if size == 0 or len(key) < 8:
        return ErrorCode.TRUNCATED, f"mode 2 frame of meter {mid} has no whole DES block"
    plain = oms_crypto.des_cbc_decrypt(key[:8], body[:size])
    if plain[:2] != oms_crypto.MODE5_CHECK:
        return ErrorCode.DECRYPT_FAILED, f"wrong DES key for meter {mid} (no 2F2F after decrypt)"
    return plain + body[size:]
