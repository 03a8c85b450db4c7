"""M-Bus / OMS decoder against the shared real-frame vectors (libmbus and wmbusmeters).

Every line of both files is decoded (one batch per file, one shared signature cache, the
keys the vectors give). Frames that need a vendor codec or carry non-standard data are
skipped with a reason naming the driver; `test_skip_census` counts them by driver.
"""

from __future__ import annotations

import json
from collections import Counter
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from decoder import drivers, mbus
from decoder.columns import Decoded, ErrorCode, Flag, FrameFlag

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors"
pytestmark = pytest.mark.skipif(
    not VECTORS.is_dir(), reason=f"shared vectors not found at {VECTORS} (outside the repo)"
)
LIBMBUS, WMBUS = "mbus_libmbus.jsonl", "wmbus_wmbusmeters.jsonl"

# drivers whose expected target_m3 is not the lowest-storage volume register (driver choice)
TARGET_ELSEWHERE = {
    "qwaterv2": "qwaterv2 reads target_m3 from storage 17 (half-month register)",
    "uiws": "uiws reads target_m3 from storage 30; storage 1 holds 0x80000000 (no value)",
}


# wmbusmeters prints M-Bus "no data" markers as numbers: 4413 00000080 as -2147483.648 m3,
# 4413 FFFFFFFF as -0.001 m3, Zenner's BCD 8C0413 00000080 as 80000 m3; for us they are
# absent (FrameFlag.NO_DATA), never readings
NO_DATA_M3 = frozenset({Decimal("-2147483.648"), Decimal("-0.001"), Decimal(80000)})
UNDATED = (None, "2000-00-00")  # a billing date of FFFF / 0000: no billing reading


def _lines(name: str) -> list[dict[str, Any]]:
    """All vector lines of one file."""
    with (VECTORS / name).open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _key(raw: str) -> bytes:
    """A vector's hex key; 8-byte keys are doubled (wmbusmeters' Diehl default convention)."""
    key = bytes.fromhex(raw)
    return key * 2 if len(key) == 8 else key


@cache
def _decoded(name: str) -> tuple[list[dict[str, Any]], Decoded]:
    """Decode a whole vector file as one batch with its keys and a shared cache."""
    lines = _lines(name)
    keys = {
        (v["expected"].get("id") or v.get("meter_id_arg")): _key(v["key"])
        for v in lines
        if v.get("key")
    }
    frames = [bytes.fromhex(v["hex"]) for v in lines]
    received = np.full(len(frames), 1_900_000_000, np.int64)  # after every vector's clock
    return lines, mbus.decode(frames, received, keys, mbus.SignatureCache())


def skip_reason(v: dict[str, Any]) -> str | None:
    """Why a wmbusmeters vector is outside standard EN 13757-3 decoding, or None."""
    if drivers.claims(bytes.fromhex(v["hex"])):  # a driver file decodes it (vendor data)
        return None
    head, drv = v.get("derived_header", {}), v.get("driver", "?")
    ci, mode = head.get("CI", ""), head.get("sec_mode")
    check = v.get("generic_decoder_check", {})
    if ci and 0xA0 <= int(ci, 16) <= 0xB7:
        return f"{drv}: proprietary CI {ci} needs the {drv} vendor codec"
    if mode == 3:
        return f"{drv}: DES security mode {mode} (obsolete, not decoded)"
    if mode is not None and mode >= 16:
        return f"{drv}: manufacturer security mode {mode} needs the {drv} codec"
    if drv == "zenner0b" or (drv == "qwaterv2" and ci == "78"):
        return f"{drv}: total sits in manufacturer records (0F / 0DFF5F), {drv} codec"
    if drv == "flowiq2200" and check.get("status", "").startswith("non-standard"):
        return "flowiq2200: synthetic compact telegram with a stale data CRC"
    return None


def _volumes(extra: dict[str, object]) -> set[Decimal]:
    """Every volume value a frame's extras carry."""
    return {
        Decimal(str(v))
        for k, v in extra.items()
        if ("volume_m3" in k or k in ("total_m3", "target_m3")) and not isinstance(v, str)
    }


def _wm_cases() -> list[Any]:
    """One pytest param per wmbusmeters line."""
    if not VECTORS.is_dir():
        return []
    return [pytest.param(i, id=f"{i:03d}-{v.get('driver')}") for i, v in enumerate(_lines(WMBUS))]


def _lm_cases() -> list[Any]:
    """One pytest param per libmbus line."""
    if not VECTORS.is_dir():
        return []
    return [
        pytest.param(i, id=f"{i:02d}-{Path(v['source'].split(' ')[0]).stem}")
        for i, v in enumerate(_lines(LIBMBUS))
    ]


@pytest.mark.parametrize("i", _wm_cases())
def test_wmbusmeters_vector(i: int) -> None:
    """wmbusmeters frame i decodes to the total_m3 / target_m3 the driver test expects."""
    lines, res = _decoded(WMBUS)
    v = lines[i]
    reason = skip_reason(v)
    if reason:
        pytest.skip(reason)
    exp, extra = v["expected"], res.extra[i]
    assert res.error_code[i] == ErrorCode.OK, res.error_message[i]
    assert res.address_of_frame[i] == exp["id"]
    if "total_m3" in exp:
        assert Decimal(str(extra["total_m3"])) == Decimal(str(exp["total_m3"]))
        current = res.register_ml[(res.frame_index == i) & ~(res.flags & Flag.BILLING_DATE > 0)]
        assert current.tolist() == [int(Decimal(str(exp["total_m3"])) * 1_000_000)]
    billing = res.register_ml[(res.frame_index == i) & (res.flags & Flag.BILLING_DATE > 0)]
    if "target_m3" in exp and Decimal(str(exp["target_m3"])) in NO_DATA_M3:
        assert "target_m3" not in extra
        assert billing.tolist() == []
        assert res.frame_flags_or_zero[i] & FrameFlag.NO_DATA
    elif "target_m3" in exp and exp.get("target_date", "") in UNDATED:
        assert Decimal(str(extra["target_m3"])) == Decimal(str(exp["target_m3"]))
        assert billing.tolist() == [], "a billing value without a valid date is no reading"
        assert res.frame_flags_or_zero[i] & FrameFlag.BILLING_UNDATED
    elif "target_m3" in exp:
        want = Decimal(str(exp["target_m3"]))
        if v.get("driver") in TARGET_ELSEWHERE:
            assert want in _volumes(extra), TARGET_ELSEWHERE[v["driver"]]
        else:
            assert Decimal(str(extra["target_m3"])) == want
            assert billing.tolist() == [int(want * 1_000_000)]
    if "total_m3" not in exp and "target_m3" not in exp:
        assert extra, "a frame with no expected register still decodes its records"


@pytest.mark.parametrize("i", _lm_cases())
def test_libmbus_vector(i: int) -> None:
    """libmbus frame i: total, billing volume and every volume record match libmbus' XML."""
    lines, res = _decoded(LIBMBUS)
    v = lines[i]
    records = v["expected"]["records"]
    exp_id = v["expected"]["slave"]["Id"]
    assert res.address_of_frame[i].lstrip("0") == exp_id.lstrip("0")
    if "StorageNumber" not in records[0]:  # EN 1434-3 fixed data structure (CI 73)
        assert res.error_code[i] == ErrorCode.OK, res.error_message[i]
        assert res.register_ml[res.frame_index == i].tolist() == [1000, 135000]  # 1 l, 135 l
        return
    volumes = [
        (int(r["StorageNumber"]), Decimal(r["Value"]))
        for r in records
        if r["Quantity"] == "Volume" and r["Function"] == "Instantaneous value"
    ]
    if not volumes:
        assert res.error_code[i] == ErrorCode.NO_REGISTER
        return
    assert res.error_code[i] == ErrorCode.OK, res.error_message[i]
    extra = res.extra[i]
    current = [val for s, val in volumes if s == 0]
    if current:
        assert Decimal(str(extra["total_m3"])) == current[0]
    stored = [s for s, _ in volumes if s > 0]
    if stored:
        billing = [val for s, val in volumes if s == min(stored)]
        assert Decimal(str(extra["target_m3"])) == billing[0]
    assert {val for _, val in volumes} <= _volumes(extra)


def test_skip_census() -> None:
    """Skipped wmbusmeters vectors are only vendor / non-standard ones, counted by driver."""
    lines, _ = _decoded(WMBUS)
    by_driver = Counter(v.get("driver") for v in lines if skip_reason(v))
    checked = sum(1 for v in lines if not skip_reason(v))
    print(f"\nwmbusmeters: {checked} checked, {sum(by_driver.values())} skipped: {by_driver}")
    assert checked >= 60
    assert set(by_driver) <= {
        "actislink", "apator08", "apator172", "apatorna1", "izarv2", "izar", "mkradio3",
        "mkradio4", "zenner0b", "qwaterv2", "rfmtx1", "kamwater",
        "engelmann-faw", "flowiq2200",
    }  # fmt: skip


def test_compact_vectors_use_learned_formats() -> None:
    """Kamstrup compact frames in the corpus decode through formats learned in the batch."""
    lines, res = _decoded(WMBUS)
    compact = [
        i
        for i, v in enumerate(lines)
        if v.get("driver") == "multical21"
        and v["generic_decoder_check"]["status"].startswith("non")
    ]
    assert compact
    assert all(res.error_code[i] == ErrorCode.OK for i in compact)
