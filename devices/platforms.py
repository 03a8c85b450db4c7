"""Operator-platform push envelopes, sans-I/O: body bytes in, authenticated uplinks out.

An operator's IoT platform receives a meter's CoAP/LwM2M traffic and POSTs each uplink to
the utility as JSON carrying the payload (hex or base64). Each platform is one row of
`PLATFORMS`: how its envelope is read (`read`: device identity, payload bytes and platform
time of every message) and how its push is authenticated (`verify`: signature or token,
then every message's time within `Window`). No sockets, no database: the HTTP shell
(`collector.platform_http`) feeds bytes in and turns the result into uplinks; the
encoders (`onenet_body`, `oceanconnect_body`) are the inverse, for tests, the bench and
the simulator.

Supported (their public documentation, cited in the tests):

- **onenet** (China Mobile OneNET HTTP push): `{"msg": {...} | [...], "msg_signature",
  "nonce"}`; signature = base64(md5(token + nonce + msg)), msg as sent; a batch push
  carries a list. Data-point messages (`type` 1) carry `value` (the payload), `at` (platform
  time, ms; inside the signed msg, so it bounds replays) and, for NB-IoT devices, `imei`
  (the identity used; `dev_id` otherwise). Other types (online/offline, command results)
  are acknowledged and ignored.
- **oceanconnect** (Huawei OceanConnect northbound push, `deviceDataChanged` and the batch
  `deviceDatasChanged`, whose list is `services`, or `service` as in the documentation's
  own example): `deviceId`, `service(s)[].data` (the payload: `rawData` base64,
  else the hex string the codec left) and `eventTime` (`YYYYMMDDTHHMMSSZ`). The platform
  signs nothing (its documentation authenticates the receiver by HTTPS certificate only),
  so the push carries the tenant's endpoint secret in its callback URL
  (`.../oceanconnect/<secret>`), compared in constant time; `eventTime` bounds replays,
  though nothing binds it to the secret. Other notify types are acknowledged and ignored.

Errors: `PushRejected(status, code, detail)`, the HTTP answer to give (400 malformed,
401 bad signature/token or stale, 413 too many messages).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from decoder.limits import MAX_DEPTH, json_depth


class PushRejected(Exception):
    """A push that is answered with a 4xx before anything is stored."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Message:
    """One uplink inside a push: who (platform identity), what (payload), when (platform)."""

    device_id: str
    payload: bytes
    at_s: float  # the platform's time of the message (epoch seconds)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A push as read, not yet authenticated: its uplinks, and what the signature covers."""

    platform: str
    messages: tuple[Message, ...]
    ignored: int = 0  # messages of other kinds (online/offline, command results)
    signed: Mapping[str, str] = field(default_factory=dict)  # platform-specific material


@dataclass(frozen=True, slots=True)
class Window:
    """How old (or how far ahead) a message's platform time may be."""

    max_age_s: float = 3600.0
    max_ahead_s: float = 300.0


MAX_MESSAGES = 1000  # per push; a platform batches far fewer
_MAX_AT_MS = 253_402_300_800_000  # OneNET `at` (ms): before 10000-01-01, as a date holds it


def _malformed(detail: str) -> PushRejected:
    return PushRejected(400, "malformed", detail)


def _json(body: bytes) -> object:
    if json_depth(body) > MAX_DEPTH:
        raise _malformed(f"JSON nested deeper than {MAX_DEPTH}")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _malformed(f"not JSON: {exc}") from exc


_HEX = re.compile(r"^(?:[0-9A-Fa-f]{2})+$")


def payload_bytes(value: object, where: str) -> bytes:
    """A payload string as bytes: hex when it is all hex digit pairs, else strict base64."""
    if not isinstance(value, str) or not value:
        raise _malformed(f"{where}: the payload must be a non-empty string")
    if _HEX.match(value):
        return bytes.fromhex(value)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _malformed(f"{where}: the payload is neither hex nor base64") from exc


def _identity(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _malformed(f"{where}: no device identity")
    text = str(value)
    if not 1 <= len(text) <= 128 or not text.isprintable():
        raise _malformed(f"{where}: a device identity is 1 to 128 printable characters")
    return text


# ---------------------------------------------------------------- OneNET


def onenet_signature(token: bytes, nonce: str, msg: str) -> str:
    """base64(md5(token + nonce + msg)): OneNET's push signature (and URL check's)."""
    digest = hashlib.md5(token + nonce.encode() + msg.encode(), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode()


def _raw_msg(body: bytes, msg: object) -> str:
    """The text of the top-level `msg` value exactly as sent (what OneNET signed)."""
    text = body.decode()
    decoder = json.JSONDecoder()
    for match in re.finditer(r'"msg"\s*:\s*', text):
        try:
            value, end = decoder.raw_decode(text, match.end())
        except ValueError:
            continue
        if value == msg:
            return text[match.end() : end]
    raise _malformed("msg not found")


def _read_onenet(body: bytes) -> Envelope:
    doc = _json(body)
    if not isinstance(doc, dict):
        raise _malformed("the body must be a JSON object with msg, msg_signature and nonce")
    msg, signature, nonce = doc.get("msg"), doc.get("msg_signature"), doc.get("nonce")
    if not isinstance(signature, str) or not isinstance(nonce, str) or msg is None:
        raise _malformed("msg, msg_signature (string) and nonce (string) are required")
    items = msg if isinstance(msg, list) else [msg]
    if len(items) > MAX_MESSAGES:
        raise PushRejected(413, "too_many", f"more than {MAX_MESSAGES} messages in one push")
    messages: list[Message] = []
    ignored = 0
    for n, item in enumerate(items):
        where = f"msg[{n}]"
        if not isinstance(item, dict):
            raise _malformed(f"{where} is not an object")
        if item.get("type") != 1:  # 2 online/offline, 7 command result: nothing to store
            ignored += 1
            continue
        at = item.get("at")
        if isinstance(at, bool) or not isinstance(at, int):
            raise _malformed(f"{where}.at (platform time, ms) is required")
        if not 0 <= at < _MAX_AT_MS:
            raise _malformed(f"{where}.at {at} is not a time in ms since 1970")
        who = item.get("imei") if item.get("imei") is not None else item.get("dev_id")
        value = payload_bytes(item.get("value"), f"{where}.value")
        messages.append(Message(_identity(who, f"{where}.imei/dev_id"), value, at / 1000))
    raw = _raw_msg(body, msg)
    return Envelope(
        "onenet", tuple(messages), ignored, {"nonce": nonce, "sig": signature, "msg": raw}
    )


def _verify_onenet(env: Envelope, secret: bytes, url_token: str | None) -> None:
    del url_token  # OneNET signs the body
    want = onenet_signature(secret, env.signed["nonce"], env.signed["msg"])
    if not hmac.compare_digest(want.encode(), env.signed["sig"].encode()):
        raise PushRejected(401, "bad_signature", "msg_signature does not match the token")


def onenet_body(items: list[dict[str, object]], token: bytes, nonce: str) -> bytes:
    """A OneNET push body carrying `items` (one: plain, several: batch), signed with `token`."""
    msg = json.dumps(items[0] if len(items) == 1 else items, separators=(",", ":"))
    signature = onenet_signature(token, nonce, msg)
    return f'{{"msg":{msg},"msg_signature":"{signature}","nonce":"{nonce}"}}'.encode()


# ---------------------------------------------------------------- OceanConnect


def _event_time(value: object, where: str) -> float:
    if not isinstance(value, str):
        raise _malformed(f"{where}.eventTime (YYYYMMDDTHHMMSSZ) is required")
    try:
        return datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError as exc:
        raise _malformed(f"{where}.eventTime {value!r} is not YYYYMMDDTHHMMSSZ") from exc


def _service_payload(data: object, where: str) -> bytes:
    if not isinstance(data, dict):
        raise _malformed(f"{where}.data must be an object")
    if "rawData" in data:  # a transparent (no codec) device: base64 of the bytes
        return payload_bytes(data["rawData"], f"{where}.data.rawData")
    found = [v for v in data.values() if isinstance(v, str) and _HEX.match(v)]
    if len(found) != 1:
        raise _malformed(f"{where}.data holds no single hex payload (nor rawData)")
    return bytes.fromhex(found[0])


_OC_DATA = ("deviceDataChanged", "deviceDatasChanged")


def _read_oceanconnect(body: bytes) -> Envelope:
    doc = _json(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("notifyType"), str):
        raise _malformed("the body must be a JSON object with notifyType")
    if doc["notifyType"] not in _OC_DATA:  # device info, commands...: nothing to store
        return Envelope("oceanconnect", (), 1)
    device = _identity(doc.get("deviceId"), "deviceId")
    if doc["notifyType"] == "deviceDataChanged":
        services = [doc.get("service")]
    else:
        # the parameter table names the list `services`; the page's own request example
        # sends it as `service`: take either
        listed = doc.get("services", doc.get("service"))
        if not isinstance(listed, list) or not listed:
            raise _malformed("deviceDatasChanged needs a non-empty services list")
        services = listed
    if len(services) > MAX_MESSAGES:
        raise PushRejected(413, "too_many", f"more than {MAX_MESSAGES} services in one push")
    messages = []
    for n, service in enumerate(services):
        where = f"services[{n}]" if doc["notifyType"] == "deviceDatasChanged" else "service"
        if not isinstance(service, dict):
            raise _malformed(f"{where} must be an object")
        payload = _service_payload(service.get("data"), where)
        messages.append(Message(device, payload, _event_time(service.get("eventTime"), where)))
    return Envelope("oceanconnect", tuple(messages))


def _verify_oceanconnect(env: Envelope, secret: bytes, url_token: str | None) -> None:
    del env  # nothing in the body is signed
    if url_token is None or not hmac.compare_digest(url_token.encode(), secret):
        raise PushRejected(401, "bad_token", "the callback URL does not carry this tenant's secret")


def oceanconnect_body(
    device_id: str, payloads: list[tuple[bytes, float]], request_id: str
) -> bytes:
    """A `deviceDataChanged` (one payload) or `deviceDatasChanged` body; payloads as hex."""

    def service(payload: bytes, at_s: float) -> dict[str, object]:
        when = datetime.fromtimestamp(at_s, UTC).strftime("%Y%m%dT%H%M%SZ")
        return {
            "serviceId": "WaterMeter",
            "serviceType": "WaterMeter",
            "data": {"meterFrame": payload.hex().upper()},
            "eventTime": when,
        }

    doc: dict[str, object] = {
        "requestId": request_id,
        "deviceId": device_id,
        "gatewayId": device_id,
    }
    if len(payloads) == 1:
        doc |= {"notifyType": "deviceDataChanged", "service": service(*payloads[0])}
    else:
        doc |= {"notifyType": "deviceDatasChanged", "services": [service(*p) for p in payloads]}
    return json.dumps(doc).encode()


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Platform:
    """How one platform's push is read and authenticated."""

    name: str
    read: Callable[[bytes], Envelope]
    authenticate: Callable[[Envelope, bytes, str | None], None]


PLATFORMS: Mapping[str, Platform] = {
    p.name: p
    for p in (
        Platform("onenet", _read_onenet, _verify_onenet),
        Platform("oceanconnect", _read_oceanconnect, _verify_oceanconnect),
    )
}


def read(platform: str, body: bytes) -> Envelope:
    """The envelope of `platform`'s push `body`, unauthenticated (PushRejected if malformed)."""
    spec = PLATFORMS.get(platform)
    if spec is None:
        raise PushRejected(404, "unknown_platform", f"supported: {', '.join(PLATFORMS)}")
    return spec.read(body)


def _iso(at_s: float) -> str:
    """`at_s` as an ISO 8601 UTC time, or as seconds where no date has it (year > 9999)."""
    try:
        return datetime.fromtimestamp(at_s, UTC).isoformat()
    except (ValueError, OverflowError, OSError):
        return f"{at_s:.0f} s since 1970"


def verify(
    env: Envelope, secret: bytes, now_s: float, window: Window, url_token: str | None = None
) -> None:
    """Authenticate `env` with the tenant's `secret`, then check every message's time."""
    PLATFORMS[env.platform].authenticate(env, secret, url_token)
    for message in env.messages:
        if now_s - message.at_s > window.max_age_s or message.at_s - now_s > window.max_ahead_s:
            at = _iso(message.at_s)
            detail = (
                f"message time {at} is outside the accepted window"
                f" ({window.max_age_s:.0f} s old, {window.max_ahead_s:.0f} s ahead)"
            )
            raise PushRejected(401, "stale", detail)
