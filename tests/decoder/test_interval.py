"""Interval batches: interval_batch.jsonl (Qalcosonic W1) expansions, our nbm1, rejects."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from decoder import decode_batch, interval
from decoder.columns import ErrorCode, Flag

VECTORS = Path(__file__).parents[2] / ".." / "shared" / "vectors"
LAYOUT_OF = {"w1_lorawan": "w1h"}  # the TTN example is the same 51-byte "enhanced 24h"


def _lines() -> list[dict]:
    path = VECTORS / "interval_batch.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _vectors() -> list[object]:
    if not VECTORS.is_dir():
        reason = f"{VECTORS} absent: shared vector tests skipped (golden examples still run)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    return [pytest.param(v, id=f"interval_batch.jsonl:{n}") for n, v in enumerate(_lines())]


def _hint(v: dict) -> str:
    name = v["format"].removeprefix("axioma_qalcosonic_")
    return f"interval:{LAYOUT_OF.get(name, name)}"


def _decode(v: dict, hint: str | None = None) -> tuple[int, dict, list[tuple[int, int, int]]]:
    d = decode_batch([bytes.fromhex(v["hex"])], 0, hints=[hint or _hint(v)])
    rows = list(zip(d.read_at_s.tolist(), d.register_ml.tolist(), d.flags.tolist(), strict=True))
    return int(d.error_code[0]), d.extra[0], rows


def _epoch(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


@pytest.mark.parametrize("v", _vectors())
def test_vector(v: dict) -> None:
    """Each W1 payload expands to its base + hourly series with the source's values."""
    exp = v["expected"]
    code, extra, rows = _decode(v)
    series = [r for r in rows if r[2] & Flag.INTERVAL or r is rows[0]]
    if "alarm_status_code" in exp:
        assert code == ErrorCode.NO_REGISTER
        assert extra["alarm_status"] == exp["alarm_status_code"]
        return
    assert code == ErrorCode.OK
    assert all(rows[i][2] & Flag.INTERVAL for i in range(1, len(series)))
    assert not rows[0][2] & Flag.INTERVAL
    if "log_volume_m3" in exp:  # TTN example: base + 23 deltas, 14-bit packed
        assert series[0][1] == int(Decimal(str(exp["log_volume_m3"])) * 1_000_000)
        deltas = np.diff([r[1] for r in series]).tolist()
        assert deltas == [int(Decimal(str(x)) * 1_000_000) for x in exp["deltas_m3"]]
        assert extra["total_m3"] == Decimal(str(exp["current_volume_m3"]))
        assert extra["status"] == exp["status"]
        assert rows[-1][2] & ~Flag.INTERVAL == 0  # status 0: no alarm flag
    if "current_volume_raw_l" in exp:
        assert rows[-1][1] == exp["current_volume_raw_l"] * 1000
    if "temperature_c" in exp:
        assert extra["temperature_c"] == Decimal(str(exp["temperature_c"]))
    if "n_volumes" in exp or "n_volumes_in_test" in exp:
        assert len(series) == exp.get("n_volumes", exp.get("n_volumes_in_test"))
    for key, value in exp.items():
        if key.startswith("objects["):  # diwise: objects[i].CumulatedWaterVolume_m3
            i = int(key[8 : key.index("]")])
            assert series[i][1] == int(Decimal(str(value)) * 1_000_000)
    if "status_code" in exp:
        assert extra["status"] == exp["status_code"]
    if "temperature_present" in exp:
        assert ("temperature_c" in extra) == exp["temperature_present"]
    if "monotonic" in exp:
        assert [r[1] for r in rows] == sorted(r[1] for r in rows)


def test_monotonic_across_uplinks() -> None:
    """Within each sensor window, all W1t captures' points sorted by time never decrease."""
    lines = [v for v in _lines() if "monotonic" in v["expected"]]
    if not lines:
        pytest.skip(f"{VECTORS} absent: shared vector tests skipped")
    windows = lines[0]["expected"]["monotonic"].split(": ")[1].split(", ")
    points = sorted({(t, ml) for v in lines for t, ml, _ in _decode(v)[2]})
    for n, window in enumerate(windows):  # half-open: a window's end starts the next one
        start, end = (_epoch(x) for x in window.split(".."))
        last = n == len(windows) - 1
        inside = [ml for t, ml in points if start <= t < end or (last and t == end)]
        assert inside
        assert inside == sorted(inside)


def test_qalcosonic_length_auto_pick() -> None:
    """Hint `interval` without a layout picks w1t/w1e by the hour-aligned log time."""
    for v in _lines()[:4]:
        code, extra, _ = _decode(v, "interval")
        assert code == ErrorCode.OK
        assert extra["layout"] == _hint(v).split(":")[1]
    if not _lines():
        pytest.skip(f"{VECTORS} absent: shared vector tests skipped")


GOOD = interval.encode_interval("00000000000042", 1_700_002_800, 5_000, [1_000] * 24, 4)


def _flip(frame: bytes, pos: int, value: int) -> bytes:
    body = bytearray(frame[:-2])
    body[pos] = value
    return bytes(body) + interval.k.crc16_ccitt_bytes(bytes(body)).to_bytes(2, "big")


REJECTS = [
    ("crc", GOOD[:-1] + bytes([GOOD[-1] ^ 1]), "interval", ErrorCode.BAD_CHECKSUM),
    ("version", _flip(GOOD, 2, 3), "interval", ErrorCode.UNSUPPORTED),
    ("v2-odd-length", _flip(GOOD, 2, 2), "interval", ErrorCode.BAD_LENGTH),
    ("k-mismatch", _flip(GOOD, 3, 5), "interval", ErrorCode.BAD_LENGTH),
    ("not-hour", _flip(GOOD, 11, 1), "interval", ErrorCode.BAD_TIME),
    ("no-magic", _flip(GOOD, 0, 0x4F), "interval:nbm1", ErrorCode.BAD_START_STOP),
    ("w1h-version", bytes([2]) + bytes(50), "interval:w1h", ErrorCode.UNSUPPORTED),
    ("no-layout", bytes(33), "interval", ErrorCode.UNSUPPORTED),
    ("alarm", bytes.fromhex("43B1315D88"), "interval", ErrorCode.NO_REGISTER),
]


@pytest.mark.parametrize(
    ("frame", "hint", "code"), [r[1:] for r in REJECTS], ids=[r[0] for r in REJECTS]
)
def test_reject_code(frame: bytes, hint: str, code: ErrorCode) -> None:
    """Each interval reject path yields its own code and no reading."""
    d = decode_batch([frame], 0, hints=[hint])
    assert d.error_code[0] == code
    assert d.error_message[0]
    assert d.n_readings == 0


@given(
    address=st.text("0123456789", min_size=14, max_size=14),
    hour=st.integers(400_000, 500_000),
    base_l=st.integers(0, 2**32 - 1 - 24 * 65535),
    deltas_l=st.lists(st.integers(0, 65535), min_size=1, max_size=24),
    status=st.sampled_from([0, int(Flag.LEAK), int(Flag.LOW_BATTERY | Flag.REVERSE_FLOW)]),
)
def test_round_trip(address: str, hour: int, base_l: int, deltas_l: list[int], status: int) -> None:
    """encode_interval -> decode_batch (auto-detected) gives K+1 exact hourly readings."""
    frame = interval.encode_interval(
        address, hour * 3600, base_l * 1000, [d * 1000 for d in deltas_l], status
    )
    d = decode_batch([frame], 0)
    assert d.format[0] == "interval"
    assert d.error_code[0] == ErrorCode.OK
    assert d.read_at_s.tolist() == [(hour + i) * 3600 for i in range(len(deltas_l) + 1)]
    assert d.register_ml.tolist() == (np.cumsum([base_l, *deltas_l]) * 1000).tolist()
    assert d.address.tolist() == [address] * (len(deltas_l) + 1)
    assert d.flags[0] == 0
    assert d.flags[-1] == Flag.INTERVAL | status


def test_batch_of_mixed_k() -> None:
    """Frames with 23 and 24 deltas in one batch expand per frame, in input order."""
    frames = [
        interval.encode_interval(f"{i:014d}", 3600 * (10 + i), 0, [1000] * (23 + i % 2))
        for i in range(6)
    ]
    d = decode_batch(frames, 0)
    assert np.bincount(d.frame_index).tolist() == [24, 25, 24, 25, 24, 25]
    assert d.frame_index.tolist() == sorted(d.frame_index.tolist())
