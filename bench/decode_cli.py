"""Benchmark (not a test): `nbmeter decode` throughput on JSONL, inline keys beside --keys.

One input of `n` lines (default 20,000): AES mode 5 OMS frames of 200 meters, each line
carrying its meter's key inline (`{"hex": ..., "key": ...}`, the vector files' shape),
mixed with keyless plain OMS, wired M-Bus and CJ/T 188 frames. The same frames are run
twice through the command in this process: once with the inline keys, once as bare hex
lines with the keys in a `--keys` file; and once more the way the command worked before
it grouped inline keys (each inline-keyed frame decoded in a batch of its own, output
built from per-frame dicts), as the same-run baseline. Output goes to a string buffer;
the figures are whole runs (parse, decode, JSON out). Run:

    .venv/bin/python bench/decode_cli.py [n_lines]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from decoder import decode_batch, mbus
from decoder.encode_cjt188 import encode_cjt188
from decoder.view import WILDCARD_KEY, parse_input_line, records

if sys.path[:1] == [str(Path(__file__).resolve().parent)]:
    sys.path.pop(0)  # run as a script: bench/collector.py would shadow the collector package
from nbmeter.commands.decode import run_decode  # after the path fix above

METERS = 200


def build(n: int, rng: random.Random) -> tuple[list[str], list[str], dict[str, str]]:
    """(inline-key JSONL lines, bare hex lines, meter id -> hex key) for `n` frames."""
    keys = {f"{m:08d}": rng.randbytes(16).hex() for m in range(10_000_000, 10_000_000 + METERS)}
    meters = sorted(keys)
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    inline: list[str] = []
    bare: list[str] = []
    for i in range(n):
        when = t0 + timedelta(seconds=rng.randrange(10**7))
        total = rng.randrange(10**9) * 1000
        kind = i % 10
        key: str | None = None
        if kind < 6:  # encrypted: the key rides along inline
            mid = meters[i % METERS]
            key = keys[mid]
            frame = mbus.encode_oms_mode5(mid, "KAM", 0x1B, 0x16, i & 0xFF, total,
                                          bytes.fromhex(key), when)  # fmt: skip
        elif kind < 8:
            frame = mbus.encode_oms_plain(f"{i:08d}", "DME", 0x30, 0x07, i & 0xFF, total, when)
        elif kind < 9:
            frame = mbus.encode_wired(f"{i:08d}", "ACW", 0x14, 0x07, i & 0xFF, total, when)
        else:
            frame = encode_cjt188(address=f"{i:014d}", total_ml=total // 10**7 * 10**4)
        record = {"hex": frame.hex()} | ({"key": key} if key else {})
        inline.append(json.dumps(record))
        bare.append(frame.hex())
    return inline, bare, keys


def run(lines: list[str], keys_file: str | None) -> tuple[float, str]:
    """Seconds for one `nbmeter decode` over `lines` on stdin, and its output."""
    args = argparse.Namespace(frames=[], keys=keys_file, received_at=1_700_000_000, driver=None)
    sink = io.StringIO()
    stdin, sys.stdin = sys.stdin, io.StringIO("\n".join(lines) + "\n")
    try:
        start = time.perf_counter()
        with contextlib.redirect_stdout(sink):
            code = run_decode(args)
        elapsed = time.perf_counter() - start
    finally:
        sys.stdin = stdin
    assert code == 0, "bench input must decode cleanly"
    return elapsed, sink.getvalue()


def run_one_by_one(lines: list[str]) -> tuple[float, str]:
    """Seconds for the command's former path over `lines`: keyless frames in one batch,
    each inline-keyed frame in a batch of its own, one dict per frame, json.dumps each."""
    start = time.perf_counter()
    frames: list[bytes] = []
    inline: dict[int, bytes] = {}
    for i, line in enumerate(lines):
        frame, key = parse_input_line(line)
        frames.append(frame)
        if key is not None:
            inline[i] = key
    rest = [i for i in range(len(frames)) if i not in inline]
    out: list[dict[str, object]] = [{} for _ in frames]
    batch = decode_batch([frames[i] for i in rest], 1_700_000_000)
    for i, rec in zip(rest, records(batch), strict=True):
        out[i] = rec
    for i, key in inline.items():
        one = decode_batch([frames[i]], 1_700_000_000, keys={WILDCARD_KEY: key})
        out[i] = records(one)[0]
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in out)
    return time.perf_counter() - start, text


def main() -> None:
    """Build the input, time the three runs, print lines/s and the ratios."""
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    inline, bare, keys = build(n, random.Random(42))
    with tempfile.TemporaryDirectory() as tmp:
        keys_file = Path(tmp, "keys.json")
        keys_file.write_text(json.dumps(keys))
        run(inline[:200], None)  # warm-up: imports, layout caches
        before_s, before_out = run_one_by_one(inline)
        inline_s, inline_out = run(inline, None)
        keys_s, keys_out = run(bare, str(keys_file))
    same = before_out == inline_out and inline_out.splitlines() == keys_out.splitlines()
    keyed = sum('"key"' in x for x in inline)
    rows = (
        ("inline keys, one batch per frame (before)", before_s),
        ("nbmeter decode, inline keys", inline_s),
        ("nbmeter decode, --keys file", keys_s),
    )
    print(f"input: {n} lines, {keyed} with an inline key ({METERS} meters)")
    for label, seconds in rows:
        print(f"{label:<42}: {n / seconds:9,.0f} lines/s ({seconds:.2f} s)")
    print(f"{'inline keys, now / before':<42}: {before_s / inline_s:9.1f} x")
    print(f"{'inline keys / --keys':<42}: {keys_s / inline_s:9.2f} x")
    print(f"{'same output in all three runs':<42}: {same}")


if __name__ == "__main__":
    main()
