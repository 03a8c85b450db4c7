"""M-Bus / OMS per-record robustness: a readable current register keeps its frame.

Each tolerated oddity (trailing junk, a cut-short record, an L field a few bytes off, a
declared security mode on a clear payload, "no data" markers, a record named like a link
field) has its own case with the `FrameFlag` it sets. The property test at the end
mutates every shared vector whose total we read and checks that the current register is
then either the expected one or absent/refused, never another value.
"""

from __future__ import annotations

import json
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decoder import decode_batch, mbus
from decoder.columns import Decoded, ErrorCode, Flag, FrameFlag, frame_flag_names
from decoder.encode_cjt188 import encode_cjt188
from decoder.mbus_encode import id_field, manufacturer_field
from decoder.view import records

T0 = 1_700_000_000
TOTAL = "0C1378563412"  # BCD 12345678 L = 12345.678 m3, storage 0
TOTAL_ML = 12_345_678_000


def _wm(records_hex: str, ci: int = 0x78, *, tpl: bytes = b"") -> bytes:
    """A CRC-stripped wM-Bus frame ABC 12345678 with `ci`, `tpl` header and records."""
    body = b"\x44" + manufacturer_field("ABC") + id_field("12345678") + b"\x01\x07"
    body += bytes([ci]) + tpl + bytes.fromhex(records_hex)
    return bytes([len(body)]) + body


def _one(frame: bytes, keys: dict[str, bytes] | None = None) -> Decoded:
    """`frame` decoded alone, received at T0."""
    return mbus.decode([frame], np.full(1, T0, np.int64), keys)


def _current(res: Decoded, i: int = 0) -> list[int]:
    """The current (non-billing) register readings of frame i, in mL."""
    mine = (res.frame_index == i) & (res.flags & Flag.BILLING_DATE == 0)
    return [int(v) for v in res.register_ml[mine]]


def _notes(res: Decoded, i: int = 0) -> FrameFlag:
    return FrameFlag(int(res.frame_flags_or_zero[i]))


@pytest.mark.parametrize(
    ("tail", "flag"),
    [
        ("FED0", FrameFlag.TRAILING_JUNK),  # qwaterv2: DIF+DIFE, then nothing
        ("FFFF", FrameFlag.TRAILING_JUNK),  # special DIF 0xFF
        ("2F2F2F0412", FrameFlag.TRAILING_JUNK),  # bytes after the closing fillers
        ("0413E803", FrameFlag.CUT_RECORD),  # a last record cut short
    ],
)
def test_total_survives_trailing_damage(tail: str, flag: FrameFlag) -> None:
    """A total followed by junk or a cut-short record is read, with the frame flag."""
    res = _one(_wm(TOTAL + tail))
    assert res.error_code.tolist() == [ErrorCode.OK], res.error_message[0]
    assert _current(res) == [TOTAL_ML]
    assert _notes(res) == flag


def test_junk_records_after_fillers_never_become_fields() -> None:
    """Bytes after the closing 2F padding are not walked: no `volume_m3_max` of junk."""
    res = _one(_wm(TOTAL + "2F2F" + "1213CBFF"))
    assert "volume_m3_max" not in res.extra[0]
    assert _current(res) == [TOTAL_ML]


def test_negative_max_volume_is_left_out() -> None:
    """A max / at-error volume below zero (itron `7413 FEFEFEFE`) is junk: left out."""
    res = _one(_wm(TOTAL + "1213CBFF" + "7413FEFEFEFE"))
    assert "volume_m3_max" not in res.extra[0]
    assert "volume_m3_at_error_storage1" not in res.extra[0]
    assert _notes(res) == FrameFlag.RECORD_DROPPED
    assert _current(res) == [TOTAL_ML]


def test_junk_before_any_register_still_refuses() -> None:
    """Damage before the register leaves nothing to read: refused, saying what is wrong."""
    res = _one(_wm("FFFF" + TOTAL))
    assert res.error_code.tolist() == [ErrorCode.BAD_RECORD]
    assert "special DIF 0xFF" in res.error_message[0]


@pytest.mark.parametrize("extra", [1, 2, 5])
def test_l_field_off_by_a_few_bytes_is_read_as_received(extra: int) -> None:
    """An L field short of the frame (RSSI/CRC bytes appended) reads the total, flagged."""
    frame = _wm(TOTAL) + b"\xff" * extra
    assert mbus.looks_like(frame)
    res = _one(frame)
    assert _current(res) == [TOTAL_ML]
    assert _notes(res) == FrameFlag.LENGTH_MISMATCH | FrameFlag.TRAILING_JUNK


def test_declared_security_on_clear_payload() -> None:
    """Mode 5 or 2 (no key) or mode 3 declared on a 2F2F payload: read in clear, flagged;
    an encrypted one without its key is refused (NO_KEY; mode 3 is not decrypted)."""
    for mode in (5, 2, 3):
        tpl = bytes([0x01, 0x00, 0x00, mode])  # ACC, STS, CW (mode in CW bits 8-12)
        res = _one(_wm("2F2F" + TOTAL, ci=0x7A, tpl=tpl))
        assert _current(res) == [TOTAL_ML]
        assert _notes(res) == FrameFlag.CLEAR_PAYLOAD
    for mode, code in ((2, ErrorCode.NO_KEY), (3, ErrorCode.UNSUPPORTED)):
        encrypted = _one(_wm("1234" + TOTAL, ci=0x7A, tpl=bytes([1, 0, 0, mode])))
        assert encrypted.error_code.tolist() == [code]


def test_clear_payload_despite_a_key() -> None:
    """Mode 5 with a key whose decryption loses 2F2F, on a clear 2F2F payload: clear."""
    frame = _wm("2F2F" + TOTAL + "2F" * 10, ci=0x7A, tpl=bytes([1, 0, 0x10, 5]))
    res = _one(frame, keys={"12345678": bytes(16)})
    assert _current(res) == [TOTAL_ML]
    assert _notes(res) == FrameFlag.CLEAR_PAYLOAD
    # 2F2F alone is not proof: records that do not walk to the end are a wrong key's noise
    noisy = _wm("2F2F" + TOTAL + "FFFF" + "00" * 8, ci=0x7A, tpl=bytes([1, 0, 0x10, 5]))
    assert _one(noisy, keys={"12345678": bytes(16)}).error_code.tolist() == [
        ErrorCode.DECRYPT_FAILED
    ]


@pytest.mark.parametrize(
    ("billing", "flag"),
    [
        ("441300000080" + "426C1F0C", FrameFlag.NO_DATA),  # int32 sign only
        ("4413FFFFFFFF" + "426CFFFF", FrameFlag.NO_DATA),  # all ones, date FFFF
        ("4C1300000080" + "426C1F0C", FrameFlag.NO_DATA),  # Zenner BCD 00..80
        ("4C13FFFFFFFF" + "426C1F0C", FrameFlag.NO_DATA),  # BCD all F
        ("4C13AA000000" + "426C1F0C", FrameFlag.RECORD_DROPPED),  # BCD hex digit
        ("4C1301000000" + "426CFFFF", FrameFlag.NO_DATA | FrameFlag.BILLING_UNDATED),
    ],
)
def test_no_data_billing_register_is_absent(billing: str, flag: FrameFlag) -> None:
    """A billing register holding "no data" or bad digits (or an undated one) is no
    reading and no number, and the current total stays."""
    res = _one(_wm(TOTAL + billing))
    assert res.error_code.tolist() == [ErrorCode.OK]
    assert res.register_ml.tolist() == [TOTAL_ML]
    assert _notes(res) == flag
    if flag & FrameFlag.BILLING_UNDATED:
        assert res.extra[0]["target_m3"] == Decimal("0.001")  # the value, not a reading
    else:
        assert "target_m3" not in res.extra[0]


def test_no_data_current_register() -> None:
    """A current register of 0x80000000 is no reading: with a dated billing register the
    frame keeps that one; alone, the frame is NO_REGISTER."""
    res = _one(_wm("041300000080" + "4413E8030000426C1F0C"))
    assert res.register_ml.tolist() == [1_000_000]
    assert res.flags[0] & Flag.BILLING_DATE
    assert _notes(res) == FrameFlag.NO_DATA
    alone = _one(_wm("041300000080"))
    assert alone.error_code.tolist() == [ErrorCode.NO_REGISTER]


def test_other_no_data_records_are_absent() -> None:
    """A temperature of 0x8000 and a date of FFFF are absent, not -327.68 C or a date."""
    res = _one(_wm(TOTAL + "02590080" + "026CFFFF"))
    extra = res.extra[0]
    assert "flow_temperature_c" not in extra
    assert "date" not in extra
    assert _notes(res) == FrameFlag.NO_DATA


def test_data_record_never_overwrites_link_access_number() -> None:
    """`01FD08 80` after a TPL access number of 12 is `access_number_record` 128."""
    res = _one(_wm("2F2F01FD0880" + TOTAL, ci=0x7A, tpl=bytes([12, 0, 0, 0])))
    extra = res.extra[0]
    assert extra["access_number"] == 12
    assert extra["access_number_record"] == 128
    assert _notes(res) == FrameFlag.LINK_FIELD_KEPT


def test_view_names_the_frame_flags() -> None:
    """`nbmeter decode`'s JSON lists the frame flags by name."""
    res = decode_batch([_wm(TOTAL + "FED0")], T0)
    assert records(res)[0]["decode_flags"] == ["trailing_junk"]
    assert frame_flag_names(int(FrameFlag.NO_DATA | FrameFlag.CUT_RECORD) | 1 << 30) == [
        "no_data",
        "cut_record",
        "bit30",
    ]


def test_flags_survive_the_dispatch_merge() -> None:
    """Frame flags come back through decode_batch's per-format merge, in input order."""
    cjt = encode_cjt188(address="78330011223344", total_ml=556_677_000_000)
    frames = [cjt, _wm(TOTAL + "FFFF"), _wm(TOTAL)]
    res = decode_batch(frames, T0)
    assert res.frame_flags_or_zero.tolist() == [0, FrameFlag.TRAILING_JUNK, 0]


# --- property: mutated shared vectors never yield a wrong current total ------------------

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors"
WMBUS, LIBMBUS = "wmbus_wmbusmeters.jsonl", "mbus_libmbus.jsonl"


def _key(raw: str) -> bytes:
    key = bytes.fromhex(raw)
    return key * 2 if len(key) == 8 else key


@cache
def _corpus() -> tuple[tuple[bytes, int, dict[str, bytes], int], ...]:
    """(frame, expected current mL, keys, shortest prefix that still reads it) of every
    shared M-Bus vector whose current total we read right today."""
    out: list[tuple[bytes, int, dict[str, bytes], int]] = []
    for name in (WMBUS, LIBMBUS):
        lines = [json.loads(x) for x in (VECTORS / name).read_text().splitlines() if x.strip()]
        keys = {
            (v["expected"].get("id") or v.get("meter_id_arg")): _key(v["key"])
            for v in lines
            if v.get("key")
        }
        frames = [bytes.fromhex(v["hex"]) for v in lines]
        res = decode_batch(frames, T0, keys=keys, compact_cache=_cache())
        for i, v in enumerate(lines):
            want = _expected_ml(v)
            if want is None or _current(res, i) != [want]:
                continue
            out.append((frames[i], want, keys, _shortest(frames[i], want, keys)))
    return tuple(out)


def _expected_ml(v: dict[str, Any]) -> int | None:
    """The vector's expected current total in mL (wmbusmeters `total_m3`; libmbus: the
    first storage-0 instantaneous volume, in m3), or None."""
    exp = v["expected"]
    if "total_m3" in exp:
        return int(Decimal(str(exp["total_m3"])) * 1_000_000)
    for r in exp.get("records", []):
        if (r.get("Quantity"), r.get("Function"), r.get("StorageNumber")) == (
            "Volume", "Instantaneous value", "0",
        ):  # fmt: skip
            return int(Decimal(r["Value"]) * 1_000_000)
    return None


@cache
def _cache_entries() -> dict[str, str]:
    """The signature cache learned from every full frame of the shared wM-Bus file."""
    lines = [json.loads(x) for x in (VECTORS / WMBUS).read_text().splitlines() if x.strip()]
    learned = mbus.SignatureCache()
    decode_batch([bytes.fromhex(v["hex"]) for v in lines], T0, compact_cache=learned)
    return learned.to_dict()


def _cache() -> mbus.SignatureCache:
    """A fresh copy of the learned cache (decoding updates a cache in place)."""
    return mbus.SignatureCache.from_dict(_cache_entries())


def _body(frame: bytes) -> bytes:
    """The part of a frame a mutation edits: C..data of a wired frame, else all of it."""
    return frame[4:-2] if frame[:1] == b"\x68" else frame


def _frame(wired: bool, body: bytes, fix_length: bool) -> bytes:
    """A frame around an edited `body`: a wired one gets its L and checksum made right,
    a wireless one its L if `fix_length`."""
    if wired:
        n = len(body) & 0xFF
        return bytes([0x68, n, n, 0x68]) + body + bytes([sum(body) & 0xFF, 0x16])
    return bytes([len(body) - 1]) + body[1:] if fix_length and body else body


def _shortest(frame: bytes, want: int, keys: dict[str, bytes]) -> int:
    """The shortest prefix of `frame`'s body (L, checksum fixed up) that still reads
    `want`; the whole body when none does (encrypted, compact)."""
    wired, body = frame[:1] == b"\x68", _body(frame)
    sizes = range(10, len(body))
    cuts = [_frame(wired, body[:n], fix_length=True) for n in sizes]
    res = decode_batch(cuts, T0, keys=keys, compact_cache=_cache())
    return next((n for j, n in enumerate(sizes) if _current(res, j) == [want]), len(body))


def _mutate(frame: bytes, start: int, data: st.DataObject) -> bytes:
    """One structural mutation of `frame` that leaves its body before `start` alone."""
    wired, body = frame[:1] == b"\x68", bytearray(_body(frame))
    kind = data.draw(st.sampled_from(["flip", "cut", "append", "marker", "length", "mode"]))
    if kind == "mode" and not wired and body[10] == 0x7A and len(body) > 15:
        # a short TPL's CW: the security mode sits in bits 0-4 of its second byte
        body[14] = (body[14] & 0xE0) | data.draw(st.integers(0, 31))
    if kind == "flip" and start < len(body):
        at = data.draw(st.integers(start, len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    elif kind == "cut" and start < len(body):
        del body[data.draw(st.integers(start, len(body) - 1)) :]
    elif kind == "append":
        body += data.draw(st.sampled_from([b"\xfe\xd0", b"\xff\xff", b"\x2f\x2f\x04", b""]))
        body += data.draw(st.binary(max_size=6))
    elif kind == "marker" and start + 4 <= len(body):
        at = data.draw(st.integers(start, len(body) - 4))
        marker = data.draw(st.sampled_from([b"\x00\x00\x00\x80", b"\xff" * 4, b"\x00\x80"]))
        body[at : at + len(marker)] = marker
    if kind == "length" and not wired:
        body[0] = data.draw(st.integers(0, 255))
        return bytes(body)
    return _frame(wired, bytes(body), fix_length=data.draw(st.booleans()))


@pytest.mark.skipif(not VECTORS.is_dir(), reason=f"shared vectors not found at {VECTORS}")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_vectors_never_yield_a_wrong_total(data: st.DataObject) -> None:
    """Any damage after a vector's current total (flipped bytes, a cut, junk appended,
    no-data markers), a wrong L field or another declared security mode leaves that total
    right or absent/refused."""
    corpus = _corpus()
    assert len(corpus) >= 65
    frame, want, keys, start = data.draw(st.sampled_from(corpus))
    mutated = _mutate(frame, start, data)
    res = decode_batch([mutated], T0, keys=keys, compact_cache=_cache())
    assert set(_current(res)) <= {want}, (mutated.hex(), res.error_message[0])
    assert not set(res.register_ml.tolist()) & {-2_147_483_648_000, 80_000_000_000}


def test_wired_frame_with_trailing_junk_keeps_its_total() -> None:
    """A wired long frame (checksum right) with FED0 after its records reads the total."""
    frame = mbus.encode_wired("87654321", "ACW", 0x14, 0x07, 3, 54_321_000)
    body = frame[4:-2] + bytes.fromhex("FED0")
    n = len(body)
    wired = bytes([0x68, n, n, 0x68]) + body + bytes([sum(body) & 0xFF, 0x16])
    res = _one(wired)
    assert res.format.tolist() == ["mbus_wired"]
    assert _current(res) == [54_321_000]
    assert _notes(res) == FrameFlag.TRAILING_JUNK
