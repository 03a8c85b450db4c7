"""Downlink commands on the wire: pure encoders for the mailbox and the device's answers.

`check_args(kind, fmt, args)` validates a command before it is queued (ValueError says
what is wrong); `downlink(commands, now_s)` builds the envelope a device gets in its
reachability window; `parse_results(payload, address)` reads the device's answers.

Envelope (JSON, UTF-8; CoAP content-format 50), one per window, commands in queue order:

    {"v": 1, "cmds": [{"id": 17, "kind": "valve", "args": {"action": "close"},
                       "frame": "6810...16"}]}

`id` is the mailbox's command id: the device executes a command id at most once and
answers a repeated one from memory (delivery is at least once). `args` is the project's
own payload for interval/SenML devices; `frame` is added for a CJ/T 188 meter, its own
write frame (C=04): DI A017 valve control (55 open, 99 close: the forced codes both
published sources agree on, FORMATS.md §1.2) or DI A015 set time (the collector's clock
at the moment of sending, Beijing local time, `ss mm hh DD MM YY CC`). SER = id mod 256.
A rotate_key is for the device's own stack on any meter (no frame): the collector adds
the new key to its args when it sends it, `aes_key` (hex, OMS) or `oscore` (the new
context as provisioning shows it: sender_id, recipient_id, master_secret, master_salt,
algorithm, kdf; the device's point of view), and the device answers it as an
interval/SenML device does. A read is an LwM2M Read (`collector.lwm2m` sends it to LwM2M
clients); should an LwM2M client's meter also take an envelope, it goes there with its
args only (no frame), as any command the device may not know.

Answer (JSON): one object or a list of them,

    {"id": 17, "ok": true, "result": {...}}     interval/SenML devices
    {"id": 17, "frame": "6810...8403A01711...16"}  CJ/T 188: its reply frame

A CJ/T 188 reply is checked (checksum, the meter's own address, C=84 normal or C4
abnormal, SER = id mod 256); `ok` comes from it, never from the envelope.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeGuard

from decoder import limits
from decoder.cjt188 import BEIJING_UTC_OFFSET_S

ENVELOPE_VERSION: Final = 1
MAX_RESULTS: Final = 64  # answers in one message
_HHMM = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")

# what each meter format can be told (M-Bus/OMS: no standard write on these meters yet);
# rotate_key is no meter write: the AES key of an OMS meter (migration 0047) or the OSCORE
# context of the device's modem (0048), whatever its frames' format
SUPPORTED: Final[Mapping[str, frozenset[str]]] = {
    "cjt188": frozenset({"valve", "clock", "rotate_key"}),
    "senml": frozenset({"valve", "clock", "reporting", "rotate_key"}),
    "interval": frozenset({"valve", "clock", "reporting", "rotate_key"}),
    "oms": frozenset({"rotate_key"}),
    "mbus": frozenset({"rotate_key"}),
}
# rotate_key's `key`: which key it rolls; without one, the AES key of an OMS meter and the
# OSCORE context of any other
ROTATE_KEYS: Final = ("aes", "oscore")
KINDS: Final = ("valve", "clock", "reporting", "rotate_key", "read")
# read's `path`: an LwM2M object, instance, resource or resource instance (LwM2M 1.1
# §7.2: ids 0..65534 each; 65535 is reserved)
_LWM2M_PATH = re.compile(r"^(?:/[0-9]{1,5}){1,4}$")
_LWM2M_ID_MAX: Final = 65534
# CJ/T 188 write DIs (big-endian on the wire, as the published valve frames)
_DI_VALVE, _DI_CLOCK = b"\xa0\x17", b"\xa0\x15"
_VALVE_CODES: Final = {"open": 0x55, "close": 0x99}
_METER_TYPE: Final = {"water": 0x10, "gas": 0x30}


@dataclass(frozen=True)
class Pending:
    """A command going out now, with what its encoding needs of the meter."""

    command_id: int
    kind: str
    args: Mapping[str, Any]
    meter_format: str
    meter_kind: str
    address: str


@dataclass(frozen=True)
class DeviceResult:
    """One answer of a device: command id, success, and what it said."""

    command_id: int
    ok: bool
    result: Mapping[str, Any] = field(default_factory=dict)


def rotate_target(meter_format: str, args: Mapping[str, Any]) -> str:
    """Which key a rotate_key with `args` rolls on a `meter_format` meter: aes or oscore."""
    return str(args.get("key") or ("aes" if meter_format == "oms" else "oscore"))


def setting_of(kind: str, args: Mapping[str, Any] | None = None) -> str:
    """The setting a command of `kind` with (checked) `args` changes: a later one
    supersedes a queued earlier one. A read changes nothing: only a read of the same
    path supersedes it."""
    if kind == "read" and args is not None:
        return f"read {args['path']}"
    return kind


def _is_path(path: object) -> TypeGuard[str]:
    return isinstance(path, str) and _LWM2M_PATH.match(path) is not None


def check_args(kind: str, meter_format: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """The normalized args of a `kind` command for a `meter_format` meter; ValueError if bad."""
    if kind not in KINDS:
        msg = f"unknown command kind {kind!r} (one of {', '.join(KINDS)})"
        raise ValueError(msg)
    # a read is an LwM2M operation on the client, whatever its frames' format: the gate is
    # that the meter is an LwM2M client (storage.mailbox), not its format
    if kind != "read" and kind not in SUPPORTED.get(meter_format, frozenset()):
        msg = f"a {meter_format} meter cannot take a {kind} command"
        raise ValueError(msg)
    allowed: dict[str, set[str]] = {
        "valve": {"action"}, "clock": set(), "reporting": {"interval_s", "report_time"},
        "rotate_key": {"key"},  # the collector adds the new key when it sends the command
        "read": {"path"},
    }  # fmt: skip
    extra = sorted(set(args) - allowed[kind])
    if extra:
        msg = f"{kind}: unknown argument(s) {extra}"
        raise ValueError(msg)
    if kind == "valve":
        if args.get("action") not in _VALVE_CODES:
            msg = "valve: action must be 'open' or 'close'"
            raise ValueError(msg)
        return {"action": args["action"]}
    if kind == "clock":
        return {}  # the collector's clock at the moment of sending
    if kind == "read":  # LwM2M clients only: storage.mailbox checks the meter registered
        path = args.get("path")
        ids = [int(i) for i in path[1:].split("/")] if _is_path(path) else [-1]
        if min(ids) < 0 or max(ids) > _LWM2M_ID_MAX:
            msg = (
                "read: path must be an LwM2M path /object[/instance[/resource[/ri]]] (ids < 65535)"
            )
            raise ValueError(msg)
        return {"path": "/" + "/".join(map(str, ids))}
    if kind == "rotate_key":  # the key itself: staged by the collector when it sends it
        if "key" in args and args["key"] not in ROTATE_KEYS:
            msg = "rotate_key: key must be 'aes' (OMS meters) or 'oscore'"
            raise ValueError(msg)
        if rotate_target(meter_format, args) == "aes" and meter_format != "oms":
            msg = f"rotate_key: a {meter_format} meter has no OMS AES key"
            raise ValueError(msg)
        return {"key": args["key"]} if "key" in args else {}
    interval = args.get("interval_s")
    report_time = args.get("report_time")
    if interval is None and report_time is None:
        msg = "reporting: give interval_s, report_time or both"
        raise ValueError(msg)
    out: dict[str, Any] = {}
    if interval is not None:
        if type(interval) is not int or not 60 <= interval <= 7 * 86400:
            msg = "reporting: interval_s must be an integer from 60 to 604800"
            raise ValueError(msg)
        out["interval_s"] = interval
    if report_time is not None:
        if not isinstance(report_time, str) or not _HHMM.match(report_time):
            msg = "reporting: report_time must be 'HH:MM' (the meter's local time)"
            raise ValueError(msg)
        out["report_time"] = report_time
    return out


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def cjt188_write(
    address: str, meter_kind: str, di: bytes, ser: int, data: bytes, preamble: int = 0
) -> bytes:
    """A CJ/T 188 write-data request (C=04) to `address`: DI, SER, data."""
    if len(address) != 14 or not address.isdigit():
        msg = f"address {address!r} must be 14 BCD digits"
        raise ValueError(msg)
    payload = di + bytes([ser & 0xFF]) + data
    body = (
        bytes([0x68, _METER_TYPE[meter_kind]])
        + bytes.fromhex(address)[::-1]  # A0 first on the wire
        + bytes([0x04, len(payload)])
        + payload
    )
    # CJ/T 188: CS = sum of bytes from 0x68 to the last data byte, mod 256
    return b"\xfe" * preamble + body + bytes([sum(body) & 0xFF, 0x16])


def _clock_bytes(now_s: int) -> bytes:
    local = datetime.fromtimestamp(now_s, UTC) + timedelta(seconds=BEIJING_UTC_OFFSET_S)
    fields = (local.second, local.minute, local.hour, local.day, local.month)
    return bytes(_bcd(v) for v in (*fields, local.year % 100, local.year // 100))


def _frame(cmd: Pending, now_s: int) -> bytes | None:
    # rotate_key is the modem's, read the LwM2M client's (collector.lwm2m): not the meter's
    if cmd.meter_format != "cjt188" or cmd.kind in ("rotate_key", "read"):
        return None
    if cmd.kind == "valve":
        data = bytes([_VALVE_CODES[cmd.args["action"]]])
        return cjt188_write(cmd.address, cmd.meter_kind, _DI_VALVE, cmd.command_id, data)
    if cmd.kind == "clock":
        data = _clock_bytes(now_s)
        return cjt188_write(cmd.address, cmd.meter_kind, _DI_CLOCK, cmd.command_id, data)
    msg = f"a cjt188 meter cannot take a {cmd.kind} command"
    raise ValueError(msg)


def entry(cmd: Pending, now_s: int) -> dict[str, Any]:
    """One command of the envelope (clock set: `now_s`, the collector's clock)."""
    args = dict(cmd.args)
    if cmd.kind == "clock":
        args["utc_s"] = now_s
    out: dict[str, Any] = {"id": cmd.command_id, "kind": cmd.kind, "args": args}
    frame = _frame(cmd, now_s)
    if frame is not None:
        out["frame"] = frame.hex()
    return out


def downlink(commands: Sequence[Pending], now_s: int) -> bytes:
    """The envelope carrying `commands` (in order) to their device; empty when none."""
    if not commands:
        return b""
    body = {"v": ENVELOPE_VERSION, "cmds": [entry(c, now_s) for c in commands]}
    return json.dumps(body, separators=(",", ":")).encode()


def cjt188_reply(request: bytes, *, abnormal: bool = False, status: int = 0) -> bytes:
    """The meter's reply to a CJ/T 188 write request (the simulator's side): C=84, or C4
    when `abnormal`, echoing DI and SER, then the ST word (`status`, byte0 first)."""
    start = request.find(b"\x68")
    body = request[start:]
    data = body[11:14] + status.to_bytes(2, "little")  # DI(2) SER(1) ST(2)
    head = body[:9] + bytes([0xC4 if abnormal else 0x84, len(data)])
    frame = head + data
    return frame + bytes([sum(frame) & 0xFF, 0x16])


def parse_cjt188_reply(frame: bytes, address: str, command_id: int) -> DeviceResult:
    """A CJ/T 188 write reply for `command_id` from meter `address`; ValueError if it is not
    one (bad checksum, another meter, not a write reply, another SER)."""
    start = frame.find(b"\x68")
    body = frame[start:] if start >= 0 else b""
    if len(body) < 13 or body[-1] != 0x16 or len(body) != 13 + body[10]:
        msg = "not a CJ/T 188 frame (start, length or end byte)"
        raise ValueError(msg)
    if sum(body[:-2]) & 0xFF != body[-2]:
        msg = "CJ/T 188 checksum does not match"
        raise ValueError(msg)
    if body[2:9][::-1].hex() != address:
        msg = "the reply names another meter"
        raise ValueError(msg)
    control = body[9]
    if control & 0x80 == 0 or control & 0x1F != 0x04:
        msg = f"not a write-data reply (C={control:02X})"
        raise ValueError(msg)
    data = body[11:-2]
    if len(data) < 3 or data[2] != command_id & 0xFF:
        msg = "the reply's SER is not this command's"
        raise ValueError(msg)
    abnormal = bool(control & 0x40)  # C = C4: abnormal reply
    info: dict[str, Any] = {"frame": frame.hex(), "di": data[:2].hex()}
    if len(data) >= 5:
        info["status"] = data[3:5].hex()
    return DeviceResult(command_id, not abnormal, info)


def parse_results(payload: bytes, address: str) -> list[DeviceResult]:
    """The answers in a device's result message (see the module docstring); ValueError if
    the message is not one. Read within `decoder.limits` (size, nesting depth): a result
    nested past the parser's recursion is refused as any other malformed one, never a
    RecursionError that would leave it unanswered (CoAP 5.00) or unacknowledged (MQTT:
    redelivered for ever)."""
    try:
        body = limits.load_json(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        msg = f"result is not JSON: {exc}"
        raise ValueError(msg) from exc
    items = body if isinstance(body, list) else [body]
    if not 1 <= len(items) <= MAX_RESULTS:
        msg = f"a result message holds 1 to {MAX_RESULTS} answers"
        raise ValueError(msg)
    out: list[DeviceResult] = []
    for item in items:
        if not isinstance(item, dict):
            msg = "each answer is an object"
            raise ValueError(msg)
        cid = item.get("id")
        if type(cid) is not int or not 1 <= cid < 2**63:
            msg = "each answer needs its command's integer id"
            raise ValueError(msg)
        if "frame" in item:
            try:
                raw = bytes.fromhex(str(item["frame"]))
            except ValueError as exc:
                msg = "frame must be hex"
                raise ValueError(msg) from exc
            out.append(parse_cjt188_reply(raw, address, cid))
            continue
        ok, result = item.get("ok"), item.get("result", {})
        if not isinstance(ok, bool) or not isinstance(result, dict):
            msg = "each answer needs ok (true/false) and an optional result object"
            raise ValueError(msg)
        out.append(DeviceResult(cid, ok, result))
    return out
