"""decode_batch dispatch, the format registry, the JSON view, and a fuzz of random frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decoder import decode_batch, interval, registry
from decoder.columns import Decoded, ErrorCode
from decoder.encode_cjt188 import encode_cjt188
from decoder.encode_senml import encode_senml, water_pack
from decoder.view import frame_records, parse_input_line

RX = 1_700_000_000
CJT = encode_cjt188(address="78330011223344", total_ml=556_677_000_000, preamble=2)
SENML = encode_senml(water_pack("urn:m:1", [(RX - 3600, 1_000), (RX, 2_000)]))
NBM1 = interval.encode_interval("00000000000007", RX - RX % 3600, 0, [1000] * 23)


def _invariants(d: Decoded, n: int) -> None:
    assert d.n_frames == n
    for col in (d.format, d.address_of_frame, d.error_code, d.error_message):
        assert len(col) == n
    assert len(d.extra) == n
    m = d.n_readings
    for col in (d.frame_index, d.address, d.read_at_s, d.register_ml, d.flags):
        assert len(col) == m
    assert d.register_ml.dtype == np.int64
    assert d.read_at_s.dtype == np.int64
    assert d.frame_index.tolist() == sorted(d.frame_index.tolist())
    assert not np.isin(d.frame_index, np.flatnonzero(~d.ok)).any()  # no reading of a bad frame
    assert all(msg for msg, code in zip(d.error_message, d.error_code, strict=True) if code)


def test_mixed_batch_detects_each_format() -> None:
    """A batch mixing CJ/T 188, SenML, nbm1, empty and junk is classified per frame."""
    frames = [CJT, SENML, b"", NBM1, b"junk", CJT]
    d = decode_batch(frames, RX)
    _invariants(d, len(frames))
    assert d.format.tolist() == ["cjt188", "senml", "", "interval", "", "cjt188"]
    assert d.error_code.tolist() == [0, 0, ErrorCode.EMPTY, 0, ErrorCode.UNKNOWN_FORMAT, 0]
    assert np.bincount(d.frame_index, minlength=6).tolist() == [1, 2, 0, 24, 0, 1]


def test_hint_skips_detection() -> None:
    """A hint routes a frame no detector would claim (a Qalcosonic W1 payload)."""
    w1e = bytes.fromhex("0EA0355D302935000054C0345DE7290000" + "B800" * 15)
    assert decode_batch([w1e], RX).error_code[0] == ErrorCode.UNKNOWN_FORMAT
    d = decode_batch([w1e], RX, hints=["interval:w1e"])
    assert d.error_code[0] == ErrorCode.OK
    assert d.n_readings == 17


def test_unknown_hint() -> None:
    """A hint naming no registered format is UNKNOWN_FORMAT for that frame only."""
    d = decode_batch([CJT, CJT], RX, hints=["nosuch", None])
    assert d.error_code.tolist() == [ErrorCode.UNKNOWN_FORMAT, ErrorCode.OK]


def test_duplicate_key_refused() -> None:
    """Registering a format key twice raises instead of overwriting (asyncpg-style)."""
    fmt = registry.lookup("cjt188")
    assert fmt is not None
    with pytest.raises(registry.DuplicateFormatError):
        registry.register(fmt)


def test_failing_plugin_marks_only_its_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    """A format decoder that raises marks its frames INTERNAL; other frames still decode."""
    fmt = registry.lookup("senml")
    assert fmt is not None

    def boom(*_: object, **__: object) -> Decoded:
        raise RuntimeError("bug")

    monkeypatch.setitem(registry._FORMATS, "senml", registry.Format("senml", fmt.detect, boom))
    d = decode_batch([SENML, CJT], RX)
    assert d.error_code.tolist() == [ErrorCode.INTERNAL, ErrorCode.OK]


def test_wrong_length_receive_times() -> None:
    """Receive times of the wrong length make the batch unusable: ValueError."""
    with pytest.raises(ValueError, match="receive times"):
        decode_batch([CJT, CJT], np.array([RX]))


def test_mbus_plugged_in() -> None:
    """When decoder.mbus exists it is registered and reachable by detection."""
    if registry.lookup("mbus") is None:
        pytest.skip("decoder.mbus not present yet")
    wired = bytes.fromhex("6803036808FD7277")  # too short: still routed by hint, never raises
    d = decode_batch([wired], RX, hints=["mbus"])
    assert d.error_code[0] != ErrorCode.OK


def _mutations(frame: bytes) -> st.SearchStrategy[bytes]:
    def mutate(data: tuple[int, int, int]) -> bytes:
        pos, value, cut = data
        out = bytearray(frame)
        out[pos % len(out)] = value
        return bytes(out[: max(1, len(out) - cut)])

    return st.tuples(st.integers(0, 200), st.integers(0, 255), st.integers(0, 3)).map(mutate)


FRAME = st.one_of(
    st.binary(max_size=120),
    _mutations(CJT),
    _mutations(SENML),
    _mutations(NBM1),
    st.sampled_from([CJT, SENML, NBM1]),
)


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(FRAME, max_size=12), hint=st.sampled_from([None, "cjt188", "senml"]))
def test_fuzz_never_raises(frames: list[bytes], hint: str | None) -> None:
    """Random and mutated frames: no exception, invariants hold, bad frames have a code."""
    d = decode_batch(frames, RX, hints=[hint] * len(frames))
    _invariants(d, len(frames))
    for frame, code in zip(frames, d.error_code.tolist(), strict=True):
        if frame in (CJT, SENML, NBM1) and hint is None:
            assert code == 0
    assert json.dumps(frame_records(frames, RX), default=str)


def test_view_record_shape() -> None:
    """The JSON view keeps the meter's precision and puts units in field names."""
    rec, senml_rec, bad = frame_records([CJT, SENML, b"\x01\x02"], RX)
    assert rec["ok"] is True
    assert rec["total_m3"] == "556677.00"
    assert rec["address"] == "78330011223344"
    assert rec["flags"] == ["clock_missing"]
    assert len(senml_rec["readings"]) == 2
    assert senml_rec["total_m3"] == "0.002000"
    assert bad["ok"] is False
    assert bad["error_code"] == ErrorCode.UNKNOWN_FORMAT
    assert json.loads(json.dumps([rec, senml_rec, bad]))


@pytest.mark.parametrize(
    ("line", "want"),
    [
        ("68 10 44 33", (bytes.fromhex("68104433"), None)),
        ('{"hex": "FEFE68", "key": "00ff"}', (bytes.fromhex("FEFE68"), b"\x00\xff")),
        ('{"payload": "[{\\"n\\":\\"a\\"}]"}', (b'[{"n":"a"}]', None)),
    ],
)
def test_parse_input_line(line: str, want: tuple[bytes, bytes | None]) -> None:
    """Input lines: hex with spaces, or a vector-file JSON object with hex and key."""
    assert parse_input_line(line) == want


@pytest.mark.parametrize("line", ["zz", "[1]", '{"hex": 5}', '{"hex": "00", "key": "q"}'])
def test_parse_input_line_rejects(line: str) -> None:
    """A line that is neither hex nor a usable JSON object raises ValueError saying why."""
    with pytest.raises(ValueError, match=r"."):
        parse_input_line(line)
