"""SenML packs (RFC 8428), JSON and CBOR, -> Decoded; LwM2M water meter object 3424.

A pack is resolved per RFC 8428 §4.6: name = bn + n, time = bt + t, value = bv + v,
sum = bs + s, unit = u or bu; base fields apply from the record that carries them on.
A resolved time below 2**28 is relative to "now" (§4.5.3): it is anchored to the receive
time the caller passes. Numbers stay exact: JSON floats parse as Decimal from the literal,
CBOR floats become Decimal(shortest repr), CBOR tag 4 decimal fractions are Decimal.

Readings are the volume records: LwM2M `…/3424/<inst>/1` (cumulated water volume, m3) or,
in a pack without one, a record with unit `m3` or `l`/`L` whose name is no LwM2M object
path (an IPSO 3300 reading in m3 is no register). `read_at_s` is the resolved time floored
to whole seconds, or the instance's 3424/x/5518 measurement timestamp where one is given.
Values are exact: a number with more significant digits than a double holds (Zephyr prints
123.456 as 123.456000000000003) is a printed double, read as the whole mL within its
rounding; a float32's 12.345000267 m3 is no whole mL and is refused. Resources 9..13 of the
same 3424 instance and time set LEAK / REVERSE_FLOW / METER_ERROR / TAMPER; a value its
meter marks invalid (6042 quality 1/2, 6049 level 0) is not a reading. A record that cannot
be read is dropped alone (`extra["dropped_records"]`, FrameFlag.RECORD_DROPPED); a bad base
field refuses the pack. Readings of two 3424 instances or meters in one pack are refused.
`address` is the name before `/3424/…` (or bn without its trailing
separator); LwM2M paths (`/3424/0/1`) carry no identity, so it is "" and the collector
attaches the endpoint name. All resolved records go to `extra["records"]`. Device health
from LwM2M objects 3 and 4 (battery mV/%, RSRP, SINR, cell id, coverage level) goes to
extra fields named with their units (`HEALTH_FIELDS`), only from the records of the
readings' meter (or bare paths); battery mV only from a power source 3/0/6 calls a battery.
A pack of health alone is NO_REGISTER but keeps its health
fields and, as the frame's address, the one meter its health records name (records naming
two meters: no health); the collector stores that health for an authenticated device.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import NamedTuple, TypeAlias

import cbor2
import numpy as np
import numpy.typing as npt

from decoder import kernels as k
from decoder import limits
from decoder.columns import Decoded, ErrorCode, Flag, FrameFlag, empty
from decoder.registry import Format, register

REL_TIME_LIMIT = 2**28  # RFC 8428 §4.5.3
MAX_VERSION = 10  # RFC 8428 §4.4 default bver
CBOR_LABELS: Mapping[int, str] = {
    -1: "bver", -2: "bn", -3: "bt", -4: "bu", -5: "bv", -6: "bs",
    0: "n", 1: "u", 2: "v", 3: "vs", 4: "vb", 5: "s", 6: "t", 7: "ut", 8: "vd",
}  # fmt: skip
LABEL_OF = {name: label for label, name in CBOR_LABELS.items()}
VOLUME_ML_PER_UNIT: Mapping[str, int] = {"m3": 1_000_000, "l": 1000, "L": 1000}
WATER_VOLUME = re.compile(r"(?:^|/)3424/(\d+)/1$")  # OMA 3424 res 1: cumulated volume, m3
WATER_ALARM = re.compile(r"(?:^|/)3424/(\d+)/(9|10|11|12|13)$")
# 3424 v1.1 (IPSO common resources): 5518 Timestamp, when the measurement was performed;
# 6042 Measurement Quality Indicator (1 REJECTED WITH CERTAINTY, 2 REJECTED WITH
# PROBABILITY: "the measured value is (likely) invalid"); 6049 Measurement Quality Level
# (0: "the measurement should certainly be rejected")
WATER_NOTE = re.compile(r"(?:^|/)3424/(\d+)/(5518|6042|6049)$")
REJECTED_QUALITY: Mapping[str, frozenset[Decimal]] = {
    "6042": frozenset({Decimal(1), Decimal(2)}),
    "6049": frozenset({Decimal(0)}),
}
# a name that ends in an LwM2M object path (/object/instance/resource[/instance]): a
# unit m3/l on another object's resource (IPSO 3300 Generic Sensor, a tank) is no register
LWM2M_PATH = re.compile(r"(?:^|/)\d{1,5}/\d{1,5}/\d{1,5}(?:/\d{1,5})?$")
# IEEE 754 binary64 holds 15-17 significant decimal digits; a literal with more is a
# printed double (Zephyr's lwm2m_ftoa writes 17 fraction digits rounded to 15:
# 123.456 -> 123.456000000000003), whose digits past the double's precision are noise
DOUBLE_DIGITS = 16
ULPS = 4  # the printer's own arithmetic error on top of the double's rounding
_ONE, _ML_TOLERANCE = Decimal(1), Decimal("0.001")  # (a printed double's noise is below)
ALARM_FLAGS: Mapping[str, Flag] = {  # 3424: 9/10 leak suspected/detected, 11 back-flow,
    "9": Flag.LEAK, "10": Flag.LEAK, "11": Flag.REVERSE_FLOW,  # 12 blocked, 13 fraud
    "12": Flag.METER_ERROR, "13": Flag.TAMPER,
}  # fmt: skip
_VALUE_KEYS = frozenset({"v", "vs", "vb", "vd", "s"})
_BASE_KEYS = frozenset({"bver", "bn", "bt", "bu", "bv", "bs"})
_LABELS = frozenset(LABEL_OF)
# `_usual`, the one pass over a usual pack: its fields, and its numbers as Decimals (an
# operation of two Decimals is faster than of a Decimal and an int, and exactly the same)
_USUAL = frozenset({"bn", "bt", "bu", "n", "t", "u", "v", "vb"})
_ZERO = Decimal(0)  # the default base value (RFC 8428 §4.6)
_REL_TIME_LIMIT = Decimal(REL_TIME_LIMIT)
_EPOCH_END = Decimal(2**40)  # a reading's time is an epoch second below this
_ML_PER_UNIT = {unit: Decimal(ml) for unit, ml in VOLUME_ML_PER_UNIT.items()}
# LwM2M device health (OMA objects 3 Device and 4 Connectivity Monitoring): path -> the
# extra field it fills. 3/7 is a multiple-instance resource (/3/0/7/0 in LwM2M 1.1 paths).
HEALTH_RESOURCE = re.compile(r"(?:^|/)(3|4)/\d+/(\d+)(?:/(\d+))?$")
POWER_SOURCES = re.compile(r"(?:^|/)3/\d+/6(?:/(\d+))?$")  # 3/0/6: Available Power Sources
BATTERY_SOURCES = frozenset({Decimal(1), Decimal(2)})  # 1 internal, 2 external battery
HEALTH_FIELDS: Mapping[tuple[str, str], str] = {
    ("3", "7"): "battery_mv",  # Power Source Voltage, mV
    ("3", "9"): "battery_pct",  # Battery Level, %
    ("4", "2"): "rsrp_dbm",  # Radio Signal Strength, dBm (RSRP on LTE/NB-IoT)
    ("4", "8"): "cell_id",  # Cell ID
    ("4", "11"): "sinr_db",  # SignalSNR, dB (object 4 v1.1+)
    ("4", "13"): "ecl",  # Coverage Enhancement Level (object 4 v1.3: NB-IoT CE 0..2)
}
_WHOLE = frozenset({"battery_mv", "battery_pct", "cell_id", "ecl"})

EXAMPLES: tuple[tuple[bytes, int, Mapping[str, object]], ...] = (
    (  # LwM2M Send of a 3424 water meter: two hourly points, the second relative to bt
        b'[{"bn":"urn:imei:861234567890123/3424/0/","bt":1700000000,"n":"1","u":"m3",'
        b'"v":123.456},{"n":"1","t":3600,"v":123.789},{"n":"10","t":3600,"vb":true}]',
        1700007200,
        {"address": "urn:imei:861234567890123", "register_ml": [123_456_000, 123_789_000],
         "read_at_s": [1700000000, 1700003600], "flags": [Flag.NONE, Flag.LEAK]},
    ),
)  # fmt: skip


class SenMLError(ValueError):
    """One pack is unusable; carries the ErrorCode the frame gets."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        extra: dict[str, object] | None = None,
        address: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra or {}
        self.address = address  # the meter the refused pack names, if one


def _num(value: object, field: str) -> Decimal:
    """A SenML number -> exact Decimal (bool is not a number; NaN/inf are refused)."""
    if type(value) is Decimal:  # the common cases first: a JSON literal, parsed exact
        if value.is_finite():
            return value
    elif type(value) is int:
        return Decimal(value)
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise SenMLError(ErrorCode.BAD_RECORD, f"{field} must be a number, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SenMLError(ErrorCode.BAD_RECORD, f"{field} is not finite")
        return Decimal(repr(value))
    out = Decimal(value)
    if not out.is_finite():
        raise SenMLError(ErrorCode.BAD_RECORD, f"{field} is not finite")
    return out


def _no_constant(name: str) -> object:
    raise SenMLError(ErrorCode.BAD_RECORD, f"JSON constant {name} is not a SenML number")


def parse(frame: bytes) -> tuple[list[dict[str, object]], str]:
    """Raw pack -> (records with field names, "json" or "cbor"); raises SenMLError.

    Parsed within `decoder.limits` (size, nesting depth, CBOR number tags only): a pack
    past a limit is MALFORMED."""
    head = frame.lstrip()[:1]
    try:
        if head == b"[":
            # Leshan accepts a trailing "]," (FORMATS §3); strip trailing commas only.
            text = frame.rstrip().rstrip(b",")
            pack = limits.load_json(text, parse_float=Decimal, parse_constant=_no_constant)
            encoding = "json"
        else:
            pack, encoding = limits.load_cbor(frame), "cbor"
    except limits.LimitError as exc:
        raise SenMLError(ErrorCode.MALFORMED, str(exc)) from exc
    if not isinstance(pack, list):
        raise SenMLError(ErrorCode.BAD_RECORD, "a SenML pack is an array of records")
    if encoding == "json" and set(map(type, pack)) <= {dict}:
        return pack, encoding  # JSON keys are names already
    records = []
    for rec in pack:
        if not isinstance(rec, dict):
            raise SenMLError(ErrorCode.BAD_RECORD, "a SenML record is a map/object")
        # JSON keys are names already; CBOR's are labels (or, past RFC 8428, anything)
        if encoding == "json":
            records.append(rec)
        else:
            records.append(
                {CBOR_LABELS[key] if key in CBOR_LABELS else str(key): v for key, v in rec.items()}
            )
    return records, encoding


def resolve(
    records: Sequence[Mapping[str, object]],
    received_at_s: int,
    dropped: list[tuple[str, SenMLError]] | None = None,
) -> list[dict[str, object]]:
    """Records -> resolved records (RFC 8428 §4.6) with absolute Decimal `t`; SenMLError.

    A bad base field (bn, bt, bu, bv, bs, bver) or a must-understand field refuses the
    pack: every later record depends on it. A record whose own fields are bad (n, t, u, v,
    vs, vb, vd, s, ut) raises too, unless `dropped` is given: then that record alone is
    left out and (its name or "", the error) appended there, so one unreadable secondary
    record does not cost the pack its register."""
    bn, bt, bu, bv, bs, bs_set = "", Decimal(0), None, Decimal(0), Decimal(0), False
    out: list[dict[str, object]] = []
    for rec in records:
        keys = rec.keys()
        labelled = keys <= _LABELS  # no must-understand field, nothing to copy over as is
        if not labelled and (must := [key for key in rec if key.endswith("_")]):
            raise SenMLError(ErrorCode.UNSUPPORTED, f"must-understand field(s) {must}")
        if not keys.isdisjoint(_BASE_KEYS):
            if "bver" in rec and _num(rec["bver"], "bver") > MAX_VERSION:
                raise SenMLError(ErrorCode.UNSUPPORTED, f"SenML version {rec['bver']} > 10")
            if "bn" in rec:
                bn = _text(rec["bn"], "bn")
            if "bt" in rec:
                bt = _num(rec["bt"], "bt")
            if "bu" in rec:
                bu = _text(rec["bu"], "bu")
            if "bv" in rec:
                bv = _num(rec["bv"], "bv")
            if "bs" in rec:
                bs, bs_set = _num(rec["bs"], "bs"), True
        if keys.isdisjoint(_VALUE_KEYS):
            continue  # a record of base fields only
        try:
            res = _record(rec, (bn, bt, bu, bv, bs, bs_set), received_at_s)
        except SenMLError as exc:
            if dropped is None:
                raise
            name = rec.get("n", "")
            dropped.append((bn + name if isinstance(name, str) else bn, exc))
            continue
        if not labelled:
            res.update({key: val for key, val in rec.items() if key not in LABEL_OF})
        out.append(res)
    return out


_Bases: TypeAlias = tuple[str, Decimal, str | None, Decimal, Decimal, bool]


def _record(rec: Mapping[str, object], bases: _Bases, received_at_s: int) -> dict[str, object]:
    """One record's own fields resolved against the base values in force; SenMLError."""
    bn, bt, bu, bv, bs, bs_set = bases
    name = bn + _text(rec.get("n", ""), "n")
    if not name:
        raise SenMLError(ErrorCode.BAD_RECORD, "record has no name (bn + n is empty)")
    t = bt + _num(rec.get("t", 0), "t")
    if t < REL_TIME_LIMIT:
        t += received_at_s
    res: dict[str, object] = {"n": name, "t": t}
    unit = _text(rec["u"], "u") if "u" in rec else bu
    if unit is not None:
        res["u"] = unit
    if "v" in rec:
        res["v"] = bv + _num(rec["v"], "v")
    if "s" in rec or bs_set:
        res["s"] = bs + _num(rec.get("s", 0), "s")
    if "vs" in rec:
        res["vs"] = _text(rec["vs"], "vs")
    if "vd" in rec:
        res["vd"] = _text(rec["vd"], "vd")
    if "vb" in rec:
        if not isinstance(rec["vb"], bool):
            raise SenMLError(ErrorCode.BAD_RECORD, "vb must be a boolean")
        res["vb"] = rec["vb"]
    if "ut" in rec:
        res["ut"] = _num(rec["ut"], "ut")
    return res


class _Name(NamedTuple):
    """What a resolved record's name says, worked out once per name (`_name`)."""

    volume: str | None  # LwM2M 3424/x/1: the name up to the instance (the reading's key)
    address: str | None  # ... and the meter's address (the name before /3424/)
    alarm: tuple[str, Flag] | None  # 3424/x/9..13: (name up to the instance, its flag)
    health: tuple[str, str, str] | None  # objects 3/4: (meter, extra field, res. instance)
    note: tuple[str, str] | None  # 3424/x/5518|6042|6049: (name up to the instance, res)
    lwm2m: bool  # the name ends in an LwM2M object path
    power_source: str | None  # 3/x/6 Available Power Sources: its resource instance ("")
    noted: bool  # an alarm or a note: a record `_notes` reads
    healthy: bool  # health or a power source: a record `health_of` reads


@functools.lru_cache(maxsize=4096)  # a pack repeats its names; bare LwM2M paths recur
def _name(name: str) -> _Name:
    volume = WATER_VOLUME.search(name)
    alarm = WATER_ALARM.search(name)
    note = WATER_NOTE.search(name)
    health = HEALTH_RESOURCE.search(name)
    field = HEALTH_FIELDS.get((health.group(1), health.group(2))) if health else None
    return _Name(
        name[: volume.end(1)] if volume else None,
        name[: volume.start()].rstrip("/:") if volume else None,
        (name[: alarm.end(1)], ALARM_FLAGS[alarm.group(2)]) if alarm else None,
        (name[: health.start()].rstrip("/:"), field, health.group(3) or "")
        if health and field
        else None,
        (name[: note.end(1)], note.group(2)) if note else None,
        LWM2M_PATH.search(name) is not None,
        (power.group(1) or "") if (power := POWER_SOURCES.search(name)) else None,
        bool(alarm or note),
        bool((health and field) or power),
    )


def _text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise SenMLError(ErrorCode.BAD_RECORD, f"{field} must be a string, got {value!r}")
    return value


def _reading(rec: Mapping[str, object], lwm2m: bool) -> tuple[int, int, str, Decimal, str] | None:
    """A resolved volume record -> (read_at_s, register_ml, instance key, value, unit);
    else None.

    A volume record is LwM2M 3424/x/1, or (in a pack with no 3424/x/1, under a name that
    is no LwM2M object path) any record in m3 or l. SenMLError when it is one but not
    usable."""
    name, unit = str(rec["n"]), rec.get("u")
    parts = _name(name)
    prefix = parts.volume
    if prefix is None and (unit not in VOLUME_ML_PER_UNIT or lwm2m or parts.lwm2m):
        return None
    unit = "m3" if unit is None else unit
    if unit not in VOLUME_ML_PER_UNIT:
        raise SenMLError(ErrorCode.BAD_UNIT, f"{name}: volume unit {unit!r} is not m3 or l")
    raw = rec.get("v", rec.get("s"))
    if not isinstance(raw, Decimal):
        raise SenMLError(ErrorCode.BAD_RECORD, f"{name}: volume record has no numeric value")
    ml = _whole_ml(raw, VOLUME_ML_PER_UNIT[str(unit)])
    if ml is None or ml < 0 or ml >= 2**63:
        raise SenMLError(ErrorCode.BAD_UNIT, f"{name}: {raw} {unit} is not a whole mL >= 0")
    t = rec["t"]
    if not isinstance(t, Decimal) or not 0 <= t < 2**40:
        raise SenMLError(ErrorCode.BAD_TIME, f"{name}: time {t} is not a plausible epoch")
    at = _floor(t)
    return at, ml, f"{prefix or name}|{at}", raw, str(unit)


def _m3(raw: Decimal, unit: str, ml: int) -> Decimal:
    """A volume record's value in m3: as written, unless it is a printed double's noise
    around whole mL (`_whole_ml`), then those whole mL (worked out for the register
    reported, not for every record)."""
    m3 = raw if unit == "m3" else raw.scaleb(-3)
    if m3.scaleb(6) != ml:  # a printed double's noise: the whole mL it carries
        m3 = Decimal(ml).scaleb(-6)
    return m3


def _whole_ml(raw: Decimal, ml_per_unit: int) -> int | None:
    """`raw` units as whole mL, or None when it is not a whole mL.

    Exact, except for a number written with more significant digits than a double holds
    (`DOUBLE_DIGITS`): that is a printed binary double, and a whole mL within the
    double's rounding (`ULPS` ulps plus the last printed digit) is the value it carries,
    provided that tolerance is far below one mL. A short float (float32 12.345 ->
    12.345000267...) is far off any whole mL and stays refused."""
    ml = raw * ml_per_unit
    whole = ml.to_integral_value()
    if ml == whole:
        return int(whole)
    _, digits, exponent = raw.as_tuple()
    if len(digits) < DOUBLE_DIGITS:
        return None
    assert isinstance(exponent, int)  # finite: `_num` refuses NaN and infinities
    tolerance = (Decimal(ULPS * math.ulp(float(raw))) + _ONE.scaleb(exponent)) * ml_per_unit
    if tolerance < _ML_TOLERANCE and abs(ml - whole) <= tolerance:
        return int(whole)
    return None


def _floor(t: object) -> int:
    """Resolved SenML time -> whole epoch seconds (floor: 76.999 s belongs to second 76)."""
    assert isinstance(t, Decimal)
    return int(t.to_integral_value("ROUND_FLOOR"))


def _address_of(name: str, base: str) -> str:
    address = _name(name).address
    if address is not None:
        return address
    return base.rstrip("/:") if base else name


def _health_owner(name: str) -> str | None:
    """The meter a health record's name reports ("": a bare LwM2M path); None: no health."""
    health = _name(name).health
    return None if health is None else health[0]


def health_of(
    resolved: Sequence[Mapping[str, object]], address: str | None = None
) -> dict[str, object]:
    """LwM2M objects 3/4 records -> health extra fields (the newest of each; a non-numeric
    or fractional value where a whole number is due, or one of 2**63 or more, is no
    figure). With `address`, only the records of that meter (or bare paths) count: another
    meter's battery is not this one's. Power Source Voltage (3/0/7/i) is the battery's
    only for an instance i that Available Power Sources (3/0/6/i) says is a battery (1
    internal, 2 external), or, with no 3/0/6 in the pack, when the pack has one voltage
    instance (3/0/7/1 may be USB)."""
    found: dict[str, tuple[Decimal, Decimal]] = {}  # field -> (time, value)
    sources: dict[str, object] = {}  # 3/0/6 instance -> power source type
    volts: set[str] = set()  # 3/0/7 instances
    healthy: list[tuple[Mapping[str, object], tuple[str, str, str]]] = []  # (record, health)
    for rec in resolved:
        parts = _name(str(rec["n"]))
        if parts.power_source is not None:
            sources[parts.power_source] = rec.get("v")
        health = parts.health
        if health is not None:
            healthy.append((rec, health))
            if health[1] == "battery_mv":
                volts.add(health[2])
    for rec, (owner, field, instance) in healthy:
        if address is not None and owner not in ("", address):
            continue
        if field == "battery_mv" and (
            sources.get(instance) not in BATTERY_SOURCES if sources else len(volts) > 1
        ):
            continue
        value, t = rec.get("v"), rec.get("t")
        if not isinstance(value, Decimal) or not isinstance(t, Decimal):
            continue
        if field in _WHOLE and (
            value != value.to_integral_value() or abs(value) >= limits.INT8_END
        ):
            continue  # (nor a whole number past int8: int() of 1E+999999 takes seconds)
        if field not in found or t >= found[field][0]:
            found[field] = (t, value)
    return {name: int(v) if name in _WHOLE else v for name, (_, v) in found.items()}


def _notes(
    resolved: Sequence[Mapping[str, object]],
) -> tuple[dict[str, int], dict[str, int], set[str]]:
    """3424 alarms, measurement timestamps and rejecting quality marks, each keyed like a
    reading (the name up to the instance | the SenML second): (flags, stamps, rejected)."""
    alarms: dict[str, int] = {}
    stamps: dict[str, int] = {}
    rejected: set[str] = set()
    for rec in resolved:
        parts = _name(str(rec["n"]))
        if parts.alarm is None and parts.note is None:
            continue
        t = rec["t"]
        if not isinstance(t, Decimal) or not 0 <= t < _EPOCH_END:
            # no reading has that second (`_reading`): left out before its floor, which
            # for an absurd time (1E+999999) would take seconds of CPU
            continue
        value = rec.get("v")
        if parts.alarm and (rec.get("vb") is True or rec.get("v", 0) != 0):
            key, flag = f"{parts.alarm[0]}|{_floor(rec['t'])}", parts.alarm[1]
            alarms[key] = alarms[key] | flag if key in alarms else flag  # (no enum op on 0)
        if parts.note and isinstance(value, Decimal):
            key = f"{parts.note[0]}|{_floor(rec['t'])}"
            if parts.note[1] in REJECTED_QUALITY:
                if value in REJECTED_QUALITY[parts.note[1]]:
                    rejected.add(key)
            elif REL_TIME_LIMIT <= value < 2**40:  # 5518: an absolute epoch (Time type)
                stamps[key] = _floor(value)
    return alarms, stamps, rejected


# cbor2's CBORDecodeError is not a ValueError; RecursionError cannot pass `decoder.limits`
# but one pack must never sink the batch
_PACK_ERRORS = (
    cbor2.CBORError,
    ValueError,
    TypeError,
    ArithmeticError,
    RecursionError,
    LookupError,
)


def decode_one(
    frame: bytes, received_at_s: int
) -> tuple[list[tuple[int, int, int]], str, dict[str, object]]:
    """One pack -> ([(read_at_s, register_ml, flags)], address, extra); raises SenMLError.

    A record that cannot be read (its own fields bad, a volume record not in whole mL, a
    reading the meter marks invalid by 3424/x/6042 or 6049) is left out and listed in
    `extra["dropped_records"]`; the pack is refused only when no reading is left (with
    the error of its first unusable volume record, else NO_REGISTER). A reading's time is
    its instance's 3424/x/5518 measurement timestamp where one is given. Readings of more
    than one 3424 instance or meter are refused (a reading names no instance of its own
    downstream: they would pass as one meter's)."""
    times, mls, flags, address, extra = _decode_one(frame, received_at_s)
    return list(zip(times, mls, flags, strict=True)), address, extra


# a pack's readings as columns (read_at_s, register_ml, flags), its address and extra
_Pack: TypeAlias = tuple[Sequence[int], Sequence[int], Sequence[int], str, dict[str, object]]


def _decode_one(frame: bytes, received_at_s: int) -> _Pack:
    """`decode_one` with the readings as columns. The usual pack takes one pass (`_usual`),
    any other the general steps (`_general`); both give the same result."""
    records, encoding = parse(frame)
    usual = _usual(records, encoding, received_at_s)
    if usual is not None:
        return usual
    readings, address, extra = _general(records, encoding, received_at_s)
    times, mls, flags = zip(*readings, strict=True)  # a reading at least, or it raised
    return times, mls, flags, address, extra


def _usual(
    records: Sequence[Mapping[str, object]], encoding: str, received_at_s: int
) -> _Pack | None:
    """`_general`'s result for the usual pack, in one pass over its records; None for
    any other pack, whose result (or error) `_general` then gives.

    Usual: fields bn, bt, bu, n, t, u, v and vb only, each one readable; readings of one
    3424/x/1 name and unit only, each a whole mL (or a printed double's) at a plausible
    time, none that the meter marks invalid (6042/6049) or dates (5518). For such a pack
    each step is `resolve`'s, `_reading`'s or `_general`'s, with the same arithmetic;
    an error of any kind leaves the pack to `_general`, which decides how it fails."""
    bn, bt, bu = "", _ZERO, None  # the base fields in force (a usual pack sets no bv, bs)
    base: str | None = None  # the first bn (`_address_of` falls back to it)
    n: object = None  # the last record's n and bn, and their name: a pack repeats it
    name, name_bn = "", ""
    volume, volume_unit = "", ""  # the readings' one name and unit
    resolved: list[dict[str, object]] = []
    noted: list[dict[str, object]] = []  # all that `_notes` reads
    healthy: list[dict[str, object]] = []  # all that `health_of` reads
    values: list[Decimal] = []  # the readings' values and times, read at once below
    stamps: list[Decimal] = []
    try:
        for rec in records:
            valued = True
            if len(rec) != 3 or "n" not in rec or "t" not in rec or "v" not in rec:
                # not {n, t, v}, the usual history record: base fields to take, a value
                # to look for
                if not _USUAL.issuperset(rec):
                    return None
                if "bn" in rec:
                    raw = rec["bn"]
                    bn = raw if type(raw) is str else _text(raw, "bn")
                    base = bn if base is None else base
                if "bt" in rec:
                    bt = _num(rec["bt"], "bt")
                if "bu" in rec:
                    bu = _text(rec["bu"], "bu")
                valued = "v" in rec
                if not valued and "vb" not in rec:
                    continue  # a record of base fields only
            raw = rec.get("n", "")
            if raw != n or bn is not name_bn:
                n, name_bn, name = raw, bn, bn + (raw if type(raw) is str else _text(raw, "n"))
                if not name:
                    return None
            raw = rec.get("t", 0)  # Decimal + int converts the int exactly, as `_num` does
            t = bt + (raw if type(raw) is int else _num(raw, "t"))
            if t < _REL_TIME_LIMIT:
                t += received_at_s
            res: dict[str, object] = {"n": name, "t": t}
            unit = "m3"  # a volume record's unit where it names none (`_reading`)
            if "u" in rec:
                unit = res["u"] = _text(rec["u"], "u")
            elif bu is not None:
                unit = res["u"] = bu
            if valued:
                raw = rec["v"]
                if not ((type(raw) is Decimal and raw.is_finite()) or type(raw) is int):
                    raw = _num(raw, "v")
                value = res["v"] = _ZERO + raw
            if "vb" in rec:
                if type(rec["vb"]) is not bool:
                    return None
                res["vb"] = rec["vb"]
            resolved.append(res)
            if name != volume:  # (the readings' name says no more than the first time)
                parts = _name(name)
                if parts.noted:
                    noted.append(res)
                if parts.healthy:
                    healthy.append(res)
                if parts.volume is None:
                    continue  # with a 3424/x/1 in the pack no other record is a volume record
                if volume or parts.noted or parts.healthy:
                    return None  # several meters or instances (or a name read as two things)
                volume, volume_unit = name, unit
            if unit != volume_unit or not valued:
                return None
            values.append(value)
            stamps.append(t)
        if not values:
            return None  # no 3424/x/1: the general path looks for other volume records
        # `_reading` of every reading at once: a time in the epoch (>= 0: int() truncates
        # it to its `_floor`), whole mL >= 0 (`_whole_ml`, its exact case first)
        ml_per_unit = _ML_PER_UNIT.get(volume_unit)
        if ml_per_unit is None or min(stamps) < 0 or max(stamps) >= _EPOCH_END:
            return None
        ml = [value * ml_per_unit for value in values]
        if min(ml) < 0 or max(ml) >= limits.INT8_END:
            return None  # (and no int() of a huge number here: `_general` has that to do)
        mls = list(map(int, ml))
        if ml != mls:  # not all whole mL as written: a printed double's, or none
            mls = []
            for value in values:
                register_ml = _whole_ml(value, VOLUME_ML_PER_UNIT[volume_unit])
                if register_ml is None or register_ml >= 2**63:
                    return None
                mls.append(register_ml)
        times = list(map(int, stamps))
    except _PACK_ERRORS:
        return None
    flags = [0] * len(times)
    if noted:  # (what `_notes` raises `_general` raises too: it reads the same records)
        alarms, marks, rejected = _notes(noted)
        prefix = str(_name(volume).volume)
        if marks or rejected:
            read = set(times)
            if not read.isdisjoint(_by_second(prefix, marks)) or not read.isdisjoint(
                _by_second(prefix, rejected)
            ):
                return None
        at_alarm = {at: alarms[key] for at, key in _by_second(prefix, alarms).items()}
        if at_alarm:
            flags = [at_alarm.get(at, 0) for at in times]
    last = times.index(max(times))  # `_general` reports the first latest reading
    extra: dict[str, object] = {"senml": encoding, "records": resolved}
    extra["total_m3"] = _m3(values[last], volume_unit, mls[last])
    address = _address_of(volume, base or "")
    if healthy:
        extra.update(health_of(healthy, address))
    return times, mls, flags, address, extra


def _by_second(prefix: str, keys: Iterable[str]) -> dict[int, str]:
    """The `_notes` keys ("name up to the instance|second") of the instance `prefix`, by
    their second (an int: its str has no "|", the last "|" is the one before it)."""
    out: dict[int, str] = {}
    for key in keys:
        head, _, second = key.rpartition("|")
        if head == prefix:
            out[int(second)] = key
    return out


def _general(
    records: Sequence[Mapping[str, object]], encoding: str, received_at_s: int
) -> tuple[list[tuple[int, int, int]], str, dict[str, object]]:
    """`decode_one` of parsed records, step by step over every record."""
    dropped: list[tuple[str, SenMLError]] = []
    resolved = resolve(records, received_at_s, dropped)
    alarms, stamps, rejected = _notes(resolved)
    lwm2m = any(_name(str(rec["n"])).volume is not None for rec in resolved)
    found: list[tuple[Mapping[str, object], tuple[int, int, str, Decimal, str]]] = []
    unusable = [exc for name, exc in dropped if _name(name).volume is not None]
    for rec in resolved:
        try:
            got = _reading(rec, lwm2m)
        except SenMLError as exc:
            dropped.append((str(rec["n"]), exc))
            unusable.append(exc)
            continue
        if got is None:
            continue
        if got[2] in rejected:
            why = f"{rec['n']}: the meter marks this value invalid (3424 quality)"
            dropped.append((str(rec["n"]), SenMLError(ErrorCode.BAD_RECORD, why)))
            unusable.append(dropped[-1][1])
            continue
        at, ml, key, raw, unit = got
        at = stamps.get(key, at)
        found.append((rec, (at, ml, key, raw, unit)))
    extra: dict[str, object] = {"senml": encoding, "records": resolved}
    if dropped:
        extra["dropped_records"] = [f"{name}: {exc}" for name, exc in dropped]
    if not found:
        if unusable:
            raise SenMLError(unusable[0].code, str(unusable[0]), extra)
        msg = "pack has no water volume record (unit m3/l or LwM2M /3424/x/1)"
        # health alone (objects 3/4) is still reported, with the one meter it names; the
        # collector stores it for an authenticated device (`collector.verdict`)
        owners = {o for rec in resolved if (o := _health_owner(str(rec["n"]))) is not None}
        if len(owners) == 1:
            extra.update(health_of(resolved))
            raise SenMLError(ErrorCode.NO_REGISTER, msg, extra, address=owners.pop())
        raise SenMLError(ErrorCode.NO_REGISTER, msg, extra)
    instances = {key.rpartition("|")[0] for _, (_, _, key, _, _) in found}
    if len(instances) > 1 and lwm2m:
        msg = f"readings of {len(instances)} water meter instances in one pack"
        raise SenMLError(ErrorCode.UNSUPPORTED, msg, extra)
    readings = [(t, ml, alarms.get(key, 0)) for _, (t, ml, key, _, _) in found]
    last_rec, last = max(found, key=lambda item: item[1][0])
    extra["total_m3"] = _m3(last[3], last[4], last[1])
    bases = [str(r.get("bn", "")) for r in records if "bn" in r]
    address = _address_of(str(last_rec["n"]), bases[0] if bases else "")
    if len({_address_of(str(rec["n"]), bases[0] if bases else "") for rec, _ in found}) > 1:
        msg = "readings of more than one meter in one pack"
        raise SenMLError(ErrorCode.UNSUPPORTED, msg, extra)
    extra.update(health_of(resolved, address))
    return readings, address, extra


def decode(
    frames: Sequence[bytes],
    received_at_s: npt.ArrayLike,
    keys: Mapping[str, bytes] | None = None,
    cache: object | None = None,
) -> Decoded:
    """SenML JSON/CBOR packs -> Decoded; a bad pack gets its code, the batch goes on."""
    del keys, cache
    n = len(frames)
    rx = k.as_received(received_at_s, n).tolist()
    out = empty(n)
    out.format.fill("senml")
    counts = [0] * n  # readings per frame; their columns are built as lists, then arrays
    times: list[int] = []
    mls: list[int] = []
    flags: list[int] = []
    notes = np.zeros(n, np.uint32)
    for i, frame in enumerate(frames):  # JSON/CBOR parsing is per pack by nature
        try:
            at, ml, fl, meter, extra = _decode_one(bytes(frame), rx[i])
        except SenMLError as exc:
            out.error_code[i], out.error_message[i] = exc.code, str(exc)
            out.address_of_frame[i] = exc.address
            if exc.extra:
                out.sparse[i] = exc.extra
            continue
        except _PACK_ERRORS as exc:
            out.error_code[i], out.error_message[i] = ErrorCode.BAD_RECORD, f"bad pack: {exc}"
            continue
        out.address_of_frame[i], out.sparse[i] = meter, extra  # a pack's fields: no columns
        if "dropped_records" in extra:
            notes[i] = FrameFlag.RECORD_DROPPED
        counts[i] = len(at)
        times += at
        mls += ml
        flags += fl
    return Decoded(
        frame_index=np.repeat(np.arange(n, dtype=np.int32), counts),
        address=np.repeat(out.address_of_frame, counts),
        read_at_s=np.array(times, np.int64),
        register_ml=np.array(mls, np.int64),
        flags=np.array(flags, np.uint32),
        format=out.format,
        address_of_frame=out.address_of_frame,
        error_code=out.error_code,
        error_message=out.error_message,
        sparse=out.sparse,
        frame_flags=notes if notes.any() else None,
    )


# RFC 8259 §2: after an array's "[" (and whitespace) comes a value or the closing "]". A
# wireless M-Bus frame of L = 0x5B (92 bytes) starts with "[" too, then its C field (44 "D",
# 46 "F", 08, 06), which no JSON value starts with.
_JSON_AFTER_BRACKET = frozenset(b'{["-0123456789tfn]')
# RFC 8949 array heads: 0x80-0x97 hold the count, 0x98 / 0x99 have it in 1 / 2 bytes after
_CBOR_COUNT_BYTES = {0x98: 1, 0x99: 2}
_MIN_CBOR_RECORD = 3  # the smallest SenML record: a map of one pair (A1, label, value)


def looks_like(frame: bytes) -> bool:
    """A JSON array (its first item a JSON value or "]"), or a CBOR array whose first item
    is a map and whose count of records fits in the frame (RFC 8428 §5/§6).

    The count check keeps wireless M-Bus frames out: L = 0x98 reads as a CBOR array of
    C = 0x44 (68) records, and 68 records of 3 bytes or more do not fit in 153 bytes.
    """
    body = frame.lstrip()
    if body[:1] == b"[":
        after = body[1:].lstrip()[:1]
        return not after or after[0] in _JSON_AFTER_BRACKET
    if not frame or not (0x81 <= frame[0] <= 0x99 or frame[0] == 0x9F):
        return False
    size = _CBOR_COUNT_BYTES.get(frame[0], 0)
    first = 1 + size
    if len(frame) <= first or not (0xA1 <= frame[first] <= 0xB9 or frame[first] == 0xBF):
        return False
    if frame[0] == 0x9F:  # indefinite length: no count to check
        return True
    count = int.from_bytes(frame[1:first], "big") if size else frame[0] & 0x1F
    return count * _MIN_CBOR_RECORD <= len(frame) - first


FORMAT = register(Format(key="senml", detect=looks_like, decode=decode))
