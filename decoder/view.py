"""JSON view of decoded frames for `nbmeter decode`: one JSON-serialisable dict per frame.

Shape: `ok`, `format`, `address`, `total_m3` (a decimal string at the meter's own
precision, "556677.00"; from `extra["total_m3"]`, else the newest register in mL), the
format's other fields from `Decoded.extra_of` (units in their names; Decimal -> string), and either
`read_at` / `flags` for a single reading or `readings` for several, `decode_flags` (the
names of the frame's `FrameFlag` bits: what the decoder tolerated or left out) when any
is set; a failed frame adds `error` (message) and `error_code` (the stable integer) with
`error_name`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal

import numpy as np
import numpy.typing as npt

from decoder import decode_batch, limits
from decoder.columns import Decoded, ErrorCode, Flag, concat, frame_flag_names
from decoder.mbus_link import WILDCARD_KEY  # `keys["*"]`: the key for whichever meter

__all__ = [
    "WILDCARD_KEY",
    "decode_frames",
    "flag_names",
    "frame_records",
    "json_value",
    "m3_text",
    "parse_input_line",
    "records",
]


def json_value(value: object) -> object:
    """Decoded values -> JSON types: Decimal -> exact string, bytes -> hex, containers."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, bytes | bytearray):
        return value.hex().upper()
    if isinstance(value, Mapping):
        return {str(key): json_value(val) for key, val in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(val) for val in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _iso(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


def flag_names(bits: int) -> list[str]:
    """The lowercase names of the reading `Flag` bits set in `bits`."""
    return [f.name.lower() for f in Flag if f and bits & f and f.name]


def m3_text(ml: int) -> str:
    """mL as an exact m3 string without trailing zeros ("0" for 0)."""
    return format(Decimal(ml).scaleb(-6).normalize(), "f") if ml else "0"


def records(decoded: Decoded) -> list[dict[str, object]]:
    """A Decoded batch -> one JSON-ready dict per input frame (see the module docstring)."""
    by_frame: dict[int, list[int]] = {}
    for j, i in enumerate(decoded.frame_index.tolist()):
        by_frame.setdefault(i, []).append(j)
    notes = decoded.frame_flags_or_zero
    out = []
    for i in range(decoded.n_frames):
        code = int(decoded.error_code[i])
        rec: dict[str, object] = {
            "ok": code == 0,
            "format": decoded.format[i] or None,
            "address": decoded.address_of_frame[i] or None,
        }
        extra = decoded.extra_of(i)
        rows = by_frame.get(i, [])
        if "total_m3" in extra:
            rec["total_m3"] = json_value(extra.pop("total_m3"))
        elif rows:
            newest = max(rows, key=lambda j: int(decoded.read_at_s[j]))
            rec["total_m3"] = m3_text(int(decoded.register_ml[newest]))
        rec.update({key: json_value(val) for key, val in extra.items() if key not in rec})
        if notes[i]:
            rec["decode_flags"] = frame_flag_names(int(notes[i]))
        readings = [
            {
                "read_at": _iso(int(decoded.read_at_s[j])),
                "register_m3": m3_text(int(decoded.register_ml[j])),
                "flags": flag_names(int(decoded.flags[j])),
            }
            for j in rows
        ]
        if len(readings) == 1:
            rec["read_at"], rec["flags"] = readings[0]["read_at"], readings[0]["flags"]
        elif readings:
            rec["readings"] = readings
        if code:
            rec["error"] = decoded.error_message[i]
            rec["error_code"] = code
            rec["error_name"] = (
                ErrorCode(code).name if code in ErrorCode._value2member_map_ else "?"
            )
        out.append(rec)
    return out


def decode_frames(
    frames: Sequence[bytes],
    received_at_s: npt.ArrayLike,
    keys: Mapping[str, bytes] | None = None,
    frame_keys: Mapping[int, bytes] | None = None,
) -> Decoded:
    """Frames -> one Decoded batch in input order (never raises per frame).

    `frame_keys[i]` is an inline key for frame i (the vector files' `key`): its meter id
    is not known before decoding, so the frames that share an inline key are decoded as
    one batch with `keys["*"]` set to it (a meter's own key in `keys` still wins); the
    frames without one are one batch with `keys`. The batches merge back in input order.
    """
    n = len(frames)
    rx = np.broadcast_to(np.asarray(received_at_s, np.int64), (n,))
    groups: dict[bytes | None, list[int]] = {}
    inline = frame_keys or {}
    for i in range(n):
        groups.setdefault(inline.get(i), []).append(i)
    parts: list[tuple[npt.NDArray[np.int64], Decoded]] = []
    for key, rows in groups.items():
        batch_keys = dict(keys or {}) if key is None else {**(keys or {}), WILDCARD_KEY: key}
        where = np.asarray(rows, np.int64)
        picked = frames if len(rows) == n else [frames[i] for i in rows]
        parts.append((where, decode_batch(picked, rx[where], keys=batch_keys)))
    if len(parts) == 1:
        return parts[0][1]
    return concat(parts, n)


def frame_records(
    frames: Sequence[bytes],
    received_at_s: npt.ArrayLike,
    keys: Mapping[str, bytes] | None = None,
    frame_keys: Mapping[int, bytes] | None = None,
) -> list[dict[str, object]]:
    """Frames -> one JSON-serialisable dict per frame, in order (see `decode_frames`)."""
    return records(decode_frames(frames, received_at_s, keys, frame_keys))


def parse_input_line(line: str) -> tuple[bytes, bytes | None]:
    """A hex line (spaces allowed) or a JSON object (`hex`, or SenML `json`/`payload`,
    optional hex `key`) -> (frame bytes, key or None); raises ValueError saying why."""
    text = line.strip()
    if not text:
        msg = "empty line"
        raise ValueError(msg)
    if not text.startswith("{"):
        try:
            return bytes.fromhex("".join(text.split())), None
        except ValueError:
            msg = "not a hex string (0-9, A-F, spaces) nor a JSON object"
            raise ValueError(msg) from None
    try:
        obj = limits.load_json(text.encode("utf-8", "surrogatepass"))
    except ValueError as exc:  # LimitError (nesting, size) included
        msg = f"invalid JSON: {exc}"
        raise ValueError(msg) from None
    if not isinstance(obj, dict):
        msg = "JSON input must be an object with a `hex` field"
        raise ValueError(msg)
    if isinstance(obj.get("hex"), str):
        frame = parse_input_line(obj["hex"])[0]
    elif isinstance(obj.get("payload"), str):
        frame = obj["payload"].encode()
    elif isinstance(obj.get("json"), list):
        frame = json.dumps(obj["json"]).encode()
    else:
        msg = "JSON object has no `hex` string (nor SenML `payload`/`json`)"
        raise ValueError(msg)
    key = obj.get("key")
    if key is None:
        return frame, None
    try:
        return frame, bytes.fromhex(str(key))
    except ValueError:
        msg = "`key` is not hex"
        raise ValueError(msg) from None
