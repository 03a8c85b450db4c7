"""SenML: senml.jsonl vectors resolve as their source says; 3424 readings; rejects; round trip."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from decoder import decode_batch, senml
from decoder.columns import ErrorCode, Flag
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
