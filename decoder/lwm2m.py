"""LwM2M 1.1 server side, pure parts: registration parameters, Send packs, command operations.

- `registration_params(query)`: the Register/Update query (`ep`, `lt`, `lwm2m`, `b`, `Q`)
  checked (ValueError says what is wrong). LwM2M 1.1 §6.2: Queue Mode is the `Q`
  parameter; a 1.0 client says it in the binding (`b=UQ`), accepted too.
- `objects_of(link_format)`: the object instances a client registered (`</3424/0>`...).
- `with_endpoint(pack, endpoint)`: a Send pack whose names are bare object paths
  (`/3424/0/1`) with the endpoint name put in front of every base name, so the SenML
  decoder attributes its readings to the registered meter; a pack that names a meter
  itself is returned unchanged (and the collector's identity check compares it).
- `operations(command, objects, now_s)`: the mailbox command as LwM2M Device Management
  operations (`Op`), or ValueError when the client cannot take it:

  | mailbox command          | operation(s)                                              |
  |--------------------------|-----------------------------------------------------------|
  | valve open / close       | Write /3306/i/5850 true / false (IPSO Actuation On/Off)   |
  | clock set                | Write /3/0/13 (Device Current Time, the collector's clock)|
  | reporting interval_s     | Write /1/i/1 (Server Lifetime) then Execute /1/i/8        |
  |                          | (Registration Update Trigger: the client updates now)     |
  | read path                | Read (GET) of the path, of an object the client registered|

  OMA 3424 (water meter, v1.0) has no valve resource (FORMATS.md §3 lists its resources),
  so the valve is the IPSO Actuation object 3306 instance the client registered. A
  `report_time` has no LwM2M resource: refused. Every operation is idempotent (a value
  written again, an update triggered again), which is what makes at-least-once delivery
  safe for LwM2M clients, which know no command ids. Writes carry SenML CBOR (content
  format 112, RFC 8428 §6), one of LwM2M 1.1's data formats.
- `read_content(format, payload, now_s)`: a Read answer's content as a command result
  (SenML JSON/CBOR records, plain text, TLV entries, else hex).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

import cbor2

from decoder import limits, senml
from decoder.commands import Pending

SENML_JSON: Final = 110  # RFC 8428 §12.3 CoAP content formats
SENML_CBOR: Final = 112
TEXT_PLAIN: Final = 0  # LwM2M 1.1 §7.3: plain text for a single resource value
OPAQUE: Final = 42
TLV: Final = 11542  # OMA-TLV (LwM2M 1.0's and 1.1's)
_FORMAT_NAMES: Final = {
    SENML_JSON: "senml+json", SENML_CBOR: "senml+cbor", TEXT_PLAIN: "text", OPAQUE: "opaque",
    TLV: "tlv",
}  # fmt: skip
_TLV_TYPES: Final = ("object_instance", "resource_instance", "multiple_resource", "resource")
LIFETIME_MIN_S: Final = 60
LIFETIME_MAX_S: Final = 31 * 86400
DEFAULT_LIFETIME_S: Final = 86400  # LwM2M 1.1 §6.2.1: lt defaults to 86400 s
VERSIONS: Final = frozenset({"1.0", "1.1"})
_ENDPOINT = re.compile(r"^[\x21-\x7e]{1,64}$")
_BINDING = re.compile(r"^[UMHTSNQ]{1,6}$")
_LINK = re.compile(r"<(/\d{1,5})(?:/(\d{1,5}))?>")
_BN: Final = senml.LABEL_OF["bn"]
_JSON_BN = re.compile(r'"bn"\s*:\s*"')
VALVE_OBJECT: Final = 3306  # IPSO Actuation
VALVE_RESOURCE: Final = 5850  # On/Off, boolean (true: open)


@dataclass(frozen=True)
class Params:
    """What a Register or Update query says (None: not given)."""

    endpoint: str | None
    lifetime_s: int | None
    version: str | None
    binding: str | None
    queue_mode: bool | None


@dataclass(frozen=True)
class Op:
    """One Device Management operation: method (PUT write, POST execute), path, body."""

    method: str
    path: tuple[str, ...]
    payload: bytes = b""
    content_format: int | None = None

    @property
    def name(self) -> str:
        """`write /3/0/13` style, for results and logs."""
        kind = {"PUT": "write", "GET": "read"}.get(self.method, "execute")
        return f"{kind} /{'/'.join(self.path)}"


def registration_params(query: Sequence[str], *, register: bool) -> Params:
    """The Register (`register`) or Update query; ValueError when it is not usable."""
    fields: dict[str, str] = {}
    for item in query:
        key, _, value = item.partition("=")
        fields[key] = value
    endpoint = fields.get("ep")
    if register and (endpoint is None or not _ENDPOINT.match(endpoint)):
        msg = "ep must name the endpoint (1-64 printable characters)"
        raise ValueError(msg)
    version = fields.get("lwm2m")
    if register and version not in VERSIONS:
        msg = f"lwm2m must be one of {sorted(VERSIONS)}"
        raise ValueError(msg)
    lifetime: int | None = None
    if "lt" in fields:
        if not fields["lt"].isdigit() or not LIFETIME_MIN_S <= int(fields["lt"]) <= LIFETIME_MAX_S:
            msg = f"lt must be whole seconds from {LIFETIME_MIN_S} to {LIFETIME_MAX_S}"
            raise ValueError(msg)
        lifetime = int(fields["lt"])
    elif register:
        lifetime = DEFAULT_LIFETIME_S
    binding = fields.get("b")
    if binding is not None and not _BINDING.match(binding):
        msg = "b must be a binding (U, UQ, ...)"
        raise ValueError(msg)
    queue: bool | None = None
    if "Q" in fields or (binding is not None and "Q" in binding):
        queue = True
    elif register or binding is not None:
        queue = False
    if register and binding is None:
        binding = "U"
    return Params(endpoint, lifetime, version, binding, queue)


def objects_of(link_format: str) -> dict[int, list[int]]:
    """Object id -> its registered instances (an object listed without one: [])."""
    out: dict[int, list[int]] = {}
    for obj, inst in _LINK.findall(link_format):
        instances = out.setdefault(int(obj[1:]), [])
        if inst:
            instances.append(int(inst))
    return out


def with_endpoint(pack: bytes, endpoint: str) -> bytes:
    """`pack` with `endpoint` before each base name when its names are bare object paths
    (see the module docstring); unchanged when it names a meter, or does not parse (the
    decoder then refuses it with its own reason)."""
    try:
        records, encoding = senml.parse(pack)
    except (ValueError, TypeError, LookupError, RecursionError, cbor2.CBORError):
        return pack  # cbor2's errors are not ValueErrors
    names, base = [], ""
    for rec in records:
        base = str(rec.get("bn", base))  # RFC 8428 §4.6: bn holds until the next bn
        names.append(base + str(rec.get("n", "")))
    if not names or not all(n.startswith("/") or n == "" for n in names):
        return pack
    if encoding == "cbor":
        raw = cbor2.loads(pack)  # parsed within decoder.limits just above
        for i, rec in enumerate(raw):
            if _BN in rec or i == 0:
                rec[_BN] = endpoint + str(rec.get(_BN, ""))
        return bytes(cbor2.dumps(raw))
    # JSON: the text itself, so numbers keep their literals (no float round trip); every
    # name is a bare path, so every base name gets the prefix
    quoted = json.dumps(endpoint)[1:-1]
    text = _JSON_BN.sub(lambda m: m.group(0) + quoted, pack.decode())
    if "bn" not in records[0]:
        text = text.replace("{", '{"bn":"' + quoted + '",', 1)
    return text.encode()


def _write(path: tuple[int, ...], value: object) -> Op:
    record: dict[int, object] = {senml.LABEL_OF["bn"]: "/" + "/".join(map(str, path))}
    record[senml.LABEL_OF["vb" if isinstance(value, bool) else "v"]] = value
    return Op("PUT", tuple(map(str, path)), cbor2.dumps([record]), SENML_CBOR)


def _instance(objects: Mapping[int, list[int]], obj: int) -> int:
    if obj not in objects:
        msg = f"the client registered no object {obj}"
        raise ValueError(msg)
    return min(objects[obj], default=0)


def operations(command: Pending, objects: Mapping[int, list[int]], now_s: int) -> list[Op]:
    """The operations carrying `command` to a client with `objects` (see the table)."""
    if command.kind == "valve":
        inst = _instance(objects, VALVE_OBJECT)
        return [_write((VALVE_OBJECT, inst, VALVE_RESOURCE), command.args["action"] == "open")]
    if command.kind == "clock":
        return [_write((3, 0, 13), now_s)]
    if command.kind == "reporting":
        if "report_time" in command.args:
            msg = "report_time has no LwM2M resource (give interval_s only)"
            raise ValueError(msg)
        inst = _instance(objects, 1) if 1 in objects else 0
        lifetime = int(command.args["interval_s"])
        return [_write((1, inst, 1), lifetime), Op("POST", ("1", str(inst), "8"))]
    if command.kind == "read":
        path = tuple(str(command.args["path"]).strip("/").split("/"))
        _instance(objects, int(path[0]))
        return [Op("GET", path)]
    msg = f"no LwM2M operation for a {command.kind} command"
    raise ValueError(msg)


def _plain(value: object) -> object:
    """A resolved SenML value as JSON: exact (a fractional number as its decimal text, and
    a whole one past int8 too: int() of 1E+999999 would take seconds)."""
    if isinstance(value, Decimal):
        whole = value == value.to_integral_value() and abs(value) < limits.INT8_END
        return int(value) if whole else str(value)
    if isinstance(value, bytes):
        return value.hex()
    return value if isinstance(value, str | int | bool) or value is None else str(value)


def _tlv(data: bytes, depth: int = 0) -> list[dict[str, object]]:
    """OMA-TLV (LwM2M 1.1 §7.4.3) -> entries {type, id, hex | entries}; ValueError if
    malformed. Values stay hex: TLV carries no types, the object model says them."""
    out: list[dict[str, object]] = []
    i = 0
    while i < len(data):
        head = data[i]
        id_len = 2 if head & 0x20 else 1
        len_len = (head >> 3) & 0x03
        start = i + 1 + id_len + len_len
        if start > len(data):
            msg = "TLV header runs past the payload"
            raise ValueError(msg)
        ident = int.from_bytes(data[i + 1 : i + 1 + id_len], "big")
        size = int.from_bytes(data[i + 1 + id_len : start], "big") if len_len else head & 0x07
        value = data[start : start + size]
        if len(value) != size:
            msg = "TLV value runs past the payload"
            raise ValueError(msg)
        kind = _TLV_TYPES[head >> 6]
        entry: dict[str, object] = {"type": kind, "id": ident}
        if kind in ("object_instance", "multiple_resource") and depth < 2:
            entry["entries"] = _tlv(value, depth + 1)
        else:
            entry["hex"] = value.hex()
        out.append(entry)
        i = start + size
    return out


def read_content(content_format: int | None, payload: bytes, now_s: int) -> dict[str, object]:
    """A Read answer's content as the command's result: SenML JSON/CBOR as resolved
    records (name, value; a fractional number as its exact decimal text), text/plain as
    its text, TLV as its entries (values hex), anything else (opaque, unknown) as hex.
    A content that does not parse as its format says so and keeps its bytes (hex)."""
    # no Content-Format: opaque bytes as far as the server can tell
    fmt = "opaque" if content_format is None else _FORMAT_NAMES.get(content_format, "other")
    out: dict[str, object] = {"content_format": content_format, "format": fmt}
    try:
        if content_format in (SENML_JSON, SENML_CBOR):
            records, _ = senml.parse(payload)
            resolved = senml.resolve(records, now_s)
            out["records"] = [{key: _plain(v) for key, v in rec.items()} for rec in resolved]
            return out
        if content_format == TEXT_PLAIN:
            out["value"] = payload.decode("utf-8")
            return out
        if content_format == TLV:
            out["entries"] = _tlv(payload)
            return out
    except (ValueError, TypeError, LookupError, RecursionError, cbor2.CBORError) as exc:
        out["error"] = f"content is not {fmt}: {exc}"
    out["hex"] = payload.hex()
    return out
