"""`nbmeter decode`: hex frames (arguments, or hex/JSONL lines on stdin) to JSON lines.

One JSON object per frame, in input order: `ok`, `format`, `meter_id`, `total_m3`, the
other decoded fields with units in their names, and `error` when the frame fails. A bad
line never stops the run; the exit code is 1 when any frame failed, so scripts notice.
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
from decoder.view import decode_frames, parse_input_line


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


def run_decode(args: argparse.Namespace) -> int:
    """Decode the frames named by `args`, print JSON lines; 1 if any frame failed."""
    _install_drivers(args.driver)
    keys = _load_keys(args.keys)
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
    parser.set_defaults(func=run_decode)
