"""CJ/T 188: golden examples, cjt188.jsonl + constructed.jsonl vectors, rejects, round trip."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from decoder import cjt188, decode_batch
from decoder import kernels as k
from decoder.columns import ErrorCode, Flag, FrameFlag
from decoder.encode_cjt188 import GAS, WATER, encode_cjt188

VECTORS = Path(__file__).parents[2] / ".." / "shared" / "vectors"
RX = 1_700_000_000
CST = timedelta(hours=8)  # CJ/T 188 meters keep China Standard Time


def _vectors(*names: str) -> list[object]:
    if not VECTORS.is_dir():
        reason = f"{VECTORS} absent: shared vector tests skipped (golden examples still run)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    out = []
    for name in names:
        for n, line in enumerate((VECTORS / name).read_text().splitlines()):
            out.append(pytest.param(json.loads(line), id=f"{name}:{n}"))
    return out


def _one(
    frame: bytes, hint: str | None = None
) -> tuple[int, dict, list[tuple[int, int, int]], str]:
    d = decode_batch([frame], RX, hints=[hint])
    rows = [
        (int(d.register_ml[j]), int(d.read_at_s[j]), int(d.flags[j])) for j in range(d.n_readings)
    ]
    return int(d.error_code[0]), d.extra[0], rows, str(d.address_of_frame[0])


def _local_epoch(text: str) -> int:
    return int((datetime.fromisoformat(text[:19]).replace(tzinfo=UTC) - CST).timestamp())


@pytest.mark.parametrize(("hex_", "want"), cjt188.EXAMPLES)
def test_golden_examples(hex_: str, want: dict) -> None:
    """The module's golden frames (FORMATS §1.2 example with the correct CS 13) decode."""
    code, extra, rows, meter = _one(bytes.fromhex(hex_))
    assert code == want["error_code"]
    assert meter == want["address"]
    if "total_ml" in want:
        assert rows[0][0] == want["total_ml"]
        assert rows[0][1] == want["read_at_s"]
        assert rows[0][2] == want["flags"]
    for key in ("total_m3", "settlement_m3", "status_hex", "valve"):
        if key in want:
            assert str(extra[key]) == want[key]


def _wire(meter: str) -> str:
    return "".join(reversed([meter[i : i + 2] for i in range(0, 14, 2)]))


def _model_for(v: dict) -> str | None:
    """Vendor variants are configuration: the vector's source names the meter model."""
    text = json.dumps(v)
    if "data-only checksum" in text or "sum of DATA field only" in text:
        return "cjt188:mfunhcu"
    if "cumulative_source_interpretation_m3" in v["expected"]:
        return "cjt188:bcd-integer"
    if "constructed_note" in v:
        return "cjt188:cjs-tool"
    return None


@pytest.mark.parametrize("v", _vectors("cjt188.jsonl", "constructed.jsonl"))
def test_vector(v: dict) -> None:
    """Each vector's `expected` fields hold (address, total, clock, status, CS, DI, SER)."""
    exp, frame = v["expected"], bytes.fromhex(v["hex"])
    hint = _model_for(v)
    code, extra, rows, meter = _one(frame, hint)
    if hint == "cjt188:mfunhcu":  # never guessed: the standard CS rejects these frames
        assert _one(frame)[0] == ErrorCode.BAD_CHECKSUM
    checks = 0
    for key, want in exp.items():
        checks += 1
        if key in ("address_A6_A0", "source_meter_address", "source_meterno"):
            assert meter == want
        elif key == "address_wire" or key == "meter_no":
            assert _wire(meter) == want
        elif key == "meter_type":
            assert extra["meter_type"] == want[:2]
        elif key == "control":
            assert extra["control"] == want[:2]
        elif key == "DI":
            assert extra["di"] == want[:4]
        elif key == "SER":
            assert extra["ser"] == int(want, 16)
        elif key in ("cs", "cs_ok", "valid"):
            bad = want is False or ("valid" not in str(want) and want is not True)
            assert (code == ErrorCode.BAD_CHECKSUM) == bad
        elif key == "decoder_must":
            assert code == ErrorCode.BAD_CHECKSUM
        elif key == "current_cumulative":
            assert extra["total_m3"] == Decimal(str(want))
            assert rows[0][0] == int(Decimal(str(want)) * 1_000_000)
        elif key == "settlement_or_month_cumulative":
            assert extra["settlement_m3"] == Decimal(str(want))
        elif key == "realtime":
            assert rows[0][1] == _local_epoch(want)
            assert not rows[0][2] & Flag.CLOCK_MISSING
        elif key == "st":
            assert extra["status_hex"] == want[:5].replace(" ", "")
        elif key == "cumulative_source_interpretation_m3":
            assert rows[0][0] == int(Decimal(str(want)) * 1_000_000)
        elif key.startswith("source_f1"):  # 0.01 t units: 100010 -> 1000.10 m3
            assert rows[0][0] == want * 10_000
        elif key.startswith("source_YSL"):  # integer m3 (the source drops hundredths)
            assert int(extra["total_m3"]) == want
        elif key == "source_metersum_string":  # 0.001 m3 units, "0000003000" -> 3.000 m3
            assert rows[0][0] == int(want.split()[0]) * 1000
        elif key in ("isValidForCommon", "isValidForCJ188", "retcode"):
            assert code == ErrorCode.OK
        elif key == "extracted_frame":
            inner = _one(bytes.fromhex(want))
            assert (code, meter, extra) == (inner[0], inner[3], inner[1])
        elif key in ("find_frame_in_buff", "ascii_prefix"):
            assert code == ErrorCode.OK
            assert len(rows) == 1
        elif key == "current":  # constructed: "BCD value 1 (integer, unit code 0x29)" = 1 L
            assert rows[0][0] == 1000
        elif key == "settlement":
            assert extra["settlement_m3"] == Decimal("0.002")
        elif key == "status":  # "ST byte0=03 -> valve abnormal" in the tool's byte order
            assert rows[0][2] & Flag.VALVE_ABNORMAL
        elif key == "project_layout":
            assert code == ErrorCode.NO_REGISTER
        else:
            checks -= 1  # prose only (`note`, `source_reading`, `meaning_from_source`, ...)
    if extra.get("di") == "D120" and hint:
        assert extra["settlement_m3"] == Decimal("433323.13")
        assert extra["history_months_back"] == 1
    assert checks > 0 or code in (ErrorCode.OK, ErrorCode.NO_REGISTER)


def test_settlement_is_not_a_reading() -> None:
    """The undated settlement-day total goes to extra (Decimal), not to the readings."""
    frame = encode_cjt188(address="00000000000001", total_ml=5_000_000, settlement_ml=4_000_000)
    d = decode_batch([frame], RX)
    assert d.n_readings == 1
    assert d.register_ml.tolist() == [5_000_000]
    assert d.extra[0]["settlement_m3"] == Decimal("4.00")


def test_all_zero_clock_uses_receive_time() -> None:
    """An all-zero RTC means no clock: read_at = receive time and CLOCK_MISSING is set."""
    d = decode_batch([encode_cjt188(address="00000000000001", total_ml=0)], RX)
    assert d.read_at_s.tolist() == [RX]
    assert d.flags[0] & Flag.CLOCK_MISSING


@pytest.mark.parametrize("order", ["be", "le"])
def test_a_clock_valid_in_both_byte_orders_is_read_nearest_the_receive_time(order: str) -> None:
    """`20 24 05 28 10 30 20` is BE 2024-05-28 10:30:20 and LE 2030-10-28 05:24:20: the
    reading nearer the receive time is taken, in whichever order the meter sent it."""
    clock = datetime(2024, 5, 28, 10, 30, 20, tzinfo=UTC) - CST
    frame = encode_cjt188(
        address="00005132764300", total_ml=17_040_000, clock=clock, clock_order=order
    )
    assert frame[24 + 0] == 0x20 if order == "be" else frame[24 + 6] == 0x20
    rx = int(clock.timestamp()) + 3600
    d = decode_batch([frame], rx)
    assert d.read_at_s.tolist() == [int(clock.timestamp())]
    assert not d.flags[0] & Flag.CLOCK_MISSING
    assert d.extra[0]["clock"] == ("meter (CC..ss)" if order == "be" else "meter (ss..CC)")


@pytest.mark.parametrize(
    ("meter_type", "medium"), [(0x14, "water"), (0x19, "water"), (0x39, "gas")]
)
def test_a_vendor_code_in_the_family_range_is_decoded(meter_type: int, medium: str) -> None:
    """T 10H..19H is water and 30H..39H gas (CJ/T 188 ranges), not only the named codes."""
    frame = encode_cjt188(address="00201510270588", total_ml=123_450_000, meter_type=meter_type)
    d = decode_batch([frame], RX)
    assert d.register_ml.tolist() == [123_450_000]
    assert d.extra[0]["medium"] == medium


def test_a_heat_meter_vendor_code_is_still_not_a_volume_reading() -> None:
    """T 25H is a heat meter: its 901F is not decoded as a water register."""
    frame = encode_cjt188(address="00201510270588", total_ml=123_450_000, meter_type=0x25)
    assert _one(frame)[0] == ErrorCode.UNSUPPORTED


def test_a_heat_meter_901f_reply_is_unsupported_not_a_bad_length() -> None:
    """A heat meter's own 901F layout (L = 2EH) is a known variant we do not decode."""
    body = bytes.fromhex("6820" + "01000000000000" + "812E901F00") + bytes(43)
    frame = body + bytes([sum(body) & 0xFF, 0x16])
    d = decode_batch([frame], RX)
    assert d.error_code[0] == ErrorCode.UNSUPPORTED
    assert "heat" in d.error_message[0]
    assert d.n_readings == 0


def test_status_map_is_configurable() -> None:
    """The sdqr model reads valve/battery from the reversed bit order (0xC0, 0x20)."""
    frame = encode_cjt188(address="00000000000001", total_ml=0, status=0x64)
    standard = decode_batch([frame], RX).flags[0]
    assert standard & Flag.LOW_BATTERY
    assert not standard & Flag.VALVE_CLOSED
    flags = decode_batch([frame], RX, hints=["cjt188:sdqr"]).flags[0]
    assert flags & Flag.VALVE_CLOSED
    assert flags & Flag.LOW_BATTERY


def test_platform_json_envelope() -> None:
    """A hex string inside platform JSON (OceanConnect services[0].data) is unwrapped."""
    inner = encode_cjt188(address="12345678901234", total_ml=1_230_000, preamble=3)
    doc = {"services": [{"data": {"device": {"data1": inner.hex().upper()}}}]}
    d = decode_batch([json.dumps(doc).encode()], RX)
    assert d.format[0] == "cjt188"
    assert d.register_ml.tolist() == [1_230_000]


def _mutate(frame: bytes, pos: int, value: int) -> bytes:
    out = bytearray(frame)
    out[pos] = value
    body = out[: len(out) - 2]
    out[-2] = sum(body[body.index(0x68) :]) & 0xFF
    return bytes(out)


GOOD = encode_cjt188(address="00000000000001", total_ml=10_000)
REJECTS = [
    ("checksum", GOOD[:-2] + bytes([GOOD[-2] ^ 1, 0x16]), None, ErrorCode.BAD_CHECKSUM),
    ("no-stop", GOOD[:-1] + b"\x00", "cjt188", ErrorCode.BAD_START_STOP),
    ("truncated", GOOD[:20], "cjt188", ErrorCode.TRUNCATED),
    ("too-short", GOOD[:8], "cjt188", ErrorCode.TRUNCATED),
    ("too-large", b"\x00" * 600, "cjt188", ErrorCode.TOO_LARGE),
    ("bcd", _mutate(GOOD, 14, 0xAB), None, ErrorCode.BAD_BCD),
    ("unit", _mutate(GOOD, 18, 0x05), None, ErrorCode.BAD_UNIT),
    # litres: the standard's XXXXXX.XX or whole litres by vendor (100x): never guessed
    ("litres-unmodelled", _mutate(GOOD, 18, 0x29), None, ErrorCode.BAD_UNIT),
    ("heat", _mutate(GOOD, 1, 0x20), None, ErrorCode.UNSUPPORTED),
    ("request", bytes.fromhex("68100100000508000001031F90003916"), None, ErrorCode.NO_REGISTER),
    ("bad-length", bytes.fromhex("6810010000050800008103901F00B916"), None, ErrorCode.BAD_LENGTH),
    ("json-no-hex", b'{"data": "nothing here"}', "cjt188", ErrorCode.BAD_RECORD),
    ("model", GOOD, "cjt188:nosuch", ErrorCode.UNSUPPORTED),
    # a reply echoing the broadcast / a vendor-wide wildcard address names no meter
    ("wildcard-address", encode_cjt188(address="AA" * 7, total_ml=0), None, ErrorCode.UNSUPPORTED),
    (
        "wildcard-byte",
        encode_cjt188(address="AAAAAAAAAA3378", total_ml=0),
        None,
        ErrorCode.UNSUPPORTED,
    ),
]


@pytest.mark.parametrize(
    ("frame", "hint", "code"), [r[1:] for r in REJECTS], ids=[r[0] for r in REJECTS]
)
def test_reject_code(frame: bytes, hint: str | None, code: ErrorCode) -> None:
    """Each CJ/T 188 reject path yields its own error code (and no reading)."""
    d = decode_batch([frame], RX, hints=[hint])
    assert d.error_code[0] == code
    assert d.error_message[0]
    assert d.n_readings == 0


def _settlement(frame: bytes, fill: bytes) -> bytes:
    """`frame` with the settlement total and its unit (DATA 8..12) replaced by `fill`."""
    for i, value in enumerate(fill):
        frame = _mutate(frame, 19 + i, value)
    return frame


@pytest.mark.parametrize(
    "fill",
    ["0000000000", "AAAAAAAAAA", "EEEEEEEE2C", "0000010005"],
    ids=["zero-fill", "aa-fill", "not-bcd", "not-a-volume"],
)
def test_bad_settlement_keeps_the_register(fill: str) -> None:
    """A settlement total that is not one (00/AA fill of a meter that keeps none, bad
    digits, a unit that is no volume) is left out, noted RECORD_DROPPED: it used to
    refuse the frame (BAD_BCD / BAD_UNIT) and cost the meter its current register."""
    frame = encode_cjt188(address="00000000000001", total_ml=5_000_000, settlement_ml=4_000_000)
    d = decode_batch([_settlement(frame, bytes.fromhex(fill)), frame], RX)
    assert d.error_code.tolist() == [ErrorCode.OK, ErrorCode.OK]
    assert d.register_ml.tolist() == [5_000_000, 5_000_000]
    assert "settlement_m3" not in d.extra[0]
    assert d.extra[1]["settlement_m3"] == Decimal("4.00")
    assert d.frame_flags_or_zero.tolist() == [FrameFlag.RECORD_DROPPED, 0]


@given(
    address=st.text("0123456789", min_size=14, max_size=14),
    total=st.integers(0, 99_999_999),
    settlement=st.none() | st.integers(0, 99_999_999),
    meter_type=st.sampled_from([WATER, GAS]),
    unit=st.sampled_from([0x29, 0x2C, 0x2D, 0x2E]),
    clock=st.none()
    | st.datetimes(datetime(2000, 1, 1), datetime(2098, 12, 31), timezones=st.just(UTC)),
    status=st.integers(0, 0xFFFF),
    di_order=st.sampled_from(["be", "le"]),
    clock_order=st.sampled_from(["le", "be"]),
    preamble=st.integers(0, 6),
)
def test_round_trip(
    address: str, total: int, settlement: int | None, meter_type: int, unit: int,
    clock: datetime | None, status: int, di_order: str, clock_order: str, preamble: int,
) -> None:  # fmt: skip
    """encode_cjt188 -> decode_batch returns the address, mL total, clock and status bits
    (litre units with the model that reads them as the standard's XXXXXX.XX)."""
    model = "standard-litres" if unit == 0x29 else "standard"
    per = cjt188.MODELS[model].ml_per_count()[unit]
    frame = encode_cjt188(
        address=address, total_ml=total * int(per), meter_type=meter_type, unit=unit,
        settlement_ml=None if settlement is None else settlement * int(per),
        clock=clock, status=status, di_order=di_order, clock_order=clock_order, preamble=preamble,
    )  # fmt: skip
    clock_bytes = np.frombuffer(frame[preamble + 24 : preamble + 31], np.uint8)[None, :]
    # A clock valid in both byte orders (CC YY MM DD hh mm ss with ss in 19..21 can also read
    # as ss mm hh DD MM YY CC) is ambiguous: the "auto" model reads it as the standard order.
    assume(not all(k.bcd_clock(clock_bytes, big_endian=be)[1][0] for be in (False, True)))
    d = decode_batch([frame], RX, hints=[f"cjt188:{model}"])
    assert d.error_code[0] == ErrorCode.OK, d.error_message[0]
    assert d.address.tolist() == [address]
    assert d.register_ml.tolist() == [total * int(per)]
    want_t = RX if clock is None else int(clock.replace(microsecond=0).timestamp())
    assert d.read_at_s.tolist() == [want_t]
    valve = status & 0x03
    assert bool(d.flags[0] & Flag.VALVE_CLOSED) == (valve == 1)
    assert bool(d.flags[0] & Flag.VALVE_ABNORMAL) == (valve in (2, 3))
    assert bool(d.flags[0] & Flag.LOW_BATTERY) == bool(status & 0x04)
    assert ("settlement_m3" in d.extra[0]) == (settlement is not None)


def test_vectorized_batch_matches_single() -> None:
    """A mixed batch (lengths, preambles, envelopes) decodes the same as one frame at a time."""
    rng = np.random.default_rng(7)
    frames = [
        encode_cjt188(address=f"{i:014d}", total_ml=int(rng.integers(0, 10**6)) * 10_000,
                      preamble=int(rng.integers(0, 5)), di_order=("be", "le")[i % 2])
        for i in range(50)
    ] + [GOOD[:-2] + b"\x00\x16", b"CTRL:&2017" + GOOD]  # fmt: skip
    batch = decode_batch(frames, RX)
    singles = [decode_batch([f], RX) for f in frames]
    assert batch.error_code.tolist() == [int(s.error_code[0]) for s in singles]
    assert batch.register_ml.tolist() == [int(r) for s in singles for r in s.register_ml]


# Two nbm1 interval batches made by our encoder (bench/cityday.py's fleet) whose hourly
# deltas happen to read 68 <water type> ... 16 where a CJ/T 188 L field would put its
# stop byte. Before the prefix rule, detection took them for CJ/T 188 frames with a bad
# checksum: the uplink was quarantined and its 24 readings were not stored.
NBM1_LOOKING_LIKE_CJT188 = (
    "4e490117008218000000000054136b681000000000140012001a001b0014000c0008001900090020"
    "0010000a0025001b001b00060016002600160020001f0012000600b7c5",
    "4e490117568405000000008002126b6811000000000b000a001c0018002100140008000b0007001f"
    "0023001700120002002500030019001600140008000b000c00120059ad",
)


@pytest.mark.parametrize("hex_frame", NBM1_LOOKING_LIKE_CJT188)
def test_a_0x68_inside_another_format_is_not_a_cjt188_frame(hex_frame: str) -> None:
    """Only FE, ASCII and zero bytes may come before the 0x68: these batches decode as
    the nbm1 frames they are, 24 readings each, alone and in a batch of CJ/T frames."""
    frame = bytes.fromhex(hex_frame)
    assert not cjt188.looks_like(frame)
    code, _, rows, _ = _one(frame)
    assert code == ErrorCode.OK
    assert len(rows) == 24
    real = encode_cjt188(address="12345678901234", total_ml=1_230_000, meter_type=WATER)
    d = decode_batch([real, frame, b"CTRL:&2017\xfe\xfe" + real], [RX] * 3)
    assert list(d.format) == ["cjt188", "interval", "cjt188"]
    assert list(d.error_code) == [ErrorCode.OK] * 3


def test_a_frame_after_a_binary_header_is_not_located() -> None:
    """A 0x68 after bytes no DTU prefix has (a vendor's binary header) is not taken: such
    framing needs a driver, never a guess."""
    real = encode_cjt188(address="12345678901234", total_ml=1_230_000, meter_type=WATER)
    assert cjt188.looks_like(b"\xfe\xfe" + real)
    assert cjt188.looks_like(b"\x00\x00\x00\x00\xfe\xfe" + real)
    assert not cjt188.looks_like(b"\x01\x84" + real)
