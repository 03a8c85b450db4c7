"""Health figures per format: golden frames for CJ/T 188, OMS, SenML objects 3/4, nbm1 v2."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from decoder import decode_batch, health
from decoder.columns import Decoded, ErrorCode, Flag, empty
from decoder.encode_cjt188 import encode_cjt188
from decoder.interval import ModemHealth, encode_interval
from decoder.mbus_encode import encode_oms_mode5

RX = 1_700_010_000
KEY = bytes(range(16))
WHEN = datetime(2023, 11, 14, 22, 0, tzinfo=UTC)
ADDRESS = "00000000000042"
DELTAS = [1_000] * 24
BASE_T = 1_700_002_800


def _one(frame: bytes, hint: str | None = None, keys: dict[str, bytes] | None = None) -> dict:
    dec = decode_batch([frame], RX, keys=keys, hints=[hint] if hint else None)
    assert dec.error_code[0] == ErrorCode.OK, dec.error_message[0]
    return dec.extra_of(0)


@pytest.mark.parametrize(("key", "flags", "want"), health.EXAMPLES)
def test_annotate_examples(key: str, flags: int, want: dict[str, bool]) -> None:
    """The format table: which status bits become which health column, and none for SenML."""
    dec = empty(1)
    dec.format[:] = key
    dec = Decoded(
        frame_index=np.zeros(1, np.int32), address=np.array(["1"], object),
        read_at_s=np.zeros(1, np.int64), register_ml=np.zeros(1, np.int64),
        flags=np.array([flags], np.uint32), format=dec.format,
        address_of_frame=dec.address_of_frame, error_code=dec.error_code,
        error_message=dec.error_message,
    )  # fmt: skip
    out = health.annotate(dec).extra_of(0, health.HEALTH_COLUMNS)
    assert out == want


@pytest.mark.parametrize(
    ("status", "battery_low", "valve"),
    [
        (0x00, False, "open"),
        (0x04, True, "open"),
        (0x05, True, "closed"),
        (0x03, False, "abnormal"),
    ],
)
def test_cjt188_status_bits(status: int, battery_low: bool, valve: str) -> None:
    """CJ/T 188 ST byte0: D2 battery low, D1D0 valve (FORMATS §1.2) reach the health columns."""
    extra = _one(encode_cjt188(address=ADDRESS, total_ml=1_230_000, clock=WHEN, status=status))
    assert extra["battery_low"] is battery_low
    assert extra["valve"] == valve
    assert extra["meter_error"] is (valve == "abnormal")


@pytest.mark.parametrize(
    ("sts", "battery_low", "meter_error"),
    [(0x00, False, False), (0x04, True, False), (0x08, False, True), (0x13, False, True)],
)
def test_oms_status_byte(sts: int, battery_low: bool, meter_error: bool) -> None:
    """OMS TPL STS: bit 2 power low, bits 3/4 permanent/temporary error, 11 alarm (EN 13757-7)."""
    frame = encode_oms_mode5("12345678", "NBM", 1, 7, 1, 5_000_000, KEY, WHEN, status=sts)
    extra = _one(frame, keys={"12345678": KEY})
    assert (extra["battery_low"], extra["meter_error"]) == (battery_low, meter_error)


def test_senml_objects_3_and_4() -> None:
    """LwM2M 3/0/7 mV, 3/0/9 %, 4/0/2 RSRP, 4/0/11 SINR, 4/0/8 cell id, 4/0/13 ECL."""
    pack = (
        b'[{"bn":"urn:imei:861234567890123/3424/0/","bt":1700000000,"n":"1","u":"m3",'
        b'"v":1.5},{"bn":"urn:imei:861234567890123/","n":"3/0/7/0","v":3581},'
        b'{"n":"3/0/9","v":87},{"n":"4/0/2","v":-104.5},{"n":"4/0/11","v":6.25},'
        b'{"n":"4/0/8","v":21842946},{"n":"4/0/13","v":1},{"n":"4/0/2","t":-60,"v":-99}]'
    )
    extra = _one(pack)
    assert extra["battery_mv"] == 3581
    assert extra["battery_pct"] == 87
    assert str(extra["rsrp_dbm"]) == "-104.5"  # the newest of the two RSRP records
    assert str(extra["sinr_db"]) == "6.25"
    assert (extra["cell_id"], extra["ecl"]) == (21842946, 1)
    assert "battery_low" not in extra  # SenML carries no status bit: no false "fine"


def test_senml_fractional_battery_is_no_figure() -> None:
    """A whole-number resource (mV) sent with a fraction is refused as a figure, not rounded."""
    pack = b'[{"bn":"x/3424/0/","bt":1700000000,"n":"1","u":"m3","v":1},{"n":"3/0/7","v":3.5}]'
    assert "battery_mv" not in _one(pack)


def test_nbm1_v2_health_block() -> None:
    """nbm1 v2: battery, RSRP, SINR, ECL and cell id at fixed offsets after the deltas."""
    figures = ModemHealth(3600, -10550, -325, 2, 0x0ABCDEF)
    frame = encode_interval(ADDRESS, BASE_T, 5_000_000, DELTAS, Flag.LOW_BATTERY, figures)
    assert len(frame) == 34 + 2 * len(DELTAS)
    extra = _one(frame)
    assert (extra["battery_mv"], extra["rsrp_cdbm"], extra["sinr_cdb"]) == (3600, -10550, -325)
    assert (extra["ecl"], extra["cell_id"], extra["battery_low"]) == (2, 0x0ABCDEF, True)


def test_nbm1_v2_absent_figures() -> None:
    """A figure sent as its absent value is no column entry; v1 frames carry none at all."""
    frame = encode_interval(ADDRESS, BASE_T, 5_000_000, DELTAS, 0, ModemHealth(rsrp_cdbm=-9000))
    extra = _one(frame)
    assert extra["rsrp_cdbm"] == -9000
    assert not {"battery_mv", "sinr_cdb", "ecl", "cell_id"} & set(extra)
    v1 = _one(encode_interval(ADDRESS, BASE_T, 5_000_000, DELTAS))
    assert "rsrp_cdbm" not in v1
    assert v1["battery_low"] is False


def test_nbm1_v2_mixed_batch_is_columnar() -> None:
    """v1 and v2 frames in one batch: health present only for the v2 rows."""
    v1 = encode_interval(ADDRESS, BASE_T, 5_000_000, DELTAS)
    v2 = encode_interval(ADDRESS, BASE_T, 5_000_000, DELTAS, 0, ModemHealth(battery_mv=3100))
    dec = decode_batch([v1, v2, v2], RX)
    assert dec.ok.all()
    col = dec.fields["battery_mv"]
    assert [col.has(i) for i in range(3)] == [False, True, True]


def test_nbm1_v2_refuses_what_it_cannot_carry() -> None:
    """An ECL outside 0..2 or a figure equal to the absent marker cannot be encoded."""
    with pytest.raises(ValueError, match="ecl"):
        ModemHealth(ecl=3).encode()
    with pytest.raises(ValueError, match="battery_mv"):
        ModemHealth(battery_mv=0xFFFF).encode()


@given(
    battery=st.none() | st.integers(0, 0xFFFE),
    rsrp=st.none() | st.integers(-0x8000, 0x7FFE),
    ecl=st.none() | st.integers(0, 2),
    cell=st.none() | st.integers(0, 0xFFFFFFFE),
)
def test_nbm1_v2_round_trip(battery: int | None, rsrp: int | None, ecl: int | None,
                            cell: int | None) -> None:  # fmt: skip
    """encode -> decode gives back every figure sent, and nothing for the absent ones."""
    figures = ModemHealth(battery, rsrp, None, ecl, cell)
    extra = _one(encode_interval(ADDRESS, BASE_T, 0, DELTAS, 0, figures))
    sent = {"battery_mv": battery, "rsrp_cdbm": rsrp, "ecl": ecl, "cell_id": cell}
    assert {k: extra.get(k) for k in sent} == sent


VECTORS = Path(__file__).parents[2] / ".." / "shared" / "vectors"


def _status_vectors() -> list[object]:
    path = VECTORS / "wmbus_wmbusmeters.jsonl"
    if not path.is_file():
        reason = f"{path} absent: shared vector tests skipped (golden frames above still run)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    out = []
    for n, line in enumerate(path.read_text().splitlines()):
        v = json.loads(line)
        if isinstance((v.get("expected") or {}).get("status"), str):
            out.append(pytest.param(v, id=f"wmbus:{n}"))
    return out


@pytest.mark.parametrize("vector", _status_vectors())
def test_wmbusmeters_power_low_is_battery_low(vector: dict) -> None:
    """Real telegrams: battery_low is true exactly where wmbusmeters reports POWER_LOW."""
    keys = {"*": bytes.fromhex(vector["key"])} if vector.get("key") else None
    dec = decode_batch([bytes.fromhex(vector["hex"])], RX, keys=keys)
    if dec.error_code[0] != ErrorCode.OK:
        pytest.skip(f"not decoded here: {dec.error_message[0]}")
    extra = dec.extra_of(0)
    if "battery_low" not in extra:
        assert "driver" in extra, "only a driver file's frame may say nothing about it"
        pytest.skip(f"driver {extra['driver']} declares no low-battery bit")
    assert extra["battery_low"] is ("POWER_LOW" in vector["expected"]["status"])


def test_driver_file_frames_carry_what_their_driver_declares() -> None:
    """ACME NB-1 (a driver declaring low_battery): battery_low from its status and its own
    battery_v / rsrp_dbm fields; nothing about meter errors, which it does not declare."""
    extra = _one(bytes.fromhex("AC4E0186001234567887D61200804F1200807E0E6B00001C0EA13A39"))
    assert extra["battery_low"] is False
    assert "meter_error" not in extra
    assert str(extra["battery_v"]) == "3.612"
    assert extra["rsrp_dbm"] == -95
