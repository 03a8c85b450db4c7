"""SenML: senml.jsonl vectors resolve as their source says; 3424 readings; rejects; round trip."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from decoder import decode_batch, senml
from decoder.columns import ErrorCode, Flag, FrameFlag
from decoder.encode_senml import encode_senml, water_pack

VECTORS = Path(__file__).parents[2] / ".." / "shared" / "vectors"


def _vectors() -> list[object]:
    if not VECTORS.is_dir():
        reason = f"{VECTORS} absent: shared vector tests skipped (golden examples still run)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    lines = (VECTORS / "senml.jsonl").read_text().splitlines()
    return [pytest.param(json.loads(line), id=f"senml.jsonl:{n}") for n, line in enumerate(lines)]


def _frame(v: dict) -> bytes:
    if "hex" in v:
        return bytes.fromhex(v["hex"])
    if "payload" in v:
        return v["payload"].encode()
    return json.dumps(v["json"]).encode()


def _now(v: dict) -> int:
    """The receive time the spec authors' resolver ran at (their "now" for missing t)."""
    resolved = (v.get("expected") or {}).get("resolved_records") or []
    times = [int(Decimal(str(r["t"]))) for r in resolved if "t" in r]
    return max(times, default=1_700_000_000)


def _same(mine: dict, want: dict) -> bool:
    if set(mine) - {"vd"} != set(want):
        return False
    for key, value in want.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            if mine[key] != Decimal(str(value)):
                return False
        elif mine[key] != value:
            return False
    return True


@pytest.mark.parametrize("v", _vectors())
def test_vector(v: dict) -> None:
    """Resolved records (name, unit, absolute time, exact value) equal the source's."""
    now = _now(v)
    records, encoding = senml.parse(_frame(v))
    got = senml.resolve(records, now)
    exp = v["expected"]
    if exp is None:  # ex12b: no resolved file upstream; RFC 8428 §4.5.3 relative t=0.1
        base = Decimal("1320078429.0")
        assert [r["t"] for r in got] == [base, base, base + Decimal("0.1"), base + Decimal("0.1")]
        return
    if "resolved_records" in exp:
        # The authors' resolver predates `vd` (ex7 drops its vd record); RFC 8428 keeps it.
        mine = [r for r in got if "vd" not in r]
        assert len(mine) == len(exp["resolved_records"])
        assert all(_same(m, w) for m, w in zip(mine, exp["resolved_records"], strict=True))
    elif "records_label_names" in exp:  # CBOR: same pack as the JSON example
        assert encoding == "cbor"
        want = [{k: Decimal(str(x)) if isinstance(x, float) else x for k, x in r.items()}
                for r in exp["records_label_names"]]  # fmt: skip
        exact = [{k: Decimal(repr(x)) if isinstance(x, float) else x for k, x in r.items()}
                 for r in records]  # fmt: skip
        assert exact == want
    elif "values" in exp:  # Leshan: bt just above 2**28 is absolute
        assert {r["n"] for r in got} == {exp["path"]}
        assert [(int(r["t"]), r["v"]) for r in got] == [
            (w["t"], Decimal(str(w["v"]))) for w in exp["values"]
        ]
    elif "groups" in exp:  # a later bt applies from its record on
        flat = [(int(g["t"]), n, x) for g in exp["groups"] for n, x in g.items() if n != "t"]
        assert sorted((int(r["t"]), r["n"], r.get("v", r.get("vs"))) for r in got) == sorted(
            (t, n, Decimal(str(x)) if isinstance(x, float) else x) for t, n, x in flat
        )
    else:  # LwM2M path -> {t, v} or a prose time
        for path, want in exp.items():
            (rec,) = [r for r in got if r["n"] == path]
            if isinstance(want, dict):
                assert rec["t"] == Decimal(want["t"].split()[0])
                assert rec["v"] == Decimal(str(want["v"]))
            else:
                assert rec["v"] == Decimal(want.split()[1])


@pytest.mark.parametrize(("frame", "rx", "want"), senml.EXAMPLES)
def test_golden_examples(frame: bytes, rx: int, want: dict) -> None:
    """The module's LwM2M 3424 example yields exact mL readings, times and leak flag."""
    d = decode_batch([frame], rx)
    assert d.error_code[0] == ErrorCode.OK
    assert d.address_of_frame[0] == want["address"]
    assert d.register_ml.tolist() == want["register_ml"]
    assert d.read_at_s.tolist() == want["read_at_s"]
    assert d.flags.tolist() == [int(f) for f in want["flags"]]


def test_relative_time_anchors_to_receive_time() -> None:
    """t < 2**28 is relative to the receive time the caller passes (RFC 8428 §4.5.3)."""
    frame = b'[{"n":"m","u":"l","v":12.5,"t":-3600}]'
    d = decode_batch([frame], 1_700_003_600)
    assert d.read_at_s.tolist() == [1_700_000_000]
    assert d.register_ml.tolist() == [12_500]


def test_cbor_decimal_fraction() -> None:
    """A CBOR tag-4 decimal fraction value stays exact."""
    frame = cbor2.dumps([{-2: "w/3424/0/", 0: "1", 2: Decimal("1.000001"), 6: 1_700_000_000}])
    assert decode_batch([frame], 0).register_ml.tolist() == [1_000_001]


REJECTS = [
    ("bad-json", b"[{]", ErrorCode.BAD_RECORD),
    ("not-a-record", b"[1, 2]", ErrorCode.BAD_RECORD),
    ("must-understand", b'[{"n":"a","v":1,"x_":1}]', ErrorCode.UNSUPPORTED),
    ("sub-ml", b'[{"n":"a","u":"m3","v":1.0000001,"t":1700000000}]', ErrorCode.BAD_UNIT),
    ("bad-unit", b'[{"n":"/3424/0/1","u":"Cel","v":1}]', ErrorCode.BAD_UNIT),
    ("bad-time", b'[{"n":"a","u":"m3","v":1,"t":1e15}]', ErrorCode.BAD_TIME),
    ("no-volume", b'[{"n":"temp","u":"Cel","v":21.5}]', ErrorCode.NO_REGISTER),
]


@pytest.mark.parametrize(("frame", "code"), [r[1:] for r in REJECTS], ids=[r[0] for r in REJECTS])
def test_reject_code(frame: bytes, code: ErrorCode) -> None:
    """Each SenML reject path yields its own code and no reading."""
    d = decode_batch([frame], 1_700_000_000, hints=["senml"])
    assert d.error_code[0] == code
    assert d.error_message[0]
    assert d.n_readings == 0


@given(
    points=st.lists(
        st.tuples(st.integers(1_600_000_000, 1_900_000_000), st.integers(0, 10**13)),
        min_size=1,
        max_size=30,
    ),
    cbor=st.booleans(),
    relative=st.booleans(),
    leak=st.booleans(),
)
def test_round_trip(points: list[tuple[int, int]], cbor: bool, relative: bool, leak: bool) -> None:
    """water_pack -> encode_senml (JSON/CBOR) -> decode_batch gives back exact (t, mL)."""
    now = max(t for t, _ in points) + 60
    records = water_pack("urn:imei:1", points, now_s=now if relative else None)
    if leak:
        records.append({"n": "10", "vb": True, "t": points[-1][0] - points[0][0]})
    d = decode_batch([encode_senml(records, cbor=cbor)], now)
    assert d.error_code[0] == ErrorCode.OK, d.error_message[0]
    assert list(zip(d.read_at_s.tolist(), d.register_ml.tolist(), strict=True)) == points
    assert d.address_of_frame[0] == "urn:imei:1"
    assert bool(d.flags[-1] & Flag.LEAK) == leak


def test_iso_receive_time_is_utc() -> None:
    """A missing t resolves to the receive time itself (UTC epoch seconds, no offset)."""
    rx = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    d = decode_batch([b'[{"n":"x","u":"m3","v":2}]'], rx)
    assert d.read_at_s.tolist() == [rx]


def test_health_only_pack_reports_its_health_and_meter() -> None:
    """A pack of objects 3/4 alone is NO_REGISTER with no reading, but keeps its health
    figures and the one meter it names (the collector stores them for a device)."""
    frame = b'[{"bn":"urn:imei:1/3/0/","n":"9","v":87},{"bn":"urn:imei:1/4/0/","n":"2","v":-97}]'
    d = decode_batch([frame], 1_700_000_000, hints=["senml"])
    assert d.error_code[0] == ErrorCode.NO_REGISTER
    assert d.n_readings == 0
    assert d.address_of_frame[0] == "urn:imei:1"
    assert d.extra[0]["battery_pct"] == 87
    assert d.extra[0]["rsrp_dbm"] == Decimal(-97)


def test_health_of_two_meters_is_no_health() -> None:
    """Health records naming two meters with no reading: no figure, no meter (never one
    meter's battery on another); beside a reading only the reading's meter's count."""
    two = b'[{"n":"urn:imei:1/3/0/9","v":87},{"n":"urn:imei:2/3/0/9","v":10}]'
    d = decode_batch([two], 1_700_000_000, hints=["senml"])
    assert d.error_code[0] == ErrorCode.NO_REGISTER
    assert "battery_pct" not in d.extra[0]
    assert d.address_of_frame[0] == ""
    mixed = (
        b'[{"n":"urn:imei:1/3424/0/1","v":1.5,"t":1700000000},'
        b'{"n":"urn:imei:2/3/0/9","v":10},{"n":"urn:imei:1/3/0/9","v":87}]'
    )
    d = decode_batch([mixed], 1_700_000_000, hints=["senml"])
    assert d.error_code[0] == ErrorCode.OK
    assert d.extra[0]["battery_pct"] == 87


RX = 1_700_000_000


def _one(pack: bytes) -> tuple[int, list[tuple[int, int]], dict]:
    d = decode_batch([pack], RX, hints=["senml"])
    rows = list(zip(d.read_at_s.tolist(), d.register_ml.tolist(), strict=True))
    return int(d.error_code[0]), rows, d.sparse.get(0) or {}


@pytest.mark.parametrize(
    "secondary",
    [
        b'{"bn":"/3/0/","n":"0","vs":5}',  # a string resource sent as a number
        b'{"bn":"/3/0/","n":"9","v":"95"}',  # a number sent as a string
        b'{"n":"10","vb":1}',  # a boolean sent as 1
        b'{"n":"7","v":0.001,"t":"x"}',  # a time that is no number
        b'{"n":7,"v":0.001}',  # a name that is no string
        b'{"bn":"/3424/0/","n":"1","t":-60,"v":"1.2"}',  # one history point as a string
        b'{"bn":"/3424/0/","n":"1","t":-3600,"u":"m3/h","v":1.4}',  # one history point bad
    ],
)
def test_bad_secondary_record_keeps_the_register(secondary: bytes) -> None:
    """One unreadable record is dropped (RECORD_DROPPED), the valid 3424 register stays."""
    pack = b'[{"bn":"/3424/0/","n":"1","v":123.456},' + secondary + b"]"
    d = decode_batch([pack], RX, hints=["senml"])
    assert d.error_code[0] == ErrorCode.OK, d.error_message[0]
    assert d.register_ml.tolist() == [123_456_000]
    assert d.read_at_s.tolist() == [RX]
    assert d.frame_flags_or_zero[0] == FrameFlag.RECORD_DROPPED
    assert len(d.sparse[0]["dropped_records"]) == 1


def test_unit_volume_of_another_object_is_no_register() -> None:
    """An m3 record of another LwM2M object (IPSO 3300) is not the meter's register."""
    code, rows, _ = _one(b'[{"n":"/3424/0/1","v":123.456},{"n":"/3300/0/5700","u":"m3","v":0.25}]')
    assert (code, rows) == (ErrorCode.OK, [(RX, 123_456_000)])
    code, rows, _ = _one(b'[{"n":"/3300/0/5700","u":"m3","v":0.25}]')
    assert (code, rows) == (ErrorCode.NO_REGISTER, [])


@pytest.mark.parametrize(
    "quality", [b'{"n":"6042","v":1}', b'{"n":"6042","v":2}', b'{"n":"6049","v":0}']
)
def test_value_the_meter_marks_invalid_is_refused(quality: bytes) -> None:
    """3424 Measurement Quality Indicator 1/2 or Level 0: the value is not reported."""
    code, rows, _ = _one(b'[{"bn":"/3424/0/","n":"1","v":123.456},' + quality + b"]")
    assert (code, rows) == (ErrorCode.BAD_RECORD, [])
    code, rows, _ = _one(b'[{"bn":"/3424/0/","n":"1","v":123.456},{"n":"6042","v":4}]')
    assert (code, rows) == (ErrorCode.OK, [(RX, 123_456_000)])


def test_measurement_timestamp_is_the_read_time() -> None:
    """3424/x/5518 (when the measurement was performed) dates a Read answer's register."""
    pack = (
        b'[{"bn":"/3424/0/","n":"1","v":123.456},{"n":"5518","v":1699990000},{"n":"10","vb":true}]'
    )
    d = decode_batch([pack], RX, hints=["senml"])
    assert d.read_at_s.tolist() == [1_699_990_000]
    assert d.register_ml.tolist() == [123_456_000]
    assert d.flags.tolist() == [Flag.LEAK]


@pytest.mark.parametrize(
    "pack",
    [
        b'[{"bn":"/3424/0/","n":"1","v":123.456},{"bn":"/3424/1/","n":"1","v":7.0}]',
        b'[{"n":"urn:imei:1/3424/0/1","v":1.5},{"n":"urn:imei:2/3424/0/1","v":2.5}]',
    ],
)
def test_readings_of_two_meters_in_one_pack_are_refused(pack: bytes) -> None:
    """Two 3424 instances or meters would pass downstream as one meter's readings."""
    code, rows, _ = _one(pack)
    assert (code, rows) == (ErrorCode.UNSUPPORTED, [])


@pytest.mark.parametrize(
    ("literal", "ml"),
    [
        (b"123.456000000000003", 123_456_000),  # a double printed to 15 fractional digits
        (b"0.100000000000000005", 100_000),
        (b"12.345000267028809", None),  # a float32's value: 0.27 mL off, not a whole mL
        (b"12.3454567", None),  # exact and sub-mL
    ],
)
def test_printed_double_carries_its_whole_ml(literal: bytes, ml: int | None) -> None:
    """Digits past a double's precision are print noise; a float32 value is not rounded."""
    code, rows, _ = _one(b'[{"n":"/3424/0/1","v":' + literal + b"}]")
    assert (code, rows) == ((ErrorCode.OK, [(RX, ml)]) if ml else (ErrorCode.BAD_UNIT, []))


def test_cbor_float_widths() -> None:
    """CBOR half/single/double: exact whole mL kept; a float32 12.345 is refused, not rounded."""
    head = bytes.fromhex("81a200692f333432342f302f3102")  # [{0: "/3424/0/1", 2: ...}]
    assert _one(head + bytes.fromhex("f94100"))[1] == [(RX, 2_500_000)]  # half 2.5
    assert _one(head + cbor2.dumps(12.345))[1] == [(RX, 12_345_000)]  # double
    single = head + b"\xfa" + struct.pack(">f", 12.345)
    assert _one(single)[:2] == (ErrorCode.BAD_UNIT, [])


def test_battery_voltage_is_the_battery_power_source() -> None:
    """3/0/7/i is battery_mv only where 3/0/6/i says battery; two unnamed sources: none."""
    base = b'[{"bn":"/3424/0/","n":"1","v":1.0},{"bn":"/3/0/","n":"6/0","v":5},{"n":"6/1","v":1},'
    _, _, extra = _one(base + b'{"n":"7/0","v":5000},{"n":"7/1","v":3600}]')
    assert extra["battery_mv"] == 3600
    _, _, extra = _one(
        b'[{"n":"/3424/0/1","v":1.0},{"bn":"/3/0/7/","n":"0","v":3800},{"n":"1","v":5000}]'
    )
    assert "battery_mv" not in extra
    _, _, extra = _one(b'[{"n":"/3424/0/1","v":1.0},{"n":"/3/0/7","v":3600}]')
    assert extra["battery_mv"] == 3600


# The usual pack (bn, bt, bu, n, t, u, v, vb; one 3424/x/1 name) is read in one pass
# (`senml._usual`); every other pack by the general steps. The cases below pin the edges
# that pass special-cases, with exact values (Decimal representations included).


def _pack(frame: bytes) -> tuple[list[tuple[int, int, int]], str, dict]:
    records, encoding = senml.parse(frame)
    assert senml._usual(records, encoding, RX) is not None  # the one pass reads it
    return senml.decode_one(frame, RX)


def test_later_base_fields_apply_from_their_record() -> None:
    """A later bn/bt applies from its record on: health between readings, then the meter's
    base again with a new bt; the alarm takes the time of the bt in force."""
    readings, address, extra = _pack(
        b'[{"bn":"urn:imei:1/3424/0/","bt":1699990000,"u":"m3","n":"1","v":1.5},'
        b'{"n":"1","t":3600,"v":1.75},{"bn":"urn:imei:1/3/0/","n":"9","v":87},'
        b'{"bn":"urn:imei:1/3424/0/","bt":1699999000,"n":"1","v":2.0},{"n":"10","vb":true}]'
    )
    assert readings == [
        (1_699_990_000, 1_500_000, 0),
        (1_699_993_600, 1_750_000, 0),
        (1_699_999_000, 2_000_000, Flag.LEAK),
    ]
    assert address == "urn:imei:1"
    assert extra["battery_pct"] == 87
    assert repr(extra["total_m3"]) == "Decimal('2.0')"
    assert [(r["n"], r["t"]) for r in extra["records"]][2:] == [
        ("urn:imei:1/3/0/9", Decimal(1_699_990_000)),
        ("urn:imei:1/3424/0/1", Decimal(1_699_999_000)),
        ("urn:imei:1/3424/0/10", Decimal(1_699_999_000)),
    ]


@pytest.mark.parametrize(
    ("literal", "value", "ml"),
    [
        (b"5E+3", "Decimal('5000')", 5_000_000_000),  # 0 + 5E+3: exponent 0, not +3
        (b"-0", "Decimal('0')", 0),  # 0 + -0 is +0
        (b"-0.0", "Decimal('0.0')", 0),
        (b"1.50", "Decimal('1.50')", 1_500_000),  # the trailing zero stays
    ],
)
def test_value_is_the_sum_with_the_default_base(literal: bytes, value: str, ml: int) -> None:
    """v resolves to bv + v with bv = 0 (RFC 8428 §4.6): the sum's exact representation."""
    readings, _, extra = _pack(b'[{"n":"/3424/0/1","t":1699999000,"v":' + literal + b"}]")
    assert readings == [(1_699_999_000, ml, 0)]
    assert repr(extra["records"][0]["v"]) == value
    assert repr(extra["total_m3"]) == value


def test_relative_times_of_a_pack() -> None:
    """bt below 2**28 anchors to the receive time; a fractional second floors; the first
    of the latest readings is the total."""
    readings, address, extra = _pack(
        b'[{"bn":"urn:imei:7/3424/0/","bt":-7200,"n":"1","v":10.001},'
        b'{"n":"1","t":3600,"v":10.002},{"n":"1","t":3599.5,"v":10.003}]'
    )
    assert readings == [
        (1_699_992_800, 10_001_000, 0),
        (1_699_996_400, 10_002_000, 0),
        (1_699_996_399, 10_003_000, 0),
    ]
    assert address == "urn:imei:7"
    assert [r["t"] for r in extra["records"]] == [
        Decimal(1_699_992_800),
        Decimal(1_699_996_400),
        Decimal("1699996399.5"),
    ]
    assert repr(extra["total_m3"]) == "Decimal('10.002')"


def test_printed_doubles_and_base_unit_of_a_pack() -> None:
    """Printed doubles carry whole mL (the records keep the literal); bu applies to all."""
    readings, _, extra = _pack(
        b'[{"bn":"/3424/0/","n":"1","v":123.456000000000003,"t":1699996400},'
        b'{"n":"1","v":123.457000000000001,"t":1699999999}]'
    )
    assert readings == [(1_699_996_400, 123_456_000, 0), (1_699_999_999, 123_457_000, 0)]
    assert extra["records"][1]["v"] == Decimal("123.457000000000001")
    assert repr(extra["total_m3"]) == "Decimal('123.457000')"
    readings, _, extra = _pack(
        b'[{"bn":"/3424/0/","bu":"l","n":"1","v":12.5,"t":1699996400},'
        b'{"n":"1","v":13,"t":1699999999}]'
    )
    assert readings == [(1_699_996_400, 12_500, 0), (1_699_999_999, 13_000, 0)]
    assert [r["u"] for r in extra["records"]] == ["l", "l"]
    assert repr(extra["total_m3"]) == "Decimal('0.013')"


def test_alarm_flags_the_reading_of_its_second() -> None:
    """An alarm flags the reading of its own second only."""
    readings, _, _ = _pack(
        b'[{"bn":"/3424/0/","bt":1699990000,"n":"1","v":1},{"n":"1","v":2,"t":3600},'
        b'{"n":"11","vb":true,"t":3600},{"n":"12","v":1}]'
    )
    assert readings == [
        (1_699_990_000, 1_000_000, Flag.METER_ERROR),
        (1_699_993_600, 2_000_000, Flag.REVERSE_FLOW),
    ]


def test_a_name_both_a_volume_and_a_health_resource() -> None:
    """/4/3424/2/1 is a 3424 volume and an object 4 RSRP: the newest value is the RSRP."""
    readings, _, extra = senml.decode_one(
        b'[{"bn":"/4/3424/2/","n":"1","v":90,"t":1700000000},{"n":"1","v":80,"t":1700000010}]',
        RX,
    )
    assert readings == [(1_700_000_000, 90_000_000, 0), (1_700_000_010, 80_000_000, 0)]
    assert extra["rsrp_dbm"] == Decimal(80)


_LITERALS = {  # field -> JSON literals, the usual ones repeated so that most packs are usual
    "bn": ['"urn:imei:1/3424/0/"'] * 6 + ['"urn:imei:1/3/0/"', '"/3424/1/"', '"urn:imei:1/"'],
    "bt": ["1700000000"] * 3 + ["-3600", "1699999999.5", "0"],
    "bu": ['"l"', '"m3"'],
    "u": ['"m3"', '"l"', '"L"'],
    "n": ['"1"'] * 12 + ['"10"', '"13"', '"5518"', '"6042"', '"9"', '"6/0"', '"7"'],
    "t": ["3600"] * 4 + ["0", "-60", "0.5", "7200.25"],
    "v": ["1", "1.5", "1.50", "5E+3", "-0", "-0.0", "123.456000000000003", "2", "0.001",
          "12.345000267", "1700000000", "3600.000"],
    "vb": ["true", "false"],
}  # fmt: skip
_ODD = {  # and what leaves a pack to the general steps
    "bn": ['""', "7"], "bt": ['"x"', "1e30"], "bu": ['"Cel"'], "u": ['""', '"m3/h"'],
    "n": ["1", '""'], "t": ["1e15", "true"], "v": ["-1.5", "1e400", '"1"', "1e-7"],
    "vb": ["1"], "vs": ['"x"'], "bv": ["1"], "x_": ["1"],
}  # fmt: skip


@st.composite
def _packs(draw: st.DrawFn) -> bytes:
    records = []
    for i in range(draw(st.integers(1, 8))):
        rec = {"n": draw(st.sampled_from(_LITERALS["n"]))}
        for field in ("bn", "bt", "bu", "u", "t", "vb"):
            if draw(st.integers(0, 9)) < (8 if i == 0 and field in ("bn", "bt") else 1):
                rec[field] = draw(st.sampled_from(_LITERALS[field]))
        if "vb" not in rec or draw(st.booleans()):
            rec["v"] = draw(st.sampled_from(_LITERALS["v"]))
        if draw(st.integers(0, 49)) == 0:
            field = draw(st.sampled_from(sorted(_ODD)))
            rec[field] = draw(st.sampled_from(_ODD[field]))
        records.append("{" + ",".join(f'"{k}":{v}' for k, v in rec.items()) + "}")
    return ("[" + ",".join(records) + "]").encode()


def _outcome(read: Callable[[], object]) -> str:
    try:
        return repr(read())
    except (ValueError, ArithmeticError) as exc:  # SenMLError is a ValueError
        return f"{type(exc).__name__}: {exc}"


@given(pack=_packs())
def test_one_pass_gives_what_the_general_steps_give(pack: bytes) -> None:
    """Wherever the one pass reads a pack, its readings, address and extra (records and
    their Decimal representations included), or its error, are the general steps'."""
    records, encoding = senml.parse(pack)

    def one_pass() -> object:
        got = senml._usual(records, encoding, RX)
        if got is None:
            return None
        times, mls, flags, address, extra = got
        return list(zip(times, mls, flags, strict=True)), address, extra

    usual = _outcome(one_pass)
    if usual != "None":
        assert usual == _outcome(lambda: senml._general(records, encoding, RX))


def test_notes_at_absurd_times_are_left_out() -> None:
    """An alarm, quality mark or 5518 stamp at a time no reading can have (1E+999999, a
    negative second) marks nothing, and costs no huge integer: the pack reads as without it."""
    plain = b'[{"bn":"/3424/0/","bt":1699990000,"n":"1","v":1},{"n":"1","v":2,"t":3600}'
    odd = (
        b',{"n":"10","vb":true,"t":1E+999999},{"n":"6042","v":1,"t":-1E+999999},'
        b'{"n":"5518","v":1699990000,"t":-1E+999999}'
    )
    readings, address, extra = senml.decode_one(plain + odd + b"]", RX)
    assert (readings, address) == senml.decode_one(plain + b"]", RX)[:2]
    assert readings == [(1_699_990_000, 1_000_000, 0), (1_699_993_600, 2_000_000, 0)]
    assert "dropped_records" not in extra


def test_health_of_absurd_magnitude_costs_no_register() -> None:
    """A whole health figure of absurd magnitude (1E+999999) is no figure, read at once;
    the pack keeps its register and its other health."""
    readings, _, extra = senml.decode_one(
        b'[{"bn":"urn:imei:1/3424/0/","bt":1699990000,"u":"m3","n":"1","v":1.5},'
        b'{"bn":"urn:imei:1/3/0/","n":"9","v":1E+999999},{"n":"7","v":-1E+999999},'
        b'{"bn":"urn:imei:1/4/0/","n":"2","v":-97}]',
        RX,
    )
    assert readings == [(1_699_990_000, 1_500_000, 0)]
    assert "battery_pct" not in extra
    assert "battery_mv" not in extra
    assert extra["rsrp_dbm"] == -97
