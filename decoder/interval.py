"""Interval batches: one uplink = a base register + K hourly deltas -> K+1 readings.

Our own NB-IoT layout, `nbm1` (what the simulator sends; all integers little-endian):

| offset | size | field |
|---|---|---|
| 0 | 2 | magic `4E 49` ("NI") |
| 2 | 1 | version, 1 |
| 3 | 1 | K, number of hourly deltas (1..24; a day is 23 or 24) |
| 4 | 7 | meter address, packed BCD, low byte first (printed A6..A0, as CJ/T 188) |
| 11 | 4 | base time, UTC epoch s, a whole hour: the time of the base register |
| 15 | 4 | base register, litres |
| 19 | 2 | status, `decoder.columns.Flag` bits |
| 21 | 2K | deltas, litres per hour (reading i = base + sum of the first i deltas) |
| 21+2K | 2 | CRC-16/CCITT-FALSE over bytes 0..20+2K, big-endian |

Version 2 (length 34 + 2K) adds the modem's health between the deltas and the CRC (which
then covers bytes 0..31+2K); a figure the modem did not measure is sent as its "absent"
value (all ones; 0x7FFF for the signed ones):

| offset | size | field |
|---|---|---|
| 21+2K | 2 | battery, mV (uint16; FFFF absent) |
| 23+2K | 2 | RSRP, centi-dBm (int16; 7FFF absent) |
| 25+2K | 2 | SINR, centi-dB (int16; 7FFF absent) |
| 27+2K | 1 | ECL, NB-IoT coverage enhancement level 0..2 (3GPP TS 36.331; FF absent) |
| 28+2K | 4 | E-UTRAN cell id, 28 bits (uint32; FFFFFFFF absent) |

Axioma Qalcosonic W1 layouts (FORMATS §5, vectors/interval_batch.jsonl; LoRaWAN, so only
decoded on a hint `interval` / `interval:<layout>`, never detected): `w1t` (47 B: time,
status, current, temperature, log time, log volume, 14 uint16 deltas), `w1e` (47 B, no
temperature, 15 deltas), `w1h` (51 B "enhanced 24h": version, time, status, log volume,
23 deltas of 14 bits LSB-first; the log time is midnight of the sensor day minus 23 h),
`alarm` (5 B: time + status, no register). Volumes are litres.

Readings: the base register (no INTERVAL) and K expanded ones (Flag.INTERVAL) from a
cumsum over the `(N, K)` delta array; where the payload also has the meter's current
register (w1t/w1e) it is one more reading at the sensor time. The status flags go on the
newest reading of the frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from decoder import kernels as k
from decoder.columns import Column, Decoded, ErrorCode, Flag, concat, empty
from decoder.registry import Format, register

MAGIC = b"NI"
HOUR = 3600
ML_PER_L = 1000


@dataclass(frozen=True)
class Layout:
    """Fixed offsets of one interval layout (None = absent); deltas are (offset, K, bits)."""

    name: str
    sensor_time: int | None
    status: int
    current: int | None
    temperature: int | None
    log_time: int | None
    log_volume: int
    deltas: tuple[int, int, int]


LAYOUTS: Mapping[str, Layout] = {
    "w1t": Layout("w1t", 0, 4, 5, 9, 11, 15, (19, 14, 16)),
    "w1e": Layout("w1e", 0, 4, 5, None, 9, 13, (17, 15, 16)),
    "w1h": Layout("w1h", 1, 5, None, None, None, 6, (10, 23, 14)),
}
QALCOSONIC_LENGTHS = {47: ("w1t", "w1e"), 51: ("w1h",), 5: ("alarm",)}


def _qalcosonic_flags() -> np.ndarray:
    """Status byte -> Flag (FORMATS §5: 04 power low, 08/10 errors, top 3 bits event code)."""
    s = np.arange(256)
    code = s >> 5  # 001 leak, 011 backflow, 101 burst, 100 freeze
    flags = np.where(s & 0x04, Flag.LOW_BATTERY, 0) | np.where(s & 0x18, Flag.METER_ERROR, 0)
    events = [Flag.LEAK, Flag.REVERSE_FLOW, Flag.BURST]
    flags |= np.select([code == 1, code == 3, code == 5], events, 0)
    return flags.astype(np.uint32)


QALCOSONIC_FLAGS = _qalcosonic_flags()


def _deltas(a: k.Frames, off: int, count: int, bits: int) -> k.Int64s:
    """(N, count) deltas: uint16 LE, or `bits`-bit fields packed LSB-first (w1h)."""
    if bits == 16:
        return a[:, off : off + 2 * count].view("<u2").astype(np.int64)
    pos = off * 8 + bits * np.arange(count)
    j, shift = pos // 8, pos % 8
    b = np.concatenate([a, np.zeros((len(a), 3), np.uint8)], axis=1).astype(np.int64)
    return ((b[:, j] | b[:, j + 1] << 8 | b[:, j + 2] << 16) >> shift) & ((1 << bits) - 1)


def _series(base_t: k.Int64s, base_l: k.Int64s, deltas: k.Int64s) -> tuple[k.Int64s, ...]:
    """Vectorized expansion: (N,) base + (N, K) deltas -> (N, K+1) times, mL, flags."""
    n, count = deltas.shape
    volume = np.concatenate([base_l[:, None], base_l[:, None] + np.cumsum(deltas, axis=1)], 1)
    times = base_t[:, None] + HOUR * np.arange(count + 1)
    flags = np.full((n, count + 1), Flag.INTERVAL, np.int64)
    flags[:, 0] = 0
    return times, volume * ML_PER_L, flags


def _assemble(
    out: Decoded, times: k.Int64s, ml: k.Int64s, flags: k.Int64s, meter: np.ndarray
) -> Decoded:
    """(N, P) reading arrays of OK rows (others dropped) -> Decoded in frame order."""
    ok = out.error_code == 0
    per = times.shape[1]
    rows = np.repeat(np.flatnonzero(ok), per).astype(np.int32)
    return Decoded(
        frame_index=rows,
        address=meter[rows],
        read_at_s=times[ok].ravel(),
        register_ml=ml[ok].ravel(),
        flags=flags[ok].ravel().astype(np.uint32),
        format=out.format,
        address_of_frame=out.address_of_frame,
        error_code=out.error_code,
        error_message=out.error_message,
        fields=out.fields,
    )


def _blank(n: int, layout: str) -> Decoded:
    out = empty(n)
    out.format.fill("interval")
    out.fields["layout"] = Column(np.full(n, layout))
    return out


def _fail(out: Decoded, mask: k.Bools, code: ErrorCode, text: str) -> None:
    sel = mask & (out.error_code == 0)
    out.error_code[sel], out.error_message[sel] = code, text


# nbm1 v2 health block (offsets after the deltas): name -> (offset, width, signed, absent)
NBM1_HEALTH: Mapping[str, tuple[int, int, bool, int]] = {
    "battery_mv": (0, 2, False, 0xFFFF),
    "rsrp_cdbm": (2, 2, True, 0x7FFF),
    "sinr_cdb": (4, 2, True, 0x7FFF),
    "ecl": (6, 1, False, 0xFF),
    "cell_id": (7, 4, False, 0xFFFFFFFF),
}
NBM1_HEALTH_BYTES = 11


def _nbm1_health(out: Decoded, a: k.Frames, at: int) -> None:
    """nbm1 v2: the health block at `at` -> columns, present where sent and plausible."""
    ok = out.error_code == 0
    for name, (off, width, signed, absent) in NBM1_HEALTH.items():
        raw = k.u_le(a, at + off, width)
        sent = ok & (raw != absent)
        if signed:
            raw = np.where(raw >= 1 << (8 * width - 1), raw - (1 << (8 * width)), raw)
        if name == "ecl":
            sent &= raw <= 2  # 3GPP TS 36.331: CE level 0..2; anything else is no figure
        if sent.any():
            out.fields[name] = Column(raw, None if sent.all() else sent)


def decode_nbm1(a: k.Frames) -> Decoded:
    """Our `nbm1` layout, `(N, 23+2K)` (v1) or `(N, 34+2K)` (v2) rows of one K -> Decoded."""
    n, width = a.shape
    out = _blank(n, "nbm1")
    tail = NBM1_HEALTH_BYTES if width % 2 == 0 else 0  # v1 is odd, v2 even
    count = (width - 23 - tail) // 2
    bad_magic = (a[:, 0] != MAGIC[0]) | (a[:, 1] != MAGIC[1])
    _fail(out, bad_magic, ErrorCode.BAD_START_STOP, "no NI magic")
    _fail(out, (a[:, 2] != 1) & (a[:, 2] != 2), ErrorCode.UNSUPPORTED, "nbm1 version not 1 or 2")
    bad_k = (a[:, 3] != count) | (count < 1) | (a[:, 2] != (2 if tail else 1))
    _fail(out, bad_k, ErrorCode.BAD_LENGTH, "K does not match the frame length")
    crc = (a[:, width - 2].astype(np.int64) << 8) | a[:, width - 1]
    _fail(out, k.crc16_ccitt(a, width - 2) != crc, ErrorCode.BAD_CHECKSUM, "CRC-16 mismatch")
    base_t = k.u_le(a, 11, 4)
    _fail(out, base_t % HOUR != 0, ErrorCode.BAD_TIME, "base time is not a whole hour")
    meter = k.hex_digits(a, 4, 7, reverse=True)
    out.address_of_frame[:] = meter
    times, ml, flags = _series(base_t, k.u_le(a, 15, 4), _deltas(a, 21, count, 16))
    flags[:, -1] |= k.u_le(a, 19, 2) & ~np.int64(Flag.INTERVAL)
    out.fields["total_m3"] = _litres_as_m3(ml[:, -1])
    if tail:
        _nbm1_health(out, a, 21 + 2 * count)
    return _assemble(out, times, ml, flags, meter)


def decode_qalcosonic(a: k.Frames, layout: Layout) -> Decoded:
    """Axioma Qalcosonic W1 `(N, 47|51)` rows of one layout -> Decoded."""
    n = len(a)
    out = _blank(n, layout.name)
    status = a[:, layout.status]
    sensor = k.u_le(a, layout.sensor_time or 0, 4)
    off, count, bits = layout.deltas
    if layout.name == "w1h":
        _fail(out, a[:, 0] != 1, ErrorCode.UNSUPPORTED, "w1h frame version is not 1")
        base_t = sensor - sensor % 86400 - (count * HOUR)  # midnight of the sensor day - 23 h
    else:  # diwise floors the W1 log time to the hour (w1e logs at hh:43:16 -> hh:00)
        log_t = k.u_le(a, layout.log_time or 0, 4)
        base_t = log_t - log_t % HOUR
    times, ml, flags = _series(
        base_t, k.u_le(a, layout.log_volume, 4), _deltas(a, off, count, bits)
    )
    if layout.current is not None:  # the meter's own register at sensor time: the head
        times = np.concatenate([times, sensor[:, None]], axis=1)
        ml = np.concatenate([ml, k.u_le(a, layout.current, 4)[:, None] * ML_PER_L], axis=1)
        flags = np.concatenate([flags, np.zeros((n, 1), np.int64)], axis=1)
    flags[:, -1] |= QALCOSONIC_FLAGS[status]
    out.fields["status"] = Column(status.copy())
    out.fields["total_m3"] = _litres_as_m3(ml[:, -1])
    if layout.temperature:
        out.fields["temperature_c"] = Column(
            k.u_le(a, layout.temperature, 2), render="decimal", scale=2
        )
    return _assemble(out, times, ml, flags, np.full(n, "", object))


def decode_alarm(a: k.Frames) -> Decoded:
    """Qalcosonic 5-byte alarm packet (uint32 time + status): no register."""
    out = _blank(len(a), "alarm")
    out.error_code[:], out.error_message[:] = ErrorCode.NO_REGISTER, "alarm packet: no register"
    out.fields["alarm_status"] = Column(a[:, 4].copy())
    out.fields["alarm_at_s"] = Column(k.u_le(a, 0, 4))
    return out


def _litres_as_m3(ml: k.Int64s) -> Column:
    """Whole litres of a mL column, rendered as m3 with 3 decimals (Decimal, exact)."""
    return Column(ml // ML_PER_L, render="decimal", scale=3)


def _pick(a: k.Frames, variant: str | None) -> np.ndarray:
    """Layout name per row: the hinted one, else by magic/length (47 B: hour-aligned log time)."""
    n, width = a.shape
    if variant:
        return np.full(n, variant, object)
    names = np.full(n, "", object)
    if width >= 2:
        names[(a[:, 0] == MAGIC[0]) & (a[:, 1] == MAGIC[1])] = "nbm1"
    choices = QALCOSONIC_LENGTHS.get(width, ())
    if len(choices) == 1:
        names[names == ""] = choices[0]
    elif choices:
        w1t_aligned = k.u_le(a, 11, 4) % HOUR == 0
        names[(names == "") & w1t_aligned] = "w1t"
        names[names == ""] = "w1e"
    return names


def decode(
    frames: Sequence[bytes],
    received_at_s: object,
    keys: Mapping[str, bytes] | None = None,
    cache: object | None = None,
    *,
    variant: str | None = None,
) -> Decoded:
    """Interval frames -> Decoded with K+1 readings each; `variant` forces a layout."""
    del received_at_s, keys, cache  # every layout carries its own times
    parts: list[tuple[k.Int64s, Decoded]] = []
    for idx, a in k.group_by_length(frames):
        names = _pick(a, variant)
        for name in np.unique(names):
            rows = np.flatnonzero(names == name)
            sub = a[rows]
            expected = {"w1t": 47, "w1e": 47, "w1h": 51, "alarm": 5}.get(name)
            if name == "nbm1" and a.shape[1] >= 25:
                part = decode_nbm1(sub)
            elif expected == a.shape[1]:
                part = (
                    decode_alarm(sub) if name == "alarm" else decode_qalcosonic(sub, LAYOUTS[name])
                )
            else:
                part = _blank(len(rows), str(name))
                known = name in {"nbm1", "w1t", "w1e", "w1h", "alarm"}
                part.error_code[:] = ErrorCode.BAD_LENGTH if known else ErrorCode.UNSUPPORTED
                part.error_message[:] = (
                    f"{a.shape[1]} bytes do not fit interval layout {name}"
                    if known
                    else f"no interval layout is {a.shape[1]} bytes long (hint one of {sorted(LAYOUTS)}, nbm1, alarm)"  # noqa: E501
                )
            parts.append((idx[rows], part))
    return concat(parts, len(frames))


def looks_like(frame: bytes) -> bool:
    """Only our own `nbm1` is detected: magic, version 1 (length 23 + 2K) or 2 (34 + 2K);
    Qalcosonic needs a hint."""
    return (
        len(frame) >= 25
        and frame[:2] == MAGIC
        and frame[2] in (1, 2)
        and len(frame) == 23 + 2 * frame[3] + (NBM1_HEALTH_BYTES if frame[2] == 2 else 0)
    )


def detect_array(a: k.Frames) -> k.Bools:
    """Vectorized `looks_like` over equal-length rows."""
    n, width = a.shape
    if width < 25:
        return np.zeros(n, bool)
    version, tail = (1, 0) if width % 2 else (2, NBM1_HEALTH_BYTES)
    head = (a[:, 0] == MAGIC[0]) & (a[:, 1] == MAGIC[1]) & (a[:, 2] == version)
    looks: k.Bools = head & (a[:, 3] == (width - 23 - tail) // 2)
    return looks


@dataclass(frozen=True)
class ModemHealth:
    """The nbm1 v2 health block; None is a figure the modem did not measure."""

    battery_mv: int | None = None
    rsrp_cdbm: int | None = None
    sinr_cdb: int | None = None
    ecl: int | None = None
    cell_id: int | None = None

    def encode(self) -> bytes:
        """The 11-byte block; ValueError for a figure the block cannot carry."""
        out = b""
        for name, (_, width, signed, absent) in NBM1_HEALTH.items():
            value = getattr(self, name)
            if value is None:
                out += absent.to_bytes(width, "little")
            elif value == absent or (name == "ecl" and not 0 <= value <= 2):
                msg = f"{name} {value} cannot be sent in nbm1 v2"
                raise ValueError(msg)
            else:
                out += int(value).to_bytes(width, "little", signed=signed)
        return out


def encode_interval(
    address: str,
    base_time_s: int,
    base_ml: int,
    deltas_ml: Sequence[int],
    status: int = 0,
    health: ModemHealth | None = None,
) -> bytes:
    """Build an `nbm1` frame (version 2 when `health` is given); raises ValueError for
    values the layout cannot carry exactly."""
    if len(address) != 14 or not 1 <= len(deltas_ml) <= 24 or base_time_s % HOUR:
        msg = "need a 14-digit address, 1..24 deltas and a whole-hour base time"
        raise ValueError(msg)
    if base_ml % ML_PER_L or any(d % ML_PER_L or d < 0 for d in deltas_ml):
        msg = "nbm1 carries whole litres (>= 0) only"
        raise ValueError(msg)
    head = MAGIC + bytes([1 if health is None else 2, len(deltas_ml)])
    head += bytes.fromhex(address)[::-1]
    body = head + base_time_s.to_bytes(4, "little") + (base_ml // ML_PER_L).to_bytes(4, "little")
    body += status.to_bytes(2, "little")
    body += b"".join((d // ML_PER_L).to_bytes(2, "little") for d in deltas_ml)
    if health is not None:
        body += health.encode()
    return body + k.crc16_ccitt_bytes(body).to_bytes(2, "big")


FORMAT = register(
    Format(
        key="interval",
        detect=looks_like,
        detect_array=detect_array,
        decode=decode,
        variants=frozenset({*LAYOUTS, "nbm1", "alarm"}),
        takes_variant=True,
    )
)
