"""`nbmeter decode`: hex frames (arguments, or hex/JSONL lines on stdin) to JSON lines.

One JSON object per frame, in input order: `ok`, `format`, `meter_id`, `total_m3`, the
other decoded fields with units in their names, and `error` when the frame fails. A bad
line never stops the run; the exit code is 1 when any frame failed, so scripts notice.

`--platform onenet|oceanconnect [FILE]` reads one operator-platform push body (the file,
or stdin) instead: one line per message it carries, with the platform's device identity,
its time and the payload, then what the payload decodes to. The push's signature is not
checked here (that needs the tenant's secret: the collector checks it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from collector.drivers import install_files
from decoder.drivers import DriverError
from decoder.jsonl import json_lines
from decoder.view import decode_frames, frame_records, parse_input_line


def _load_keys(path: str | None) -> dict[str, bytes]:
    if not path:
        return {}
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        msg = f"--keys {path}: {exc} (expected a JSON object: meter id -> 32 hex digits)"
        raise SystemExit(f"nbmeter decode: {msg}") from exc
    keys: dict[str, bytes] = {}
    for meter, key in raw.items():
        try:
            keys[str(meter)] = bytes.fromhex(key)
        except (TypeError, ValueError):
            msg = f"--keys {path}: key for meter {meter} is not hex"
            raise SystemExit(f"nbmeter decode: {msg}") from None
        if len(keys[str(meter)]) != 16:
            msg = f"--keys {path}: key for meter {meter} is not 16 bytes (AES-128)"
            raise SystemExit(f"nbmeter decode: {msg}")
    return keys


def _install_drivers(paths: list[str] | None) -> None:
    """`--driver FILE`: install driver files (each may replace a shipped one of its name)."""
    if not paths:
        return
    try:
        install_files([Path(p) for p in paths], replace=True)
    except DriverError as exc:
        raise SystemExit(f"nbmeter decode: {exc}") from exc


def _run_push(args: argparse.Namespace, keys: dict[str, bytes]) -> int:
    from datetime import UTC, datetime

    from devices import platforms

    source = args.frames[0] if args.frames else "-"
    try:
        body = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
        envelope = platforms.read(args.platform, body)
    except OSError as exc:
        raise SystemExit(f"nbmeter decode: {source}: {exc}") from exc
    except platforms.PushRejected as exc:
        print(json.dumps({"ok": False, "error": f"{exc.code}: {exc.detail}"}))
        return 1
    received = args.received_at if args.received_at is not None else int(time.time())
    frames = [m.payload for m in envelope.messages]
    records = frame_records(frames, received, keys=keys, frame_keys={})
    failed = 0
    for message, record in zip(envelope.messages, records, strict=True):
        failed += not record.get("ok", False)
        head = {
            "platform": envelope.platform,
            "device_id": message.device_id,
            "platform_time": datetime.fromtimestamp(message.at_s, UTC).isoformat(),
            "payload_hex": message.payload.hex(),
        }
        print(json.dumps(head | record, ensure_ascii=False, default=str))
    if envelope.ignored:
        print(json.dumps({"ignored": envelope.ignored, "why": "no uplink data (status, commands)"}))
    return 1 if failed else 0


def run_decode(args: argparse.Namespace) -> int:
    """Decode the frames named by `args`, print JSON lines; 1 if any frame failed."""
    _install_drivers(args.driver)
    keys = _load_keys(args.keys)
    if args.platform:
        return _run_push(args, keys)
    lines = args.frames or [line for line in sys.stdin if line.strip()]
    received = args.received_at if args.received_at is not None else int(time.time())
    frames: list[bytes] = []
    inline: dict[int, bytes] = {}  # a JSONL line's own `key`, for that frame only
    bad_input: dict[int, str] = {}
    for i, line in enumerate(lines):
        try:
            frame, key = parse_input_line(line)
        except ValueError as exc:
            bad_input[i] = str(exc)
            frame, key = b"", None
        frames.append(frame)
        if key is not None:
            inline[i] = key
    decoded = decode_frames(frames, received, keys=keys, frame_keys=inline)
    lines_out = json_lines(decoded)  # built column by column, no per-frame dict
    for i, message in bad_input.items():
        record = {"ok": False, "error": f"input line {i + 1}: {message}"}
        lines_out[i] = json.dumps(record, ensure_ascii=False, default=str)
    failed = bool(bad_input) or not bool(decoded.ok.all())
    sys.stdout.write("".join(line + "\n" for line in lines_out))
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `nbmeter decode`."""
    parser.add_argument(
        "frames", nargs="*", help="hex frames; none: read lines (hex or JSONL) from stdin"
    )
    parser.add_argument("--keys", help="JSON file mapping meter id to AES-128 key (hex)")
    parser.add_argument(
        "--driver",
        action="append",
        metavar="FILE",
        help="driver file (TOML) to try; validated and golden-checked first (repeatable)",
    )
    parser.add_argument(
        "--received-at", type=int, help="receive time, UTC epoch seconds (default now)"
    )
    parser.add_argument(
        "--platform",
        choices=["onenet", "oceanconnect"],
        help="the input (a FILE argument, or stdin) is one push body of this platform",
    )
    parser.set_defaults(func=run_decode)
