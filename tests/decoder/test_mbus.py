"""M-Bus / OMS decoder: golden examples, one test per reject code, round trips and fuzzing.

These run without ../shared: frames come from our encoder and from EN 13757-3 / OMS
worked examples quoted in FORMATS.md §2.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decoder import mbus, mbus_compact
from decoder.columns import Decoded, ErrorCode, Flag, FrameFlag
from decoder.mbus_encode import id_field, manufacturer_field
from decoder.mbus_link import crc16_en13757

KEY = bytes(range(16))
T0 = 1_700_000_000
WHEN = datetime(2024, 3, 5, 6, 7, 8, tzinfo=UTC)


def _decode(
    *frames: bytes, keys: dict[str, bytes] | None = None, cache: mbus.SignatureCache | None = None
) -> Decoded:
    """Decode `frames` received at T0."""
    return mbus.decode(list(frames), np.full(len(frames), T0, np.int64), keys, cache)


def _wm(records: bytes, ci: int = 0x78, man: str = "ABC", mid: str = "12345678") -> bytes:
    """A CRC-stripped wM-Bus frame with link header and `ci` + `records` (no TPL for 78)."""
    body = b"\x44" + manufacturer_field(man) + id_field(mid) + b"\x01\x07" + bytes([ci]) + records
    return bytes([len(body)]) + body


def _code(
    frame: bytes, keys: dict[str, bytes] | None = None, cache: mbus.SignatureCache | None = None
) -> ErrorCode:
    """The error code of a single decoded frame."""
    return ErrorCode(int(_decode(frame, keys=keys, cache=cache).error_code[0]))


# --- golden examples -------------------------------------------------------------------


def test_mode5_frame_decodes_register_clock_and_billing() -> None:
    """A mode 5 frame yields the register at the meter clock and the billing-date register."""
    billing = {"target_ml": 100_000_000, "target_date": date(2023, 12, 31)}
    frame = mbus.encode_oms_mode5(
        "12345678", "KAM", 0x1B, 0x16, 7, 123_456_789, KEY, WHEN, **billing
    )
    res = _decode(frame, keys={"12345678": KEY})
    assert res.error_code.tolist() == [0]
    assert res.register_ml.tolist() == [123_456_789, 100_000_000]
    assert res.read_at_s.tolist() == [int(WHEN.timestamp()), 1_703_980_800]
    assert res.flags.tolist() == [0, Flag.BILLING_DATE]
    assert res.extra[0]["total_m3"] == Decimal("123.456789")
    assert res.extra[0]["target_m3"] == 100
    assert res.extra[0]["target_date"] == "2023-12-31"
    assert res.extra[0]["meter_datetime"] == "2024-03-05 06:07:08"
    assert res.address.tolist() == ["12345678"] * 2
    assert res.format[0] == "wmbus"


def test_frame_without_clock_uses_receive_time() -> None:
    """With no date record the reading is stamped with the receive time and CLOCK_MISSING."""
    res = _decode(mbus.encode_oms_plain("00000042", "DME", 1, 7, 1, 5000))
    assert res.read_at_s.tolist() == [T0]
    assert res.flags.tolist() == [Flag.CLOCK_MISSING]


def test_status_byte_maps_to_flags() -> None:
    """OMS STS power-low and error bits become LOW_BATTERY and METER_ERROR."""
    frame = mbus.encode_oms_plain("00000042", "DME", 1, 7, 1, 5000, WHEN, status=0x04 | 0x08)
    assert _decode(frame).flags.tolist() == [Flag.LOW_BATTERY | Flag.METER_ERROR]


def test_wired_long_frame_uses_secondary_address() -> None:
    """A wired RSP_UD frame decodes with the CI 72 secondary-address id."""
    frame = mbus.encode_wired("87654321", "ACW", 0x14, 0x07, 3, 54_321_000, WHEN, address=5)
    res = _decode(frame)
    assert res.address_of_frame.tolist() == ["87654321"]
    assert res.format[0] == "mbus_wired"
    assert res.register_ml.tolist() == [54_321_000]
    assert mbus.looks_like(frame)
    assert mbus.looks_like(mbus.encode_oms_plain("00000001", "ABC", 1, 7, 1, 0))
    assert not mbus.looks_like(b"\x68\x01\x02\x68\x16")
    assert not mbus.looks_like(b"hello")


def test_spec_date_examples() -> None:
    """FORMATS §2.3 [checked]: 046D1E02DE21 = 2022-01-30 02:30 and 426CBF2C = 2021-12-31."""
    res = _decode(_wm(bytes.fromhex("0C1378563412046D1E02DE214C1300000000426CBF2C")))
    assert res.extra[0]["meter_datetime"] == "2022-01-30 02:30"
    assert res.extra[0]["target_date"] == "2021-12-31"
    assert res.register_ml.tolist() == [12_345_678_000, 0]


def test_kamstrup_compact_frame_through_learned_signature() -> None:
    """FORMATS §2.4 [checked]: header 02FF20 0413 4413 615B 6167 hashes to A8ED; the compact
    frame EDA8 6AB6 … decodes once a full frame of the model taught the cache."""
    header = bytes.fromhex("02FF2004134413615B6167")
    assert crc16_en13757(header) == 0xA8ED
    # a manufacturer with no known formats (Kamstrup's decode at once: test_drivers.py)
    full = _wm(bytes.fromhex("02FF207100" "041308190000" "441308190000" "615B7F" "616713"),
               man="ZZZ")  # fmt: skip
    compact = _wm(bytes.fromhex("EDA86AB6710008190000081900007F13"), ci=0x79, man="ZZZ")
    cache = mbus.SignatureCache()
    assert _code(compact, cache=cache) == ErrorCode.UNKNOWN_COMPACT
    res = _decode(compact, full, cache=cache)
    assert res.error_code.tolist() == [0, 0]
    assert res.extra[0]["total_m3"] == Decimal("6.408") == res.extra[1]["total_m3"]
    restored = mbus.SignatureCache.from_dict(cache.to_dict())
    assert _code(compact, cache=restored) == ErrorCode.OK
    assert len(restored) == 1


# a header whose signature collides with `04 13 06 6D` (register in litres, type I clock):
# the register's VIF says 10 L, and the free DIFE bits of a trailing no-data manufacturer
# record (80 80 80 31 7F) were searched until CRC-16/EN 13757 of the whole equals the true
# header's. Read through it, a compact frame's register would come out 10 times too large.
TRUE_HEADER = bytes.fromhex("0413066D")
COLLIDING_HEADER = bytes.fromhex("0414066D808080317F")


def test_colliding_learned_format_is_refused_by_the_data_crc() -> None:
    """A learned format with the frame's signature but other headers (a CRC-16 collision,
    or a poisoned cache) never reads the frame: its data CRC, over the full records
    rebuilt with the learned headers, does not match, so it is BAD_CHECKSUM."""
    assert crc16_en13757(COLLIDING_HEADER) == crc16_en13757(TRUE_HEADER)
    compact = mbus.encode_oms_plain("22222222", "ZZZ", 1, 7, 1, 5_000_000, WHEN, compact=True)
    sig = crc16_en13757(TRUE_HEADER)
    poisoned = mbus.SignatureCache({("ZZZ", 1, 7, sig): COLLIDING_HEADER})
    res = _decode(compact, cache=poisoned)
    assert res.error_code.tolist() == [ErrorCode.BAD_CHECKSUM]
    assert res.n_readings == 0
    right = mbus.SignatureCache({("ZZZ", 1, 7, sig): TRUE_HEADER})
    assert _decode(compact, cache=right).register_ml.tolist() == [5_000_000]


def test_deferred_cache_keeps_what_a_call_learns_apart() -> None:
    """A DeferredCache answers lookups from the cache it views only: a full frame teaches
    its format (kept in `learned`, with the meter that sent it) but no compact frame of
    the same call is read with it; a later call through a cache holding it reads them."""
    full = mbus.encode_oms_plain("11111111", "ZZZ", 1, 7, 1, 5_000_000, WHEN)
    compact = mbus.encode_oms_plain("22222222", "ZZZ", 1, 7, 1, 6_000_000, WHEN, compact=True)
    view = mbus_compact.DeferredCache()
    res = _decode(full, compact, cache=view)
    assert res.error_code.tolist() == [ErrorCode.OK, ErrorCode.UNKNOWN_COMPACT]
    key = ("ZZZ", 1, 7, crc16_en13757(TRUE_HEADER))
    assert res.error_message[1] == mbus_compact.not_learned(key[:3], key[3])
    assert view.learned == {key: TRUE_HEADER}
    assert view.teachers == {key: {"11111111"}}
    assert len(view.known) == 0
    later = mbus_compact.DeferredCache(mbus.SignatureCache(view.learned))
    assert _decode(compact, cache=later).register_ml.tolist() == [6_000_000]


def test_fixed_data_structure() -> None:
    """A wired CI 73 fixed frame (libmbus manual_frame2): 1 l current, 135 l historic."""
    res = _decode(bytes.fromhex("68131368080573785634120A00E97E01000000350100003C16"))
    assert res.register_ml.tolist() == [1000, 135_000]
    assert res.flags[1] & Flag.BILLING_DATE


# --- one test per reject code ------------------------------------------------------------


def test_reject_empty() -> None:
    """An empty frame is EMPTY."""
    assert _code(b"") == ErrorCode.EMPTY


def test_reject_truncated() -> None:
    """A wireless frame shorter than its link header is TRUNCATED."""
    assert _code(bytes([4, 0x44, 1, 2, 3])) == ErrorCode.TRUNCATED


def test_reject_bad_start_stop() -> None:
    """A wired frame without the closing 16 is BAD_START_STOP."""
    frame = bytearray(mbus.encode_wired("87654321", "ACW", 1, 7, 3, 1000))
    frame[-1] = 0x17
    assert _code(bytes(frame)) == ErrorCode.BAD_START_STOP


def test_reject_bad_checksum() -> None:
    """A wired frame with a flipped data byte is BAD_CHECKSUM."""
    frame = bytearray(mbus.encode_wired("87654321", "ACW", 1, 7, 3, 1000))
    frame[-4] ^= 0x01
    assert _code(bytes(frame)) == ErrorCode.BAD_CHECKSUM


def test_reject_bad_length() -> None:
    """A wireless frame whose L is far off its size is BAD_LENGTH; one cut into its
    register is refused (the register's record is TRUNCATED)."""
    frame = mbus.encode_oms_plain("00000001", "ABC", 1, 7, 1, 1000)
    assert _code(frame + bytes(20)) == ErrorCode.BAD_LENGTH
    assert _code(frame[:-1]) == ErrorCode.TRUNCATED


def test_reject_bad_bcd() -> None:
    """A BCD volume register with a hex digit is BAD_BCD."""
    assert _code(_wm(bytes.fromhex("0C13AA000000"))) == ErrorCode.BAD_BCD


def test_reject_unsupported_vendor_ci() -> None:
    """A manufacturer-specific CI (A0-B7) is UNSUPPORTED, naming the vendor codec."""
    res = _decode(_wm(bytes(12), ci=0xA2, man="ABC"))  # no driver file for ABC
    assert res.error_code[0] == ErrorCode.UNSUPPORTED
    assert "ABC" in res.error_message[0]


def test_reject_unsupported_mode7() -> None:
    """Security mode 7 with a key configured is UNSUPPORTED and says mode 7."""
    frame = _wm(bytes.fromhex("01000007") + b"\x10" + bytes(16), ci=0x7A)
    res = _decode(frame, keys={"12345678": KEY})
    assert res.error_code[0] == ErrorCode.UNSUPPORTED
    assert "mode 7" in res.error_message[0]


def test_reject_no_key() -> None:
    """A mode 5 frame with no key for its meter is NO_KEY, naming the meter."""
    res = _decode(mbus.encode_oms_mode5("12345678", "KAM", 1, 7, 1, 1000, KEY))
    assert res.error_code[0] == ErrorCode.NO_KEY
    assert "12345678" in res.error_message[0]


def test_reject_wrong_key() -> None:
    """A mode 5 frame decrypted with the wrong key is DECRYPT_FAILED."""
    frame = mbus.encode_oms_mode5("12345678", "KAM", 1, 7, 1, 1000, KEY)
    res = _decode(frame, keys={"12345678": bytes(16)})
    assert res.error_code[0] == ErrorCode.DECRYPT_FAILED
    assert "wrong AES key for meter 12345678" in res.error_message[0]


def test_reject_bad_record() -> None:
    """A frame whose first record's VIFE chain runs off the end is BAD_RECORD."""
    assert _code(_wm(bytes.fromhex("0493"))) == ErrorCode.BAD_RECORD


def test_reject_bad_unit() -> None:
    """A volume scaled finer than 1 mL (VIFE 10^-6 correction) is BAD_UNIT."""
    assert _code(_wm(bytes.fromhex("049370E8030000"))) == ErrorCode.BAD_UNIT


def test_reject_no_register() -> None:
    """A frame with records but no volume is NO_REGISTER (its extras are still decoded)."""
    res = _decode(_wm(bytes.fromhex("046D1E02DE21")))
    assert res.error_code[0] == ErrorCode.NO_REGISTER
    assert res.extra[0]["meter_datetime"] == "2022-01-30 02:30"


def test_reject_unknown_compact() -> None:
    """A compact frame with a never-learned signature is UNKNOWN_COMPACT."""
    assert _code(_wm(bytes.fromhex("3412000001000000"), ci=0x79)) == ErrorCode.UNKNOWN_COMPACT


def test_bad_frame_does_not_sink_batch() -> None:
    """One corrupt frame in a batch is rejected alone; its neighbours decode."""
    good = mbus.encode_oms_plain("00000001", "ABC", 1, 7, 1, 1000, WHEN)
    res = _decode(good, b"\x68garbage", good)
    assert res.error_code.tolist()[0::2] == [0, 0]
    assert res.error_code[1] != 0
    assert res.frame_index.tolist() == [0, 2]


# --- round trips and fuzz ------------------------------------------------------------------

ids = st.integers(0, 99_999_999).map(lambda n: f"{n:08d}")
mans = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=3, max_size=3)
whens = st.datetimes(datetime(2000, 1, 1), datetime(2080, 12, 31), timezones=st.just(UTC))


@settings(max_examples=60, deadline=None)
@given(ids, mans, st.integers(0, 255), st.sampled_from([3, 6, 7, 0x16]), st.integers(0, 255),
       st.integers(-(2**40), 2**40), st.binary(min_size=16, max_size=16), whens)  # fmt: skip
def test_mode5_round_trip(mid, man, ver, dev, acc, total, key, when) -> None:
    """encode_oms_mode5 -> decode returns the id, register and clock that went in."""
    res = _decode(mbus.encode_oms_mode5(mid, man, ver, dev, acc, total, key, when), keys={mid: key})
    assert res.error_code.tolist() == [0], res.error_message[0]
    assert res.address.tolist() == [mid]
    assert res.register_ml.tolist() == [total]
    assert res.read_at_s.tolist() == [int(when.replace(microsecond=0).timestamp())]


@settings(max_examples=60, deadline=None)
@given(
    ids,
    st.integers(0, 2**31 - 1),
    st.integers(0, 2**31 - 1),
    st.dates(date(2000, 1, 1), date(2080, 12, 31)),
)
def test_plain_and_wired_round_trip(mid, total_l, target_l, day) -> None:
    """Plain wireless and wired frames round-trip register and billing-date register."""
    kw = {"target_ml": target_l * 1000, "target_date": day}
    for frame in (mbus.encode_oms_plain(mid, "ABC", 1, 7, 2, total_l * 1000, **kw),
                  mbus.encode_wired(mid, "ABC", 1, 7, 2, total_l * 1000, **kw)):  # fmt: skip
        res = _decode(frame)
        assert res.register_ml.tolist() == [total_l * 1000, target_l * 1000]
        midnight = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
        assert res.read_at_s.tolist() == [T0, int(midnight)]


@settings(max_examples=60, deadline=None)
@given(ids, ids, st.integers(0, 255), st.integers(-(2**40), 2**40), whens,
       st.integers(0, 2**31 - 1), st.dates(date(2000, 1, 1), date(2080, 12, 31)))  # fmt: skip
def test_compact_round_trip(mid, other, ver, total, when, target_l, day) -> None:
    """encode_oms_plain(compact=True) -> decode, through the format a full frame of another meter of
    the model (same records) taught, returns what the full frame of the same values returns."""
    kw = {"target_ml": target_l * 1000, "target_date": day}
    cache = mbus.SignatureCache()
    _decode(mbus.encode_oms_plain(other, "ZZZ", ver, 7, 1, total, when, **kw), cache=cache)
    compact = _decode(
        mbus.encode_oms_plain(mid, "ZZZ", ver, 7, 2, total, when, compact=True, **kw), cache=cache
    )
    full = _decode(mbus.encode_oms_plain(mid, "ZZZ", ver, 7, 2, total, when, **kw))
    assert compact.error_code.tolist() == [0], compact.error_message[0]
    assert compact.register_ml.tolist() == full.register_ml.tolist()
    assert compact.read_at_s.tolist() == full.read_at_s.tolist()
    assert compact.flags.tolist() == full.flags.tolist()
    assert compact.address.tolist() == [mid] * len(full.address)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=8))
def test_fuzz_random_frames(frames: list[bytes]) -> None:
    """Random bytes never raise; every frame is either rejected or yields readings."""
    res = _decode(*frames)
    for i in range(len(frames)):
        assert (res.error_code[i] != 0) or (i in res.frame_index)
        assert (res.error_code[i] == 0) or (i not in res.frame_index)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 255))
def test_fuzz_mutated_wired_frames(pos: int, xor: int) -> None:
    """Any single-byte corruption of a wired frame gets a nonzero error code."""
    frame = bytearray(mbus.encode_wired("12345678", "ACW", 1, 7, 1, 1000, WHEN))
    frame[pos % len(frame)] ^= xor
    assert _code(bytes(frame)) != ErrorCode.OK


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.binary(min_size=1, max_size=4))
def test_fuzz_truncated_and_padded_wireless(cut: int, tail: bytes) -> None:
    """A wireless frame cut short or padded (L no longer matching) is rejected or read
    with its true register and the LENGTH_MISMATCH frame flag, never another value."""
    frame = mbus.encode_oms_mode5("12345678", "KAM", 1, 7, 1, 1000, KEY, WHEN)
    keys = {"12345678": KEY}
    for mutated in (frame[: len(frame) - cut], frame + tail):
        res = _decode(mutated, keys=keys)
        if res.error_code[0] == ErrorCode.OK:
            assert res.register_ml.tolist() == [1000]
            assert res.frame_flags_or_zero[0] & FrameFlag.LENGTH_MISMATCH


def test_decode_rejects_mismatched_inputs() -> None:
    """Frames and receive times of different lengths are an unusable batch (ValueError)."""
    with pytest.raises(ValueError, match="receive times"):
        mbus.decode([b""], np.zeros(2, np.int64))
