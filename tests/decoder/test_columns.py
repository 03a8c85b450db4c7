"""Columnar extra fields (`Decoded.fields`, `sparse`, lazy `extra_of`), merging across
formats, the `decode_batch` hot path, and the meter clock's UTC offset."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import numpy as np
import pytest

from decoder import decode_batch, mbus
from decoder import kernels as k
from decoder.columns import Column, Decoded, ErrorCode, concat, empty
from decoder.encode_cjt188 import encode_cjt188
from decoder.interval import encode_interval
from decoder.view import frame_records

RX = 1_700_000_000
KEY = bytes(range(16))
WHEN = datetime(2024, 3, 5, 6, 7, 8, tzinfo=UTC)
HOUR = 3600


def _cjt(i: int = 1, **kw: object) -> bytes:
    """A CJ/T 188 901F reply of meter `i` with a clock."""
    args = {"address": f"{i:014d}", "total_ml": 1_234_560_000, "clock": WHEN, **kw}
    return encode_cjt188(**args)  # type: ignore[arg-type]


def test_column_renders() -> None:
    """Each render turns the stored integer into its documented Python value."""
    col = Column(np.array([55667700, 4]), render="decimal", scale=np.array([2, 5], np.int8))
    assert [col.value(0), col.value(1)] == [Decimal("556677.00"), Decimal("0.00004")]
    assert str(col.value(0)) == "556677.00"
    assert Column(np.array([0x2C], np.uint8), render="hex2").value(0) == "2C"
    assert Column(np.array([0x901F], np.uint16), render="hex4").value(0) == "901F"
    assert Column(np.array([1]), render="label", labels=("open", "closed")).value(0) == "closed"
    plain = Column(np.array([7], np.uint8)).value(0)
    assert plain == 7
    assert type(plain) is int
    with pytest.raises(ValueError, match="unknown render"):
        Column(np.zeros(1), render="hex")


def test_extra_is_lazy_view_of_columns_and_sparse() -> None:
    """`extra[i]` merges present columns and the sparse dict; absent fields are left out."""
    d = empty(3)
    d.fields["a"] = Column(np.array([1, 2, 3]), present=np.array([True, False, True]))
    d.fields["b"] = Column(np.array(["x", "y", "z"]))
    d.sparse[2] = {"records": [1, 2]}
    assert len(d.extra) == 3
    assert d.extra[0] == {"a": 1, "b": "x"}
    assert d.extra[1] == {"b": "y"}
    assert d.extra[-1] == {"a": 3, "b": "z", "records": [1, 2]}
    assert d.extra_of(2, ["records", "b"]) == {"b": "z", "records": [1, 2]}
    assert list(d.extra) == [d.extra_of(i) for i in range(3)]
    with pytest.raises(IndexError):
        d.extra[3]


def test_concat_merges_fields_without_per_frame_work() -> None:
    """Parts' columns land at their input rows; differing decimal scales become per-row."""
    one, two = empty(2), empty(1)
    one.fields["total_m3"] = Column(np.array([100, 200]), render="decimal", scale=2)
    two.fields["total_m3"] = Column(np.array([3]), render="decimal", scale=3)
    two.fields["only_two"] = Column(np.array([True]))
    merged = concat([(np.array([0, 2]), one), (np.array([1]), two)], 3)
    assert [merged.extra_of(i)["total_m3"] for i in range(3)] == [
        Decimal("1.00"), Decimal("0.003"), Decimal("2.00"),
    ]  # fmt: skip
    assert str(merged.extra_of(1)["total_m3"]) == "0.003"
    assert [("only_two" in merged.extra_of(i)) for i in range(3)] == [False, True, False]


def test_concat_falls_back_to_objects_when_representations_differ() -> None:
    """An integer column and an object column of one name merge as Python objects."""
    one, two = empty(2), empty(2)
    present = np.array([True, False])
    one.fields["total_m3"] = Column(np.array([100, 0]), present, render="decimal", scale=2)
    two.fields["total_m3"] = Column.of_objects([Decimal("6.408"), None])
    merged = concat([(np.array([0, 1]), one), (np.array([2, 3]), two)], 4)
    assert merged.fields["total_m3"].values.dtype == object
    got = [merged.extra_of(i).get("total_m3", "absent") for i in range(4)]
    assert got == [Decimal("1.00"), "absent", Decimal("6.408"), "absent"]


def test_mixed_batch_extra_matches_single_frame_decodes() -> None:
    """CJ/T 188, nbm1 and M-Bus frames in one batch have the extras they have alone."""
    frames = [
        _cjt(1),
        encode_interval("00000000000002", RX - RX % HOUR - 2 * HOUR, 5_000_000, [1000, 2000]),
        mbus.encode_oms_plain("12345678", "KAM", 0x1B, 0x16, 7, 123_456_789, WHEN),
        b"",
        _cjt(3, unit=0x29, total_ml=17_000),
        b"\x01\x02",
        mbus.encode_wired("87654321", "KAM", 1, 7, 1, 0, None, target_ml=500, address=5)[:-3]
        + b"\x00\x00\x16",  # a bad wired frame: no fields at all
    ]
    # the litre-unit frame with the model that reads litres as the standard's XXXXXX.XX
    hints = [None, None, None, None, "cjt188:standard-litres", None, None]
    batch = decode_batch(frames, RX, hints=hints)
    for i, frame in enumerate(frames):
        alone = decode_batch([frame], RX, hints=hints[i : i + 1])
        assert batch.extra_of(i) == alone.extra_of(0), i
        assert int(batch.error_code[i]) == int(alone.error_code[0])
    assert batch.error_code.tolist()[3:6] == [ErrorCode.EMPTY, 0, ErrorCode.UNKNOWN_FORMAT]
    assert batch.error_code[6] != 0
    assert str(batch.extra_of(4)["total_m3"]) == "0.01700"  # litre unit: 5 decimals


def test_cjt188_fields_are_arrays_not_objects() -> None:
    """A CJ/T 188 batch keeps ids as a numpy str array and every extra field as numbers."""
    d = decode_batch([_cjt(i) for i in range(50)], RX)
    assert d.address_of_frame.dtype.kind == "U"
    assert d.address.tolist()[:2] == ["00000000000000", "00000000000001"]
    assert d.address[1] == "00000000000001"
    assert {name: c.values.dtype.kind for name, c in d.fields.items()}.keys() >= {
        "total_m3", "valve", "status_hex", "di", "medium", "clock",
    }  # fmt: skip
    assert all(c.values.dtype.kind in "uib" for c in d.fields.values())
    assert d.extra_of(0)["medium"] == "water"
    assert d.extra_of(0)["total_m3"] == Decimal("1234.56")


def test_group_by_length_gathers_each_length_from_one_join() -> None:
    """Mixed lengths are split into per-length arrays whose rows are the input frames."""
    frames = [b"abc", b"de", b"fgh", b"", b"ij", bytearray(b"klm")]
    groups = {int(a.shape[1]): (idx.tolist(), a) for idx, a in k.group_by_length(frames)}
    assert sorted(groups) == [0, 2, 3]
    idx, a = groups[3]
    assert idx == [0, 2, 5]
    assert [bytes(r) for r in a] == [b"abc", b"fgh", b"klm"]
    assert k.stack([bytearray(b"ab"), bytearray(b"cd")], 2).tolist() == [[97, 98], [99, 100]]


def test_bytearray_frames_decode_like_bytes() -> None:
    """Bytes-like frames that numpy cannot pack as `S<n>` still decode (join fallback)."""
    frames = [_cjt(1), _cjt(2)]
    a = decode_batch([bytearray(f) for f in frames], RX)
    b = decode_batch(frames, RX)
    assert a.register_ml.tolist() == b.register_ml.tolist()
    assert a.address.tolist() == b.address.tolist()


def test_cjt188_clock_default_is_beijing_time() -> None:
    """Without an offset a CJ/T 188 clock is read as UTC+8 (the meters' local time)."""
    d = decode_batch([_cjt(1)], RX)
    assert d.read_at_s.tolist() == [int(WHEN.timestamp())]  # encoder writes Beijing time


def test_meter_utc_offset_per_call_and_per_frame() -> None:
    """`meter_utc_offset_s` replaces the default, as one int or one value per frame."""
    frames = [_cjt(1), _cjt(2), _cjt(3)]
    local = int(WHEN.timestamp()) + 8 * HOUR  # what the meter clock shows, as if UTC
    d = decode_batch(frames, RX, meter_utc_offset_s=0)
    assert d.read_at_s.tolist() == [local] * 3
    d = decode_batch(frames, RX, meter_utc_offset_s=np.array([0, 3600, -18000]))
    assert d.read_at_s.tolist() == [local, local - 3600, local + 18000]
    hinted = decode_batch(frames, RX, hints=["cjt188"] * 3, meter_utc_offset_s=[0, 3600, 0])
    assert hinted.read_at_s.tolist() == [local, local - 3600, local]
    with pytest.raises(ValueError, match="UTC offsets"):
        decode_batch(frames, RX, meter_utc_offset_s=[0, 1])


def test_meter_utc_offset_leaves_missing_clocks_at_receive_time() -> None:
    """A frame without a usable clock keeps the receive time whatever the offset."""
    d = decode_batch([_cjt(1, clock=None)], RX, meter_utc_offset_s=7200)
    assert d.read_at_s.tolist() == [RX]


def test_mbus_clock_offset() -> None:
    """M-Bus clocks default to UTC; an offset shifts the clock and billing-date readings."""
    frame = mbus.encode_oms_plain(
        "12345678", "KAM", 0x1B, 0x16, 7, 1000, WHEN,
        target_ml=500, target_date=datetime(2023, 12, 31).date(),
    )  # fmt: skip
    utc = decode_batch([frame], RX)
    shifted = decode_batch([frame], RX, meter_utc_offset_s=3600)
    assert utc.read_at_s.tolist()[0] == int(WHEN.timestamp())
    assert (utc.read_at_s - shifted.read_at_s).tolist() == [3600, 3600]
    assert shifted.extra_of(0)["meter_datetime"] == utc.extra_of(0)["meter_datetime"]


def test_mbus_wildcard_key_decrypts_any_meter() -> None:
    """`keys["*"]` decrypts a mode 5 frame of a meter with no key of its own."""
    frame = mbus.encode_oms_mode5("12345678", "KAM", 0x1B, 0x16, 7, 123_456_789, KEY, WHEN)
    assert decode_batch([frame], RX).error_code[0] == ErrorCode.NO_KEY
    d = decode_batch([frame], RX, keys={"*": KEY})
    assert d.error_code[0] == ErrorCode.OK
    assert d.register_ml.tolist() == [123_456_789]
    wrong = bytes(16)
    assert decode_batch([frame], RX, keys={"*": wrong}).error_code[0] == ErrorCode.DECRYPT_FAILED
    own_first = decode_batch([frame], RX, keys={"12345678": KEY, "*": wrong})
    assert own_first.error_code[0] == ErrorCode.OK


def test_view_inline_key_decodes_encrypted_line() -> None:
    """`nbmeter decode`'s inline `key` (passed as `keys["*"]`) decrypts that line only."""
    enc = mbus.encode_oms_mode5("12345678", "KAM", 0x1B, 0x16, 7, 123_456_789, KEY, WHEN)
    recs = frame_records([enc, enc, _cjt(1)], RX, frame_keys={0: KEY})
    assert recs[0]["ok"] is True
    assert recs[0]["total_m3"] == "123.456789"
    assert recs[1]["error_code"] == ErrorCode.NO_KEY
    assert recs[2]["total_m3"] == "1234.56"
    assert recs[2]["address"] == "00000000000001"


def test_decoded_type_is_exported() -> None:
    """`decoder.Decoded` is the result type of `decode_batch`."""
    import decoder

    assert decoder.Decoded is Decoded
    assert isinstance(decode_batch([], RX), Decoded)
