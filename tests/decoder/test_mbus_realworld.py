"""M-Bus / OMS cases found by decoding real telegrams of other meter models.

Each case reproduces, with frames built here (EN 13757-3/-4 records by hand or
`decoder.mbus_encode`), the structure of a real telegram that was decoded wrong, lost
its register or raised. The rule each one holds: a frame may be refused, but a value it
reports is the meter's, and a bad or unknown secondary record never costs the register.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

from decoder import decode_batch, mbus
from decoder.columns import Decoded, ErrorCode, Flag, FrameFlag
from decoder.mbus_encode import encode_oms_mode5, encode_oms_plain, id_field, manufacturer_field
from decoder.mbus_link import crc16_en13757

T0 = 1_700_000_000
WHEN = datetime(2023, 11, 14, 12, 0, tzinfo=UTC)
TOTAL = "0C1378563412"  # BCD 12345678 L = 12345.678 m3, storage 0
TOTAL_ML = 12_345_678_000


def _wm(
    records_hex: str, ci: int = 0x78, *, tpl: bytes = b"", man: str = "ABC", vt: bytes = b"\x01\x07"
) -> bytes:
    """A CRC-stripped wM-Bus frame 12345678 of `man` (version, type `vt`) with records."""
    body = b"\x44" + manufacturer_field(man) + id_field("12345678") + vt
    body += bytes([ci]) + tpl + bytes.fromhex(records_hex)
    return bytes([len(body)]) + body


def _padded(length: int, man: str = "ABC") -> bytes:
    """A frame of `length` bytes: the total, then manufacturer data (0F) filling it up."""
    frame = _wm(TOTAL + "0F", man=man)
    return _wm(TOTAL + "0F" + "00" * (length - len(frame)), man=man)


def _current(res: Decoded, i: int = 0) -> list[int]:
    """The current (non-billing) register readings of frame i, in mL."""
    mine = (res.frame_index == i) & (res.flags & Flag.BILLING_DATE == 0)
    return [int(v) for v in res.register_ml[mine]]


def test_wmbus_frame_of_92_bytes_is_not_a_senml_json_pack() -> None:
    """L = 0x5B is "[": a 92-byte wM-Bus frame (Kamstrup heat, eBZ electricity) was taken
    for a SenML JSON pack and refused BAD_RECORD; it is M-Bus and keeps its register."""
    frame = _padded(92)
    assert frame[:2] == b"[D"
    res = decode_batch([frame], T0)
    assert res.error_code.tolist() == [ErrorCode.OK], res.error_message[0]
    assert res.format[0] == mbus.FORMAT_WIRELESS
    assert _current(res) == [TOTAL_ML]


def test_wmbus_frame_of_153_bytes_is_not_a_senml_cbor_pack() -> None:
    """L = 0x98 is a CBOR array head whose count (C = 0x44, 68 records) does not fit the
    frame; with a Diehl M field (A5 11) the next byte is a CBOR map head."""
    frame = _padded(153, man="DME")
    assert frame[0] == 0x98
    assert 0xA1 <= frame[2] <= 0xB9
    res = decode_batch([frame], T0)
    assert res.error_code.tolist() == [ErrorCode.OK], res.error_message[0]
    assert res.format[0] == mbus.FORMAT_WIRELESS
    assert _current(res) == [TOTAL_ML]


def test_senml_packs_are_still_detected() -> None:
    """JSON packs (any value after "[") and CBOR packs that fit are still SenML."""
    packs = [
        b'[{"n":"urn:m:1","u":"m3","v":1,"t":1700000000}]',
        b' [ {"n":"urn:m:1","u":"m3","v":1,"t":1700000000}]',
        b"\x81\xa3\x00\x67urn:m:1\x01\x62m3\x02\x01",
    ]
    res = decode_batch(packs, T0)
    assert res.format.tolist() == ["senml"] * 3
    assert res.error_code.tolist() == [ErrorCode.OK] * 3


QUNDIS_WALKBY = (  # CI 78, one 0DFF5F record of 53 bytes: the total (BCD) at offset 16
    "0DFF5F3500824E00007F0007C113FFFF63961300DF2C82731200FE246381130000000000000000"
    "0000000000000000000000000000000000002F046D0211F225"
)


def test_qundis_walkby_of_a_heat_cost_allocator_is_not_a_water_total() -> None:
    """Qundis heat cost allocators (type 08) send the water meters' walk-by record with HCA
    units where the litres sit: 97 units were reported as a total of 0.097 m3."""
    water = _wm(QUNDIS_WALKBY, man="QDS", vt=b"\x16\x06")
    hca = _wm(QUNDIS_WALKBY, man="QDS", vt=b"\x34\x08")
    res = decode_batch([water, hca], T0)
    assert res.error_code[0] == ErrorCode.OK
    assert _current(res, 0) == [139_663_000]
    assert res.error_code[1] != ErrorCode.OK
    assert _current(res, 1) == []


def test_wmbus_frame_of_105_bytes_is_not_a_wired_frame() -> None:
    """L = 0x68 is the wired start byte: a 105-byte wireless frame was parsed as a wired
    long frame and refused BAD_START_STOP; only 68 L L 68 is wired."""
    frame = _padded(105)
    assert frame[0] == 0x68
    res = decode_batch([frame], T0)
    assert res.error_code.tolist() == [ErrorCode.OK], res.error_message[0]
    assert res.format[0] == mbus.FORMAT_WIRELESS
    assert _current(res) == [TOTAL_ML]


def _crc(data: bytes) -> bytes:
    """EN 13757-4 CRC-16 as sent on air (big-endian)."""
    return crc16_en13757(data).to_bytes(2, "big")


def _format_a(frame: bytes) -> bytes:
    """`frame` as a format A telegram: a CRC after the first 10 bytes and every 16 after."""
    blocks = [frame[:10]] + [frame[i : i + 16] for i in range(10, len(frame), 16)]
    return b"".join(b + _crc(b) for b in blocks)


def _format_b(frame: bytes) -> bytes:
    """`frame` (over 125 bytes) as a format B telegram: a CRC after byte 126 and at the
    end, both counted by L."""
    body = frame[1:126] + _crc(bytes([len(frame) + 3]) + frame[1:126]) + frame[126:]
    out = bytes([len(body) + 2]) + body
    return out + _crc(out[128:])


def test_link_crcs_are_checked_and_removed() -> None:
    """A telegram handed over with its data-link CRCs (format A: one after the first 10
    bytes, then every 16) decodes as without them; left in, a CRC byte read as the CI
    turned the records into junk (billing registers of 1,989,766 m3 in 0.7 % of frames)."""
    frames = [
        encode_oms_plain(
            f"{i:08d}",
            "KAM",
            0x1B,
            0x16,
            i,
            ml,
            WHEN,
            target_ml=ml - 1000,
            target_date=date(2023, 12, 31),
        )
        for i, ml in enumerate(range(1_000_000, 41_000_000, 1_000_000), 1)
    ]
    plain = decode_batch(frames, T0)
    with_crcs = decode_batch([_format_a(f) for f in frames], T0)
    assert (with_crcs.error_code == ErrorCode.OK).all()
    assert with_crcs.register_ml.tolist() == plain.register_ml.tolist()
    assert with_crcs.read_at_s.tolist() == plain.read_at_s.tolist()
    assert (with_crcs.frame_flags_or_zero & FrameFlag.LINK_CRCS_REMOVED).all()
    broken = bytearray(_format_a(frames[0]))
    broken[-3] ^= 0x01  # a data bit the last CRC covers
    assert decode_batch([bytes(broken)], T0).n_readings == 0


def test_format_b_crc_inside_a_long_frame_is_removed() -> None:
    """Format B puts a CRC at bytes 126-127 of a longer frame: here it would split the
    total's value bytes; checked and removed, the total reads right."""
    head = "".join(f"0259{i:02X}00" for i in range(27))  # 27 temperature records
    frame = _wm("2F" * 2 + head + TOTAL, ci=0x7A, tpl=bytes([1, 0, 0, 0]))
    assert frame.index(bytes.fromhex(TOTAL)) < 126 < frame.index(bytes.fromhex(TOTAL)) + 6
    on_air = _format_b(frame)
    assert on_air[0] == len(on_air) - 1
    res = decode_batch([on_air], T0)
    assert res.error_code.tolist() == [ErrorCode.OK], res.error_message[0]
    assert _current(res) == [TOTAL_ML]
    assert res.frame_flags_or_zero[0] & FrameFlag.LINK_CRCS_REMOVED


def test_bytes_past_the_l_field_are_not_records() -> None:
    """Bytes a receiver appends past the meter's L (RSSI, LQI) are not read as records:
    `41 10 00` after an encrypted frame became a billing register of 0 mL."""
    key = bytes(range(16))
    frame = encode_oms_mode5("12345678", "KAM", 1, 7, 1, 1000, key, WHEN)
    res = decode_batch([frame + bytes.fromhex("411000")], T0, keys={"12345678": key})
    assert res.error_code.tolist() == [ErrorCode.OK], res.error_message[0]
    assert res.register_ml.tolist() == [1000]
    notes = FrameFlag(int(res.frame_flags_or_zero[0]))
    assert notes == FrameFlag.LENGTH_MISMATCH | FrameFlag.TRAILING_JUNK


def test_a_register_with_a_record_error_is_no_value() -> None:
    """EN 13757-3 table 17: a VIFE 15..1C says the record holds no value (no data,
    overflow, underflow, data error): its bytes were read as the current total, flagged
    METER_ERROR but kept; now the record is absent (NO_DATA) and the meter's error shows."""
    alone = decode_batch([_wm("0C9318" + "78563412")], T0)
    assert alone.error_code.tolist() == [ErrorCode.NO_REGISTER]
    assert alone.n_readings == 0
    billing = "4C13" + "00100000" + "426CDF2C"  # 1 m3 on 2022-12-31
    res = decode_batch([_wm("0C9315" + "78563412" + billing)], T0)
    assert res.error_code.tolist() == [ErrorCode.OK]
    assert _current(res) == []
    assert res.register_ml.tolist() == [1_000_000]
    assert res.flags[0] & Flag.BILLING_DATE
    assert res.flags[0] & Flag.METER_ERROR
    assert res.frame_flags_or_zero[0] & FrameFlag.NO_DATA
    assert "total_m3" not in res.extra[0]


def test_vifes_after_an_extension_or_manufacturer_vife_are_no_corrections() -> None:
    """After VIFE FC the next VIFE is a code of the extension table, after FF every VIFE is
    the manufacturer's: `74` there is no factor 10^-2 (an energy of 1 kWh read 0.01)."""
    res = decode_batch([_wm(TOTAL + "0486FC7401000000" + "0486FF7401000000")], T0)
    assert _current(res) == [TOTAL_ML]
    extra = res.extra[0]
    assert extra["energy_kwh_vife_7c74"] == 1
    assert extra["energy_kwh_mfct"] == 1


def test_variable_length_negative_bcd_is_negative() -> None:
    """EN 13757-3 table 5: LVAR D0..D9 is a negative BCD number (C0..C9 a positive one):
    the flow `0D 3B D2 3412` (VIF 3B: l/h) is -3.412 m3/h, it was read as +3.412."""
    res = decode_batch([_wm(TOTAL + "0D3BD21234" + "0D3BC21234")], T0)
    assert _current(res) == [TOTAL_ML]
    assert res.extra[0]["flow_m3h"] == Decimal("-3.412")
    assert res.extra[0]["flow_m3h_2"] == Decimal("3.412")
