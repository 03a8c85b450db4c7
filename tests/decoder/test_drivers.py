"""Driver files: validation with line numbers, golden frames, raw and wM-Bus decoding."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from importlib import resources

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from decoder import decode_batch, drivers, mbus
from decoder.columns import ErrorCode, Flag
from decoder.drivers import DriverError, parse_driver
from decoder.drivers.kernel import to_ml
from decoder.mbus_encode import id_field, manufacturer_field
from decoder.vendors import prios

RX = 1_800_000_000
ACME = bytes.fromhex("AC4E0186001234567887D61200804F1200807E0E6B00001C0EA13A39")
ACME_ALARM = bytes.fromhex("AC4E018600123456793200000000000000857E0E6B1200E40C92B305")
IZAR_SAP = bytes.fromhex("1944304C78563412D401A2011D0013BB24D718E4AD0BD86FA580")
BUILTIN = sorted(
    p.name
    for p in resources.files("decoder.drivers").joinpath("builtin").iterdir()
    if p.name.endswith(".toml")
)


def _acme_text() -> str:
    return resources.files("decoder.drivers").joinpath("builtin/acme_nb1.toml").read_text()


def _crc_modbus(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_driver_golden_frames(name: str) -> None:
    """Every shipped driver loads, and its golden frames (good and refused) decode as stated."""
    text = resources.files("decoder.drivers").joinpath(f"builtin/{name}").read_text()
    driver = parse_driver(text, name)
    drivers.check_examples(driver)  # raises DriverError on any mismatch
    assert driver.examples
    assert driver.name in {d.name for d in drivers.installed()}


def test_every_vendor_driver_carries_a_refused_golden_frame() -> None:
    """Drivers with a check (key, BCD, CRC, order of registers) show a frame it refuses."""
    refusing = {d.name for d in drivers.installed() if any(e.reject for e in d.examples)}
    assert {"izar", "apator_na1", "qundis_walkby", "acme_nb1"} <= refusing


# (text in the ACME driver, its replacement, the line to blame (its start), the message)
MALFORMED = [
    ("[checksum]", "[checksum", "[checksum", "not valid TOML"),
    ('kind = "unix32"', 'kind = "unix64"', 'kind = "unix64"', "unknown kind 'unix64'"),
    ('scale = "0.1"', "scale = 0.1", "scale = 0.1", "scale must be exact"),
    ("width = 6", "widht = 6", "widht = 6", "no key 'widht'"),
    ("at = 25", "at = 40", "at = 40", "ends past max_length"),
    ('flag = "burst"', 'flag = "fire"', 'flag = "fire"', "flag 'fire'"),
    ('current = "total"', 'current = "status"', 'current = "status"', "not a field with a unit"),
    ('kind = "crc16_modbus"', 'kind = "crc32"', 'kind = "crc32"', "checksum kind 'crc32'"),
    ("[driver]", '[transform]\nname = "rot13"\n\n[driver]', 'name = "rot13"', "'rot13'"),
    ("[driver]", "[extras]\nx = 1\n\n[driver]", "[extras]", "unknown table [extras]"),
    ('name = "acme_nb1"', 'name = "ACME"', 'name = "ACME"', "must match"),
]


@pytest.mark.parametrize(("old", "new", "blame", "what"), MALFORMED)
def test_malformed_driver_refused_naming_the_line(
    old: str, new: str, blame: str, what: str
) -> None:
    """A malformed driver file is refused; the message names its line and the fault."""
    text = _acme_text().replace(old, new, 1)
    line = next(i + 1 for i, s in enumerate(text.splitlines()) if s.startswith(blame))
    with pytest.raises(DriverError) as info:
        drivers.load(text, "acme.toml")
    assert str(info.value).startswith(f"acme.toml line {line}: "), str(info.value)
    assert what in str(info.value)


def test_failing_golden_frame_refuses_the_driver_naming_its_line() -> None:
    """A golden frame whose stated total is wrong refuses the whole file, at its line."""
    text = _acme_text().replace('total_m3 = "123.4567"', 'total_m3 = "123.4568"')
    line = text.splitlines().index('total_m3 = "123.4568"') + 1
    with pytest.raises(DriverError, match=r"acme.toml line \d+: example total"):
        drivers.load(text, "acme.toml")
    example_line = next(i + 1 for i, s in enumerate(text.splitlines()) if s == "[[example]]")
    assert example_line < line


def test_installing_another_driver_under_a_taken_name_raises() -> None:
    """Two different drivers may not share a name (as format keys may not)."""
    text = _acme_text().replace('description = "ACME', 'description = "Other ACME')
    with pytest.raises(DriverError, match="already installed"):
        drivers.install(drivers.load(text, "other.toml"))
    same = drivers.installed()[[d.name for d in drivers.installed()].index("acme_nb1")]
    assert drivers.install(same) is same  # the very same driver again: a no-op


def test_raw_driver_through_decode_batch() -> None:
    """ACME NB-1 frames are detected by magic + length and decoded to exact columns."""
    res = decode_batch([ACME, ACME_ALARM], RX)
    assert res.error_code.tolist() == [0, 0]
    assert res.format.tolist() == ["driver", "driver"]
    assert res.address_of_frame.tolist() == ["860012345678", "860012345679"]
    assert res.register_ml.tolist() == [123_456_700, 5_000]
    assert res.extra[0]["billing_day_m3"] == Decimal("120")
    assert res.read_at_s[0] == 1_796_112_000  # 2026-12-01T08:00Z from the frame
    assert res.extra[0]["battery_v"] == Decimal("3.612")
    assert res.extra[0]["rsrp_dbm"] == -95
    assert res.extra[0]["driver"] == "acme_nb1"
    flags = int(res.flags[res.frame_index == 1][0])
    assert flags & Flag.LEAK
    assert flags & Flag.TAMPER
    assert not flags & Flag.BURST


def test_raw_driver_hint_and_checksum() -> None:
    """A `driver:<name>` hint picks the driver; a bad CRC is BAD_CHECKSUM, no reading."""
    bad = ACME[:-2] + b"\x00\x00"
    res = decode_batch([ACME, bad, ACME], RX, hints=["driver:acme_nb1", None, "driver:nope"])
    assert res.error_code.tolist() == [0, ErrorCode.BAD_CHECKSUM, ErrorCode.UNSUPPORTED]
    assert set(res.frame_index.tolist()) == {0}


@given(st.integers(0, 25), st.integers(1, 255))
def test_any_corrupted_byte_is_refused_never_misread(at: int, xor: int) -> None:
    """One corrupted byte anywhere under the CRC: refused (or not claimed), never a total."""
    frame = bytearray(ACME)
    frame[at] ^= xor
    res = decode_batch([bytes(frame)], RX)
    assert res.error_code[0] != ErrorCode.OK
    assert res.n_readings == 0


@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(1_500_000_000, 1_800_000_000),
    st.integers(0, 0x3F),
)
def test_acme_encode_decode_round_trip(total: int, billing: int, when: int, status: int) -> None:
    """Any ACME NB-1 frame built from the spec decodes to exactly its values."""
    body = (
        bytes.fromhex("AC4E01860012345678")
        + total.to_bytes(4, "little")
        + billing.to_bytes(4, "little")
        + when.to_bytes(4, "little")
        + status.to_bytes(2, "little")
        + (3300).to_bytes(2, "little")
        + b"\xa0"
    )
    frame = body + _crc_modbus(body).to_bytes(2, "little")
    res = decode_batch([frame], RX)
    assert res.error_code[0] == ErrorCode.OK
    assert res.register_ml.tolist() == [total * 100]
    assert res.read_at_s.tolist() == [when]
    assert res.extra[0]["billing_day_m3"] * 1_000_000 == billing * 100


def test_mbus_batch_mixes_driver_and_standard_frames_in_order() -> None:
    """Claimed frames go through their driver, the rest through EN 13757-3, in input order."""
    standard = bytes.fromhex(
        "2E44A5119870659930037A060020052F2F0C933E842784060A3B00000A5A5901C4016D3B37DF2CCC01933E24032606"
    )
    res = mbus.decode([standard, IZAR_SAP, b"\x00", IZAR_SAP], np.full(4, RX, np.int64))
    assert res.error_code.tolist()[:2] == [0, 0]
    assert res.error_code[2] != 0
    assert res.error_code[3] == 0
    assert res.extra[0]["total_m3"] == Decimal("6842.784")
    assert res.extra[1]["driver"] == "izar"
    assert res.extra[1]["total_m3"] == Decimal("123.456")
    assert res.address_of_frame.tolist()[1] == "12345678"


def test_prios_keystream_is_its_own_inverse() -> None:
    """Scrambling twice with the same seed gives the plain bytes back (XOR keystream)."""
    seeds = np.array([1, 0xDEADBEEF, 0xFFFFFFFF], np.uint32)
    plain = np.arange(30, dtype=np.uint8).reshape(3, 10)
    stream = prios.keystream(seeds, 10)
    assert ((plain ^ stream) ^ stream == plain).all()
    assert len({bytes(r) for r in stream}) == 3


def test_izar_with_own_key_and_without() -> None:
    """A meter's own 8-byte PRIOS key is tried first; a wrong key is refused, never guessed."""
    res = mbus.decode([IZAR_SAP], np.array([RX]), {"12345678": b"\x01" * 8})
    assert res.error_code[0] == 0  # own key fails the 0x4B check, a default key opens it
    own = bytes.fromhex("39BC8A10E66D83F8")
    res = mbus.decode([IZAR_SAP], np.array([RX]), {"12345678": own * 2})
    assert res.register_ml.tolist() == [123_456_000, 120_001_000]


def test_known_compact_format_decodes_a_first_telegram() -> None:
    """A Kamstrup compact frame decodes with an empty signature cache (known headers)."""
    body = b"\x44" + manufacturer_field("KAM") + id_field("76348799") + b"\x1b\x16\x79"
    frame = body + bytes.fromhex("EDA86AB6710008190000081900007F13")
    frame = bytes([len(frame)]) + frame
    res = mbus.decode([frame], np.array([RX]), None, mbus.SignatureCache())
    assert res.error_code[0] == 0
    assert res.extra[0]["total_m3"] == Decimal("6.408")


@pytest.mark.parametrize(
    ("count", "ml_per_count", "ml"),
    [(3000001, "1000/3", 1_000_000_333), (31, "1000000/3", 10_333_333), (1, "1000/256", 4)],
)
def test_units_not_whole_ml_round_half_up(count: int, ml_per_count: str, ml: int) -> None:
    """1/3 L and 1/256 L counts become the nearest whole mL (exact integers, no floats)."""
    got, fits = to_ml(np.array([count], np.int64), Fraction(ml_per_count))
    assert got.tolist() == [ml]
    assert fits.all()


@given(
    st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.booleans()),
        min_size=1,
        max_size=40,
    )
)
def test_izar_batch_of_random_registers_decodes_exactly(
    rows: list[tuple[int, int, bool]],
) -> None:
    """A batch of PRIOS frames (either default key, random registers) decodes in one call
    to exactly its totals; a last month above the total is refused, never reported."""
    frames, want = [], []
    for i, (total, last, second_key) in enumerate(rows):
        head = bytes.fromhex("44304C") + (10_000_000 + i).to_bytes(4, "little") + b"\xd4\x01\xa2"
        head += bytes.fromhex("011D0013")
        plain = b"\x4b" + total.to_bytes(4, "little") + last.to_bytes(4, "little") + b"\x5e\x39"
        frame = bytearray([len(head) + len(plain)]) + head + bytes(len(plain))
        a = np.frombuffer(bytes(frame), np.uint8)[None, :]
        seed = prios._be32(a, 2) ^ prios._be32(a, 6) ^ prios._be32(a, 10)
        key = prios.key32(bytes.fromhex(prios.DEFAULT_KEYS[second_key]))
        stream = prios.keystream(seed ^ np.uint32(key), len(plain))[0]
        frame[15:] = bytes(p ^ int(k) for p, k in zip(plain, stream, strict=True))
        frames.append(bytes(frame))
        want.append(None if last > total else (total * 1000, last * 1000))
    res = mbus.decode(frames, np.full(len(frames), RX, np.int64))
    for i, expected in enumerate(want):
        got = res.register_ml[res.frame_index == i].tolist()
        if expected is None:
            assert res.error_code[i] == ErrorCode.BAD_RECORD
            assert got == []
        else:
            assert res.error_code[i] == 0
            assert got == list(expected)


def test_a_tenants_driver_applies_only_in_its_scope() -> None:
    """A driver installed for a tenant decodes only within `scope(tenant)`, before the
    shipped one of the same name; outside it (no scope, another tenant) the shipped
    driver decodes, and the tenant's driver is not listed among everyone's."""
    text = _acme_text().replace('scale = "0.1"', 'scale = "1"', 1)  # litres, not decilitres
    tenants = drivers.parse_driver(text, "tenant-a/acme_nb1.toml")
    drivers.install(tenants, "tenant-a")
    try:
        with drivers.scope("tenant-a"):
            assert decode_batch([ACME], RX).register_ml.tolist() == [1_234_567_000]
        for where in (None, "tenant-b"):
            with drivers.scope(where):
                assert decode_batch([ACME], RX).register_ml.tolist() == [123_456_700]
        assert tenants not in drivers.installed()
        assert drivers.installed("tenant-a") == (tenants,)
    finally:
        drivers.uninstall("acme_nb1", "tenant-a")
    with drivers.scope("tenant-a"):
        assert decode_batch([ACME], RX).register_ml.tolist() == [123_456_700]


def test_a_tenants_wmbus_driver_claims_only_in_its_scope() -> None:
    """A tenant's wM-Bus driver claims its model's frames only within its scope: an IZAR
    frame is decoded by it there, by the shipped IZAR driver elsewhere."""
    text = resources.files("decoder.drivers").joinpath("builtin/izar.toml").read_text()
    tenants = drivers.parse_driver(text.replace('name = "izar"', 'name = "izar_t"'), "t.toml")
    drivers.install(tenants, "tenant-a")
    try:
        with drivers.scope("tenant-a"):
            assert drivers.claims(IZAR_SAP) == "izar_t"
            assert mbus.decode([IZAR_SAP], np.array([RX])).extra[0]["driver"] == "izar_t"
        with drivers.scope("tenant-b"):
            assert drivers.claims(IZAR_SAP) == "izar"
        assert drivers.claims(IZAR_SAP) == "izar"
    finally:
        drivers.uninstall("izar_t", "tenant-a")
    with drivers.scope("tenant-a"):
        assert drivers.claims(IZAR_SAP) == "izar"
