"""CJ/T 188-2004/2018 water and gas meter frames -> `Decoded` (FORMATS.md §1).

Frame: `[FE]*0..6 68 T A0..A6 C L DATA(L) CS 16`, CS = sum of the bytes from 0x68 through
the last DATA byte, mod 256 (CJ/T 188; FE not included, no +0x33 as in DL/T 645).
Only DI 901F read-data replies of water (T=1x) and gas (T=3x) meters carry a reading: the
current total, timestamped by the meter clock (or the receive time + CLOCK_MISSING when
the clock is all-zero, FF-filled or invalid). The settlement-day total is undated in this
layout, so it is not a reading: it goes to `extra["settlement_m3"]` (Decimal, the meter's
own precision) for billing code to use; D120..D12B history replies likewise decode to
`extra` only. Requests, address replies, write commands and abnormal replies decode their
header but end with NO_REGISTER (they are not meter readings).

Per-model behaviour is data (`MODELS`), chosen by the hint `"cjt188:<model>"`:
decimals of the BCD register, the ST bit map, the clock byte order and time zone, and the
checksum span. `mfunhcu` is the linqiu126/mfunhcu PHP backend's *non-standard* DATA-only
checksum: it is never guessed (a frame failing the standard CS is BAD_CHECKSUM), only
applied when the caller says the meter is one of those.

Envelopes (§1.4): a bare frame; FE/ASCII-prefixed datagrams (the 0x68 search skips any
prefix); a hex string anywhere inside platform JSON (`unwrap_json`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import numpy.typing as npt

from decoder import cjt188_kernel as kernel
from decoder import kernels as k
from decoder import limits
from decoder.columns import Decoded, ErrorCode, Flag, concat, empty
from decoder.registry import Format, register

MIN_FRAME = 13  # 68 T A(7) C L CS 16 with L = 0
BEIJING_UTC_OFFSET_S = 8 * 3600

# CJ/T 188 §meter type (FORMATS §1.1); the high nibble is the family. The standard gives
# each family a range (10H..19H water, 20H..29H heat, 30H..39H gas; 2018 Table, as
# ng-gateway lists it) and names only some codes: the others are vendors' own, same family.
METER_TYPES: Mapping[int, str] = {
    **{t: "water" for t in range(0x10, 0x1A)},
    **{t: "heat" for t in range(0x20, 0x2A)},
    **{t: "gas" for t in range(0x30, 0x3A)},
    0x10: "cold water", 0x11: "domestic hot water", 0x12: "drinking water",
    0x13: "reclaimed water", 0x20: "heat", 0x21: "cooling", 0x22: "heat+cooling",
    0x30: "gas", **{t: "custom" for t in range(0x40, 0x4A)}, 0xAA: "wildcard",
}  # fmt: skip
_T_OK = np.zeros(256, bool)
_T_OK[list(METER_TYPES)] = True

# Unit codes (ng-gateway defs.rs, 2004 Table 13 / 2018 Table 20): code -> (unit, multiplier).
VOLUME_UNITS: Mapping[int, tuple[str, int]] = {
    0x29: ("L", 1), 0x2A: ("L", 10), 0x2B: ("L", 100),
    0x2C: ("m3", 1), 0x2D: ("m3", 10), 0x2E: ("m3", 100),
}  # fmt: skip


@dataclass(frozen=True)
class StatusMap:
    """Where a meter model keeps the standard ST bits: which byte, valve mask/values, battery."""

    name: str
    byte: int  # 0 = ST byte0 (standard), 1 = byte1
    valve_mask: int
    closed: int
    abnormal: tuple[int, ...]
    battery_mask: int

    @functools.cache  # noqa: B019  (a handful of frozen module-level maps)
    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """256-entry lookups: status byte -> Flag bits, and -> valve state index (0/1/2)."""
        v = np.arange(256)
        valve = np.where(
            np.isin(v & self.valve_mask, self.abnormal), 2, ((v & self.valve_mask) == self.closed)
        )
        flags = np.where(valve == 1, Flag.VALVE_CLOSED, 0) | np.where(
            valve == 2, Flag.VALVE_ABNORMAL, 0
        )
        flags |= np.where(v & self.battery_mask, Flag.LOW_BATTERY, 0)
        return flags.astype(np.uint32), valve.astype(np.uint8)


# ST byte0, ng-gateway di_types.rs: D1D0 valve 00 open / 01 closed / 11 abnormal, D2 battery.
# sdqr cj188.h reads the same table with the bit order reversed (0xC0 valve, 0x20 battery).
STATUS_MAPS: Mapping[str, StatusMap] = {
    m.name: m
    for m in (
        StatusMap("standard", 0, 0x03, 0x01, (0x02, 0x03), 0x04),
        StatusMap("sdqr", 0, 0xC0, 0x40, (0x80, 0xC0), 0x20),
        StatusMap("byte1", 1, 0x03, 0x01, (0x02, 0x03), 0x04),
    )
}
VALVE_STATES = ("open", "closed", "abnormal")


@functools.cache
def _unit_tables(decimals: int) -> tuple[np.ndarray, np.ndarray]:
    mult, scale = np.zeros(256, np.int64), np.zeros(256, np.int8)
    for code, (name, factor) in VOLUME_UNITS.items():
        mult[code], scale[code] = factor, decimals + (3 if name == "L" else 0)
    mult.flags.writeable = scale.flags.writeable = False
    return mult, scale


@dataclass(frozen=True)
class Model:
    """Per-meter-model reading of the common layout (decimals, ST map, clock, CS span)."""

    name: str
    decimals: int = 2  # CJ/T 188: XXXXXX.XX
    status: str = "standard"
    clock_order: str = "auto"  # "le" ss..CC (standard), "be" CC..ss (field devices), "auto"
    clock_utc_offset_s: int = BEIJING_UTC_OFFSET_S  # meters keep China Standard Time
    checksum: str = "frame"  # "frame" (standard, from 0x68) or "data" (mfunhcu, non-standard)
    # litre units (29H-2BH): vendors differ on their decimals (the standard's XXXXXX.XX, or
    # the BCD as whole litres: FORMATS §1.3, a 100x difference), so a model reads them only
    # when it says which; else such a frame is refused (BAD_UNIT), never guessed
    reads_litres: bool = False

    @property
    def status_map(self) -> StatusMap:
        """The named ST bit map this model uses."""
        return STATUS_MAPS[self.status]

    def m3(self, count: int, unit: int) -> Decimal:
        """Exact m3 at the meter's stated precision: 55667700 (2C) -> Decimal('556677.00')."""
        name, mult = VOLUME_UNITS[unit]
        return Decimal(count * mult).scaleb(-self.decimals - (3 if name == "L" else 0))

    def unit_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """256-entry tables of `m3` in columns: unit code -> (multiplier, decimal scale)."""
        return _unit_tables(self.decimals)

    def reads(self, unit: int) -> bool:
        """Whether this model reads volume unit code `unit` (see `reads_litres`)."""
        name = VOLUME_UNITS[unit][0] if unit in VOLUME_UNITS else None
        return name == "m3" or (name == "L" and self.reads_litres)

    def ml_per_count(self) -> np.ndarray:
        """256-entry table: unit code -> mL per BCD count (0 = not a volume / not exact)."""
        table = np.zeros(256, np.int64)
        for code, (unit, mult) in VOLUME_UNITS.items():
            exp = (6 if unit == "m3" else 3) - self.decimals
            table[code] = mult * 10**exp if exp >= 0 and self.reads(code) else 0
        return table


MODELS: Mapping[str, Model] = {
    m.name: m
    for m in (
        Model("standard"),
        Model("standard-litres", reads_litres=True),  # litre units as XXXXXX.XX too
        Model("mfunhcu", checksum="data"),  # linqiu126/mfunhcu: CS over DATA only
        Model("sdqr", status="sdqr"),  # xijunzhou sdqr cj188.h bit order
        # NB-IoT platform capture: BCD = whole litres
        Model("bcd-integer", decimals=0, reads_litres=True),
        Model("cjs-tool", decimals=0, status="byte1", reads_litres=True),  # cjt188-protocol.cjs
    )
}

# Golden frame -> fields (FORMATS §1.2 worked example with the CORRECT CS 13, and others).
EXAMPLES: tuple[tuple[str, Mapping[str, object]], ...] = (
    (
        "68104433221100337881161F9000007766552C007766552C3101221105152021841316",
        {"address": "78330011223344", "total_ml": 556_677_000_000, "total_m3": "556677.00",
         "settlement_m3": "556677.00", "read_at_s": 1431352891,  # 2015-05-11 22:01:31 +08:00
         "status_hex": "2184",
         "valve": "closed", "flags": Flag.VALVE_CLOSED, "error_code": ErrorCode.OK},
    ),
    (
        "6810880527101520008116901F01000000002C000000002C0620170901172000008E16",
        {"address": "00201510270588", "total_ml": 0, "read_at_s": 1483953606,  # 17:20:06 +08:00
         "flags": Flag.NONE, "error_code": ErrorCode.OK},
    ),
    (
        "FEFE68108967452301337883030A81A73416",
        {"address": "78330123456789", "error_code": ErrorCode.NO_REGISTER},
    ),
)  # fmt: skip


def unwrap_json(frame: bytes) -> bytes | None:
    """Platform JSON (e.g. OceanConnect `services[0].data...`) -> the CJ/T 188 bytes in it.

    None when there are none, or the JSON is malformed or past `decoder.limits`."""
    try:
        doc = limits.load_json(frame)
    except ValueError:  # LimitError, JSONDecodeError, UnicodeDecodeError
        return None
    stack: list[object] = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, list):
            stack.extend(reversed(node))
        elif isinstance(node, str) and len(node) >= 2 * MIN_FRAME:
            try:
                raw = bytes.fromhex(node)
            except ValueError:
                continue
            if locate(k.stack([raw]))[1][0]:
                return raw
    return None


def locate(a: k.Frames) -> tuple[k.Int64s, k.Bools]:
    """Start of the frame (the 0x68 after any FE/ASCII prefix) per row, and whether found."""
    return kernel.locate(a, _T_OK)


def detect_array(a: k.Frames) -> k.Bools:
    """Rows of an `(N, L)` array that hold a CJ/T 188 frame (bare, prefixed or in JSON)."""
    found = locate(a)[1]
    if a.shape[1] and (json_rows := np.flatnonzero(~found & (a[:, 0] == 0x7B))).size:
        found[json_rows] = [unwrap_json(a[i].tobytes()) is not None for i in json_rows]
    return found


def looks_like(frame: bytes) -> bool:
    """True when `frame` holds a CJ/T 188 frame (see `detect_array`)."""
    return bool(frame) and bool(detect_array(k.stack([frame]))[0])


def _model(variant: str | None) -> Model | str:
    """The hinted model, or a message saying which models exist."""
    model = MODELS.get(variant or "standard")
    return model or f"unknown CJ/T 188 model {variant!r}; known: {sorted(MODELS)}"


def _unsupported(n: int, message: str) -> Decoded:
    out = empty(n)
    out.error_code[:] = ErrorCode.UNSUPPORTED
    out.error_message[:] = message
    return out


def decode(
    frames: Sequence[bytes],
    received_at_s: npt.ArrayLike,
    keys: Mapping[str, bytes] | None = None,
    cache: object | None = None,
    *,
    variant: str | None = None,
    utc_offset_s: kernel.Offset | None = None,
) -> Decoded:
    """Raw frames (any mix of lengths/envelopes) -> Decoded; per-frame codes, never raises.

    `utc_offset_s` is the meter clocks' offset from UTC (int, or one per frame); None
    means the model's (China Standard Time, +8 h)."""
    n = len(frames)
    rx = k.as_received(received_at_s, n)
    model = _model(variant)
    if isinstance(model, str):
        return _unsupported(n, model)
    parts: list[tuple[k.Int64s, Decoded]] = []
    per_row = utc_offset_s is not None and np.ndim(utc_offset_s) > 0
    for idx, a in k.group_by_length(frames):
        off = np.asarray(utc_offset_s, np.int64)[idx] if per_row else utc_offset_s
        parts.append((idx, decode_array(a, rx[idx], variant=variant, utc_offset_s=off)))
    if len(parts) == 1 and len(parts[0][0]) == n and (parts[0][0] == np.arange(n)).all():
        return parts[0][1]
    return concat(parts, n)


def decode_array(
    a: k.Frames,
    received_at_s: k.Int64s,
    keys: Mapping[str, bytes] | None = None,
    cache: object | None = None,
    *,
    variant: str | None = None,
    utc_offset_s: kernel.Offset | None = None,
) -> Decoded:
    """`(N, L)` equal-length raw frames -> Decoded (the registry's no-copy batch path).

    Platform JSON rows (first byte `{`) are unwrapped and decoded one by one; the rest go
    through the kernel at once. Same contract as `decode`."""
    del keys, cache  # CJ/T 188-2018 security chapter has no public implementation
    n = len(a)
    rx = k.as_received(received_at_s, n)
    model = _model(variant)
    if isinstance(model, str):
        return _unsupported(n, model)
    offset = model.clock_utc_offset_s if utc_offset_s is None else utc_offset_s
    offset = int(offset) if np.ndim(offset) == 0 else np.asarray(offset, np.int64)
    if not a.shape[1] or not (is_json := a[:, 0] == 0x7B).any():
        return kernel.decode_array(a, rx, model, _T_OK, offset)
    parts: list[tuple[k.Int64s, Decoded]] = []
    plain, wrapped = np.flatnonzero(~is_json), np.flatnonzero(is_json)
    if plain.size:
        off = offset[plain] if isinstance(offset, np.ndarray) else offset
        parts.append((plain, kernel.decode_array(a[plain], rx[plain], model, _T_OK, off)))
    inner = [unwrap_json(a[i].tobytes()) for i in wrapped]
    got = np.array([i for i, r in zip(wrapped, inner, strict=True) if r is not None], np.int64)
    lost = np.array([i for i, r in zip(wrapped, inner, strict=True) if r is None], np.int64)
    if got.size:
        sub = decode(
            [r for r in inner if r is not None], rx[got], variant=variant,
            utc_offset_s=offset[got] if isinstance(offset, np.ndarray) else offset,
        )  # fmt: skip
        parts.append((got, sub))
    if lost.size:
        bad = empty(lost.size)
        bad.error_code[:] = ErrorCode.BAD_RECORD
        bad.error_message[:] = "platform JSON holds no hex string with a CJ/T 188 frame"
        parts.append((lost, bad))
    return concat(parts, n)


FORMAT = register(
    Format(
        key="cjt188",
        detect=looks_like,
        detect_array=detect_array,
        decode=decode,
        decode_array=decode_array,
        variants=frozenset(MODELS),
        takes_variant=True,
        takes_utc_offset=True,
    )
)
