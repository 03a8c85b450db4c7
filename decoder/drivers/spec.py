"""Driver files: a vendor payload described as data (TOML), validated on load.

A driver file says where a model's frames are recognised (`[match]`), how to undo a
vendor's scrambling (`[transform]`, a name from `decoder.vendors.TRANSFORMS`), how the
frame is checked (`[checksum]`), where each field sits (`[[field]]`: offset, width, kind,
byte order, scale, unit, an expected constant), which field is the register
(`[register]`), which bits are alarms (`[[alarm]]`), and golden frames with the values
they must decode to (`[[example]]`, checked when the driver is loaded).

`parse_driver(text, source)` returns a frozen `Driver` or raises `DriverError` whose
message names the file, the line and the key at fault (`acme.toml line 14: field
'total': unknown kind 'bcd9'`). Nothing here reads files: callers pass the text in.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from decoder.columns import ErrorCode, Flag

KINDS = (
    "uint",  # unsigned binary integer, `order` le / be
    "int",  # two's complement integer
    "bcd",  # packed BCD digits (le: lowest two digits first)
    "float32",  # IEEE 754 single (never a register: not exact)
    "date_g",  # EN 13757-3 type G date, 2 bytes
    "date_dmy16",  # uint16 le: day bits 0-4, month bits 5-8, year-2000 bits 9-15
    "epoch2000",  # uint32 le seconds since 2000-01-01T00:00 (meter clock)
    "unix32",  # uint32 seconds since 1970-01-01T00:00 UTC
    "hex",  # bytes printed as hex digits (meter addresses), `order` le reverses
    "packed_na1",  # Apator NA-1 register: 4 bytes le, 24-bit mantissa + 2-bit decade
)
DATE_KINDS = ("date_g", "date_dmy16", "epoch2000", "unix32")
WIDTHS = {"float32": (4,), "date_g": (2,), "date_dmy16": (2,), "epoch2000": (4,)}
WIDTHS |= {"unix32": (4,), "packed_na1": (4,)}
UNITS_ML = {"ml": Fraction(1), "l": Fraction(1000), "m3": Fraction(1_000_000)}
CHECKSUMS = ("sum8", "xor8", "crc16_modbus", "crc16_en13757")
TRANSPORTS = ("raw", "wmbus")
METER_IDS = ("a_field", "diehl")  # wM-Bus: the A field, or Diehl's swapped address
FLAGS = {f.name.lower(): f for f in Flag if f.name and f not in (Flag.NONE,)}
_NAME = re.compile(r"[a-z][a-z0-9_]{0,47}\Z")


class DriverError(ValueError):
    """A driver file that cannot be used: the message names file, line and key."""


@dataclass(frozen=True)
class FieldSpec:
    """One fixed-offset field of the (transformed) payload."""

    name: str
    at: int
    width: int
    kind: str
    order: str = "le"
    ml_per_count: Fraction | None = None  # volumes: mL per raw count
    decimals: int = 0  # other numbers: value = raw * 10**-decimals
    expect: int | None = None  # a constant the frame must carry, else the frame is refused
    optional: bool = False  # read only when the payload is long enough


@dataclass(frozen=True)
class Alarm:
    """A bit (mask) of an integer field that raises a reading flag."""

    field: str
    mask: int
    flag: Flag


@dataclass(frozen=True)
class Example:
    """A golden frame and what it must decode to (None: the frame must be refused)."""

    hex: str
    line: int
    address: str | None = None
    total_ml: int | None = None
    target_ml: int | None = None
    reject: ErrorCode | None = None
    flags: int = 0
    key: str | None = None


@dataclass(frozen=True)
class Match:
    """Where a driver's frames are recognised."""

    transport: str
    min_length: int
    max_length: int
    manufacturers: tuple[str, ...] = ()  # wmbus
    versions: tuple[int, ...] = ()
    device_types: tuple[int, ...] = ()
    ci: tuple[int, ...] = ()
    address: str = "a_field"
    magic: bytes = b""  # raw: bytes the frame carries at `magic_at`; wmbus: the payload
    magic_at: int = 0  # (after the CI) at `magic_at`, e.g. a manufacturer record header


@dataclass(frozen=True)
class Checksum:
    """A checksum over bytes [start, stop) of the frame, stored at `at`."""

    kind: str
    start: int
    stop: int  # negative: counted from the end of the frame
    at: int  # negative: counted from the end
    order: str = "le"


@dataclass(frozen=True)
class Driver:
    """A validated driver file."""

    name: str
    source: str
    match: Match
    fields: tuple[FieldSpec, ...]
    current: tuple[str, ...]  # register = sum of these volume fields
    address_field: str | None = None  # raw transport: the field holding the address
    current_time: str | None = None  # a date field, else the receive time
    billing: str | None = None
    billing_time: str | None = None
    billing_not_above_current: bool = False
    transform: str | None = None
    checksum: Checksum | None = None
    alarms: tuple[Alarm, ...] = ()
    examples: tuple[Example, ...] = ()
    media: str = ""

    @property
    def key(self) -> str:
        """The hint that picks this driver (`driver:<name>`)."""
        return f"driver:{self.name}"

    @property
    def format_key(self) -> str:
        """`Decoded.format` of its frames: "wmbus" (a wM-Bus model) or "driver" (raw);
        the `driver` field names the driver."""
        return "wmbus" if self.match.transport == "wmbus" else "driver"

    def field(self, name: str) -> FieldSpec:
        """The field called `name` (validated to exist)."""
        return next(f for f in self.fields if f.name == name)


class _Lines:
    """Line numbers of table headers and keys in a TOML text, for messages."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines = text.splitlines()

    def of(self, table: str, index: int = 0, key: str | None = None) -> int:
        """Line of `key` in the index-th `[table]` / `[[table]]` (or of the header)."""
        header = re.compile(rf"\s*\[\[?\s*{re.escape(table)}\s*\]\]?\s*(#.*)?\Z")
        seen, start = -1, 0
        for no, line in enumerate(self.lines, 1):
            if header.match(line):
                seen += 1
                if seen == index:
                    start = no
                    break
        if not start:
            return 1
        if key is None:
            return start
        pattern = re.compile(rf"\s*{re.escape(key)}\s*=")
        for no in range(start + 1, len(self.lines) + 1):
            line = self.lines[no - 1]
            if line.lstrip().startswith("["):
                break
            if pattern.match(line):
                return no
        return start

    def error(self, table: str, index: int, key: str | None, message: str) -> DriverError:
        """A DriverError naming the line of table[index].key."""
        line = self.of(table, index, key)
        return DriverError(f"{self.source} line {line}: {message}")


def _int(value: Any) -> int | None:
    """An int (TOML int, or a hex string like "0xA2"), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"0[xX][0-9a-fA-F]+|\d+", value):
        return int(value, 0)
    return None


def _ints(value: Any) -> tuple[int, ...] | None:
    """One int or a list of ints, else None."""
    items = value if isinstance(value, list) else [value]
    got = [_int(v) for v in items]
    return None if any(g is None for g in got) else tuple(g for g in got if g is not None)


def _fraction(value: Any) -> Fraction | None:
    """A positive exact scale: an int, a decimal string "0.001" or a fraction "1/3"."""
    if isinstance(value, (bool, float)):
        return None  # a float scale would make the register inexact: write it as a string
    try:
        got = Fraction(value) if isinstance(value, (int, str)) else None
    except (ValueError, ZeroDivisionError):
        return None
    return got if got is not None and got > 0 else None


_TOP = {"driver", "match", "transform", "checksum", "field", "register", "alarm", "example"}


def parse_driver(text: str, source: str = "<driver>") -> Driver:
    """Driver file text -> Driver; DriverError naming the line and key of the first fault."""
    where = _Lines(text, source)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        at = re.search(r"at line (\d+)", str(exc))
        line = f" line {at.group(1)}" if at else ""
        raise DriverError(f"{source}{line}: not valid TOML: {exc}") from exc
    for key in doc:
        if key not in _TOP:
            raise where.error(key, 0, None, f"unknown table [{key}]; one of {sorted(_TOP)}")
    head = _table(doc, "driver", where)
    name = head.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise where.error("driver", 0, "name", f"name {name!r} must match {_NAME.pattern}")
    _known(head, {"name", "description", "media"}, "driver", 0, where)
    match = _match(_table(doc, "match", where), where)
    fields = _fields(doc.get("field"), match, where)
    names = {f.name for f in fields}
    reg = _register(_table(doc, "register", where), fields, match, where)
    transform = _transform(doc.get("transform"), where)
    checksum = _checksum(doc.get("checksum"), match, where)
    alarms = _alarms(doc.get("alarm"), names, fields, where)
    examples = _examples(doc.get("example"), where)
    return Driver(
        name=name,
        source=source,
        match=match,
        fields=fields,
        transform=transform,
        checksum=checksum,
        alarms=alarms,
        examples=examples,
        media=str(head.get("media", "")),
        **reg,
    )


def _table(doc: dict[str, Any], name: str, where: _Lines) -> dict[str, Any]:
    """A required single table."""
    got = doc.get(name)
    if not isinstance(got, dict):
        raise DriverError(f"{where.source} line 1: missing table [{name}]")
    return got


def _known(table: dict[str, Any], allowed: set[str], name: str, i: int, where: _Lines) -> None:
    """Refuse a key the schema does not have (a typo must not pass silently)."""
    for key in table:
        if key not in allowed:
            raise where.error(
                name, i, key, f"[{name}] has no key {key!r}; one of {sorted(allowed)}"
            )


def _match(t: dict[str, Any], where: _Lines) -> Match:
    """The [match] table."""
    allowed = {"transport", "min_length", "max_length", "manufacturer", "version"}
    allowed |= {"device_type", "ci", "address", "magic", "magic_at"}
    _known(t, allowed, "match", 0, where)
    transport = t.get("transport")
    if transport not in TRANSPORTS:
        raise where.error("match", 0, "transport", f"transport {transport!r}; one of {TRANSPORTS}")
    lo, hi = _int(t.get("min_length", 1)), _int(t.get("max_length", 255))
    if lo is None or hi is None or not 1 <= lo <= hi <= 4096:
        raise where.error("match", 0, "min_length", "min_length/max_length: 1 <= min <= max")
    magic_hex = t.get("magic", "")
    try:
        magic = bytes.fromhex(magic_hex) if isinstance(magic_hex, str) else None
    except ValueError:
        magic = None
    at = _int(t.get("magic_at", 0))
    if magic is None or at is None:
        raise where.error("match", 0, "magic", "magic is a hex string, magic_at a byte offset")
    if transport == "raw":
        if len(magic) < 2:  # raw drivers are detected first: a 1-byte magic would steal frames
            raise where.error("match", 0, "magic", "a raw driver needs a magic of 2+ bytes (hex)")
        return Match("raw", lo, hi, magic=magic, magic_at=at)
    mans = t.get("manufacturer")
    mans = [mans] if isinstance(mans, str) else mans
    if not isinstance(mans, list) or not all(
        isinstance(m, str) and re.fullmatch(r"[A-Z@]{3}", m) for m in mans
    ):
        raise where.error("match", 0, "manufacturer", 'manufacturer: 3-letter code(s), e.g. "APT"')
    lists: dict[str, tuple[int, ...]] = {}
    for key in ("version", "device_type", "ci"):
        got = _ints(t.get(key, []))
        if got is None or any(not 0 <= v <= 255 for v in got):
            raise where.error("match", 0, key, f"{key}: a byte or a list of bytes")
        lists[key] = got
    if not lists["ci"]:
        raise where.error("match", 0, "ci", "a wmbus driver names its CI byte(s)")
    address = t.get("address", "a_field")
    if address not in METER_IDS:
        raise where.error("match", 0, "address", f"address {address!r}; one of {METER_IDS}")
    return Match(
        "wmbus", max(lo, 12), hi, tuple(mans), lists["version"], lists["device_type"],
        lists["ci"], address, magic, at,
    )  # fmt: skip


def _fields(raw: Any, match: Match, where: _Lines) -> tuple[FieldSpec, ...]:
    """The [[field]] array."""
    if not isinstance(raw, list) or not raw:
        raise DriverError(f"{where.source} line 1: a driver needs at least one [[field]]")
    allowed = {"name", "at", "width", "kind", "order", "unit", "scale", "decimals"}
    allowed |= {"expect", "optional"}
    out: list[FieldSpec] = []
    for i, t in enumerate(raw):
        _known(t, allowed, "field", i, where)
        name = t.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise where.error("field", i, "name", f"field name {name!r} must match {_NAME.pattern}")
        if any(f.name == name for f in out):
            raise where.error("field", i, "name", f"field {name!r} is defined twice")
        kind = t.get("kind")
        if kind not in KINDS:
            raise where.error(
                "field", i, "kind", f"field {name!r}: unknown kind {kind!r}; one of {KINDS}"
            )
        at, width = _int(t.get("at")), _int(t.get("width", WIDTHS.get(kind, (0,))[0]))
        if at is None or at < 0:
            raise where.error("field", i, "at", f"field {name!r}: at must be a byte offset >= 0")
        if width is None or not 1 <= width <= 8 or width not in WIDTHS.get(kind, (width,)):
            raise where.error(
                "field", i, "width", f"field {name!r}: width {width!r} for kind {kind}"
            )
        if kind in ("uint", "int") and width not in (1, 2, 3, 4, 5, 6, 7, 8):
            raise where.error("field", i, "width", f"field {name!r}: width 1..8")
        if kind == "bcd" and width > 8:
            raise where.error("field", i, "width", f"field {name!r}: at most 16 BCD digits")
        order = t.get("order", "le")
        if order not in ("le", "be"):
            raise where.error("field", i, "order", f"field {name!r}: order is le or be")
        ml: Fraction | None = None
        if "unit" in t or "scale" in t:
            unit = t.get("unit")
            if unit not in UNITS_ML:
                raise where.error(
                    "field", i, "unit", f"field {name!r}: unit one of {sorted(UNITS_ML)}"
                )
            scale = _fraction(t.get("scale", 1))
            if scale is None:
                raise where.error(
                    "field", i, "scale",
                    f"field {name!r}: scale must be exact: an int, \"0.001\" or \"1/3\" (no float)",
                )  # fmt: skip
            if kind not in ("uint", "int", "bcd", "packed_na1"):
                raise where.error(
                    "field", i, "kind", f"field {name!r}: a volume is an integer kind"
                )
            ml = UNITS_ML[unit] * scale
        decimals = _int(t.get("decimals", 0))
        if decimals is None or not 0 <= decimals <= 12:
            raise where.error("field", i, "decimals", f"field {name!r}: decimals 0..12")
        expect = t.get("expect")
        if expect is not None and _int(expect) is None:
            raise where.error("field", i, "expect", f"field {name!r}: expect is an integer")
        optional = t.get("optional", False)
        if not isinstance(optional, bool):
            raise where.error("field", i, "optional", f"field {name!r}: optional is true/false")
        if not optional and at + width > match.max_length:
            raise where.error("field", i, "at", f"field {name!r} ends past max_length")
        out.append(FieldSpec(name, at, width, kind, order, ml, decimals, _int(expect), optional))
    return tuple(out)


def _register(
    t: dict[str, Any], fields: tuple[FieldSpec, ...], match: Match, where: _Lines
) -> dict[str, Any]:
    """The [register] table: which fields are the current and billing registers."""
    allowed = {"current", "current_time", "billing", "billing_time", "address"}
    allowed |= {"billing_not_above_current"}
    _known(t, allowed, "register", 0, where)
    by_name = {f.name: f for f in fields}
    current = t.get("current")
    current = (current,) if isinstance(current, str) else tuple(current or ())
    if not current:
        raise where.error("register", 0, "current", "register.current names a volume field")
    for key, names in (("current", current), ("billing", (t.get("billing"),))):
        for n in names:
            if n is None:
                continue
            f = by_name.get(n)
            if f is None or f.ml_per_count is None:
                raise where.error("register", 0, key, f"{key}: {n!r} is not a field with a unit")
            if key == "current" and f.optional:
                raise where.error("register", 0, key, f"current register {n!r} cannot be optional")
    for key in ("current_time", "billing_time"):
        n = t.get(key)
        if n is not None and (n not in by_name or by_name[n].kind not in DATE_KINDS):
            raise where.error("register", 0, key, f"{key}: {n!r} is not a date field")
    address = t.get("address")
    if match.transport == "raw":
        if address not in by_name or by_name[address].kind not in ("hex", "bcd", "uint"):
            raise where.error("register", 0, "address", "a raw driver names its address field")
    elif address is not None:
        raise where.error("register", 0, "address", "a wmbus driver takes the id from the header")
    flag = t.get("billing_not_above_current", False)
    if not isinstance(flag, bool):
        raise where.error("register", 0, "billing_not_above_current", "true or false")
    return {
        "current": current,
        "address_field": address,
        "current_time": t.get("current_time"),
        "billing": t.get("billing"),
        "billing_time": t.get("billing_time"),
        "billing_not_above_current": flag,
    }


def _transform(t: Any, where: _Lines) -> str | None:
    """The optional [transform] table (a name; `decoder.vendors.TRANSFORMS` holds the code)."""
    if t is None:
        return None
    from decoder.vendors import TRANSFORMS

    _known(t, {"name"}, "transform", 0, where)
    name = t.get("name")
    if name not in TRANSFORMS:
        raise where.error(
            "transform", 0, "name", f"transform {name!r}; one of {sorted(TRANSFORMS)}"
        )
    return str(name)


def _checksum(t: Any, match: Match, where: _Lines) -> Checksum | None:
    """The optional [checksum] table."""
    if t is None:
        return None
    _known(t, {"kind", "start", "stop", "at", "order"}, "checksum", 0, where)
    kind = t.get("kind")
    if kind not in CHECKSUMS:
        raise where.error("checksum", 0, "kind", f"checksum kind {kind!r}; one of {CHECKSUMS}")
    start, stop, at = _int_any(t.get("start", 0)), _int_any(t.get("stop")), _int_any(t.get("at"))
    if start is None or stop is None or at is None:
        raise where.error("checksum", 0, "stop", "checksum needs start, stop and at (ints)")
    order = t.get("order", "le")
    if order not in ("le", "be"):
        raise where.error("checksum", 0, "order", "order is le or be")
    del match
    return Checksum(kind, start, stop, at, order)


def _int_any(value: Any) -> int | None:
    """An int, negative allowed (offsets from the end)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _alarms(
    raw: Any, names: set[str], fields: tuple[FieldSpec, ...], where: _Lines
) -> tuple[Alarm, ...]:
    """The [[alarm]] array: field + bit mask -> flag."""
    out: list[Alarm] = []
    for i, t in enumerate(raw or []):
        _known(t, {"field", "mask", "flag"}, "alarm", i, where)
        name, mask, flag = t.get("field"), _int(t.get("mask")), t.get("flag")
        if name not in names or next(f for f in fields if f.name == name).kind not in (
            "uint",
            "int",
        ):
            raise where.error("alarm", i, "field", f"alarm field {name!r} is not an integer field")
        if mask is None or mask <= 0:
            raise where.error("alarm", i, "mask", "mask is a positive bit mask")
        if flag not in FLAGS:
            raise where.error("alarm", i, "flag", f"flag {flag!r}; one of {sorted(FLAGS)}")
        out.append(Alarm(name, mask, FLAGS[flag]))
    return tuple(out)


def _ml(value: Any) -> int | None:
    """An exact m3 string ("3.488") -> mL; None when absent."""
    if value is None:
        return None
    got = _fraction(value) if value != "0" and value != 0 else Fraction(0)
    if got is None or (got * 1_000_000).denominator != 1:
        raise ValueError(value)
    return int(got * 1_000_000)


def _examples(raw: Any, where: _Lines) -> tuple[Example, ...]:
    """The [[example]] array (golden frames)."""
    if not isinstance(raw, list) or not raw:
        raise DriverError(f"{where.source} line 1: a driver carries at least one [[example]]")
    allowed = {"hex", "address", "total_m3", "target_m3", "reject", "flags", "key", "note"}
    out: list[Example] = []
    for i, t in enumerate(raw):
        _known(t, allowed, "example", i, where)
        text = t.get("hex", "")
        try:
            frame = bytes.fromhex(str(text).replace("_", "").replace(" ", ""))
        except ValueError:
            frame = b""
        if not frame:
            raise where.error("example", i, "hex", "example hex is not a hex string")
        try:
            total, target = _ml(t.get("total_m3")), _ml(t.get("target_m3"))
        except ValueError as exc:
            raise where.error(
                "example", i, "total_m3", f"m3 values are exact strings in whole mL: {exc}"
            ) from exc
        reject = t.get("reject")
        if reject is not None and reject not in ErrorCode.__members__:
            raise where.error("example", i, "reject", f"reject {reject!r} is not an ErrorCode name")
        if reject is None and total is None:
            raise where.error("example", i, "total_m3", "an example gives total_m3 or reject")
        flags = 0
        for name in t.get("flags", []):
            if name not in FLAGS:
                raise where.error("example", i, "flags", f"flag {name!r}; one of {sorted(FLAGS)}")
            flags |= FLAGS[name]
        out.append(
            Example(
                frame.hex(),
                where.of("example", i),
                t.get("address"),
                total,
                target,
                ErrorCode[reject] if reject else None,
                flags,
                t.get("key"),
            )
        )
    return tuple(out)
