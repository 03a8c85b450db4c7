"""`nbmeter decode` output: column-built JSON lines equal the per-frame dicts, byte for byte,
and grouping inline-keyed frames by key changes no record.

The speed itself is measured by `bench/decode_cli.py`, not here.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator
from contextlib import redirect_stdout
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from decoder import decode_batch, interval, mbus
from decoder.columns import Decoded
from decoder.encode_cjt188 import encode_cjt188
from decoder.encode_senml import encode_senml, water_pack
from decoder.jsonl import json_lines
from decoder.view import WILDCARD_KEY, decode_frames, parse_input_line, records
from nbmeter.commands.decode import add_arguments, run_decode

RX = 1_700_000_000
WHEN = datetime(2024, 3, 5, 6, 7, 8, tzinfo=UTC)
KEY_A, KEY_B = bytes(range(16)), bytes(range(16, 32))
VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors"


def _mixed_lines() -> list[str]:
    """Input lines of every kind: inline keys (two keys, a wrong one), bare hex, SenML,
    nbm1, a frame with junk after its total, a billing "no data", bad lines."""
    a = mbus.encode_oms_mode5("11111111", "KAM", 0x1B, 0x16, 1, 5_000_000, KEY_A, WHEN)
    a2 = mbus.encode_oms_mode5("11111112", "KAM", 0x1B, 0x16, 2, 6_000_000, KEY_A, WHEN)
    b = mbus.encode_oms_mode5("22222222", "DME", 0x30, 0x07, 3, 7_000, KEY_B, WHEN,
                              target_ml=1000, target_date=WHEN.date())  # fmt: skip
    plain = mbus.encode_oms_plain("33333333", "DME", 1, 7, 1, 9_000, WHEN)
    junk = plain + bytes.fromhex("FED0")  # L no longer matches: read as received
    nodata = bytes.fromhex(
        "2E4492159293949511377ABE0020252F2F04135515000004FD971D80800000441300000080426C000002FDFD02B300"
    )
    cjt = encode_cjt188(address="78330011223344", total_ml=556_677_000_000, preamble=2)
    senml = encode_senml(water_pack("urn:m:1", [(RX - 3600, 1_000), (RX, 2_000)]))
    nbm1 = interval.encode_interval("00000000000007", RX - RX % 3600, 0, [1000] * 23)
    wired = mbus.encode_wired("87654321", "ACW", 0x14, 0x07, 3, 54_321_000, WHEN)

    def keyed(frame: bytes, key: bytes) -> str:
        return json.dumps({"hex": frame.hex(), "key": key.hex()})

    return [
        keyed(a, KEY_A),
        cjt.hex(),
        keyed(b, KEY_B),
        keyed(a2, KEY_A),
        keyed(a, KEY_B),  # the wrong key: DECRYPT_FAILED
        json.dumps({"json": json.loads(senml)}),
        nbm1.hex(),
        junk.hex(),
        nodata.hex(),
        "zz not hex",
        wired.hex(),
        keyed(plain, KEY_B),  # a key it does not need
        "{}",
    ]


def _parse(lines: list[str]) -> tuple[list[bytes], dict[int, bytes]]:
    frames, inline = [], {}
    for i, line in enumerate(lines):
        try:
            frame, key = parse_input_line(line)
        except ValueError:
            frame, key = b"", None
        frames.append(frame)
        if key is not None:
            inline[i] = key
    return frames, inline


def _one_by_one(frames: list[bytes], inline: dict[int, bytes]) -> list[dict[str, object]]:
    """The records as the command built them before grouping: the keyless frames in one
    batch, each inline-keyed frame in a batch of its own."""
    rest = [i for i in range(len(frames)) if i not in inline]
    out: list[dict[str, object]] = [{} for _ in frames]
    batch = decode_batch([frames[i] for i in rest], RX)
    for i, rec in zip(rest, records(batch), strict=True):
        out[i] = rec
    for i, key in inline.items():
        out[i] = records(decode_batch([frames[i]], RX, keys={WILDCARD_KEY: key}))[0]
    return out


def _vector_batches() -> Iterator[tuple[str, Decoded]]:
    """Every shared vector file decoded as the command does (skipped when absent)."""
    if not VECTORS.is_dir():
        return
    for path in sorted(VECTORS.glob("*.jsonl")):
        frames, inline = _parse([x for x in path.read_text().splitlines() if x.strip()])
        yield path.name, decode_frames(frames, RX, frame_keys=inline)


def _dumps(decoded: Decoded) -> list[str]:
    return [json.dumps(r, ensure_ascii=False, default=str) for r in records(decoded)]


def test_json_lines_equal_the_record_dicts_on_a_mixed_batch() -> None:
    """Column-built lines are byte-identical to json.dumps of the per-frame dicts."""
    frames, inline = _parse(_mixed_lines())
    decoded = decode_frames(frames, RX, frame_keys=inline)
    assert json_lines(decoded) == _dumps(decoded)
    assert decoded.frame_flags_or_zero.any()  # the flags path is covered
    assert decoded.sparse  # SenML's per-frame extras are covered


@pytest.mark.skipif(not VECTORS.is_dir(), reason=f"shared vectors not found at {VECTORS}")
def test_json_lines_equal_the_record_dicts_on_the_vectors() -> None:
    """On every shared vector file the two outputs are byte-identical."""
    for name, decoded in _vector_batches():
        assert json_lines(decoded) == _dumps(decoded), name


def test_grouping_by_inline_key_changes_no_record() -> None:
    """Frames grouped per inline key give the records of frames decoded one by one."""
    frames, inline = _parse(_mixed_lines())
    assert len(set(inline.values())) < len(inline)  # some frames share a key
    grouped = records(decode_frames(frames, RX, frame_keys=inline))
    assert grouped == _one_by_one(frames, inline)
    assert [r["ok"] for r in grouped][:5] == [True, True, True, True, False]


@pytest.mark.skipif(not VECTORS.is_dir(), reason=f"shared vectors not found at {VECTORS}")
def test_grouping_changes_no_record_of_the_vectors() -> None:
    """The same on the wM-Bus vector file (its lines carry inline keys)."""
    lines = (VECTORS / "wmbus_wmbusmeters.jsonl").read_text().splitlines()
    frames, inline = _parse([x for x in lines if x.strip()])
    grouped = records(decode_frames(frames, RX, frame_keys=inline))
    assert grouped == _one_by_one(frames, inline)


def _decode_args(*argv: str) -> argparse.Namespace:
    # the command's own parser: a new option gets its default here too
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_command_output_and_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """`nbmeter decode` prints one line per input line (bad lines say which), in order,
    equal to the per-frame dicts, and exits 1 since some frames failed."""
    lines = _mixed_lines()
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    out = io.StringIO()
    with redirect_stdout(out):
        code = run_decode(_decode_args("--received-at", str(RX)))
    printed = out.getvalue().splitlines()
    frames, inline = _parse(lines)
    want = _one_by_one(frames, inline)
    want[9] = {"ok": False, "error": "input line 10: not a hex string (0-9, A-F, spaces) nor "
               "a JSON object"}  # fmt: skip
    want[12] = {"ok": False, "error": "input line 13: JSON object has no `hex` string "
                "(nor SenML `payload`/`json`)"}  # fmt: skip
    assert [json.loads(x) for x in printed] == json.loads(json.dumps(want, default=str))
    assert code == 1
    assert np.array_equal([json.loads(x)["ok"] for x in printed], [bool(r["ok"]) for r in want])
